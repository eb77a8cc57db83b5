"""Routing of one API request to a backend: a pure decision over the known models.

Input: the requested model name (or None for the mesh default), the status of every model the
node knows (its local backend, if any, and the remote hosts serving it ready), and this node's
own count of in-flight requests per backend; output: a `Route` to the local endpoint or to a
remote node, or a `RouteRefused` with the HTTP status, an OpenAI error code, a message listing
what is available, and a retry hint. An endpoint that needs a capability (embeddings, rerank…)
is refused with 400 naming the models that have it. Replicas are chosen by least in-flight
requests; ties go to the local backend, then rotate by the caller's request counter (so passive
clients spread deterministically) — unless the caller names a `preferred` backend (the one that
holds the request's prompt prefix in its KV cache, see `core/affinity`) that is not busier than
its fair share. Sans-I/O: imports no I/O module and reads no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum

from mesh_llm.core.capabilities import Capability, can
from mesh_llm.core.types import ModelName


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """What the node knows of one model: state, why, and where it is served."""

    name: ModelName
    state: ModelState
    reason: str = ""
    endpoint: str | None = None  # the local llama-server, when this node serves it
    aliases: tuple[str, ...] = ()
    host: str = "local"
    remote: tuple[str, ...] = ()  # node ids of other hosts serving it, ready
    capabilities: tuple[Capability, ...] = ()  # empty: unknown (not resolved yet, old peer)

    @property
    def routable(self) -> bool:
        return (self.state is ModelState.READY and self.endpoint is not None) or bool(self.remote)

    @property
    def node_count(self) -> int:
        local = self.state is ModelState.READY and self.endpoint is not None
        return int(local) + len(self.remote)


LOCAL = "local"  # the backend key of this node's own llama-server


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the local endpoint, or the remote host `node_id`."""

    model: ModelName
    endpoint: str | None = None
    node_id: str | None = None

    @property
    def key(self) -> str:
        """The in-flight/exclusion key of this backend."""
        return self.node_id if self.node_id is not None else LOCAL


@dataclass(frozen=True, slots=True)
class RouteRefused:
    status: int
    code: str
    message: str
    retry_after_s: int | None = None


def match_model(
    requested: str | None, models: Sequence[ModelStatus], capability: Capability | None = None
) -> ModelStatus | None:
    """The model a request names: exact name, then case-insensitive name or alias.

    None (no `model` field) means the mesh default: the model served by the most nodes (among
    those with `capability`, when some have it), else the first known model.
    """
    if requested is None:
        able = [m for m in models if m.capabilities and can(m.capabilities, capability)]
        if capability is not None and any(m.routable for m in able):
            models = able
        ready = sorted((m for m in models if m.routable), key=lambda m: -m.node_count)
        pool = ready or list(models)
        return pool[0] if pool else None
    for model in models:
        if model.name == requested:
            return model
    wanted = requested.casefold()
    for model in models:
        if wanted == model.name.casefold() or wanted in (a.casefold() for a in model.aliases):
            return model
    return None


def choose_route(
    requested: str | None,
    models: Sequence[ModelStatus],
    *,
    retry_after_s: int,
    in_flight: Mapping[str, int] | None = None,
    exclude: AbstractSet[str] = frozenset(),
    rotation: int = 0,
    capability: Capability | None = None,
    preferred: str | None = None,
) -> Route | RouteRefused:
    """Decide where a request goes, or why it cannot go anywhere now.

    `in_flight` maps backend keys (`LOCAL` or a node id) to this node's requests in flight
    there; `exclude` holds backends that already failed this request (failover);
    `capability` is what the endpoint needs; `preferred` is the backend key that last served
    the request's prompt prefix (None: no affinity).
    """
    model = match_model(requested, models, capability)
    if model is None:
        available = ", ".join(m.name for m in models) or "none yet"
        if requested is None:
            return RouteRefused(503, "no_models", "no model is served yet", retry_after_s)
        return RouteRefused(
            404,
            "model_not_found",
            f"model {requested!r} is not served by this mesh; available: {available}",
        )
    if not can(model.capabilities, capability):
        assert capability is not None
        return _incapable(model, models, capability)
    candidates = _candidates(model)
    usable = [route for route in candidates if route.key not in exclude]
    if usable:
        loads = in_flight or {}
        for route in usable:
            if route.key == preferred and within_fair_share(route, usable, loads):
                return route
        return _least_loaded(usable, loads, rotation)
    if candidates:
        return RouteRefused(
            502,
            "upstream_failed",
            f"the backend for {model.name} failed and no other replica could take the request",
        )
    reason = model.reason or model.state.value
    return RouteRefused(
        503, "model_not_ready", f"model {model.name} is not ready: {reason}", retry_after_s
    )


def within_fair_share(route: Route, usable: Sequence[Route], in_flight: Mapping[str, int]) -> bool:
    """Whether one more request on `route` keeps it within its fair share of the requests
    in flight over `usable` (this one included), rounded up: an idle replica always is."""
    total = sum(in_flight.get(r.key, 0) for r in usable) + 1
    share = -(-total // len(usable))  # ceil
    return in_flight.get(route.key, 0) + 1 <= share


def _incapable(
    model: ModelStatus, models: Sequence[ModelStatus], capability: Capability
) -> RouteRefused:
    able = sorted(m.name for m in models if capability in m.capabilities)
    what = (
        f"models that can: {', '.join(able)}"
        if able
        else f"no model of this mesh can ({_HOW[capability]})"
    )
    return RouteRefused(
        400,
        f"model_not_{capability.value}_capable",
        f"model {model.name} cannot answer {capability.value} requests; {what}",
    )


_HOW = {
    Capability.CHAT: "serve a chat model",
    Capability.COMPLETION: "serve a generative model",
    Capability.EMBEDDINGS: "serve an embedding GGUF, or start a node with --embeddings MODEL",
    Capability.RERANK: "serve a reranker GGUF, one whose pooling type is rank",
    Capability.INFILL: "serve a model with fill-in-the-middle tokens",
}


def _candidates(model: ModelStatus) -> list[Route]:
    routes = []
    if model.state is ModelState.READY and model.endpoint is not None:
        routes.append(Route(model.name, endpoint=model.endpoint))
    routes.extend(Route(model.name, node_id=node) for node in sorted(model.remote))
    return routes


def _least_loaded(routes: list[Route], in_flight: Mapping[str, int], rotation: int) -> Route:
    fewest = min(in_flight.get(route.key, 0) for route in routes)
    tied = [route for route in routes if in_flight.get(route.key, 0) == fewest]
    for route in tied:
        if route.endpoint is not None:
            return route  # prefer the local backend on ties: no hop
    return tied[rotation % len(tied)]
