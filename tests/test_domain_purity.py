"""billing.domain is a functional core: no I/O libraries, no wall-clock reads."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import billing.domain

FORBIDDEN = ("sqlalchemy", "requests", "celery", "kombu", "tenacity", "aiohttp", "redis", "psycopg", "httpx")
DOMAIN_DIR = Path(billing.domain.__file__).parent
REPO_ROOT = DOMAIN_DIR.parents[1]
MODULES = sorted({f"billing.domain.{m.name}" for m in pkgutil.iter_modules([str(DOMAIN_DIR)])} | {"billing.domain"})
SOURCES = sorted(DOMAIN_DIR.glob("*.py"))


def test_the_domain_package_has_the_expected_modules() -> None:
    for name in ("money", "periods", "dunning", "refunds", "declines", "states"):
        assert f"billing.domain.{name}" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_domain_module_loads_no_io_library(module: str) -> None:
    script = (
        f"import importlib, json, sys\nimportlib.import_module({module!r})\nprint(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=REPO_ROOT
    )
    loaded = json.loads(result.stdout)
    offenders = [name for name in loaded if name.split(".")[0] in FORBIDDEN]
    assert offenders == [], f"{module} imports {offenders}"


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_domain_source_imports_an_io_library_even_lazily(path: Path) -> None:
    roots = _imported_roots(ast.parse(path.read_text(), filename=str(path)))
    assert roots.isdisjoint(FORBIDDEN), f"{path.name} imports {sorted(roots & set(FORBIDDEN))}"
    # the domain may lean on billing.domain only, not on config, clock or adapters
    billing_imports = {
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("billing")
    }
    assert all(name.startswith("billing.domain") for name in billing_imports), billing_imports


WALL_CLOCK_CALLS = {("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today")}
WALL_CLOCK_CALLS |= {("time", name) for name in ("time", "time_ns", "monotonic", "perf_counter", "localtime")}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_domain_source_reads_the_wall_clock(path: Path) -> None:
    calls = [
        (node.value.id, node.attr)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
    ]
    assert not [call for call in calls if call in WALL_CLOCK_CALLS], f"{path.name} reads the clock"
    assert "import time" not in path.read_text()
