"""Lanes across hosts (scenarios 3 and 4): a firewall that blocks the TCP fast lane between two
hosts sends API and RPC traffic over QUIC, status says so and why, and unblocking returns API
requests to the fast lane within the retry time; a serving node behind NAT is reached over
the connection it opened."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.e2e.harness import wait_until
from tests.e2e.models import GEMMA, SMOLLM2
from tests.multihost.labmesh import (
    LabMesh,
    alive_peer_ids,
    chat,
    chat_ok,
    peer_of,
    split_ready,
    status_text,
    stream_timing,
    timed,
    wait_polling,
)
from tests.multihost.netlab import Host, Lab, NetnsMeshProcess

pytestmark = [pytest.mark.e2e, pytest.mark.multihost]

READY_TIMEOUT_S = 300.0
JOIN_TIMEOUT_S = 60.0
CLIENT_CHAT_BUDGET_S = 20.0
LANE_RETRY_S = 60.0  # mesh_llm/net/transport.py: QUIC carries a host's streams this long


@pytest.mark.slow  # waits out the 60 s lane retry: about 2 min
def test_blocked_fast_lane_falls_back_to_quic_and_comes_back(lab: Lab, mesh: LabMesh) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    lab.block_tcp(a, b)  # a firewall between a and b: UDP (QUIC) passes, TCP does not
    seed, token = mesh.seed(a, "--model", GEMMA.catalog, "--split")
    worker = mesh.start(b, "--join", token)  # standby: becomes the split's rpc worker
    split_ready(seed, READY_TIMEOUT_S)
    assert chat(seed, GEMMA.name)["usage"]["completion_tokens"] > 0
    [tunnel] = seed.status()["rpc_tunnels"]
    assert tunnel["lane"] == "quic", tunnel
    assert f"fast lane to {b.addr}:" in tunnel["reason"] and "failed" in tunnel["reason"]
    assert tunnel["bytes_up"] > 0 and tunnel["bytes_down"] > 0
    shown = status_text(seed)
    assert "rpc tunnels" in shown and "quic" in shown and "fast lane to" in shown, shown

    # API requests from b to the model hosted on a: over QUIC while TCP is blocked.
    wait_polling(lambda: chat_ok(worker, GEMMA.name), READY_TIMEOUT_S, "a chat through b")
    seed_short = seed.status()["node"]["short_id"]
    lanes = worker.status()["api_lanes"]
    assert lanes["quic"] >= 1 and lanes["fast"] == 0 and lanes["quic_for_now"] == [seed_short]
    assert "on QUIC for now" in status_text(worker)

    lab.unblock(a)
    unblocked = time.monotonic()

    def back_on_fast_lane() -> bool:
        return chat_ok(worker, GEMMA.name) and worker.status()["api_lanes"]["fast"] >= 1

    wait_polling(back_on_fast_lane, LANE_RETRY_S + 60, "API requests back on the fast lane")
    print(f"API back on the fast lane {time.monotonic() - unblocked:.1f} s after unblocking")
    assert worker.status()["api_lanes"]["quic_for_now"] == []


def _natted_mesh(lab: Lab, mesh: LabMesh) -> tuple[Host, NetnsMeshProcess, NetnsMeshProcess, str]:
    """Seed `a` (SmolLM2) on the switch; `n` behind NAT serving Gemma, joined and ready."""
    a, n = lab.add_host("a"), lab.add_nat_host("n")
    seed, token = mesh.seed(a, "--model", SMOLLM2.catalog)
    natted = mesh.start(n, "--model", GEMMA.catalog, "--join", token)
    natted_id = natted.node_id()
    wait_until(lambda: natted_id in alive_peer_ids(seed), JOIN_TIMEOUT_S, "the NAT'd node")
    natted.wait_ready(READY_TIMEOUT_S)
    return n, seed, natted, token


def test_serving_node_behind_nat_is_reached_over_its_own_connection(
    lab: Lab, mesh: LabMesh
) -> None:
    n, seed, natted, _ = _natted_mesh(lab, mesh)
    peer = peer_of(seed, natted.node_id())
    assert peer is not None and str(peer["address"]).startswith(f"{n.public}:"), peer
    assert seed.node_id() in alive_peer_ids(natted)
    wait_polling(lambda: chat_ok(seed, GEMMA.name), READY_TIMEOUT_S, "the seed's chat to n")
    # And the NAT'd node reaches the seed's model the same way round.
    wait_polling(lambda: chat_ok(natted, SMOLLM2.name), READY_TIMEOUT_S, "n's chat to a")


def test_a_client_reaches_a_model_served_behind_nat(lab: Lab, mesh: LabMesh) -> None:
    _, seed, natted, token = _natted_mesh(lab, mesh)
    wait_polling(lambda: chat_ok(seed, GEMMA.name), READY_TIMEOUT_S, "the seed's chat to n")
    client = mesh.start(lab.add_host("c"), "--client", "--join", token)
    wait_until(lambda: bool(client.status().get("peers")), JOIN_TIMEOUT_S, "client routes")
    # The client cannot dial the NAT'd host (its advertised addresses are private): the first
    # request waits out that dial, then goes through the node the client joined.
    wait_polling(lambda: chat_ok(client, GEMMA.name), CLIENT_CHAT_BUDGET_S, "a client's chat")
    seed_short, natted_short = seed.status()["node"]["short_id"], short_of(natted)
    lanes = client.status()["api_lanes"]
    assert lanes["relay"] >= 1 and lanes["relayed_for_now"] == {natted_short: seed_short}, lanes
    assert "relayed for now" in status_text(client)
    relayed = [timed(lambda: chat(client, GEMMA.name)) for _ in range(3)]
    print(f"client → NAT'd host through the seed: chat of 8 tokens {sorted(relayed)} s")


def short_of(node: NetnsMeshProcess) -> str:
    short: str = node.status()["node"]["short_id"]
    return short


def test_two_nodes_behind_two_nats_reach_each_other_through_the_seed(
    lab: Lab, mesh: LabMesh, demo_models_dir: Path, tmp_path: Path
) -> None:
    """Scenario 5: both NAT'd nodes reach the public seed, neither can dial the other (both
    even advertise the same private address); each one's request for the other's model is
    relayed by the seed, sealed end to end, and status says so. n2 serves its own copy of
    SmolLM2 under another name, so that only n2 serves it (the seed serves SmolLM2: a seed
    needs a model)."""
    own_copy = tmp_path / "smollm2-n2.gguf"
    shutil.copyfile(demo_models_dir / SMOLLM2.file, own_copy)
    a, n1, n2 = lab.add_host("a"), lab.add_nat_host("n1"), lab.add_nat_host("n2")
    seed, token = mesh.seed(a, "--model", SMOLLM2.catalog)
    first = mesh.start(n1, "--model", GEMMA.catalog, "--join", token)
    second = mesh.start(n2, "--model", str(own_copy), "--join", token)
    for node in (seed, first, second):
        node.wait_ready(READY_TIMEOUT_S)
    first_id, second_id = first.node_id(), second.node_id()
    wait_until(
        lambda: second_id in first.peer_ids() and first_id in second.peer_ids(),
        JOIN_TIMEOUT_S,
        "the NAT'd nodes know each other through gossip",
    )
    wait_polling(lambda: chat_ok(first, "smollm2-n2"), READY_TIMEOUT_S, "n1's chat to n2's model")
    wait_polling(lambda: chat_ok(second, GEMMA.name), READY_TIMEOUT_S, "n2's chat to n1's model")
    row = peer_of(first, second_id)
    assert row is not None and not row["linked"], "n1 must not reach n2 directly"
    seed_short = short_of(seed)
    for node, other in ((first, second), (second, first)):
        lanes = node.status()["api_lanes"]
        assert lanes["relay"] >= 1, lanes
        assert lanes["relayed_for_now"] == {short_of(other): seed_short}, lanes
        assert "relayed for now" in status_text(node)
    relay = seed.status()["relay"]
    assert relay["counts"].get("relayed", 0) >= 2, relay
    # Relay overhead, for the record: the same request on the host itself and through a relay.
    # Relay overhead, for the record: 64 streamed tokens on the host itself and from n2
    # through the seed, interleaved so that load from elsewhere hits both legs alike.
    direct: list[tuple[float, float]] = []
    relayed: list[tuple[float, float]] = []
    for _ in range(5):
        direct.append(stream_timing(first, GEMMA.name))
        relayed.append(stream_timing(second, GEMMA.name))
    for leg, runs in (("on n1 itself", direct), ("from n2 through the seed", relayed)):
        ttfts, rates = sorted(t for t, _ in runs), sorted(r for _, r in runs)
        print(
            f"relay overhead, {leg}: TTFT median {ttfts[2] * 1000:.0f} ms "
            f"({ttfts[0] * 1000:.0f}-{ttfts[-1] * 1000:.0f}), tokens/s median {rates[2]:.1f} "
            f"({rates[0]:.1f}-{rates[-1]:.1f})"
        )
