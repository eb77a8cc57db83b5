"""KV-cache affinity: prefix hashing, the bounded expiring table, and the fair-share rule."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from mesh_llm.core.affinity import AffinityTable, prefix_keys
from mesh_llm.core.router import LOCAL, ModelState, ModelStatus, Route, choose_route
from mesh_llm.core.types import ModelName

CHUNK = 64
SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}


def _keys(body: Mapping[str, object]) -> tuple[bytes, ...]:
    return prefix_keys(body, chunk_chars=CHUNK, max_chars=100_000)


def _chat(*turns: str) -> dict[str, object]:
    return {"messages": [SYSTEM, *({"role": "user", "content": t} for t in turns)]}


def test_a_later_turn_shares_the_earlier_turns_keys() -> None:
    first, second = _keys(_chat("hello")), _keys(_chat("hello", "and then?"))
    assert len(second) >= len(first) > 5
    assert second[: len(first)] == first


def test_different_system_prompts_share_no_key() -> None:
    other = {"messages": [{"role": "system", "content": "Other rules. " * 40}]}
    assert not set(_keys(_chat("hi"))) & set(_keys(other))


def test_model_and_sampling_fields_do_not_change_the_keys() -> None:
    plain = _chat("hi")
    tuned = {**plain, "model": "m", "temperature": 0.1, "stream": True, "max_tokens": 3}
    assert _keys(plain) == _keys(tuned)


def test_short_prompts_have_no_keys_and_long_ones_are_capped() -> None:
    assert prefix_keys({"prompt": "short"}, chunk_chars=CHUNK, max_chars=1000) == ()
    keys = prefix_keys({"prompt": "x" * 10_000}, chunk_chars=CHUNK, max_chars=1000)
    assert len(keys) == 1000 // CHUNK


def test_a_bad_chunk_size_is_refused() -> None:
    with pytest.raises(ValueError):
        prefix_keys({"prompt": "x"}, chunk_chars=0, max_chars=10)


def test_lookup_answers_the_backend_of_the_longest_prefix() -> None:
    table = AffinityTable(max_entries=100, ttl_s=60)
    short, longer = _keys(_chat("a")), _keys(_chat("a", "b" * 300))
    table.record("m", short, "node-a", now=0)
    table.record("m", longer, "node-b", now=1)
    assert table.lookup("m", longer, now=2) == "node-b"
    # Only the system prompt's chunks are shared with a new conversation: both recorded them,
    # the latest record wins.
    assert table.lookup("m", _keys(_chat("zzz")), now=2) == "node-b"
    assert table.lookup("other-model", longer, now=2) is None


def test_entries_expire() -> None:
    table = AffinityTable(max_entries=100, ttl_s=10)
    keys = _keys(_chat("a"))
    table.record("m", keys, "node-a", now=0)
    assert table.lookup("m", keys, now=9.9) == "node-a"
    assert table.lookup("m", keys, now=10) is None
    table.record("m", keys[:1], "node-a", now=20)  # recording also sweeps expired entries
    assert len(table) == 1


def test_the_table_is_bounded_oldest_first() -> None:
    table = AffinityTable(max_entries=8, ttl_s=60)
    old, new = _keys({"prompt": "o" * 640}), _keys({"prompt": "n" * 640})
    table.record("m", old, "node-a", now=0)
    table.record("m", new, "node-b", now=1)
    assert len(table) == 8
    assert table.lookup("m", new, now=2) == "node-b"
    assert table.lookup("m", old, now=2) is None


def test_forget_drops_a_backend() -> None:
    table = AffinityTable(max_entries=100, ttl_s=60)
    keys = _keys(_chat("a"))
    table.record("m", keys, "node-a", now=0)
    table.forget("node-a")
    assert table.lookup("m", keys, now=1) is None


def test_the_table_needs_sane_bounds() -> None:
    with pytest.raises(ValueError):
        AffinityTable(max_entries=0, ttl_s=1)


REPLICAS = ModelStatus(
    ModelName("m"), ModelState.READY, endpoint="http://127.0.0.1:1", remote=("node-a", "node-b")
)


def _route(in_flight: dict[str, int], preferred: str | None) -> Route:
    route = choose_route("m", [REPLICAS], retry_after_s=1, in_flight=in_flight, preferred=preferred)
    assert isinstance(route, Route)
    return route


def test_the_preferred_replica_wins_over_least_loaded_ties() -> None:
    assert _route({}, None).key == LOCAL  # ties go to the local backend without affinity
    assert _route({}, "node-b").key == "node-b"


def test_a_preferred_replica_within_its_fair_share_keeps_the_request() -> None:
    # 3 in flight over 3 replicas + this one: fair share ceil(4/3) = 2; node-b would have 2.
    assert _route({"node-b": 1, LOCAL: 1, "node-a": 1}, "node-b").key == "node-b"


def test_a_preferred_replica_busier_than_its_fair_share_loses_to_least_loaded() -> None:
    route = _route({"node-b": 2, LOCAL: 1}, "node-b")
    assert route.key == "node-a"


def test_an_unknown_or_excluded_preference_is_ignored() -> None:
    assert _route({}, "node-gone").key == LOCAL
    route = choose_route("m", [REPLICAS], retry_after_s=1, exclude={"node-b"}, preferred="node-b")
    assert isinstance(route, Route) and route.key == LOCAL
