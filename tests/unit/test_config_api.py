"""API flags and config: --listen-all, --api-key / MESH_LLM_API_KEY / file, --queue-depth."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mesh_llm.api.auth import warn_if_exposed
from mesh_llm.cli import ALL_INTERFACES, build_parser, config_from_args
from mesh_llm.config import ApiConfig, Config
from mesh_llm.errors import ConfigError


def _config(tmp_path: Path, argv: list[str], env: dict[str, str] | None = None) -> Config:
    args = build_parser().parse_args(["--models-dir", str(tmp_path), *argv])
    return config_from_args(args, {"MESH_LLM_HOME": str(tmp_path), **(env or {})})


def test_defaults_are_loopback_open_and_depth_64(tmp_path: Path) -> None:
    api = _config(tmp_path, []).api
    assert api.host == "127.0.0.1"
    assert api.api_key is None
    assert api.queue_depth == 64


def test_listen_all_binds_every_interface(tmp_path: Path) -> None:
    assert _config(tmp_path, ["--listen-all"]).api.host == ALL_INTERFACES == "0.0.0.0"


def test_api_key_precedence_file_env_flag(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[api]\napi_key = "from-file"\nqueue_depth = 3\n')
    assert _config(tmp_path, []).api.api_key == "from-file"
    assert _config(tmp_path, []).api.queue_depth == 3
    env = {"MESH_LLM_API_KEY": "from-env", "MESH_LLM_QUEUE_DEPTH": "5"}
    assert _config(tmp_path, [], env).api.api_key == "from-env"
    assert _config(tmp_path, [], env).api.queue_depth == 5
    flags = ["--api-key", "from-flag", "--queue-depth", "7"]
    assert _config(tmp_path, flags, env).api.api_key == "from-flag"
    assert _config(tmp_path, flags, env).api.queue_depth == 7


def test_the_key_is_not_in_the_repr(tmp_path: Path) -> None:
    config = _config(tmp_path, ["--api-key", "s3cret-value"])
    assert "s3cret-value" not in repr(config)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--api-key", " "], {}, "API key is empty"),
        ([], {"MESH_LLM_API_KEY": ""}, "API key is empty"),
        (["--queue-depth", "0"], {}, "queue_depth must be at least 1"),
    ],
)
def test_bad_api_values_are_config_errors(
    tmp_path: Path, argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, argv, env)


def test_exposed_without_key_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert warn_if_exposed(ApiConfig(host="0.0.0.0")) is True
    assert "WITHOUT an API key" in caplog.text
    assert "--api-key" in caplog.text


@pytest.mark.parametrize(
    "config", [ApiConfig(), ApiConfig(host="0.0.0.0", api_key="k"), ApiConfig(host="::1")]
)
def test_loopback_or_keyed_does_not_warn(
    config: ApiConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert warn_if_exposed(config) is False
    assert caplog.text == ""
