"""Capabilities from GGUF facts, the llama-server flags they need, and capability routing."""

from __future__ import annotations

import pytest

from mesh_llm.core.capabilities import (
    BackendMode,
    Capability,
    ModelFacts,
    Pooling,
    backend_mode,
    can,
    parse_capabilities,
)
from mesh_llm.core.router import ModelState, ModelStatus, Route, RouteRefused, choose_route
from mesh_llm.core.types import ModelName

GENERATIVE = (Capability.CHAT, Capability.COMPLETION)


def _model(name: str, *capabilities: Capability, local: bool = True) -> ModelStatus:
    return ModelStatus(
        ModelName(name),
        ModelState.READY,
        endpoint=f"http://127.0.0.1:1/{name}" if local else None,
        remote=() if local else (f"node-{name}",),
        capabilities=capabilities,
    )


def test_a_plain_llm_chats_and_completes_without_embedding_flags() -> None:
    mode = backend_mode(ModelFacts())
    assert mode == BackendMode(GENERATIVE)
    assert not mode.embeddings and not mode.reranking


def test_fim_tokens_add_infill() -> None:
    assert Capability.INFILL in backend_mode(ModelFacts(fill_in_middle=True)).capabilities


def test_embeddings_requested_for_an_llm_use_mean_pooling() -> None:
    mode = backend_mode(ModelFacts(), embeddings_requested=True)
    assert mode.capabilities == (*GENERATIVE, Capability.EMBEDDINGS)
    assert (mode.embeddings, mode.pooling) == (True, "mean")


@pytest.mark.parametrize(
    ("pooling", "flag"), [(Pooling.MEAN, "mean"), (Pooling.CLS, "cls"), (Pooling.LAST, "last")]
)
def test_an_embedding_gguf_embeds_only_with_its_own_pooling(pooling: Pooling, flag: str) -> None:
    mode = backend_mode(ModelFacts(pooling=pooling))
    assert mode.capabilities == (Capability.EMBEDDINGS,)
    assert (mode.embeddings, mode.pooling) == (True, flag)


def test_rank_pooling_is_a_reranker() -> None:
    mode = backend_mode(ModelFacts(pooling=Pooling.RANK), embeddings_requested=True)
    assert mode.capabilities == (Capability.RERANK,)
    assert mode.reranking


def test_pooling_none_is_a_plain_llm() -> None:
    assert backend_mode(ModelFacts(pooling=Pooling.NONE)).capabilities == GENERATIVE


def test_gossiped_names_skip_unknown_ones() -> None:
    assert parse_capabilities(["chat", "teleport", "rerank"]) == (
        Capability.CHAT,
        Capability.RERANK,
    )


def test_unknown_capabilities_let_the_backend_decide() -> None:
    assert can((), Capability.RERANK)
    assert can(GENERATIVE, None)
    assert not can(GENERATIVE, Capability.EMBEDDINGS)


def test_embeddings_to_a_chat_model_is_400_naming_the_models_that_can() -> None:
    models = [_model("chatty", *GENERATIVE), _model("embedder", Capability.EMBEDDINGS)]
    route = choose_route("chatty", models, retry_after_s=1, capability=Capability.EMBEDDINGS)
    assert isinstance(route, RouteRefused)
    assert route.status == 400
    assert "chatty cannot answer embeddings" in route.message
    assert "models that can: embedder" in route.message


def test_rerank_with_no_capable_model_says_how_to_get_one() -> None:
    models = [_model("chatty", *GENERATIVE)]
    route = choose_route(None, models, retry_after_s=1, capability=Capability.RERANK)
    assert isinstance(route, RouteRefused)
    assert route.status == 400
    assert "no model of this mesh can" in route.message and "reranker" in route.message


def test_no_model_field_defaults_to_a_capable_model() -> None:
    chatty = _model("chatty", *GENERATIVE)
    remote_chatty = _model("chatty2", *GENERATIVE, local=False)
    embedder = _model("embedder", Capability.EMBEDDINGS, local=False)
    models = [chatty, remote_chatty, embedder]
    route = choose_route(None, models, retry_after_s=1, capability=Capability.EMBEDDINGS)
    assert route == Route(ModelName("embedder"), node_id="node-embedder")
    chat = choose_route(None, models, retry_after_s=1, capability=Capability.CHAT)
    assert isinstance(chat, Route) and chat.model == "chatty"


def test_endpoints_without_a_capability_reach_any_model() -> None:
    models = [_model("embedder", Capability.EMBEDDINGS)]
    assert isinstance(choose_route("embedder", models, retry_after_s=1), Route)
