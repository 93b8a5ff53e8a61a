"""Load test of the Tpaga sandbox emulator: requests/s of `POST charge/credit_card` over real loopback HTTP.

The emulator runs as `billing sandbox` in its own process, pinned to one CPU core; this process is the load
generator (an aiohttp client with N keep-alive connections), pinned to another core when there is one. Each run
is bounded by a request count and a duration; the report gives the median over runs. The server's own CPU time
is read from /proc, so "server CPU" shows whether the server (not the client) was the bottleneck.

    .venv/bin/python benchmarks/sandbox_load.py                     # both default scenarios, 3 runs each
    .venv/bin/python benchmarks/sandbox_load.py --scenario 0:64 --runs 5 --requests 30000
    .venv/bin/python benchmarks/sandbox_load.py --scenario 50:1000 --duration 15

A scenario is LATENCY_MS:CONNECTIONS. Loopback only, by design.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

HOST = "127.0.0.1"
PRIVATE_KEY = "d13fr8n7vhvkuch3lq2ds5qhjnd2pdd2"
PUBLIC_KEY = "pk_test_qvbvuthlvqpijnr0elmtg5jh"
DEFAULT_SCENARIOS = ("0:64", "50:1000")


def _basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


@dataclass
class RunResult:
    requests: int
    errors: int
    seconds: float
    server_cpu_seconds: float
    client_cpu_seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def server_cpu_share(self) -> float:
        return self.server_cpu_seconds / self.seconds

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Emulator:
    """`billing sandbox` as a child process, pinned to one core."""

    def __init__(self, latency_ms: int, cpu: int | None) -> None:
        self.port = _free_port()
        command = [sys.executable, "-c", "from billing.cli import main; main()", "sandbox"]
        command += ["--host", HOST, "--port", str(self.port), "--latency-ms", str(latency_ms)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TPAGA_SANDBOX_")}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        if cpu is not None:
            os.sched_setaffinity(self.process.pid, {cpu})
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=30)
        except queue.Empty:
            self.stop()
            raise SystemExit("the emulator did not print its listening line within 30 s") from None
        if "listening" not in line:
            self.stop()
            raise SystemExit(f"unexpected first line from the emulator: {line!r}")
        self.base = f"http://{HOST}:{self.port}/"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _setup_card(session: aiohttp.ClientSession, base: str) -> str:
    """Reset the emulator and create one approving card; returns its id."""
    async with session.post(base + "__sandbox/reset") as response:
        response.raise_for_status()
    api = base + "api/"
    async with session.post(api + "customer", json={}, headers=_basic(PRIVATE_KEY)) as response:
        customer = (await response.json())["id"]
    card = {
        "primaryAccountNumber": "4111111111111111",
        "expirationMonth": "12",
        "expirationYear": str(datetime.now(UTC).year + 3),
        "cardHolderName": "Load Test",
    }
    async with session.post(api + "tokenize/credit_card", json=card, headers=_basic(PUBLIC_KEY)) as response:
        token = (await response.json())["token"]
    path = f"customer/{customer}/credit_card_token"
    async with session.post(api + path, json={"token": token}, headers=_basic(PRIVATE_KEY)) as response:
        return str((await response.json())["id"])


@dataclass
class ClientShare:
    requests: int
    errors: int
    started: float  # time.time(), comparable across processes
    finished: float
    cpu_seconds: float
    latencies_ms: list[float]


async def _load(url: str, body: bytes, connections: int, max_requests: int, max_seconds: float) -> ClientShare:
    """Closed-loop load: `connections` workers, each sending its next request when the last answer is read."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {**_basic(PRIVATE_KEY), "Content-Type": "application/json"}
    latencies: list[float] = []
    counters = {"sent": 0, "errors": 0}
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
    ) as session:
        deadline = time.monotonic() + max_seconds

        async def worker() -> None:
            while counters["sent"] < max_requests and time.monotonic() < deadline:
                counters["sent"] += 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        ok = response.status == 201
                except aiohttp.ClientError:
                    ok = False
                latencies.append((time.perf_counter() - started) * 1000)
                if not ok:
                    counters["errors"] += 1

        cpu_before, wall_before = time.process_time(), time.time()
        await asyncio.gather(*(worker() for _ in range(connections)))
        cpu, wall_after = time.process_time() - cpu_before, time.time()
    return ClientShare(len(latencies), counters["errors"], wall_before, wall_after, cpu, latencies)


