"""What a served model can answer, and how its llama-server must be started for it (pure).

Input: facts from the model's GGUF header (`ModelFacts`: pooling type, fill-in-the-middle
tokens, chat template) and whether the operator asked for embeddings (`--embeddings MODEL`);
output: a `BackendMode` — the capabilities the API advertises in `/v1/models` and routes by,
and the llama-server flags (`--embeddings`, `--pooling`, `--reranking`) that make them real.
A GGUF that declares a pooling type is meant for embeddings (rank pooling: a reranker) and
answers nothing else; a generative model chats and completes, embeds when asked to (mean
pooling unless its header says otherwise), and fills in the middle when it has FIM tokens.
Sans-I/O: no I/O imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Capability(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDINGS = "embeddings"
    RERANK = "rerank"
    INFILL = "infill"


class Pooling(IntEnum):
    """llama.cpp's `llama_pooling_type` values as stored in `<arch>.pooling_type`."""

    UNSPECIFIED = -1
    NONE = 0
    MEAN = 1
    CLS = 2
    LAST = 3
    RANK = 4


POOLING_FLAGS = {Pooling.MEAN: "mean", Pooling.CLS: "cls", Pooling.LAST: "last"}


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the GGUF header says that matters for the endpoints (defaults: a plain LLM)."""

    pooling: int = Pooling.UNSPECIFIED
    fill_in_middle: bool = False
    chat_template: bool = False


@dataclass(frozen=True, slots=True)
class BackendMode:
    capabilities: tuple[Capability, ...]
    embeddings: bool = False  # pass --embeddings
    pooling: str | None = None  # --pooling value
    reranking: bool = False  # pass --reranking (implies embeddings and rank pooling)


def backend_mode(facts: ModelFacts, *, embeddings_requested: bool = False) -> BackendMode:
    """How to serve a model with these facts; `embeddings_requested`: `--embeddings MODEL`."""
    if facts.pooling == Pooling.RANK:
        return BackendMode((Capability.RERANK,), reranking=True)
    if facts.pooling in POOLING_FLAGS:
        pooling = POOLING_FLAGS[Pooling(facts.pooling)]
        return BackendMode((Capability.EMBEDDINGS,), embeddings=True, pooling=pooling)
    capabilities = [Capability.CHAT, Capability.COMPLETION]
    if facts.fill_in_middle:
        capabilities.append(Capability.INFILL)
    if embeddings_requested:
        capabilities.append(Capability.EMBEDDINGS)
        return BackendMode(tuple(capabilities), embeddings=True, pooling="mean")
    return BackendMode(tuple(capabilities))


def parse_capabilities(names: Iterable[str]) -> tuple[Capability, ...]:
    """Capabilities from gossip (unknown names, from newer peers, are skipped)."""
    known = {c.value: c for c in Capability}
    return tuple(known[n] for n in names if n in known)


def can(capabilities: Sequence[Capability], needed: Capability | None) -> bool:
    """Whether a model with `capabilities` answers an endpoint needing `needed`. An empty
    tuple means unknown (e.g. a peer of an older version): the backend decides."""
    return needed is None or not capabilities or needed in capabilities
