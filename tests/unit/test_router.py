"""Routing decisions: model matching, the mesh default, and refusals with retry hints."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mesh_llm.core.router import (
    LOCAL,
    ModelState,
    ModelStatus,
    Route,
    RouteRefused,
    choose_route,
    match_model,
)
from mesh_llm.core.types import ModelName

RETRY_S = 7


def _status(
    name: str,
    state: ModelState = ModelState.READY,
    *,
    reason: str = "",
    aliases: tuple[str, ...] = (),
    endpoint: str | None = "auto",
) -> ModelStatus:
    if endpoint == "auto":
        endpoint = f"http://127.0.0.1:1/{name}" if state is ModelState.READY else None
    return ModelStatus(ModelName(name), state, reason, endpoint, aliases)


QWEN = _status("Qwen3-8B-Q4_K_M", aliases=("qwen", "qwen3-8b"))
GEMMA = _status("gemma-3-270m", ModelState.LOADING, reason="downloading 40%")
LLAMA = _status("llama-3.2-1b", ModelState.FAILED, reason="llama-server exited with code 1")
MODELS = (GEMMA, QWEN, LLAMA)


@dataclass(frozen=True)
class MatchCase:
    requested: str | None
    models: tuple[ModelStatus, ...]
    expected: ModelStatus | None


MATCH_CASES = {
    "exact": MatchCase("Qwen3-8B-Q4_K_M", MODELS, QWEN),
    "case-insensitive name": MatchCase("qwen3-8b-q4_k_m", MODELS, QWEN),
    "alias": MatchCase("qwen", MODELS, QWEN),
    "alias case-insensitive": MatchCase("QWEN3-8B", MODELS, QWEN),
    "loading model by name": MatchCase("gemma-3-270m", MODELS, GEMMA),
    "unknown": MatchCase("mistral", MODELS, None),
    "prefix is not a match": MatchCase("qwe", MODELS, None),
    "default prefers ready": MatchCase(None, MODELS, QWEN),
    "default without ready is first known": MatchCase(None, (GEMMA, LLAMA), GEMMA),
    "default with no models": MatchCase(None, (), None),
    "named with no models": MatchCase("qwen", (), None),
}


@pytest.mark.parametrize("case", MATCH_CASES.values(), ids=MATCH_CASES.keys())
def test_match_model(case: MatchCase) -> None:
    assert match_model(case.requested, case.models) == case.expected


def test_exact_match_wins_over_case_insensitive_one() -> None:
    upper = _status("Model")
    lower = _status("model")
    assert match_model("model", (upper, lower)) == lower
    assert match_model("Model", (lower, upper)) == upper


@dataclass(frozen=True)
class RouteCase:
    requested: str | None
    models: tuple[ModelStatus, ...]
    expected: Route | RouteRefused


ROUTE_CASES = {
    "ready by name": RouteCase(
        "qwen", MODELS, Route(QWEN.name, "http://127.0.0.1:1/Qwen3-8B-Q4_K_M")
    ),
    "default ready": RouteCase(
        None, MODELS, Route(QWEN.name, "http://127.0.0.1:1/Qwen3-8B-Q4_K_M")
    ),
    "unknown lists available": RouteCase(
        "mistral",
        MODELS,
        RouteRefused(
            404,
            "model_not_found",
            "model 'mistral' is not served by this mesh; available: "
            "gemma-3-270m, Qwen3-8B-Q4_K_M, llama-3.2-1b",
        ),
    ),
    "unknown with nothing known": RouteCase(
        "mistral",
        (),
        RouteRefused(
            404,
            "model_not_found",
            "model 'mistral' is not served by this mesh; available: none yet",
        ),
    ),
    "loading gives reason and retry": RouteCase(
        "gemma-3-270m",
        MODELS,
        RouteRefused(
            503, "model_not_ready", "model gemma-3-270m is not ready: downloading 40%", RETRY_S
        ),
    ),
    "failed gives reason and retry": RouteCase(
        "llama-3.2-1b",
        MODELS,
        RouteRefused(
            503,
            "model_not_ready",
            "model llama-3.2-1b is not ready: llama-server exited with code 1",
            RETRY_S,
        ),
    ),
    "loading without reason names the state": RouteCase(
        "m",
        (_status("m", ModelState.LOADING),),
        RouteRefused(503, "model_not_ready", "model m is not ready: loading", RETRY_S),
    ),
    "ready without endpoint is not routable": RouteCase(
        "m",
        (_status("m", endpoint=None),),
        RouteRefused(503, "model_not_ready", "model m is not ready: ready", RETRY_S),
    ),
    "default with no models": RouteCase(
        None, (), RouteRefused(503, "no_models", "no model is served yet", RETRY_S)
    ),
    "default with only loading": RouteCase(
        None,
        (GEMMA,),
        RouteRefused(
            503, "model_not_ready", "model gemma-3-270m is not ready: downloading 40%", RETRY_S
        ),
    ),
}


@pytest.mark.parametrize("case", ROUTE_CASES.values(), ids=ROUTE_CASES.keys())
def test_choose_route(case: RouteCase) -> None:
    assert choose_route(case.requested, case.models, retry_after_s=RETRY_S) == case.expected


def test_not_found_has_no_retry_hint() -> None:
    refused = choose_route("nope", MODELS, retry_after_s=RETRY_S)
    assert isinstance(refused, RouteRefused)
    assert refused.retry_after_s is None


# -- replicas: least in-flight, local on ties, rotation, failover exclusion -------------------

A, B = "node-a", "node-b"


def _replicated(local: bool = True, remote: tuple[str, ...] = (A, B)) -> ModelStatus:
    endpoint = "http://127.0.0.1:1" if local else None
    state = ModelState.READY if local else ModelState.LOADING
    return ModelStatus(ModelName("m"), state, "", endpoint, remote=remote)


@dataclass(frozen=True)
class ReplicaCase:
    model: ModelStatus
    in_flight: dict[str, int]
    exclude: frozenset[str]
    rotation: int
    expected: str | int  # backend key, or the refusal status


REPLICA_CASES = {
    "idle: local wins the tie": ReplicaCase(_replicated(), {}, frozenset(), 3, LOCAL),
    "local busy: least loaded remote": ReplicaCase(
        _replicated(), {LOCAL: 2, A: 1, B: 0}, frozenset(), 0, B
    ),
    "remote tie rotates (0)": ReplicaCase(_replicated(False), {}, frozenset(), 0, A),
    "remote tie rotates (1)": ReplicaCase(_replicated(False), {}, frozenset(), 1, B),
    "remote tie rotates (2)": ReplicaCase(_replicated(False), {}, frozenset(), 2, A),
    "failed local is excluded": ReplicaCase(_replicated(), {}, frozenset({LOCAL}), 1, B),
    "remote-only model is routable while the local one loads": ReplicaCase(
        _replicated(False, (A,)), {A: 9}, frozenset(), 0, A
    ),
    "every replica failed: 502": ReplicaCase(
        _replicated(True, (A,)), {}, frozenset({LOCAL, A}), 0, 502
    ),
    "not served anywhere: 503": ReplicaCase(_replicated(False, ()), {}, frozenset(), 0, 503),
}


@pytest.mark.parametrize("case", REPLICA_CASES.values(), ids=REPLICA_CASES.keys())
def test_replica_choice(case: ReplicaCase) -> None:
    route = choose_route(
        "m",
        (case.model,),
        retry_after_s=RETRY_S,
        in_flight=case.in_flight,
        exclude=case.exclude,
        rotation=case.rotation,
    )
    if isinstance(case.expected, int):
        assert isinstance(route, RouteRefused)
        assert route.status == case.expected
    else:
        assert isinstance(route, Route)
        assert route.key == case.expected
        assert (route.endpoint is not None) == (case.expected == LOCAL)


def test_default_model_is_the_most_served() -> None:
    one = ModelStatus(ModelName("one"), ModelState.LOADING, remote=(A,))
    two = ModelStatus(ModelName("two"), ModelState.LOADING, remote=(A, B))
    assert match_model(None, (one, two)) == two
