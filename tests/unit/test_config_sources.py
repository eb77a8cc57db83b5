"""config.toml errors with file lines, `config show` provenance, the config reference."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from mesh_llm.cli import main
from mesh_llm.config import load_config, read_file_values
from mesh_llm.config_reference import (
    DESCRIPTIONS,
    config_keys,
    render_markdown,
    render_sample_toml,
)
from mesh_llm.config_sources import config_sources, find_line
from mesh_llm.errors import ConfigError


def _home(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config.toml").write_text(text)
    return tmp_path


def test_unknown_key_names_the_file_line(tmp_path: Path) -> None:
    home = _home(tmp_path, "# mine\n[api]\nport = 9000\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"config\.toml:4: unknown config key 'api\.prot'"):
        load_config({}, {"MESH_LLM_HOME": str(home)})


def test_wrong_type_names_the_key_the_line_and_the_type(tmp_path: Path) -> None:
    home = _home(tmp_path, 'models_dir = "/m"\n\n[backend]\nctx_size = "big"\n')
    with pytest.raises(ConfigError, match=r"config\.toml:4: bad value for backend\.ctx_size.*int"):
        load_config({}, {"MESH_LLM_HOME": str(home)})


def test_bad_value_checked_by_the_dataclass_names_the_line(tmp_path: Path) -> None:
    home = _home(tmp_path, "[api]\n\nqueue_depth = 0\n")
    with pytest.raises(ConfigError, match=r"config\.toml:3: api\.queue_depth must be at least 1"):
        load_config({}, {"MESH_LLM_HOME": str(home)})


def test_find_line_handles_dotted_keys_quotes_and_dashes() -> None:
    text = 'a = 1\napi.port = 2\n[ "backend" ]\nctx-size = 3\n[net]\nbind_port=4\n'
    assert find_line(text, "api.port") == 2
    assert find_line(text, "backend.ctx_size") == 4
    assert find_line(text, "net.bind_port") == 6
    assert find_line(text, "net.missing") is None


def test_sources_name_default_file_env_and_flag(tmp_path: Path) -> None:
    home = _home(tmp_path, "[api]\nport = 9000\nqueue_depth = 5\n")
    env = {"MESH_LLM_HOME": str(home), "MESH_LLM_QUEUE_DEPTH": "7"}
    flags: dict[str, object] = {"backend.ctx_size": 2048}
    config = load_config(flags, env)
    path = home / "config.toml"
    sources = {s.key: s for s in config_sources(config, path, read_file_values(path), env, flags)}
    assert (sources["api.port"].value, sources["api.port"].origin) == (9000, f"file {path}:2")
    assert (sources["api.queue_depth"].value, sources["api.queue_depth"].origin) == (
        7,
        "env MESH_LLM_QUEUE_DEPTH",
    )
    assert (sources["backend.ctx_size"].value, sources["backend.ctx_size"].origin) == (
        2048,
        "flag",
    )
    assert sources["console_port"].origin == "default"
    assert sources["home_dir"].origin == "env MESH_LLM_HOME"


def test_config_show_prints_values_and_hides_the_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = _home(tmp_path, '[api]\napi_key = "s3cret"\n')
    monkeypatch.setenv("MESH_LLM_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["--port", "9555", "config", "show"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "(set, hidden)" in out
    port_row = next(line for line in out.splitlines() if " api.port " in line)
    assert "9555" in port_row and "flag" in port_row


def test_every_key_is_documented() -> None:
    keys = [item.key for item in config_keys()]
    assert not [k for k in keys if not DESCRIPTIONS.get(k)], "add the key to DESCRIPTIONS"
    assert not set(DESCRIPTIONS) - set(keys), "DESCRIPTIONS names keys the config lacks"


def test_sample_toml_lists_every_key_and_each_default_loads(tmp_path: Path) -> None:
    sample = render_sample_toml()
    tables: dict[str, object] = {"api": {}, "backend": {}, "net": {}, "mesh": {}, "planner": {}}
    assert tomllib.loads(sample) == tables
    value_line = re.compile(r"^# ([a-z_]+ = .+)$")
    uncommented = "\n".join(
        match.group(1) if (match := value_line.match(line)) else line
        for line in sample.splitlines()
    )
    values = tomllib.loads(uncommented)
    home = _home(tmp_path, uncommented.replace('home_dir = "~/.mesh-llm"\n', ""))
    load_config({}, {"MESH_LLM_HOME": str(home)})  # every shown default is a valid value
    flat = set(values) | {
        f"{t}.{k}" for t, table in values.items() if isinstance(table, dict) for k in table
    }
    missing = {item.key for item in config_keys() if item.default is not None} - flat
    assert not missing
    assert all(f"`{item.key}`" in render_markdown() for item in config_keys())


def test_readme_config_reference_lists_every_key() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    reference = readme.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    assert not [i.key for i in config_keys() if f"| `{i.key}` |" not in reference]
