"""The benchmark table and its JSON, from made-up figures (no benchmark runs here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench import run
from tests.bench.table import (
    Goal,
    Machine,
    Row,
    describe_machine,
    differences,
    ratios,
    render,
    row,
    to_json,
    write_json,
)

MACHINE = Machine("Test CPU 9000", 2, 23.4, "b1234 (cache)", (1.5, 1.25, 0.75), "3.11.2")


def test_goals_compare_the_median_with_their_bound() -> None:
    assert Goal(">=", 0.98).met(0.98) and not Goal(">=", 0.98).met(0.979)
    assert Goal("<=", 2.0).met(2.0) and not Goal("<=", 2.0).met(2.01)
    assert Goal("<", 2.0).met(1.99) and not Goal("<", 2.0).met(2.0)
    figure = row("s", "ratio", "", [0.90, 0.99, 0.99], "direct 10 tok/s", Goal(">=", 0.98))
    assert figure.median == 0.99 and figure.spread == (0.90, 0.99) and figure.met is True
    assert row("s", "ratio", "", [0.5, 0.97, 0.99], "", Goal(">=", 0.98)).met is False
    assert row("s", "no goal", "s", [1.0]).met is None
    assert row("s", "no samples", "s", [], "", Goal("<", 2.0)).met is None


def test_ratios_and_differences_pair_each_round_with_its_reference() -> None:
    assert ratios([9.0, 20.0], [10.0, 20.0]) == [0.9, 1.0]
    assert ratios([1.0], [0.0]) == []  # no reference figure, no ratio
    assert differences([1.5, 2.0], [1.0, 1.0]) == [0.5, 1.0]
    with pytest.raises(ValueError):
        ratios([1.0, 2.0], [1.0])


def test_the_table_shows_the_machine_each_figure_its_goal_and_verdict() -> None:
    rows = [
        row(
            "real model",
            "local: tokens/s ratio",
            "",
            [0.97, 0.99, 1.0],
            "direct 40.1 tok/s",
            Goal(">=", 0.98),
        ),
        row("membership", "kill -9 → dead", "s", [2.5, 3.0, 3.5], "", Goal("<=", 2.0)),
        row("gossip", "50 nodes: bytes/s", "B/s", [1500.0, 1512.0]),
    ]
    text = render(MACHINE, rows, "full")
    lines = text.splitlines()
    assert "Test CPU 9000, 2 cores, 23.4 GB RAM, llama.cpp b1234 (cache)" in lines[1]
    assert "1.50, 1.25, 0.75" in lines[2]
    local = next(line for line in lines if line.startswith("| local"))
    assert local.split(" | ")[1:] == ["0.990", "0.970–1.00", "3", "direct 40.1 tok/s", "≥ 0.98",
                                       "met |"]  # fmt: skip
    kill = next(line for line in lines if line.startswith("| kill"))
    assert "| 3.00 s |" in kill and "| ≤ 2 s |" in kill and kill.endswith("| NOT met |")
    gossip = next(line for line in lines if line.startswith("| 50 nodes"))
    assert "1,506 B/s" in gossip and gossip.endswith("|  |")
    assert sum(line.startswith("| **") for line in lines) == 3  # one header per section
    assert lines[-1] == "goals met: 1 of 2"


def test_the_json_holds_the_same_figures(tmp_path: Path) -> None:
    rows = [
        row("a", "ratio", "", [0.9, 1.0], "ref", Goal(">=", 0.95)),
        row("a", "empty", "s", []),
    ]
    path = tmp_path / "bench.json"
    write_json(path, MACHINE, rows, "quick")
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(to_json(MACHINE, rows, "quick")))
    assert data["mode"] == "quick" and data["machine"]["cores"] == 2
    first, empty = data["rows"]
    assert first["median"] == pytest.approx(0.95) and first["met"] is True
    assert first["goal"] == {"op": ">=", "bound": 0.95} and first["samples"] == [0.9, 1.0]
    assert empty["median"] is None and empty["met"] is None and empty["goal"] is None


def test_the_machine_description_reads_this_machine() -> None:
    machine = describe_machine("b1")
    assert machine.cores >= 1 and machine.ram_gb > 0 and machine.cpu
    assert len(machine.load_average) == 3


def test_the_driver_prints_one_table_and_writes_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The driver with its measurements replaced by fixed rows: one table, one JSON file."""

    def fixed(name: str, goal: Goal | None) -> object:
        return lambda _plan: [row(name, f"{name} figure", "s", [1.0, 3.0], "", goal)]

    monkeypatch.setattr(run, "llama_build", lambda: "b0 (test)")
    for name, goal in (
        ("solo_rows", Goal("<", 2.0)),
        ("split_rows", None),
        ("proxy_rows", None),
        ("mesh_rows", Goal("<=", 1.0)),
        ("gossip_rows", None),
    ):
        monkeypatch.setattr(run, name, fixed(name, goal))
    out = tmp_path / "out.json"
    assert run.main(["--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| figure | median |") == 1
    assert "goals met: 0 of 2" in printed  # medians 2.0: not < 2, not ≤ 1
    data = json.loads(out.read_text())
    assert data["mode"].startswith("quick")
    assert [r["name"] for r in data["rows"]] == [
        f"{n} figure" for n in ("solo_rows", "split_rows", "proxy_rows", "mesh_rows", "gossip_rows")
    ]


def test_a_failing_benchmark_is_a_row_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(_plan: run.Plan) -> list[Row]:
        raise RuntimeError("llama-server not ready:\n  argv")

    monkeypatch.setattr(run, "llama_build", lambda: "b0 (test)")
    for name in ("solo_rows", "proxy_rows", "mesh_rows", "gossip_rows"):
        monkeypatch.setattr(run, name, lambda _plan, n=name: [row(n, f"{n} figure", "s", [1.0])])
    monkeypatch.setattr(run, "split_rows", broken)
    out = tmp_path / "out.json"
    assert run.main(["--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5
    failed = rows[1]
    assert failed["section"] == "split" and failed["name"] == "FAILED"
    assert failed["reference"] == "RuntimeError: llama-server not ready: argv"
    assert failed["median"] is None and failed["samples"] == []
    assert "| FAILED | - |" in capsys.readouterr().out
