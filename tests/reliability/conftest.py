"""Fixtures of the reliability suite, and the figures file it leaves behind.

Every test here is marked `reliability` (run them alone with `pytest -m reliability`); they need PostgreSQL,
the redis-server and redis-cli binaries (each test starts its own server on a free port) and start real Celery
processes. At the end of the session the figures of every scenario that ran are written to
`bench-results/reliability.json` and summarised in the terminal.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_missing
from tests.reliability.harness import FIGURES, SCALE, World

RESULTS = Path(__file__).resolve().parents[2] / "bench-results"


@pytest.fixture
def make_world(pg_url: str, sandbox_factory: Any, tmp_path: Path) -> Iterator[Callable[..., World]]:
    """`make_world(name, database_url=None, **emulator config)`: one world per test (on a fresh schema of the
    shared PostgreSQL unless `database_url` names another), closed (every process stopped) afterwards."""
    missing = [binary for binary in ("redis-server", "redis-cli") if shutil.which(binary) is None]
    if missing:
        service_missing(" and ".join(missing), "not installed; the suite starts and drives its own Redis server")
    made: list[World] = []

    def make(name: str, database_url: str | None = None, **sandbox_config: Any) -> World:
        assert not made, "one world per test"
        sandbox_config.setdefault("seed", 7)
        world = World.create(name, tmp_path, database_url or pg_url, sandbox_factory(**sandbox_config))
        made.append(world)
        return world

    yield make
    for world in made:
        world.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not FIGURES:
        return
    RESULTS.mkdir(exist_ok=True)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scale": SCALE,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "exit_status": int(exitstatus),
        "scenarios": FIGURES,
    }
    text = json.dumps(report, indent=2, sort_keys=False, default=str)
    (RESULTS / "reliability.json").write_text(text + "\n")
    (RESULTS / f"reliability-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    write = terminalreporter.write_line
    write("")
    write(f"reliability figures (RELIABILITY_SCALE={SCALE:g}; bench-results/reliability.json):")
    for name, fig in FIGURES.items():
        write(
            f"  {name}: {fig.get('seconds', '?')}s, kills {fig.get('kills', 0)}, "
            f"charges at Tpaga {fig.get('approved_at_tpaga', '?')}, double {fig.get('double_charges', '?')}, "
            f"lost {fig.get('lost_renewals', '?')}, ambiguous flagged {fig.get('ambiguous_flagged', '?')}"
        )
