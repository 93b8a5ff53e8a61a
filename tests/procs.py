"""Shared helpers for tests that drive real processes: a foreign sender that does not import this project, a
dedicated redis-server a test may restart or flush, a dump of what a Redis broker holds (message bodies
decoded), and polling with a useful failure message.

`tasks.testing` has the Celery side (a `celery -A tasks ...` subprocess in its own process group, a private
Redis database on a shared server, a free port); this module adds what the reliability suite needs on top.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tasks.testing import free_port, process_env

# A bare Celery app: no import of `billing` or `tasks`, routing by the documented queue names. Sends in
# threads when asked, so one message can arrive many times at once; `together` connects every thread first and
# releases them at a barrier, so the messages reach the broker within the same instant.
SENDER = textwrap.dedent(
    """
    import json, sys, threading
    from concurrent.futures import ThreadPoolExecutor
    from celery import Celery
    broker, sends, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    together = len(sys.argv) > 4 and sys.argv[4] == "together"
    app = Celery("someone-else", broker=broker)
    app.conf.broker_pool_limit = max(10, threads)
    barrier = None
    if together:
        threads = len(sends)
        connections = [app.pool.acquire(block=True) for _ in sends]
        for connection in connections:
            connection.ensure_connection(max_retries=3)
        for connection in connections:
            connection.release()
        barrier = threading.Barrier(len(sends))

    def send(spec):
        key, name, queue, args, kwargs = spec
        if barrier is not None:
            barrier.wait(30)
        return key, app.send_task(name, args=args, kwargs=kwargs, queue=queue).id

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            pairs = list(pool.map(send, sends))
    else:
        pairs = [send(spec) for spec in sends]
    assert not any(m.split(".")[0] in ("billing", "tasks") for m in sys.modules), "sender imported the project"
    print(json.dumps(pairs))
    """
)

Send = tuple[str, str, str, list[Any], dict[str, Any]]


def send_by_name(
    broker_url: str, sends: list[Send], *, threads: int = 1, together: bool = False
) -> list[tuple[str, str]]:
    """Run the foreign sender (a separate Python process); returns [(key, task id)] in the order given.
    `together`: one thread per message, all released at once (for duplicates that must race)."""
    mode = ["together"] if together else []
    out = subprocess.run(
        [sys.executable, "-c", SENDER, broker_url, json.dumps(sends), str(threads), *mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env=process_env({}) | {"PYTHONPATH": ""},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [(str(k), str(v)) for k, v in json.loads(out.stdout.strip().splitlines()[-1])]


def wait_until(check: Callable[[], Any], what: str, timeout_seconds: float = 30, interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_seconds}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A redis-server of the test's own on a free loopback port: safe to SHUTDOWN NOSAVE, restart and flush
    (never do that to a shared server). No persistence, like a cache node that lost its memory."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli must be installed")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._log = open(self.workdir / "redis-server.log", "ab")  # noqa: SIM115 - closed in _reap()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(lambda: self.cli("ping").strip() == "PONG", f"redis-server on port {self.port}", 10, 0.05)
        return self

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout

    def shutdown_nosave(self) -> None:
        """`redis-cli shutdown nosave`: the server exits and forgets every message it held."""
        self.cli("shutdown", "nosave")
        self._reap()

    def restart(self, down_seconds: float = 0.0) -> None:
        """Shut down without saving, stay down for `down_seconds`, start again on the same port."""
        self.shutdown_nosave()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1

    def flushall(self) -> None:
        assert self.cli("flushall").strip() == "OK"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cli("shutdown", "nosave")
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def dump(self) -> str:
        """Everything the server holds, as text, with kombu message bodies decoded (they travel in base64)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
        parts: list[str] = []
        try:
            for raw_key in client.scan_iter(count=1000):
                key = raw_key.decode(errors="replace")
                kind = client.type(raw_key).decode()
                values: list[bytes] = []
                if kind == "string":
                    values = [client.get(raw_key) or b""]
                elif kind == "list":
                    values = list(client.lrange(raw_key, 0, -1))
                elif kind == "hash":
                    for field, value in client.hgetall(raw_key).items():
                        values += [field, value]
                elif kind == "set":
                    values = list(client.smembers(raw_key))
                elif kind == "zset":
                    values = [member for member, _ in client.zrange(raw_key, 0, -1, withscores=True)]
                parts.append(f"== {kind} {key}")
                parts.extend(decode_broker_value(value) for value in values)
        finally:
            client.close()
        return "\n".join(parts)


def decode_broker_value(value: bytes) -> str:
    """A stored value as text; a kombu message (JSON, possibly wrapped in an unacked [message, exchange,
    routing key] triple) also shows its body decoded from base64."""
    text = value.decode(errors="replace")
    shown = [text]
    with contextlib.suppress(ValueError, TypeError):
        data = json.loads(text)
        candidates = [data, *(data if isinstance(data, list) else [])]
        for item in candidates:
            if isinstance(item, dict) and "body" in item:
                body = item["body"]
                encoding = (item.get("properties") or {}).get("body_encoding")
                if encoding == "base64" and isinstance(body, str):
                    shown.append(base64.b64decode(body).decode(errors="replace"))
    return "\n".join(shown)


class PostgresServer:
    """A PostgreSQL cluster of the test's own (initdb into a temporary directory, a free port, trust auth), so a
    test may restart it without disturbing anything else that uses the machine's server. As root, the
    server runs as the `postgres` user (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        found = str(bindir[-1]) if bindir else shutil.which("initdb")
        if found is None:
            raise RuntimeError("PostgreSQL's initdb is not installed")
        self.bindir = Path(found).parent
        self.port = free_port()
        self.datadir = Path(tempfile.mkdtemp(prefix="reliability-pg-"))
        self.output = Path(f"{self.datadir}.out")
        self.restarts = 0
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.datadir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        # Output to a file, never a pipe: a started postmaster keeps the descriptors it inherited open.
        with open(self.output, "ab") as out:
            subprocess.run([*self._as, *args], check=True, stdout=out, stderr=out, timeout=timeout, cwd="/")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        log = str(self.datadir / "server.log")
        self._run(str(self.bindir / "pg_ctl"), action, "-D", str(self.datadir), "-o", options, "-l", log, "-w", *extra)

    def start(self) -> PostgresServer:
        if not (self.datadir / "PG_VERSION").exists():
            self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres", "-A", "trust")
        self._pg_ctl("start")
        return self

    def restart(self) -> None:
        """A fast shutdown (every connection is cut) and a start, as a failover or a maintenance restart."""
        self._pg_ctl("restart", "-m", "fast")
        self.restarts += 1

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", "immediate", "-w")
        shutil.rmtree(self.datadir, ignore_errors=True)
        self.output.unlink(missing_ok=True)
