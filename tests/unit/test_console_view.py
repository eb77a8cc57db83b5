"""The console's pure parts: the page's view of a status document, and the bounded event hub."""

from __future__ import annotations

import asyncio
from typing import Any

from mesh_llm.api.console_events import EventHub
from mesh_llm.api.console_view import console_view, quant_of

A, B, C, W = ("a" * 64, "b" * 64, "c" * 64, "w" * 64)
GB = 10**9


def _record(node_id: str, vram_gb: int, **fields: Any) -> dict[str, Any]:
    return {"node_id": node_id, "name": node_id[:3], "vram_bytes": vram_gb * GB, **fields}


def _status(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "node": {"node_id": A, "short_id": A[:10], "name": "a"},
        "models": [],
        "peers": [],
        "records": [],
    }
    return base | fields


def test_shares_are_of_the_advertised_sum_and_add_up_to_one() -> None:
    status = _status(
        records=[_record(A, 24), _record(B, 8, rtt_ms={A: 1.5}), _record(C, 16)],
        peers=[{"node_id": B, "state": "alive"}, {"node_id": C, "state": "suspect"}],
        clients=2,
    )
    view = console_view(status)
    assert view["mesh_vram_bytes"] == 48 * GB
    assert [n["vram_share"] for n in view["nodes"]] == [0.5, 8 / 48, 16 / 48]
    assert sum(n["vram_share"] for n in view["nodes"]) == 1.0
    assert view["nodes"][0]["you"] and not view["nodes"][1]["you"]
    assert view["nodes"][2]["state"] == "suspect"
    assert view["clients"] == {"count": 2, "you": None}
    [link] = view["links"]
    assert (link["a"], link["b"], link["rtt_ms"]) == (A, B, 1.5)


def test_dead_and_left_peers_are_not_shown() -> None:
    status = _status(
        records=[_record(A, 8), _record(B, 8), _record(C, 8)],
        peers=[{"node_id": B, "state": "dead"}, {"node_id": C, "state": "left"}],
    )
    view = console_view(status)
    assert [n["node_id"] for n in view["nodes"]] == [A]
    assert view["mesh_vram_bytes"] == 8 * GB


def test_roles_groups_and_split_ratios() -> None:
    model = "big-model-Q4_K_M"
    serving_host = {model: {"role": "host", "ready": True, "host": A}}
    serving_worker = {model: {"role": "worker", "ready": True, "host": A}}
    status = _status(
        records=[
            _record(A, 8, serving=serving_host, fast_lane_port=1, rtt_ms={W: 2.0}),
            _record(W, 8, serving=serving_worker, fast_lane_port=2),
            _record(B, 8),
        ],
        split={"model": model, "host": A, "tensor_split": [0.4, 0.6]},
        models=[{"name": model, "state": "ready", "nodes": 1, "host": "local"}],
    )
    view = console_view(status)
    roles = {n["node_id"]: (n["role"], n["backend"]) for n in view["nodes"]}
    assert roles == {
        A: ("host", "llama-server"),
        W: ("rpc worker", "rpc-server"),
        B: ("standby", "none"),
    }
    assert view["groups"] == [
        {"model": model, "host": A, "workers": [W], "tensor_split": [0.4, 0.6]}
    ]
    [link] = view["links"]
    assert link["carries"] == ["API", "RPC"] and link["lane"] == "fast lane"
    [shown] = view["models"]
    assert shown["warm"] and shown["quant"] == "Q4_K_M" and set(shown["serving_nodes"]) == {A, W}
    assert view["status_line"]["state"] == "ready"


def test_a_client_shows_itself_apart_and_adds_no_vram() -> None:
    status = _status(records=[_record(B, 8)], peers=[{"node_id": B, "state": "route"}])
    status["node"]["client"] = True
    view = console_view(status)
    assert view["clients"]["you"]["role"] == "client"
    assert [n["node_id"] for n in view["nodes"]] == [B]
    assert view["mesh_vram_bytes"] == 8 * GB


def test_cold_models_carry_their_reason() -> None:
    status = _status(
        models=[{"name": "m", "state": "loading", "nodes": 0, "reason": "waiting for VRAM: 9 GB"}]
    )
    view = console_view(status)
    assert view["models"][0]["reason"] == "waiting for VRAM: 9 GB"
    assert view["status_line"]["state"] == "waiting"


def test_quant_names() -> None:
    assert quant_of("gemma-3-270m-q4_k_m") == "Q4_K_M"
    assert quant_of("Qwen3-8B-Q8_0.gguf") == "Q8_0"
    assert quant_of("model-f16") == "F16"
    assert quant_of("<img src=x onerror=alert(1)>") == ""


async def test_a_slow_subscriber_keeps_only_the_newest_events() -> None:
    hub = EventHub(history_max=10, queue_max=5)
    with hub.subscribe() as slow:
        for index in range(100):
            hub.publish({"n": index})
        assert slow.dropped == 95
        got = [await slow.next(0.1) for _ in range(5)]
        assert [e["n"] for e in got if e] == [95, 96, 97, 98, 99]
        assert await slow.next(0.01) is None
    assert hub.subscriber_count == 0
    assert [e["n"] for e in hub.recent()] == list(range(90, 100))


async def test_close_wakes_waiting_subscribers() -> None:
    hub = EventHub()
    with hub.subscribe() as subscription:
        waiting = asyncio.create_task(subscription.next(30))
        await asyncio.sleep(0)
        hub.close()
        async with asyncio.timeout(1):
            assert await waiting is None
    assert hub.closed


def test_a_host_reached_through_a_relay_is_linked_as_such() -> None:
    serving = {"m": {"role": "host", "ready": True, "host": C}}
    status = _status(
        records=[_record(A, 8, rtt_ms={B: 1.0}), _record(B, 8), _record(C, 8, serving=serving)],
        peers=[{"node_id": B, "state": "alive"}, {"node_id": C, "state": "known"}],
        api_lanes={"relayed_for_now": {C[:10]: B[:10]}},
    )
    links = console_view(status)["links"]
    assert {
        "a": A,
        "b": C,
        "rtt_ms": None,
        "carries": ["API"],
        "lane": f"relay via {B[:10]}",
    } in links
