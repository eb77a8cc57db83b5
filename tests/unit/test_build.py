"""llama.cpp binaries: pure build commands, header/version parsing, and the search order.

No real build runs here: the search tests use tmp dirs holding fake executable scripts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mesh_llm.backend import build
from mesh_llm.backend.build import (
    BUILD_INFO_FILE,
    LLAMA_SERVER,
    RPC_SERVER,
    build_command,
    cache_bin_dir,
    configure_command,
    find_binaries,
    parse_version_output,
    read_rpc_protocol,
)
from mesh_llm.config import BackendConfig
from mesh_llm.errors import BackendError

SOURCE = Path("/src/llama.cpp")
BUILD_DIR = Path("/tmp/build")


@pytest.fixture(autouse=True)
def _bundle_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the bundle at an empty tmp dir so a real bundle never leaks into a test."""
    bundle = tmp_path / "bundle" / "bin"
    monkeypatch.setattr(build, "BUNDLE_BIN_DIR", bundle)
    monkeypatch.setattr(build, "INSTALLED_BIN_DIR", tmp_path / "venv" / "share" / "bin")
    return bundle


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _fake_binaries(
    directory: Path,
    build_id: str | None,
    *,
    rpc_name: str | None = RPC_SERVER,
    version_output: str = "",
) -> Path:
    """Executable scripts standing in for llama-server (and rpc-server), plus build info."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [LLAMA_SERVER] + ([rpc_name] if rpc_name else [])
    for name in names:
        script = directory / name
        script.write_text(f"#!/bin/sh\necho '{version_output}' >&2\n", encoding="utf-8")
        script.chmod(0o755)
    if build_id is not None:
        info = {"build_id": build_id, "rpc_protocol": "7.0.0"}
        (directory / BUILD_INFO_FILE).write_text(json.dumps(info), encoding="utf-8")
    return directory


# -- pure commands ---------------------------------------------------------------------------


def test_configure_command_is_portable_cpu_with_rpc() -> None:
    argv = configure_command(SOURCE, BUILD_DIR, "cpu")
    assert argv[:5] == ["cmake", "-S", str(SOURCE), "-B", str(BUILD_DIR)]
    for flag in (
        "-DGGML_RPC=ON",
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DCMAKE_BUILD_TYPE=Release",
    ):
        assert flag in argv
    assert "-DGGML_NATIVE=ON" not in argv
    assert not any("CUDA" in arg for arg in argv)
    assert not any("METAL" in arg for arg in argv)


def test_configure_command_with_cuda() -> None:
    argv = configure_command(SOURCE, BUILD_DIR, "cuda")
    assert "-DGGML_CUDA=ON" in argv
    assert "-DGGML_RPC=ON" in argv
    assert "-DGGML_NATIVE=OFF" in argv


def test_configure_command_metal_variant() -> None:
    argv = configure_command(SOURCE, BUILD_DIR, "metal")
    assert "-DGGML_METAL=ON" in argv
    assert "-DGGML_RPC=ON" in argv
    assert "-DGGML_AVX2=ON" not in argv
    assert not any("CUDA" in arg for arg in argv)


def test_build_command_targets_exactly_the_two_programs() -> None:
    argv = build_command(BUILD_DIR, 8)
    assert argv[:3] == ["cmake", "--build", str(BUILD_DIR)]
    assert "-j8" in argv
    assert argv[argv.index("--target") + 1 :] == ["llama-server", "ggml-rpc-server"]


@pytest.mark.parametrize("jobs", [0, -3])
def test_build_command_at_least_one_job(jobs: int) -> None:
    assert "-j1" in build_command(BUILD_DIR, jobs)


# -- parsing ---------------------------------------------------------------------------------


def _write_header(source: Path, text: str) -> None:
    header = source / "ggml" / "include" / "ggml-rpc.h"
    header.parent.mkdir(parents=True)
    header.write_text(text, encoding="utf-8")


def test_read_rpc_protocol_from_header(tmp_path: Path) -> None:
    _write_header(
        tmp_path,
        "#pragma once\n"
        "#define RPC_PROTO_MAJOR_VERSION    3\n"
        "#define RPC_PROTO_MINOR_VERSION    10\n"
        "#define RPC_PROTO_PATCH_VERSION 2\n",
    )
    assert read_rpc_protocol(tmp_path) == "3.10.2"


def test_read_rpc_protocol_missing_header(tmp_path: Path) -> None:
    assert read_rpc_protocol(tmp_path) == "unknown"


def test_read_rpc_protocol_incomplete_header(tmp_path: Path) -> None:
    _write_header(tmp_path, "#define RPC_PROTO_MAJOR_VERSION 3\n")
    assert read_rpc_protocol(tmp_path) == "unknown"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 11434 (pypi-11434.0.0)\nbuilt with cc\n", None),
        (
            "ggml_cpu_init\nversion: 1 (build 11434, commit pypi-11434.0.0) built with gcc\n",
            "b11434 (pypi-11434.0.0)",
        ),
        ("(build 42, commit abc123)", "b42 (abc123)"),
        ("", None),
        ("garbage", None),
    ],
)
def test_parse_version_output(text: str, expected: str | None) -> None:
    assert parse_version_output(text) == expected


# -- search order ----------------------------------------------------------------------------


def test_nothing_found_is_none(cache_dir: Path) -> None:
    assert find_binaries(BackendConfig(), cache_dir) is None


def test_cache(cache_dir: Path) -> None:
    directory = _fake_binaries(cache_bin_dir(cache_dir), "b-cache")
    found = find_binaries(BackendConfig(), cache_dir)
    assert found is not None
    assert found.source == "cache"
    assert found.llama_server == directory / LLAMA_SERVER
    assert found.rpc_server == directory / RPC_SERVER
    assert found.build_id == "b-cache"
    assert found.rpc_protocol == "7.0.0"


def test_bundle_wins_over_cache(cache_dir: Path, _bundle_dir: Path) -> None:
    _fake_binaries(cache_bin_dir(cache_dir), "b-cache")
    _fake_binaries(_bundle_dir, "b-bundle")
    found = find_binaries(BackendConfig(), cache_dir)
    assert found is not None
    assert (found.source, found.build_id) == ("bundle", "b-bundle")


def test_installed_bundle_in_the_venv_wins_over_cache(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed = tmp_path / "venv" / "share" / "mesh-llm" / "llama.cpp" / "bin"
    monkeypatch.setattr(build, "INSTALLED_BIN_DIR", installed)
    _fake_binaries(cache_bin_dir(cache_dir), "b-cache")
    _fake_binaries(installed, "b-installed")
    found = find_binaries(BackendConfig(), cache_dir)
    assert found is not None
    assert (found.source, found.build_id) == ("bundle", "b-installed")


def test_bin_dir_wins_over_cache(tmp_path: Path, cache_dir: Path) -> None:
    _fake_binaries(cache_bin_dir(cache_dir), "b-cache")
    bin_dir = _fake_binaries(tmp_path / "bin", "b-bin-dir", rpc_name="rpc-server")
    found = find_binaries(BackendConfig(bin_dir=bin_dir), cache_dir)
    assert found is not None
    assert (found.source, found.build_id) == ("bin-dir", "b-bin-dir")
    assert found.rpc_server == bin_dir / "rpc-server"  # the older name is accepted too


def test_flags_win_over_bin_dir_and_cache(tmp_path: Path, cache_dir: Path) -> None:
    _fake_binaries(cache_bin_dir(cache_dir), "b-cache")
    bin_dir = _fake_binaries(tmp_path / "bin", "b-bin-dir")
    flagged = _fake_binaries(tmp_path / "flagged", "b-flags")
    backend = BackendConfig(bin_dir=bin_dir, llama_server_path=flagged / LLAMA_SERVER)
    found = find_binaries(backend, cache_dir)
    assert found is not None
    assert (found.source, found.build_id) == ("flags", "b-flags")
    assert found.llama_server == flagged / LLAMA_SERVER
    assert found.rpc_server == flagged / RPC_SERVER


def test_explicit_rpc_path_is_used(tmp_path: Path, cache_dir: Path) -> None:
    _fake_binaries(cache_bin_dir(cache_dir), "b-cache")
    other = _fake_binaries(tmp_path / "other", None, rpc_name="my-rpc")
    found = find_binaries(BackendConfig(rpc_server_path=other / "my-rpc"), cache_dir)
    assert found is not None
    assert found.source == "cache"
    assert found.rpc_server == other / "my-rpc"


def test_server_without_rpc_server(tmp_path: Path, cache_dir: Path) -> None:
    bin_dir = _fake_binaries(tmp_path / "bin", "b1", rpc_name=None)
    found = find_binaries(BackendConfig(bin_dir=bin_dir), cache_dir)
    assert found is not None
    assert found.rpc_server is None


def test_build_id_probed_when_no_build_info(tmp_path: Path, cache_dir: Path) -> None:
    bin_dir = _fake_binaries(
        tmp_path / "bin", None, version_output="version: 9 (build 9000, commit deadbeef)"
    )
    found = find_binaries(BackendConfig(bin_dir=bin_dir), cache_dir)
    assert found is not None
    assert found.build_id == "b9000 (deadbeef)"
    assert found.rpc_protocol == "unknown"


def test_missing_explicit_server_path(tmp_path: Path, cache_dir: Path) -> None:
    _fake_binaries(cache_bin_dir(cache_dir), "b-cache")
    backend = BackendConfig(llama_server_path=tmp_path / "nope" / LLAMA_SERVER)
    with pytest.raises(BackendError, match="--llama-server-path"):
        find_binaries(backend, cache_dir)


def test_missing_explicit_rpc_path(tmp_path: Path, cache_dir: Path) -> None:
    flagged = _fake_binaries(tmp_path / "flagged", "b-flags")
    backend = BackendConfig(
        llama_server_path=flagged / LLAMA_SERVER, rpc_server_path=tmp_path / "missing"
    )
    with pytest.raises(BackendError, match="--rpc-server-path"):
        find_binaries(backend, cache_dir)


def test_non_executable_explicit_path(tmp_path: Path, cache_dir: Path) -> None:
    flagged = _fake_binaries(tmp_path / "flagged", "b-flags")
    (flagged / LLAMA_SERVER).chmod(0o644)
    if os.access(flagged / LLAMA_SERVER, os.X_OK):
        pytest.skip("running as a user for whom every file is executable")
    with pytest.raises(BackendError, match="not an executable"):
        find_binaries(BackendConfig(llama_server_path=flagged / LLAMA_SERVER), cache_dir)


def test_bin_dir_without_llama_server(tmp_path: Path, cache_dir: Path) -> None:
    _fake_binaries(cache_bin_dir(cache_dir), "b-cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackendError, match="no executable llama-server"):
        find_binaries(BackendConfig(bin_dir=empty), cache_dir)


def test_bin_dir_that_is_not_a_directory(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(BackendError, match="not a directory"):
        find_binaries(BackendConfig(bin_dir=tmp_path / "absent"), cache_dir)
