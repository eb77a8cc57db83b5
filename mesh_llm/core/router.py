"""Routing of one API request to a backend: a pure decision over the known models.

Input: the requested model name (or None for the mesh default), the status of every model the
node knows (its local backend, if any, and the remote hosts serving it ready), and this node's
own count of in-flight requests per backend; output: a `Route` to the local endpoint or to a
remote node, or a `RouteRefused` with the HTTP status, an OpenAI error code, a message listing
what is available, and a retry hint. Replicas are chosen by least in-flight requests; ties go
to the local backend, then rotate by the caller's request counter (so passive clients spread
deterministically). Sans-I/O: imports no I/O module and reads no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum

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


def match_model(requested: str | None, models: Sequence[ModelStatus]) -> ModelStatus | None:
    """The model a request names: exact name, then case-insensitive name or alias.

    None (no `model` field) means the mesh default: the model served by the most nodes, else
    the first known model.
    """
    if requested is None:
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
) -> Route | RouteRefused:
    """Decide where a request goes, or why it cannot go anywhere now.

    `in_flight` maps backend keys (`LOCAL` or a node id) to this node's requests in flight
    there; `exclude` holds backends that already failed this request (failover).
    """
    model = match_model(requested, models)
    if model is None:
        available = ", ".join(m.name for m in models) or "none yet"
        if requested is None:
            return RouteRefused(503, "no_models", "no model is served yet", retry_after_s)
        return RouteRefused(
            404,
            "model_not_found",
            f"model {requested!r} is not served by this mesh; available: {available}",
        )
    candidates = _candidates(model)
    usable = [route for route in candidates if route.key not in exclude]
    if usable:
        return _least_loaded(usable, in_flight or {}, rotation)
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
