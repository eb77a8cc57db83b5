"""Routing of one API request to a backend: a pure decision over the known models.

Input: the requested model name (or None for the mesh default) and the status of every model the
node knows; output: a `Route` to an endpoint, or a `RouteRefused` with the HTTP status, an
OpenAI error code, a message listing what is available, and a retry hint. Sans-I/O: imports no
I/O module and reads no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    endpoint: str | None = None
    aliases: tuple[str, ...] = ()
    host: str = "local"


@dataclass(frozen=True, slots=True)
class Route:
    model: ModelName
    endpoint: str


@dataclass(frozen=True, slots=True)
class RouteRefused:
    status: int
    code: str
    message: str
    retry_after_s: int | None = None


def match_model(requested: str | None, models: Sequence[ModelStatus]) -> ModelStatus | None:
    """The model a request names: exact name, then case-insensitive name or alias.

    None (no `model` field) means the mesh default: a ready model if there is one, else the
    first known model.
    """
    if requested is None:
        ready = [m for m in models if m.state is ModelState.READY]
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
    requested: str | None, models: Sequence[ModelStatus], *, retry_after_s: int
) -> Route | RouteRefused:
    """Decide where a request goes, or why it cannot go anywhere now."""
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
    if model.state is ModelState.READY and model.endpoint is not None:
        return Route(model.name, model.endpoint)
    reason = model.reason or model.state.value
    return RouteRefused(
        503, "model_not_ready", f"model {model.name} is not ready: {reason}", retry_after_s
    )
