"""`just bench`: one table of every benchmark figure, each beside its same-run reference.

Calls the measurements of the other modules of tests/bench/ (and the gossip simulation of
tests/sim/) and prints one table (tests/bench/table.py), written as JSON to `bench.json` too.
Each figure is the median of several rounds with their spread (min–max); legs of one benchmark
run interleaved in a shuffled order, so that load from elsewhere hits every leg alike.

    python -m tests.bench.run [--quick] [--json PATH]

`--quick` is a smoke test of the whole pipeline (few rounds, small sizes: the figures mean
little); the full run takes ~15 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.backend.build import ensure_binaries
from mesh_llm.config import BackendConfig, load_config
from mesh_llm.core.mesh import MeshTimings
from mesh_llm.models.demo import install_demo_model
from tests.bench import bench_mesh, bench_proxy, bench_solo, bench_split
from tests.bench.table import (
    Goal,
    Row,
    describe_machine,
    differences,
    ratios,
    render,
    row,
    write_json,
)
from tests.sim.test_mesh_sim import measure as measure_gossip
from tests.sim.test_mesh_sim import measure_host_loss

LOCAL_RATIO = Goal(">=", 0.98)
REMOTE_FAST_RATIO = Goal(">=", 0.97)
SPLIT_FAST_RATIO = Goal(">=", 0.95)
PROCESS_DEATH_S = Goal("<=", 2.0)
HOST_LOSS_S = Goal("<=", 6.0)
FIRST_ANSWER_S = Goal("<", 2.0)
GOSSIP_BYTES_S = Goal("<=", 2048.0)
SPLIT_THREADS = 1
"""-t of the split's rpc-servers on a machine of ≤ 2 cores (see `bench_split.measure`)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How much of each benchmark to run."""

    solo_rounds: int
    solo_tokens: int
    split_rounds: int
    proxy_runs: int
    proxy_events: int
    latency_rounds: int
    models_s: float
    mesh_runs: int
    gossip_sizes: tuple[int, ...]
    gossip_seeds: int


FULL = Plan(8, 64, 3, 5, 10000, 60, 1.0, 3, (50, 200, 1000), 2)
QUICK = Plan(2, 16, 1, 1, 2000, 5, 0.2, 1, (50,), 1)

ROUTES = {"local": "local", "remote": "remote, fast lane", "quic": "remote, QUIC"}


def solo_rows(plan: Plan) -> list[Row]:
    results = bench_solo.measure(plan.solo_rounds, plan.solo_tokens)
    direct = results["direct"]
    tps = [s.tokens_per_s for s in direct]
    ttft = [s.ttft_s for s in direct]
    cpu = [s.cpu_s / s.tokens * 1e6 for s in direct]
    section = f"real model (gemma-3-270m, {plan.solo_tokens} tokens per request)"
    rows = [
        row(section, "direct llama-server tokens/s", "tok/s", tps),
        row(section, "direct llama-server TTFT", "s", ttft, "", FIRST_ANSWER_S),
    ]
    goals = {"local": LOCAL_RATIO, "remote": REMOTE_FAST_RATIO}
    for key, name in ROUTES.items():
        samples = results[key]
        rows.append(
            row(
                section,
                f"{name}: tokens/s ratio",
                "",
                ratios([s.tokens_per_s for s in samples], tps),
                f"direct {statistics.median(tps):.1f} tok/s",
                goals.get(key),
            )
        )
        rows.append(
            row(section, f"{name}: TTFT", "s", [s.ttft_s for s in samples], "", FIRST_ANSWER_S)
        )
        rows.append(
            row(
                section,
                f"{name}: TTFT added",
                "ms",
                [d * 1000 for d in differences([s.ttft_s for s in samples], ttft)],
                f"direct {statistics.median(ttft) * 1000:.0f} ms",
            )
        )
    for key, name in ROUTES.items():
        per_token = [s.cpu_s / s.tokens * 1e6 for s in results[key]]
        rows.append(
            row(
                section,
                f"{name}: added mesh-llm CPU per relayed token",
                "µs",
                differences(per_token, cpu),
                f"direct leg {statistics.median(cpu):.0f} µs (idle mesh)",
            )
        )
    return rows


def split_rows(plan: Plan) -> list[Row]:
    threads = SPLIT_THREADS if (os.cpu_count() or 1) <= 2 else None
    results = bench_split.measure(plan.split_rounds, ("direct", "fast", "quic"), threads)
    section = "split over two rpc-servers (tensor split 0.50,0.50" + (
        f", rpc-server -t {threads} on this small machine)" if threads else ")"
    )
    gen = [r[0] for r in results["direct"]]
    rows = [row(section, "direct TCP RPC generation tokens/s", "tok/s", gen)]
    goals = {"fast": SPLIT_FAST_RATIO}
    for key, name in (("fast", "via fast lane"), ("quic", "via QUIC")):
        rows.append(
            row(
                section,
                f"{name}: generation tokens/s ratio",
                "",
                ratios([r[0] for r in results[key]], gen),
                f"direct TCP {statistics.median(gen):.1f} tok/s",
                goals.get(key),
            )
        )
    return rows


