"""End-to-end mesh: real `mesh-llm` processes on loopback joining through invite tokens.

Three nodes see each other; kill -9 is detected within the liveness goal; a clean leave is
seen at once; a restarted seeder is re-joined automatically; a wrong secret is refused with a
reason on both sides; a passive client gets routes without appearing in anyone's peer list.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, Nodes, free_tcp_port, http_status, wait_until
from tests.e2e.models import GEMMA, SMOLLM2

pytestmark = pytest.mark.e2e

JOIN_TIMEOUT_S = 15.0
DEAD_GOAL_S = 5.0  # mesh.dead_after_s: silent for 5 s ⇒ dead
PROCESS_DEATH_GOAL_S = 2.0  # a killed process's port refuses the survivors' probes
POLL_SLACK_S = 1.0  # status polling of two nodes on a loaded 2-core machine


@pytest.fixture
def mesh(tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path) -> Iterator[Nodes]:
    bin_dir = llama_binaries.llama_server.parent
    group = Nodes(tmp_path, bin_dir, demo_models_dir, seed_model=SMOLLM2.catalog)
    try:
        yield group
    finally:
        group.close()


def _sees(node: MeshProcess, others: list[MeshProcess]) -> bool:
    return {o.node_id() for o in others} <= node.peer_ids()


def test_three_nodes_join_and_see_each_other(mesh: Nodes) -> None:
    seed, token = mesh.seed()
    a = mesh.start("a", "--join", token)
    started = time.monotonic()
    wait_until(lambda: _sees(seed, [a]) and _sees(a, [seed]), JOIN_TIMEOUT_S, "a joined")
    first_join_s = time.monotonic() - started
    # b joins through the joiner, not the seed, and offers at most 1 GB.
    b = mesh.start("b", "--join", a.wait_status()["token"], "--max-vram", "1")
    wait_until(
        lambda: _sees(seed, [a, b]) and _sees(a, [seed, b]) and _sees(b, [seed, a]),
        JOIN_TIMEOUT_S,
        "full mesh of three",
    )
    print(f"join to mutual view: {first_join_s:.2f} s (includes process start)")
    peers = {p["node_id"]: p for p in b.status()["peers"]}
    seed_view = peers[seed.node_id()]
    assert seed_view["state"] == "alive"
    assert seed_view["record"]["role"] == "serving"
    assert seed_view["record"]["vram_bytes"] > 0
    assert SMOLLM2.name in seed_view["record"]["models_on_disk"]
    wait_until(
        lambda: any(
            p["record"]["serving"].get(SMOLLM2.name, {}).get("ready") for p in b.status()["peers"]
        ),
        60,
        "the seed's serving map to reach b",
    )
    assert seed_view["rtt_ms"] is None or seed_view["rtt_ms"] < 100
    b_view = {p["node_id"]: p for p in seed.status()["peers"]}[b.node_id()]
    assert b_view["record"]["vram_bytes"] == 1_000_000_000


def test_kill_9_is_detected_and_never_resurrected(mesh: Nodes) -> None:
    seed, token = mesh.seed()
    a = mesh.start("a", "--join", token)
    b = mesh.start("b", "--join", token)
    wait_until(
        lambda: _sees(seed, [a, b]) and _sees(a, [b]) and _sees(b, [a]), JOIN_TIMEOUT_S, "mesh"
    )
    victim = b.node_id()
    b.signal(signal.SIGKILL)
    b.wait_exit()
    killed = time.monotonic()
    wait_until(
        lambda: victim not in seed.peer_ids() and victim not in a.peer_ids(),
        DEAD_GOAL_S + 3,
        "survivors to drop the killed node",
    )
    detected_s = time.monotonic() - killed
    print(f"kill -9 to every survivor dropping it: {detected_s:.2f} s")
    # Found by refused probes, not by silence: the reason names them (a survivor's own, or
    # quoted in the other survivor's notice).
    for survivor in (seed, a):
        assert "no process on its port" in survivor.log_text(), survivor.log_text()[-2000:]
    assert detected_s <= PROCESS_DEATH_GOAL_S + POLL_SLACK_S
    time.sleep(6)  # several gossip rounds: nobody brings it back
    assert victim not in seed.peer_ids() and victim not in a.peer_ids()


def test_clean_leave_is_seen_at_once(mesh: Nodes) -> None:
    seed, token = mesh.seed()
    a = mesh.start("a", "--join", token)
    wait_until(lambda: _sees(seed, [a]), JOIN_TIMEOUT_S, "a joined")
    leaver = a.node_id()
    a.signal(signal.SIGINT)
    left = time.monotonic()
    assert a.wait_exit() == 0
    wait_until(lambda: leaver not in seed.peer_ids(), 3, "seed to drop the leaver")
    print(f"clean leave seen in {time.monotonic() - left:.2f} s")


def test_seeder_restart_re_forms_the_mesh(mesh: Nodes) -> None:
    port = free_tcp_port()
    seed, token = mesh.seed("--bind-port", str(port))
    a = mesh.start("a", "--join", token)
    wait_until(lambda: _sees(seed, [a]) and _sees(a, [seed]), JOIN_TIMEOUT_S, "a joined")
    seed_id = seed.node_id()
    seed.signal(signal.SIGINT)
    assert seed.wait_exit() == 0
    wait_until(lambda: seed_id not in a.peer_ids(), 5, "a to see the seed leave")
    again = MeshProcess(seed.home, seed.args)  # same home: same key, same mesh secret
    mesh.nodes.append(again.start())
    wait_until(
        lambda: seed_id in a.peer_ids() and a.node_id() in again.peer_ids(),
        JOIN_TIMEOUT_S + 30,
        "a to rejoin the restarted seed by itself",
    )


def _forged_token(token: str) -> str:
    """The same node and addresses, but another mesh secret."""
    data = msgpack.unpackb(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    data["secret"] = os.urandom(32)
    return base64.urlsafe_b64encode(msgpack.packb(data, use_bin_type=True)).rstrip(b"=").decode()


def test_wrong_secret_is_refused_with_a_reason(mesh: Nodes) -> None:
    seed, token = mesh.seed()
    intruder = mesh.start("intruder", "--join", _forged_token(token))
    wait_until(lambda: "wrong mesh secret" in intruder.log_text(), JOIN_TIMEOUT_S, "refusal logged")
    wait_until(lambda: "refused" in seed.log_text(), 5, "seed logs the refusal")
    assert intruder.node_id() not in seed.peer_ids()
    assert intruder.status()["peers"] == []


def test_passive_client_gets_routes_and_stays_invisible(mesh: Nodes) -> None:
    seed, token = mesh.seed()
    a = mesh.start("a", "--join", token)
    wait_until(lambda: _sees(seed, [a]), JOIN_TIMEOUT_S, "a joined")
    client = mesh.start("client", "--client", "--join", token)
    wait_until(
        lambda: {seed.node_id(), a.node_id()} <= client.peer_ids(), JOIN_TIMEOUT_S, "client routes"
    )
    status = client.status()
    assert status["node"]["role"] == "client"
    assert status["token"] is None
    client_id = status["node"]["node_id"]
    wait_until(lambda: seed.status()["clients"] == 1, 5, "seed to count one passive client")
    assert client_id not in seed.peer_ids() and client_id not in a.peer_ids()
    # The client learns of models through the routing table.
    wait_until(
        lambda: any(m["name"] == SMOLLM2.name for m in client.status()["models"]),
        30,
        "the served model in the client's view",
    )


def test_two_nodes_with_the_same_key_are_detected(mesh: Nodes) -> None:
    seed, token = mesh.seed()
    twin = MeshProcess(seed.home, ["--join", token, *mesh.common()])
    mesh.nodes.append(twin.start())  # same home: the same ~/.mesh-llm/key
    wait_until(lambda: "uses this node's own key" in twin.log_text(), JOIN_TIMEOUT_S, "refusal")
    assert "uses this node's own key" in seed.log_text()
    assert seed.status()["peers"] == []


def test_worker_death_replans_to_solo(mesh: Nodes) -> None:
    seed, token = mesh.seed("--split", model=GEMMA.catalog)
    worker = mesh.start("worker", "--join", token)  # standby worker
    wait_until(lambda: "--rpc" in seed.llama_argv(), 120, "a split llama-server")
    first = seed.llama_server().pid
    worker.signal(signal.SIGKILL)
    worker.wait_exit()
    wait_until(
        lambda: "--rpc" not in seed.llama_argv() and http_status(seed.base_url + "/readyz") == 200,
        40,
        "the host to re-plan solo and serve again",
    )
    assert seed.llama_server().pid != first


def test_standby_is_promoted_when_the_only_host_of_a_wanted_model_dies(
    mesh: Nodes, tmp_path: Path, demo_models_dir: Path
) -> None:
    _seed, token = mesh.seed("--model", GEMMA.catalog)
    bin_dir = mesh.bin_dir

    def joiner(name: str) -> MeshProcess:
        models = tmp_path / f"{name}-models"
        models.mkdir()
        os.link(demo_models_dir / GEMMA.file, models / GEMMA.file)  # only the wanted model
        node = MeshProcess(
            tmp_path / name, ["--join", token, "--models-dir", str(models), "--bin-dir", bin_dir]
        )
        mesh.nodes.append(node.start())
        return node

    first = joiner("first")
    first.wait_ready(timeout_s=120)
    second = joiner("second")
    wait_until(
        lambda: "No unserved model fits — standing by as a worker" in second.log_text(),
        30,
        "the second joiner to stand by",
    )
    first.signal(signal.SIGKILL)
    first.wait_exit()
    wait_until(
        lambda: (
            f"Assigned to serve {GEMMA.name} (needed by mesh, already on disk)" in second.log_text()
        ),
        DEAD_GOAL_S + 10,
        "the standby node to take over the wanted model",
    )
    second.wait_ready(timeout_s=60)
