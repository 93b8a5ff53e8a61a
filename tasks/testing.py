"""Test support for real Celery processes: a `celery -A tasks ...` subprocess in its own process group with
its output in a file, a private Redis database, a free port. Used by the test suite and handy for the
reliability suite; nothing here runs in production."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Variables a developer's shell or `.env` may hold that must not leak into a test's worker.
_SCRUBBED = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "TPAGA_API_URL",
    "TPAGA_PRIVATE_KEY",
    "TPAGA_PUBLIC_KEY",
    "BILLING_CLOCK",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The current environment minus billing settings, plus `extra`, with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith(("BILLING_", "FLOWER_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class CeleryProcess:
    """`python -m celery -A tasks <args>` in a new session (so the whole group can be signalled); `app` names
    another Celery app (a test's foreign consumer)."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None, app: str = "tasks"
    ) -> None:
        self.app = app
        self.args = list(args)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> CeleryProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", self.app, *self.args],
            env=self.env,
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout_seconds: float = 30.0) -> re.Match[str]:
        """Wait until the output matches `pattern`; fail with the output if the process dies or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            match = regex.search(self.log_text())
            if match:
                return match
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_text()[-4000:]
                raise RuntimeError(f"celery {self.args[0]} exited ({self.proc.returncode}):\n{tail}")
            time.sleep(0.1)
        raise TimeoutError(
            f"no {pattern!r} from celery {self.args[0]} in {timeout_seconds}s:\n{self.log_text()[-4000:]}"
        )

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """SIGTERM the process group (warm shutdown), SIGKILL it if it lingers."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc is not None:
            # Children of a killed leader (prefork pool processes) share its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> CeleryProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def worker(env: Mapping[str, str], log_path: Path, *extra: str, name: str | None = None) -> CeleryProcess:
    """A worker on all four queues, threads pool, INFO log; `extra` adds or overrides CLI flags."""
    hostname = name or f"test-{uuid.uuid4().hex[:8]}@%h"
    args = ["worker", "--loglevel", "INFO", "--pool", "threads", "--concurrency", "8", "-n", hostname]
    args += ["--without-mingle", "--without-gossip", *extra]
    return CeleryProcess(args, env, log_path)


@contextlib.contextmanager
def private_redis_db(base_url: str, first: int = 15, last: int = 4) -> Iterator[str]:
    """A Redis database number nobody else is using (claimed with SET NX), flushed before and after."""
    import redis

    token = uuid.uuid4().hex
    base = base_url.rsplit("/", 1)[0] if re.search(r"/\d+$", base_url) else base_url.rstrip("/")
    for db in range(first, last - 1, -1):
        client = redis.Redis.from_url(f"{base}/{db}")
        if client.set("billing-test:claim", token, nx=True, ex=900):
            try:
                client.flushdb()
                client.set("billing-test:claim", token, ex=900)
                yield f"{base}/{db}"
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    raise RuntimeError(f"no free Redis database between {last} and {first} on {base}")
