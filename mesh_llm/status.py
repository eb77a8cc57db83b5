"""`mesh-llm status` and `mesh-llm drop`: talk to the running local node.

`status` reads `GET /api/status` from the node's management endpoint on the console port
(loopback) and prints the node, its models and its peers as tables, or the raw JSON with
`--json`. `drop NAME` posts `/mesh/drop` to the local node's API (loopback), which forwards it to
the node serving the model. Both raise `PeerUnavailable` when no node answers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console
from rich.table import Table

from mesh_llm.config import Config
from mesh_llm.errors import PeerUnavailable


def fetch_status(config: Config) -> dict[str, Any]:
    url = f"http://127.0.0.1:{config.console_port}/api/status"
    try:
        with urllib.request.urlopen(url, timeout=config.net.status_request_timeout_s) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PeerUnavailable(
            f"no mesh-llm node answers on 127.0.0.1:{config.console_port} ({exc}); is one "
            f"running here? If it uses another console port, pass --console PORT"
        ) from exc


def show_status(config: Config, console: Console, *, as_json: bool) -> int:
    status = fetch_status(config)
    if as_json:
        console.print_json(json.dumps(status))
        return 0
    node = status["node"]
    console.print(
        f"[bold]node[/] {node['short_id']} ({node['name']}), role {node['role']}, "
        f"{_gib(node['vram_bytes'])} {node['backend']}, QUIC port {node['mesh_port']}, "
        f"fast lane TCP port {status.get('fast_lane_port') or '-'}, API {node['api_url']}",
        highlight=False,
    )
    models = Table(title="models")
    for column in ("model", "state", "nodes", "host / reason"):
        models.add_column(column)
    for model in status["models"]:
        where = model["reason"] or model["host"][:10]
        models.add_row(model["name"], model["state"], str(model.get("nodes", "")), where)
    console.print(models)
    peers = Table(title=f"peers ({len(status['peers'])}; passive clients: {status['clients']})")
    for column in ("node", "name", "state", "address", "RTT", "role", "VRAM", "on disk", "serving"):
        peers.add_column(column, overflow="fold")
    for peer in status["peers"]:
        record = peer["record"]
        rtt = f"{peer['rtt_ms']:.1f} ms" if peer["rtt_ms"] is not None else "-"
        serving = ", ".join(
            f"{m} ({'ready' if s['ready'] else s['role']})" for m, s in record["serving"].items()
        )
        peers.add_row(
            peer["short_id"],
            record["name"],
            peer["state"],
            peer["address"] or ", ".join(record["addrs"][:2]),
            rtt,
            record["role"],
            _gib(record["vram_bytes"]),
            ", ".join(record["models_on_disk"]) or "-",
            serving or "-",
        )
    console.print(peers)
    _show_tunnels(console, status.get("rpc_tunnels", []))
    _show_api_lanes(console, status.get("api_lanes"))
    return 0


def _show_api_lanes(console: Console, lanes: dict[str, Any] | None) -> None:
    """API requests this node sent to other hosts, per lane (fast = TCP+TLS, quic)."""
    relayed: dict[str, str] = lanes.get("relayed_for_now", {}) if lanes else {}
    if not lanes or not (lanes["fast"] or lanes["quic"] or lanes["quic_for_now"] or relayed):
        return
    line = (
        f"API requests to other hosts: {lanes['fast']} over the fast lane, "
        f"{lanes['quic']} over QUIC, {lanes.get('relay', 0)} through a relay"
    )
    reasons = lanes.get("reasons", {})
    if lanes["quic_for_now"]:
        hosts = [f"{h}: {reasons[h]}" if reasons.get(h) else h for h in lanes["quic_for_now"]]
        line += f" (on QUIC for now: {'; '.join(hosts)})"
    if relayed:
        hosts = [
            f"{h} through {via}" + (f": {reasons[h]}" if reasons.get(h) else "")
            for h, via in relayed.items()
        ]
        line += f" (relayed for now: {'; '.join(hosts)})"
    console.print(line, highlight=False)


def _show_tunnels(console: Console, tunnels: list[dict[str, Any]]) -> None:
    """The RPC tunnels of a split host: lane per worker (fast = TCP+TLS, quic) and why."""
    if not tunnels:
        return
    table = Table(title="rpc tunnels (this node hosts a split)")
    for column in ("worker", "local port", "lane", "sessions", "sent", "received", "why"):
        table.add_column(column, overflow="fold")
    for tunnel in tunnels:
        table.add_row(
            tunnel["short_id"],
            str(tunnel["port"]),
            tunnel["lane"],
            str(tunnel["connections"]),
            f"{tunnel['bytes_up'] / 1e6:.1f} MB",
            f"{tunnel['bytes_down'] / 1e6:.1f} MB",
            tunnel["reason"] or "-",
        )
    console.print(table)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def drop_model(config: Config, name: str, console: Console) -> int:
    """Ask the local node to make the node(s) serving `name` leave the mesh."""
    url = f"http://127.0.0.1:{config.api.port}/mesh/drop"
    request = urllib.request.Request(
        url,
        data=json.dumps({"model": name}).encode(),
        headers={"Content-Type": "application/json", **auth_headers(config)},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=config.net.status_request_timeout_s) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PeerUnavailable(
            f"no mesh-llm node answers on 127.0.0.1:{config.api.port} ({exc}); is one running "
            f"here? If its API uses another port, pass --port PORT"
        ) from exc
    nodes = ", ".join(answer.get("nodes", []))
    console.print(f"dropped {answer.get('dropped', name)}: node {nodes} is leaving the mesh")
    return 0


def auth_headers(config: Config) -> dict[str, str]:
    """The API key header for the local node's API, when one is configured."""
    key = config.api.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}
