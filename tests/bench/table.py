"""The one benchmark table: rows with their goals, the machine, text and JSON output.

Pure: no process, no clock. `tests/bench/run.py` measures and fills it; the unit tier checks
the formatting and the goal verdicts without running a benchmark.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Comparison = Literal[">=", "<=", "<"]


@dataclass(frozen=True, slots=True)
class Goal:
    """`value <op> bound`, e.g. a ratio ≥ 0.98 or a detection time ≤ 2 s."""

    op: Comparison
    bound: float

    def met(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.bound
        if self.op == "<=":
            return value <= self.bound
        return value < self.bound

    def text(self, unit: str) -> str:
        sign = {">=": "≥", "<=": "≤", "<": "<"}[self.op]
        return f"{sign} {self.bound:g}{(' ' + unit) if unit else ''}"


@dataclass(frozen=True, slots=True)
class Row:
    """One figure: the median of `samples`, its spread (min–max), and what it is compared to."""

    section: str
    name: str
    unit: str
    samples: tuple[float, ...]
    reference: str = ""
    """What the figure is measured against in the same run, e.g. `direct 41.2 tok/s`."""
    goal: Goal | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.samples), max(self.samples)) if self.samples else (0.0, 0.0)

    @property
    def met(self) -> bool | None:
        if self.goal is None or not self.samples:
            return None
        return self.goal.met(self.median)


def row(
    section: str,
    name: str,
    unit: str,
    samples: Sequence[float],
    reference: str = "",
    goal: Goal | None = None,
) -> Row:
    return Row(section, name, unit, tuple(float(s) for s in samples), reference, goal)


def ratios(values: Sequence[float], references: Sequence[float]) -> list[float]:
    """Per-round ratios of a leg to its reference leg measured in the same round."""
    return [v / r for v, r in zip(values, references, strict=True) if r > 0]


def differences(values: Sequence[float], references: Sequence[float]) -> list[float]:
    return [v - r for v, r in zip(values, references, strict=True)]


@dataclass(frozen=True, slots=True)
class Machine:
    cpu: str
    cores: int
    ram_gb: float
    llama_cpp: str
    load_average: tuple[float, float, float]
    python: str


def describe_machine(llama_cpp: str) -> Machine:
    """The machine this run is on (Linux: /proc for the CPU model and RAM)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    one, five, fifteen = os.getloadavg()
    return Machine(
        cpu, os.cpu_count() or 1, ram_gb, llama_cpp, (one, five, fifteen), platform.python_version()
    )


def _number(value: float) -> str:
    if value != value:  # NaN
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: ""}[met]


def render(machine: Machine, rows: Sequence[Row], mode: str) -> str:
    """The table as plain text (Markdown-compatible), machine first."""
    load = ", ".join(f"{x:.2f}" for x in machine.load_average)
    lines = [
        f"mesh-llm benchmark ({mode})",
        f"machine: {machine.cpu}, {machine.cores} cores, {machine.ram_gb:.1f} GB RAM, "
        f"llama.cpp {machine.llama_cpp}, Python {machine.python}",
        f"load average at start (1/5/15 min): {load}",
        "",
        "| figure | median | spread (min–max) | n | measured against (same run) | goal | |",
        "|---|---|---|---|---|---|---|",
    ]
    section = ""
    for item in rows:
        if item.section != section:
            section = item.section
            lines.append(f"| **{section}** | | | | | | |")
        low, high = item.spread
        unit = f" {item.unit}" if item.unit else ""
        goal = item.goal.text(item.unit) if item.goal else ""
        lines.append(
            f"| {item.name} | {_number(item.median)}{unit} | {_number(low)}–{_number(high)} "
            f"| {len(item.samples)} | {item.reference} | {goal} | {_verdict(item.met)} |"
        )
    goals = [item for item in rows if item.met is not None]
    met = sum(1 for item in goals if item.met)
    lines += ["", f"goals met: {met} of {len(goals)}"]
    return "\n".join(lines)


def to_json(machine: Machine, rows: Sequence[Row], mode: str) -> dict[str, object]:
    return {
        "mode": mode,
        "machine": asdict(machine),
        "rows": [
            {
                "section": item.section,
                "name": item.name,
                "unit": item.unit,
                "median": item.median if item.samples else None,
                "min": item.spread[0] if item.samples else None,
                "max": item.spread[1] if item.samples else None,
                "samples": list(item.samples),
                "reference": item.reference,
                "goal": None
                if item.goal is None
                else {"op": item.goal.op, "bound": item.goal.bound},
                "met": item.met,
            }
            for item in rows
        ],
    }


def write_json(path: Path, machine: Machine, rows: Sequence[Row], mode: str) -> None:
    path.write_text(json.dumps(to_json(machine, rows, mode), indent=2) + "\n")
