"""The README's main job: `billing demo` in an empty directory, on the embedded default, with real processes, twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_demo_runs_months_of_billing_and_the_ledger_agrees_with_the_database(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "CELERY_", "TPAGA_", "BILLING_"))}
    out = _demo(tmp_path, env)
    # every scenario of the demo happened
    assert "recovers on retry" in out and "voided" in out and "expired" in out
    assert "43        hard      declined" in out and "9999      unknown   unknown" in out
    # the webhook receiver got the stream: every event, verified, each subscription's in order
    assert "every event reached the receiver, in order" in out
    received = out.split("Events the webhook receiver got:")[1]
    assert re.search(r"^ +\d+  invoice\.paid$", received, re.M)
    assert re.search(r"^ +\d+  in all \(\d+ requests to endpoint \d+, every signature verified,", received, re.M)
    assert re.search(r"^ +\d+  subscription\.created$", received, re.M)
    # The first lines arrive from concurrent deliveries: a subscription's event with its seq, or a customer's.
    assert re.search(r"^ +200  #\d+  [a-z]+\.[a-z_]+  (sub \d+ seq \d+|customer_id=\d+)  ", received, re.M)
    # Counts and durations read as a person writes them, not as Python's dict and timedelta print
    assert re.search(r"^\[demo\]   invoices (\w+ \d+, )*paid \d+", out, re.M)
    assert re.search(r"^\[demo\] clock \+1 day 5 min -> ", out, re.M)
    assert re.search(r"^\[demo\] a refund asked \d+ days( \d+ h)?( \d+ min)? after approval: expired$", out, re.M)
    assert "{" not in out.split("Ledger reconciliation:")[0] and " days, " not in out
    logs = (tmp_path / "demo-logs" / "worker.log").read_text()
    assert "d13fr8n7vhvkuch3lq2ds5qhjnd2pdd2" not in logs  # the private key never reaches the worker's log

    # A second run in the same directory starts from fresh state of its own (the emulator is new each time, and
    # a kept database with the first run's advanced clock would disagree with it), and never uses the
    # configured database: the README's later commands find it as they left it.
    mine = tmp_path / "mine.db"
    again = _demo(tmp_path, env | {"DATABASE_URL": f"sqlite:///{mine}"})
    assert "OK: ledger and database agree" in again
    assert not mine.exists() and not (tmp_path / "billing.db").exists()
    assert not (tmp_path / "celery-broker.db").exists()
    state = re.search(r"^\[demo\] fresh state in (\S+) ", again, re.M)
    assert state is not None and not Path(state.group(1)).exists()  # removed once the demo succeeded
    assert "seeded 15 subscriptions" in again  # not 30: nothing of the first run was kept


def _demo(cwd: Path, env: dict[str, str]) -> str:
    billing = Path(sys.executable).with_name("billing")
    proc = subprocess.run(
        [str(billing), "demo", "--months", "1"], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "OK: ledger and database agree" in out
    return out