def _client_process(
    url: str, body: bytes, connections: int, max_requests: int, max_seconds: float, cpus: set[int] | None, out: Any
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    out.put(asyncio.run(_load(url, body, connections, max_requests, max_seconds)))


def _one_run(
    emulator: Emulator,
    connections: int,
    max_requests: int,
    max_seconds: float,
    processes: int,
    client_cpus: set[int] | None,
) -> RunResult:
    card_id = asyncio.run(_fresh_card(emulator.base))
    url = emulator.base + "api/charge/credit_card"
    body = json.dumps({"creditCard": card_id, "amount": 4500, "currency": "COP", "installments": 1}).encode()
    cpu_before = _cpu_seconds(emulator.process.pid)
    if processes == 1:
        shares = [asyncio.run(_load(url, body, connections, max_requests, max_seconds))]
    else:
        context = multiprocessing.get_context("fork")
        out = context.Queue()
        children = [
            context.Process(
                target=_client_process,
                args=(
                    url,
                    body,
                    max(1, connections // processes),
                    max_requests // processes,
                    max_seconds,
                    client_cpus,
                    out,
                ),
            )
            for _ in range(processes)
        ]
        for child in children:
            child.start()
        shares = [out.get(timeout=max_seconds + 120) for _ in children]
        for child in children:
            child.join()
    server_cpu = _cpu_seconds(emulator.process.pid) - cpu_before
    seconds = max(s.finished for s in shares) - min(s.started for s in shares)
    return RunResult(
        requests=sum(s.requests for s in shares),
        errors=sum(s.errors for s in shares),
        seconds=seconds,
        server_cpu_seconds=server_cpu,
        client_cpu_seconds=sum(s.cpu_seconds for s in shares),
        latencies_ms=[ms for s in shares for ms in s.latencies_ms],
    )


async def _fresh_card(base: str) -> str:
    async with aiohttp.ClientSession() as session:
        return await _setup_card(session, base)


def _scenario(text: str) -> tuple[int, int]:
    latency, _, connections = text.partition(":")
    try:
        parsed = int(latency), int(connections)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a scenario is LATENCY_MS:CONNECTIONS, got {text!r}") from None
    if parsed[0] < 0 or parsed[1] < 1:
        raise argparse.ArgumentTypeError(f"latency must be >= 0 and connections >= 1, got {text!r}")
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", type=_scenario, action="append", help="LATENCY_MS:CONNECTIONS (repeatable)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario; the median is reported")
    parser.add_argument("--requests", type=int, default=20000, help="request cap per run")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds cap per run")
    parser.add_argument("--server-cpu", type=int, default=0, help="core for the emulator (-1: do not pin)")
    parser.add_argument(
        "--client-cpu", type=int, default=1, help="core for the load generator (-1: every core but the server's)"
    )
    parser.add_argument(
        "--client-processes", type=int, default=1, help="load generator processes (for machines with spare cores)"
    )
    args = parser.parse_args()
    scenarios = args.scenario or [_scenario(s) for s in DEFAULT_SCENARIOS]
    cores = os.cpu_count() or 1
    server_cpu = args.server_cpu if 0 <= args.server_cpu < cores else None
    if 0 <= args.client_cpu < cores and args.client_cpu != server_cpu:
        client_cpus: set[int] | None = {args.client_cpu}
    else:
        client_cpus = set(range(cores)) - {server_cpu} if server_cpu is not None and cores > 1 else None
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    print(
        f"cores={cores} server core={server_cpu} client cores={sorted(client_cpus or [])} "
        f"client processes={args.client_processes} python={sys.version.split()[0]}"
    )

    for latency_ms, connections in scenarios:
        emulator = Emulator(latency_ms, server_cpu)
        try:
            results = []
            for run in range(1, args.runs + 1):
                result = _one_run(
                    emulator, connections, args.requests, args.duration, args.client_processes, client_cpus
                )
                results.append(result)
                print(
                    f"  latency={latency_ms}ms connections={connections} run {run}: "
                    f"{result.requests} requests in {result.seconds:.2f}s = {result.rate:,.0f} req/s, "
                    f"errors={result.errors}, p50={result.percentile(0.5):.1f}ms p99={result.percentile(0.99):.1f}ms, "
                    f"server CPU {result.server_cpu_share:.0%} of one core, "
                    f"client CPU {result.client_cpu_seconds / result.seconds:.0%}",
                    flush=True,
                )
        finally:
            emulator.stop()
        rates = [r.rate for r in results]
        per_cpu = [r.requests / r.server_cpu_seconds for r in results if r.server_cpu_seconds > 0]
        summary = f"latency={latency_ms}ms connections={connections}: median {statistics.median(rates):,.0f} req/s"
        if per_cpu:
            summary += f" ({statistics.median(per_cpu):,.0f} req per server CPU-second)"
        print(summary, flush=True)


if __name__ == "__main__":
    main()
