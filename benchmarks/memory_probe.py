"""Where a worker's memory goes: one worker process charging burst after burst, probed between bursts.

    .venv/bin/python benchmarks/memory_probe.py                 # 10,000 charges per burst, 10 bursts at 50 ms
    .venv/bin/python benchmarks/memory_probe.py --trace         # also tracemalloc snapshots (much slower)

The same stack as `billing_bench.py` (PostgreSQL, Redis, the emulator, `celery -A tasks worker` and beat),
with `-I benchmarks.memprobe` in the worker: after each probe it prints the RSS and its parts (thread stacks,
glibc malloc arenas, the heap, other anonymous memory, files), Python's live objects and allocated blocks,
threads, the database connections, and the RSS after malloc_trim(0). With --trace, the growth between the
first probe after warm-up and the last is listed by source line (tracemalloc). The probes themselves collect
garbage and trim malloc, so the RSS figures of `billing_bench.py` (which does not probe) are the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import billing_bench as bb
from sqlalchemy import create_engine, text

DATABASE = "billing_memprobe"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=10_000, help="charges per burst")
    parser.add_argument("--bursts", type=int, default=10, help="measured bursts after two warm-up bursts")
    parser.add_argument("--latency", type=int, default=50, help="emulator latency in ms")
    parser.add_argument("--trace", action="store_true", help="tracemalloc in the worker (slow)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="billing-memprobe-") as tmp_name, bb.broker_db() as broker:
        tmp = Path(tmp_name)
        probes, logs = tmp / "probes", tmp / "logs"
        probes.mkdir()
        logs.mkdir()
        env = {"BENCH_MEMPROBE_DIR": str(probes), **({"BENCH_MEMPROBE_TRACE": "1"} if args.trace else {})}
        emulator = bb.Emulator()
        try:
            db_url = bb.recreate_database(DATABASE)
            from billing.db import migrate

            migrate.upgrade(db_url)
            bb.seed_database(db_url, bb.seed_cards(emulator.api_url, -(-args.subscriptions // 10)), args.subscriptions)
            schedule = bb.Schedule(create_engine(db_url, pool_size=2))
            admin = create_engine(bb.PG_ADMIN, pool_size=1)
            os.chdir(bb.ROOT)  # the worker imports benchmarks.memprobe
            stack = bb.Stack(db_url, broker, emulator, logs, extra_env=env, worker_args=["-I", "benchmarks.memprobe"])
            stack.start(1, "mem")
            pid = stack.worker_pids()[0]
            charged = 0

            def probe(label: str) -> dict[str, Any]:
                n = len(list(probes.glob("*.json")))
                os.kill(pid, signal.SIGUSR2)
                path = probes / f"{n}.json"
                while not path.exists():  # memprobe renames it into place once written
                    time.sleep(0.1)
                report = json.loads(path.read_text())
                with admin.connect() as conn:
                    report["db_connections"] = conn.execute(
                        text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": DATABASE}
                    ).scalar_one()
                parts = ", ".join(f"{k} {v / 1024:.1f}" for k, v in sorted(report["smaps_rss_kb"].items()) if v > 500)
                print(
                    f"{label:>22} after {charged:>7} charges: RSS {report['rss_kb'] / 1024:.1f} MB ({parts});"
                    f" after malloc_trim {report['rss_kb_after_malloc_trim'] / 1024:.1f} MB;"
                    f" objects {report['objects']}, blocks {report['allocated_blocks']},"
                    f" threads {report['threads']}, db connections {report['db_connections']}",
                    flush=True,
                )
                return report

            reports = [probe("ready")]
            for latency in (0, args.latency):
                emulator.set_latency(latency)
                charged += bb.e2e_run(stack, schedule, args.subscriptions, 600)["charges"]
            reports.append(probe("warm-up (2 bursts)"))
            for n in range(args.bursts):
                run = bb.e2e_run(stack, schedule, args.subscriptions, 600)
                charged += run["charges"]
                assert run["correct"], run
                reports.append(probe(f"burst {n + 1}"))
            stack.stop()
            first, last = reports[1], reports[-1]
            print(
                f"\nfrom warm-up to the end: RSS {first['rss_kb'] / 1024:.1f} -> {last['rss_kb'] / 1024:.1f} MB"
                f" ({100 * (last['rss_kb'] / first['rss_kb'] - 1):+.1f} %), objects {first['objects']} ->"
                f" {last['objects']}, threads {first['threads']} -> {last['threads']}"
            )
            if args.trace:
                ready, warm = (tracemalloc.Snapshot.load(str(probes / f"{n}.snapshot")) for n in (0, 1))
                last = tracemalloc.Snapshot.load(str(probes / f"{len(reports) - 1}.snapshot"))
                for title, a, b in (("from ready to warm-up", ready, warm), ("from warm-up to the end", warm, last)):
                    print(f"traced Python memory growth {title}, by line (top 15):")
                    for stat in b.compare_to(a, "lineno")[:15]:
                        print(f"  {stat}")
            bb.drop_database(DATABASE)
        finally:
            emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
