"""`mesh-llm drop MODEL`: the node(s) serving a model leave the mesh.

A node that serves the model itself answers 200 and then stops (after `drop_exit_delay_s`, so
the answer leaves first: the node exits 0 as on Ctrl-C). A node that does not forwards the drop
to every remote host serving it (`POST /mesh/drop` over the peer transport) and answers with the
nodes that dropped and the errors of those that did not; 404 when no node serves the model,
listing what is served. A drop forwarded by another node is answered by `drop_local` only, so
it is never forwarded again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from mesh_llm.api.inbound import DROP_PATH
from mesh_llm.api.openai import error_body
from mesh_llm.api.upstream import PeerRequests, UpstreamFailed, open_remote, request_head
from mesh_llm.config import Config
from mesh_llm.core.router import ModelStatus
from mesh_llm.errors import MeshError

log = logging.getLogger(__name__)

Answer = tuple[int, dict[str, Any]]


class Drops:
    """Drops of models by name, for one node."""

    def __init__(
        self,
        config: Config,
        served: Callable[[], Sequence[ModelStatus]],
        statuses: Callable[[], Sequence[ModelStatus]],
        peers: PeerRequests,
        leave: Callable[[], None],
        short_id: Callable[[], str],
    ) -> None:
        self._config = config
        self._served = served  # this node's own model servers
        self._statuses = statuses  # every model the node knows (the router's input)
        self._peers = peers
        self._leave = leave  # sets the node's shutdown trigger
        self._short_id = short_id

    async def drop(self, model: str) -> Answer:
        """Drop `model` here if this node serves it, else on every remote host serving it."""
        local = await self.drop_local(model)
        if local[0] != 404:
            return local
        status = next((m for m in self._statuses() if m.name == model), None)
        if status is None or not status.remote:
            return local
        dropped: list[str] = []
        errors: list[str] = []
        for node_id in status.remote:
            try:
                answer = await self._forward(node_id, model)
            except (MeshError, UpstreamFailed) as exc:
                errors.append(f"{node_id[:10]}: {exc}")
                continue
            if answer == 200:
                dropped.append(node_id[:10])
            else:
                errors.append(f"{node_id[:10]} answered {answer}")
        if not dropped:
            return 502, error_body(
                502, f"could not drop {model}: {'; '.join(errors)}", "drop_failed"
            )
        return 200, {"dropped": model, "nodes": dropped, "errors": errors}

    async def drop_local(self, model: str) -> Answer:
        """Drop `model` if this node serves it: answer, then leave the mesh and exit 0."""
        if any(model == s.name or model in s.aliases for s in self._served()):
            log.info("dropping %s: leaving the mesh", model, extra={"event": "drop"})
            asyncio.get_running_loop().call_later(self._config.drop_exit_delay_s, self._leave)
            return 200, {"dropped": model, "nodes": [self._short_id()]}
        names = sorted({m.name for m in self._statuses() if m.routable})
        message = f"no node serves {model!r}; served models: {', '.join(names) or 'none'}"
        return 404, error_body(404, message, "model_not_found")

    async def _forward(self, node_id: str, model: str) -> int:
        """`POST /mesh/drop` to `node_id`; the status it answered."""
        body = json.dumps({"model": model}).encode()
        head = request_head(DROP_PATH, body, uuid.uuid4().hex)
        upstream = await open_remote(self._peers, node_id, head, body, self._config.api)
        try:
            async for _chunk in upstream.chunks():
                pass
        finally:
            upstream.close()
        return upstream.status