def proxy_rows(plan: Plan) -> list[Row]:
    section = "proxy only (fake llama-server streaming as fast as it can)"
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bench-proxy-") as tmp:
        root = Path(tmp)
        install_demo_model(root / "models", None)
        rates = bench_proxy.measure_rates(root, plan.proxy_runs, plan.proxy_events)
        ttfb, models = bench_proxy.measure_latency(root, plan.latency_rounds, plan.models_s)
    direct_rate, direct_ttfb = rates["direct"], ttfb["direct"]
    rows = [
        row(section, "direct SSE events/s (one stream)", "ev/s", direct_rate),
        row(section, "direct TTFB", "ms", [t * 1000 for t in direct_ttfb]),
    ]
    for key, name in ROUTES.items():
        rows.append(
            row(
                section,
                f"{name}: SSE events/s ratio",
                "",
                ratios(rates[key], direct_rate),
                f"direct {statistics.median(direct_rate):,.0f} ev/s",
            )
        )
        rows.append(
            row(
                section,
                f"{name}: TTFB added",
                "ms",
                [d * 1000 for d in differences(ttfb[key], direct_ttfb)],
                f"direct {statistics.median(direct_ttfb) * 1000:.2f} ms",
            )
        )
    for key, name in ROUTES.items():
        rows.append(row(section, f"/v1/models through {name}", "req/s", models[key]))
    return rows


def mesh_rows(plan: Plan) -> list[Row]:
    section = "membership (5 real processes on loopback)"
    runs = [bench_mesh.measure() for _ in range(plan.mesh_runs)]
    return [
        row(section, "start of 4 joiners → full mesh everywhere", "s", [r[0] for r in runs]),
        row(
            section,
            "kill -9 → every survivor marked it dead (process death)",
            "s",
            [r[1] for r in runs],
            "",
            PROCESS_DEATH_S,
        ),
    ]


def gossip_rows(plan: Plan) -> list[Row]:
    section = "gossip simulation (MeshCore nodes, simulated network, 1 % loss)"
    rows: list[Row] = []
    for size in plan.gossip_sizes:
        seeds = plan.gossip_seeds if size <= 200 else 1  # 1000 nodes: minutes per run
        figures = [measure_gossip(size, seed=size + k) for k in range(seeds)]
        degree = statistics.median(f["mean_degree"] for f in figures)
        rows.append(
            row(
                section,
                f"{size} nodes: a change reaches all",
                "s",
                [f["spread_s"] for f in figures],
            )
        )
        rows.append(
            row(
                section,
                f"{size} nodes: steady bytes/s per node",
                "B/s",
                [f["steady_bytes_per_node_s"] for f in figures],
                f"mean degree {degree:.0f}",
                GOSSIP_BYTES_S if size == 200 else None,
            )
        )
    losses = [measure_host_loss(10, seed) for seed in range(3 if plan is FULL else 1)]
    timings = MeshTimings()
    rows.append(
        row(
            section,
            "host loss (silent links) → every survivor marked it dead, 10 nodes",
            "s",
            losses,
            f"dead_after_s {timings.dead_after_s:g}",
            HOST_LOSS_S,
        )
    )
    return rows


STEPS = ("solo", "split", "proxy", "mesh", "gossip")
"""Run in this order; each `<name>_rows(plan)` returns its rows of the table."""


def run_step(name: str, step: Callable[[Plan], list[Row]], plan: Plan) -> list[Row]:
    """The rows of one benchmark; if it fails, one row saying so (the table still prints)."""
    try:
        return step(plan)
    except Exception as exc:  # a failed benchmark is a row of the table, not a lost table
        traceback.print_exc()
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        return [row(name, "FAILED", "", [], reason)]


def llama_build() -> str:
    binaries = ensure_binaries(BackendConfig(), load_config().cache_dir)
    return f"{binaries.build_id} ({binaries.source})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: few small rounds")
    parser.add_argument("--json", type=Path, default=Path("bench.json"), help="output file")
    args = parser.parse_args(argv)
    plan, mode = (QUICK, "quick, figures not meaningful") if args.quick else (FULL, "full")
    machine = describe_machine(llama_build())
    started = time.monotonic()
    rows: list[Row] = []
    for name in STEPS:
        step_started = time.monotonic()
        rows += run_step(name, globals()[f"{name}_rows"], plan)
        print(f"[{name}: {time.monotonic() - step_started:.0f} s]", file=sys.stderr)
    mode += f", {time.monotonic() - started:.0f} s"
    print(render(machine, rows, mode))
    write_json(args.json, machine, rows, mode)
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
