"""benchmarks/dunning_sim.py: seeded (the same seed gives the same table) and clear about bad parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dunning_sim


def table(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert dunning_sim.main(["--customers", "300", *args]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]


def test_the_same_seed_gives_the_same_table_and_another_seed_another(capsys: pytest.CaptureFixture[str]) -> None:
    first = table(capsys, "--seed", "5")
    assert len(first) == 4 and [row.split(" | ")[0] for row in first[1:]] == [
        "| fixed (1,3,5,7)",
        "| fixed over 21 days (1,3,5,7,10,14,21)",
        "| colombia",
    ]
    assert table(capsys, "--seed", "5") == first
    assert table(capsys, "--seed", "6") != first


def test_nobody_paid_means_nothing_recovered(capsys: pytest.CaptureFixture[str]) -> None:
    rows = table(capsys, "--semimonthly", "0", "--monthly", "0")
    assert all(row.split(" | ")[1] == "0.0%" for row in rows[1:])


@pytest.mark.parametrize(
    "args",
    [["--customers", "0"], ["--semimonthly", "0.8", "--monthly", "0.3"], ["--funds-days-min", "0"]],
)
def test_bad_parameters_are_refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dunning_sim.main(args)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
