"""Config: defaults, precedence (defaults < file < env < flags), nested tables, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_llm.config import ApiConfig, BackendConfig, Config, load_config
from mesh_llm.errors import ConfigError


def _write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text, encoding="utf-8")


def test_defaults_without_file_env_or_flags(tmp_path: Path) -> None:
    config = load_config({"home_dir": tmp_path}, {})
    assert config.home_dir == tmp_path
    assert config.api == ApiConfig()
    assert config.backend == BackendConfig()
    assert config.api.port == 9337
    assert config.api.host == "127.0.0.1"
    assert config.console_port == 3131
    assert config.log_format == "pretty"
    assert config.ephemeral_key is False
    assert config.models == ()
    assert config.backend.ctx_size == 4096
    assert config.backend.bin_dir is None
    assert config.key_path == tmp_path / "key"
    assert config.run_dir == tmp_path / "run"


def test_home_from_env_reads_its_config_file(tmp_path: Path) -> None:
    _write_config(tmp_path, "console_port = 4000\n")
    config = load_config({}, {"MESH_LLM_HOME": str(tmp_path)})
    assert config.home_dir == tmp_path
    assert config.console_port == 4000


def test_home_flag_wins_over_env_home(tmp_path: Path) -> None:
    flag_home, env_home = tmp_path / "flag", tmp_path / "env"
    _write_config(flag_home, "console_port = 1111\n")
    _write_config(env_home, "console_port = 2222\n")
    config = load_config({"home_dir": flag_home}, {"MESH_LLM_HOME": str(env_home)})
    assert config.home_dir == flag_home
    assert config.console_port == 1111


def test_file_overrides_defaults_with_nested_tables(tmp_path: Path) -> None:
    _write_config(
        tmp_path,
        """
log_format = "json"
models = ["a", "b"]

[api]
port = 9000
max-body-bytes = 1024

[backend]
ctx_size = 8192
bin_dir = "/opt/llama/bin"
extra_args = ["--flash-attn", "on"]
""",
    )
    config = load_config({"home_dir": tmp_path}, {})
    assert config.log_format == "json"
    assert config.models == ("a", "b")
    assert config.api.port == 9000
    assert config.api.max_body_bytes == 1024
    assert config.api.host == "127.0.0.1"  # untouched sibling keeps its default
    assert config.backend.ctx_size == 8192
    assert config.backend.bin_dir == Path("/opt/llama/bin")
    assert config.backend.extra_args == ("--flash-attn", "on")


def test_env_overrides_file(tmp_path: Path) -> None:
    _write_config(tmp_path, "[api]\nport = 9000\n[backend]\nctx_size = 8192\n")
    env = {"MESH_LLM_PORT": "9100", "MESH_LLM_EPHEMERAL_KEY": "yes"}
    config = load_config({"home_dir": tmp_path}, env)
    assert config.api.port == 9100
    assert config.ephemeral_key is True
    assert config.backend.ctx_size == 8192  # not in env: the file still counts


def test_flags_override_env_and_file(tmp_path: Path) -> None:
    _write_config(tmp_path, "[api]\nport = 9000\n")
    config = load_config(
        {"home_dir": tmp_path, "api.port": 9200, "backend.ctx_size": None},
        {"MESH_LLM_PORT": "9100", "MESH_LLM_CTX_SIZE": "2048"},
    )
    assert config.api.port == 9200
    # A flag given as None means "not given": the env value stays.
    assert config.backend.ctx_size == 2048


def test_env_paths_are_paths(tmp_path: Path) -> None:
    env = {
        "MESH_LLM_MODELS_DIR": str(tmp_path / "models"),
        "MESH_LLM_BIN_DIR": str(tmp_path / "bin"),
        "MESH_LLM_LLAMA_SERVER": str(tmp_path / "bin" / "llama-server"),
    }
    config = load_config({"home_dir": tmp_path}, env)
    assert config.models_dir == tmp_path / "models"
    assert config.backend.bin_dir == tmp_path / "bin"
    assert config.backend.llama_server_path == tmp_path / "bin" / "llama-server"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("no_such_key = 1\n", "no_such_key"),
        ("[api]\nno_such_key = 1\n", "api.no_such_key"),
        ("[nothing]\nport = 1\n", "nothing.port"),
    ],
)
def test_unknown_key_in_file_is_a_config_error(tmp_path: Path, text: str, key: str) -> None:
    _write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config({"home_dir": tmp_path}, {})


def test_unknown_flag_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"api\.bogus"):
        load_config({"home_dir": tmp_path, "api.bogus": 1}, {})


@pytest.mark.parametrize(
    ("flags", "env", "key"),
    [
        ({"api.port": "not-a-number"}, {}, "api.port"),
        ({"api.port": True}, {}, "api.port"),
        ({}, {"MESH_LLM_CTX_SIZE": "4k"}, "backend.ctx_size"),
        ({}, {"MESH_LLM_EPHEMERAL_KEY": "maybe"}, "ephemeral_key"),
        ({"log_format": "xml"}, {}, "log_format"),
        ({}, {"MESH_LLM_LOG_FORMAT": "yaml"}, "log_format"),
        ({"shutdown_grace_s": "soon"}, {}, "shutdown_grace_s"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, flags: dict[str, object], env: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config({"home_dir": tmp_path, **flags}, env)


def test_bad_value_in_file_names_the_key(tmp_path: Path) -> None:
    _write_config(tmp_path, '[backend]\nctx_size = "big"\n')
    with pytest.raises(ConfigError, match=r"backend\.ctx_size"):
        load_config({"home_dir": tmp_path}, {})


@pytest.mark.parametrize("raw", ["1", "true", "YES", "on"])
def test_true_spellings(tmp_path: Path, raw: str) -> None:
    config = load_config({"home_dir": tmp_path}, {"MESH_LLM_EPHEMERAL_KEY": raw})
    assert config.ephemeral_key is True


@pytest.mark.parametrize("raw", ["0", "false", "No", "off", ""])
def test_false_spellings(tmp_path: Path, raw: str) -> None:
    config = load_config({"home_dir": tmp_path}, {"MESH_LLM_EPHEMERAL_KEY": raw})
    assert config.ephemeral_key is False


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    _write_config(tmp_path, "[api\nport = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config({"home_dir": tmp_path}, {})


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config({"home_dir": tmp_path}, {})
    with pytest.raises(AttributeError):
        config.verbose = 3  # type: ignore[misc]
    assert isinstance(config, Config)
