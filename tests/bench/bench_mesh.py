"""Benchmark: five real `mesh-llm` processes on loopback.

Prints the time from starting four joiners (all with the seed's token) until every node lists
all four others, and the time from `kill -9` of one node until every survivor has dropped it.
`measure` is one run (the table of `just bench` takes the median of several); run alone with
`python -m tests.bench.bench_mesh`.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from mesh_llm.backend.build import ensure_binaries
from mesh_llm.config import BackendConfig, load_config
from mesh_llm.models.demo import install_demo_model
from tests.e2e.harness import MeshProcess, wait_until

NODES = 5


def measure() -> tuple[float, float]:
    """(seconds from starting the joiners to a full mesh everywhere, seconds from `kill -9` of
    one node until every survivor dropped it)."""
    binaries = ensure_binaries(BackendConfig(), load_config().cache_dir)
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bench-") as tmp:
        models = Path(tmp) / "models"
        install_demo_model(models, None)
        common = ["--models-dir", str(models), "--bin-dir", str(binaries.llama_server.parent)]
        seed = MeshProcess(Path(tmp) / "seed", ["--model", "gemma-3-270m", *common]).start()
        nodes = [seed]
        try:
            wait_until(lambda: bool(seed.status().get("token")), 30, "seed token")
            token = seed.status()["token"]
            started = time.monotonic()
            for index in range(NODES - 1):
                joiner = MeshProcess(Path(tmp) / f"n{index}", ["--join", token, *common])
                nodes.append(joiner.start())
            ids = {node.node_id() for node in nodes}
            wait_until(
                lambda: all(ids - {n.node_id()} <= n.peer_ids() for n in nodes), 60, "full mesh"
            )
            joined_s = time.monotonic() - started
            victim = nodes[-1]
            victim_id = victim.node_id()
            victim.signal(signal.SIGKILL)
            victim.wait_exit()
            killed = time.monotonic()
            survivors = nodes[:-1]
            wait_until(
                lambda: all(victim_id not in n.peer_ids() for n in survivors), 30, "detection"
            )
            detected_s = time.monotonic() - killed
        finally:
            for node in nodes:
                node.stop()
    return joined_s, detected_s


def main() -> int:
    joined_s, detected_s = measure()
    print(f"{NODES} nodes on loopback:")
    print(f"  start of {NODES - 1} joiners → full mesh everywhere: {joined_s:.2f} s")
    print(f"  kill -9 → every survivor dropped it: {detected_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
