"""A supervised `rpc-server` for when this node is a worker in another node's split.

`RpcWorker.run()` starts llama.cpp's rpc-server on a free loopback port (tensor cache on) and
keeps it running until `stop()`; it is ready when the port accepts TCP connections. Remote hosts
never reach it directly: the RPC tunnel connects to `port` on their behalf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from mesh_llm.backend.build import Binaries
from mesh_llm.backend.llama import LOOPBACK, build_rpc_server_argv
from mesh_llm.backend.process import ChildSpec, ChildState, HealthCheck, Supervisor
from mesh_llm.backend.serving import free_tcp_port
from mesh_llm.config import Config
from mesh_llm.errors import BackendError

log = logging.getLogger(__name__)


class RpcWorker:
    """llama.cpp's rpc-server on 127.0.0.1:`port`, supervised."""

    def __init__(
        self, config: Config, binaries: Binaries, on_state: Callable[[ChildState, str], None]
    ) -> None:
        if binaries.rpc_server is None:
            raise BackendError(
                f"no rpc-server next to {binaries.llama_server}; this node cannot be a worker "
                f"(pass --rpc-server-path)"
            )
        self._config = config
        self.port = free_tcp_port()
        # rpc-server's own default is half the cores: measured 0.78 of the generation speed
        # of all cores on a 2-core CPU host (tests/bench/bench_split.py), so use them all.
        threads = config.backend.threads or os.cpu_count() or 1
        argv = build_rpc_server_argv(binaries.rpc_server, self.port, threads=threads)
        self.supervisor = Supervisor(
            ChildSpec("rpc-server", tuple(argv)),
            health=port_accepts(self.port, config.backend.port_probe_timeout_s),
            config=config.backend,
            run_dir=config.run_dir,
            on_state=on_state,
        )

    async def run(self) -> None:
        log.info("starting rpc-server on %s:%d", LOOPBACK, self.port, extra={"event": "rpc_start"})
        await self.supervisor.run()

    async def stop(self) -> None:
        await self.supervisor.stop()


def port_accepts(port: int, timeout_s: float) -> HealthCheck:
    """A check that something accepts TCP connections on 127.0.0.1:`port` within `timeout_s`."""

    async def check() -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(LOOPBACK, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    return check
