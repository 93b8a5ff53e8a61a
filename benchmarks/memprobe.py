"""Memory probe for a worker: `celery -A tasks worker -I benchmarks.memprobe` with BENCH_MEMPROBE_DIR set.

Each SIGUSR2 writes BENCH_MEMPROBE_DIR/<n>.json: the RSS, the size of Python's live objects by type, and the
RSS after glibc's malloc_trim(0) (memory malloc held but no object used). With BENCH_MEMPROBE_TRACE=1 it
also starts tracemalloc at import and writes a snapshot, <n>.snapshot, to compare two with
`Snapshot.compare_to`. Benchmark-only: the product never imports it.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import itertools
import json
import os
import signal
import sys
import threading
import tracemalloc
from pathlib import Path
from types import FrameType

DIRECTORY = os.environ.get("BENCH_MEMPROBE_DIR")
_counter = itertools.count()


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def _smaps_kb() -> dict[str, int]:
    """Resident kB by kind of mapping: thread stacks (8 MiB anonymous maps with a guard page), glibc's
    per-thread malloc arenas (64 MiB reservations), the main heap, file-backed (code, libraries), other."""
    groups: collections.Counter[str] = collections.Counter()
    kind = "other"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            size_kb = (end - start) // 1024
            path = fields[5] if len(fields) > 5 else ""
            if path == "[heap]":
                kind = "heap"
            elif path.startswith("/"):
                kind = "files"
            elif path:
                kind = path
            elif size_kb in (8192, 8196):
                kind = "thread stacks"
            elif size_kb <= 65536 and start % (64 * 1024 * 1024) == 0:
                kind = "malloc arenas"
            else:
                kind = "other anonymous"
        elif fields[0] == "Rss:":
            groups[kind] += int(fields[1])
    return dict(groups)


def _dump(signum: int, frame: FrameType | None) -> None:
    assert DIRECTORY is not None
    n = next(_counter)
    gc.collect()
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(str(Path(DIRECTORY) / f"{n}.snapshot"))
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    before = _rss_kb()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    report = {
        "rss_kb": before,
        "smaps_rss_kb": _smaps_kb(),
        "allocated_blocks": sys.getallocatedblocks(),
        "rss_kb_after_malloc_trim": _rss_kb(),
        "threads": threading.active_count(),
        "objects": sum(types.values()),
        "types": dict(types.most_common(60)),
    }
    # Written aside and renamed: whoever waits for <n>.json never reads half a file.
    partial = Path(DIRECTORY) / f"{n}.json.partial"
    partial.write_text(json.dumps(report))
    partial.replace(Path(DIRECTORY) / f"{n}.json")


if DIRECTORY:
    if os.environ.get("BENCH_MEMPROBE_TRACE") == "1":
        tracemalloc.start(int(os.environ.get("BENCH_MEMPROBE_FRAMES", "1")))
    signal.signal(signal.SIGUSR2, _dump)
