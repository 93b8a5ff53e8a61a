"""Rules the test suite keeps about itself: every skip goes through `tests.conftest.service_missing`, so that
BILLING_TEST_REQUIRE_SERVICES=1 (CI) turns it into a failure instead of a green run that tested less."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SKIP_NAMES = {"skip", "skipif", "importorskip", "xfail"}
# Selected by its own variable, not a missing service: .ci/run sets RELIABILITY_PG_RESTART=1.
OPT_INS = {("reliability/test_4_database.py", "skipif")}


def _skips(path: Path) -> list[tuple[str, int]]:
    """(name, line) of every pytest.skip/skipif/importorskip/xfail reference, called or used as a marker."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in SKIP_NAMES:
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "pytest":
                found.append((node.attr, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module == "pytest":
            found.extend((alias.name, node.lineno) for alias in node.names if alias.name in SKIP_NAMES)
    return found


def test_every_skip_goes_through_service_missing() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        relative = path.relative_to(TESTS).as_posix()
        for name, line in _skips(path):
            if relative == "conftest.py" or (relative, name) in OPT_INS:
                continue
            offenders.append(f"tests/{relative}:{line}: pytest.{name}")
    assert offenders == [], "skip through tests.conftest.service_missing instead:\n" + "\n".join(offenders)


def test_the_rule_sees_each_kind_of_skip(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "import pytest\nfrom pytest import importorskip\n"
        "pytestmark = pytest.mark.skipif(True, reason='x')\n"
        "def test_a():\n    pytest.skip('x')\n"
    )
    assert sorted(_skips(sample)) == [("importorskip", 2), ("skip", 5), ("skipif", 3)]
