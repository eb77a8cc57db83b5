"""Real `mesh-llm` processes for end-to-end tests: start, wait for readiness, stop by pid.

Each node runs `python -m mesh_llm` with its own home directory and API port on loopback; its
log goes to a file that failing assertions can show. `stop()` ends only the process it
started (SIGINT, then SIGKILL after a deadline) and reports what was left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.1


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


def http_status(url: str) -> int | None:
    """Status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


@dataclass
class MeshProcess:
    """One `mesh-llm` node process."""

    home: Path
    args: list[str]
    port: int = field(default_factory=free_tcp_port)
    console_port: int = field(default_factory=free_tcp_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    # The program that runs the node (e.g. an installed venv's `mesh-llm` script).
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "mesh_llm"])
    # False: start without --port/--console, so the node picks its defaults (then set `port`
    # and `console_port` to those defaults so the helpers below reach it).
    pass_ports: bool = True
    # Log file name inside `home`: two nodes sharing one home need two logs.
    log_name: str = "node.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / self.log_name

    def start(self) -> MeshProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MESH_LLM_HOME": str(self.home), **self.env}
        env.pop("MESH_LLM_PORT", None)
        argv = [*self.command, *self.args]
        if self.pass_ports:
            argv += ["--port", str(self.port), "--console", str(self.console_port)]
        else:
            env.pop("MESH_LLM_CONSOLE_PORT", None)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, *, local: bool | None = None) -> None:
        """Wait for /readyz 200 and, unless `local` is False (default: not a --client), for a
        model served by this node itself: /readyz is also 200 for models served elsewhere."""
        own = "--client" not in self.args if local is None else local

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}):\n{self.log_text()}")
            if http_status(self.base_url + "/readyz") != 200:
                return False
            return not own or any(
                m["host"] == "local" and m["state"] == "ready"
                for m in self.status().get("models", [])
            )

        try:
            wait_until(ready, timeout_s, f"{self.base_url}/readyz")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- node log ---\n{self.log_text()}") from None

    def status(self) -> dict[str, Any]:
        """The node's /api/status, or {} while it does not answer."""
        url = f"http://127.0.0.1:{self.console_port}/api/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                data: dict[str, Any] = json.loads(response.read())
                return data
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def wait_status(self, timeout_s: float = 30.0) -> dict[str, Any]:
        wait_until(lambda: bool(self.status()), timeout_s, f"status of {self.home.name}")
        return self.status()

    def peer_ids(self) -> set[str]:
        return {p["node_id"] for p in self.status().get("peers", [])}

    def node_id(self) -> str:
        node_id: str = self.wait_status()["node"]["node_id"]
        return node_id

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def llama_argv(self) -> list[str]:
        """The command line of this node's one llama-server, or [] (none, several, or exiting)."""
        servers = [p for p in self.descendants() if p.name() == "llama-server"]
        try:
            return servers[0].cmdline() if len(servers) == 1 else []
        except psutil.NoSuchProcess:  # includes a zombie not reaped yet
            return []

    def llama_server(self) -> psutil.Process:
        servers = [
            p
            for p in self.descendants()
            if p.name() == "llama-server" or "tests.fakes.fake_llama_server" in p.cmdline()
        ]
        assert len(servers) == 1, f"expected one llama-server child, found {servers}"
        return servers[0]

    def llama_server_port(self) -> int:
        cmdline = self.llama_server().cmdline()
        return int(cmdline[cmdline.index("--port") + 1])

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        """End this node and anything it left, by pid only. Safe to call twice."""
        if self.proc is None:
            return
        children = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


class Nodes:
    """The `mesh-llm` processes one test (or one module's fixture) started, all on the same
    llama.cpp binaries; `close()` stops every one of them, in start order.

    `start` gives each node `--models-dir` (this group's, or its own), `--bin-dir` and JSON
    logs; `config` is written as the home's config.toml (the group's default, or per node).
    `seed` starts a node and waits for its invite token. Nodes made elsewhere (e.g. a restart
    on the same home) are added to `nodes` so that `close()` stops them too.
    """

    def __init__(
        self,
        root: Path,
        bin_dir: Path,
        models_dir: Path,
        *,
        config: str = "",
        seed_model: str | None = None,
    ) -> None:
        self.root = root
        self.bin_dir = str(bin_dir)
        self.models_dir = models_dir
        self.config = config
        self.seed_model = seed_model
        self.nodes: list[MeshProcess] = []

    def common(self, models_dir: Path | None = None) -> list[str]:
        """The arguments every node of this group gets."""
        models = str(models_dir or self.models_dir)
        return ["--models-dir", models, "--bin-dir", self.bin_dir, "--log-format", "json"]

    def start(
        self,
        name: str,
        *args: str,
        models_dir: Path | None = None,
        env: dict[str, str] | None = None,
        config: str | None = None,
        home: Path | None = None,
        **process: Any,
    ) -> MeshProcess:
        node = MeshProcess(home or self.root / name, [*args, *self.common(models_dir)], **process)
        node.env = env or {}
        text = self.config if config is None else config
        if text:
            node.home.mkdir(parents=True, exist_ok=True)
            (node.home / "config.toml").write_text(text)
        self.nodes.append(node.start())
        return node

    def seed(
        self, *args: str, name: str = "seed", model: str | None = None, **kwargs: Any
    ) -> tuple[MeshProcess, str]:
        """A node serving `model` (default: the group's `seed_model`) and its invite token."""
        chosen = model or self.seed_model
        node = self.start(name, *(("--model", chosen) if chosen else ()), *args, **kwargs)
        return node, invite_token(node)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()


def invite_token(node: MeshProcess, timeout_s: float = 30.0) -> str:
    """The node's invite token, once it has one."""
    wait_until(lambda: bool(node.status().get("token")), timeout_s, f"token of {node.home.name}")
    token: str = node.status()["token"]
    return token
