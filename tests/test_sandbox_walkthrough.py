"""docs/sandbox.md's walkthrough, run as written: its shell block against a live emulator, its printed output
compared line by line, and its Python block; so the copy-paste path from `billing sandbox` to a paid subscription
cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import requests

from billing.sandbox import SandboxThread
from tasks.testing import process_env

DOC = Path(__file__).resolve().parents[1] / "docs" / "sandbox.md"
DOC_ADDRESS = "127.0.0.1:8090"  # where the doc's `billing sandbox` listens; the test's emulator is elsewhere


def _block(marker: str, end: str | None = None) -> str:
    """The first fenced block after `<!-- walkthrough: MARKER -->` (all of them up to `END`'s marker if given)."""
    text = DOC.read_text()
    start = text.index(f"<!-- walkthrough: {marker} -->")
    stop = text.index(f"<!-- walkthrough: {end} -->", start) if end else len(text)
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```$", text[start:stop], re.M | re.S)
    assert blocks, f"no code block after the {marker} marker in {DOC}"
    return "\n".join(blocks) if end else blocks[0]


def _pattern(line: str) -> re.Pattern[str]:
    return re.compile(".+?".join(re.escape(part) for part in line.split("…")))


def _env() -> dict[str, str]:
    """A shell like a new user's: no billing settings of the test run's, the virtualenv's `bin` first."""
    env = process_env({})
    env = {k: v for k, v in env.items() if not k.startswith(("TPAGA_", "DATABASE_URL"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def test_the_walkthrough_ends_with_a_paid_subscription_and_prints_what_the_doc_shows(
    sandbox: SandboxThread, tmp_path: Path
) -> None:
    script = _block("start", "end")
    assert DOC_ADDRESS in script and "tokenize/credit_card" in script
    here = urlsplit(sandbox.base_url).netloc
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace(DOC_ADDRESS, here)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Every line the doc says it prints, in that order
    printed = done.stdout.splitlines()
    position = 0
    for line in _block("output").splitlines():
        pattern = _pattern(line)
        found = next((i for i in range(position, len(printed)) if pattern.fullmatch(printed[i])), None)
        assert found is not None, f"the doc shows {line!r}, the walkthrough printed:\n{done.stdout}"
        position = found + 1

    # The answer shape the doc gives for tokenize, and the emulator's own record of one approved charge
    token = (tmp_path / "token.json").read_text()
    assert re.fullmatch(r'\{"token":"[0-9a-z]{32}","used":false\}', token), token
    ledger = requests.get(sandbox.base_url + "__sandbox/ledger", timeout=10).json()
    assert [(c["orderId"], c["paid"], c["errorCode"]) for c in ledger["charges"]] == [("inv1-a1", True, "00")]
    # ... and it used its own database, not the default billing.db
    assert (tmp_path / "walkthrough.db").exists() and not (tmp_path / "billing.db").exists()


def test_the_walkthroughs_python_tokenize_call_works_as_written(sandbox: SandboxThread, tmp_path: Path) -> None:
    env = _env() | {
        "TPAGA_API_URL": sandbox.api_url,
        "TPAGA_PUBLIC_KEY": "pk_test_qvbvuthlvqpijnr0elmtg5jh",
    }
    done = subprocess.run(
        [sys.executable, "-c", _block("python")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"\{'token': '[0-9a-z]{32}', 'used': False\}\n", done.stdout), done.stdout
