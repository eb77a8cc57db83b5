"""Where each configuration value comes from, and config.toml errors that name the file line.

`check_file_values` validates the keys of `config.toml` one by one (called by the loader), so an
unknown key or a wrong type is reported as `config.toml:LINE: key …`. `config_sources` replays
the layers (default < file < environment < flag) for `mesh-llm config show`. `tomllib` keeps no
positions, so `find_line` locates a key by scanning the text for its table header and its
`key =` line (dotted keys and inline tables are found by their first segment). Reads the config
file only when asked; never the environment (callers pass it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.config import ENV_KEYS, Config, _coerce
from mesh_llm.config_reference import config_keys
from mesh_llm.errors import ConfigError

_HEADER = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_.\"'-]+)\s*=")


@dataclass(frozen=True, slots=True)
class Source:
    """One effective value and the layer that set it ("default", "file …", "env …", "flag")."""

    key: str
    value: object
    origin: str


def find_line(text: str, dotted: str) -> int | None:
    """1-based line of `dotted` (e.g. "api.port") in TOML `text`, or None."""
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = header.group(1).replace('"', "").replace("'", "").replace("-", "_")
            continue
        assign = _ASSIGN.match(line)
        if assign is None:
            continue
        name = assign.group(1).replace('"', "").replace("'", "").replace("-", "_")
        full = f"{table}.{name}" if table else name
        if full == dotted or dotted.startswith(full + "."):
            return number
    return None


def check_file_values(path: Path, values: Mapping[str, object]) -> None:
    """Raise `ConfigError` naming `path:line` for the first unknown key or badly typed value."""
    hints = {item.key: item for item in config_keys()}
    types = _field_types()
    for key, raw in values.items():
        if key not in hints:
            raise ConfigError(
                f"{_where(path, key)}: unknown config key {key!r} "
                "(see the config reference: mesh-llm config show lists every key)"
            )
        try:
            _coerce(key, types[key], raw)
        except ConfigError as exc:
            expected = hints[key].type_name
            raise ConfigError(f"{_where(path, key)}: {exc} — expected {expected}") from None
    try:
        # Checks across one table (e.g. api.queue_depth >= 1) with the file's values alone.
        from mesh_llm.config import _build

        _build(Config, values, "")
    except ConfigError as exc:
        culprit = next((k for k in values if k in str(exc)), None)
        raise ConfigError(f"{_where(path, culprit) if culprit else path}: {exc}") from None


def config_sources(
    effective: Config,
    file_path: Path,
    file_values: Mapping[str, object],
    env: Mapping[str, str],
    flags: Mapping[str, object],
) -> Iterator[Source]:
    """Each key's effective value in `effective` and the last layer that gave it."""
    env_by_key = {key: name for name, key in ENV_KEYS.items() if name in env}
    if "MESH_LLM_HOME" in env:
        env_by_key["home_dir"] = "MESH_LLM_HOME"
    try:
        text = file_path.read_text(encoding="utf-8")
    except OSError:
        text = ""
    for item in config_keys():
        origin = "default"
        if item.key in file_values:
            line = find_line(text, item.key)
            origin = f"file {file_path}" + (f":{line}" if line else "")
        if item.key in env_by_key:
            origin = f"env {env_by_key[item.key]}"
        if flags.get(item.key) is not None:
            origin = "flag"
        yield Source(item.key, _lookup(effective, item.key), origin)


def _lookup(config: object, dotted: str) -> object:
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _field_types() -> dict[str, object]:
    return {item.key: item.hint for item in config_keys()}


def _where(path: Path, key: str) -> str:
    try:
        line = find_line(path.read_text(encoding="utf-8"), key)
    except OSError:
        line = None
    return f"{path}:{line}" if line else str(path)
