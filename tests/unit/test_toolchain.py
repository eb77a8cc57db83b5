"""GPU backend selection for the llama.cpp build, and doctor's mismatch warning (pure).

No GPU is available where these run: the toolchain facts are given, never probed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh_llm.backend.build import configure_command
from mesh_llm.backend.toolchain import (
    PORTABLE_CPU_FLAGS,
    BuildBackend,
    Toolchains,
    backend_warning,
    binaries_backend,
    cmake_backend_flags,
    missing_for,
    parse_list_devices,
    select_backend,
)

CUDA = Toolchains(nvcc=True, nvidia_gpu=True)
ROCM = Toolchains(hipcc=True, amd_gpu=True)
VULKAN = Toolchains(glslc=True, vulkan_headers=True, render_node=True)


@pytest.mark.parametrize(
    ("found", "backend"),
    [
        (Toolchains(), "cpu"),
        (CUDA, "cuda"),
        (Toolchains(nvcc=True), "cpu"),  # a compiler without a GPU builds nothing useful
        (Toolchains(nvidia_gpu=True), "cpu"),
        (ROCM, "rocm"),
        (Toolchains(hipcc=True), "cpu"),
        (VULKAN, "vulkan"),
        (Toolchains(glslc=True, render_node=True), "cpu"),  # no headers
        (Toolchains(glslc=True, vulkan_headers=True), "cpu"),  # no GPU
        (Toolchains(nvcc=True, nvidia_gpu=True, glslc=True, vulkan_headers=True), "cuda"),
        (
            Toolchains(hipcc=True, amd_gpu=True, glslc=True, vulkan_headers=True, render_node=True),
            "rocm",
        ),
        (Toolchains(apple_silicon=True, nvcc=True), "metal"),
    ],
)
def test_select_backend(found: Toolchains, backend: BuildBackend) -> None:
    assert select_backend(found) == backend


@pytest.mark.parametrize(
    ("backend", "flag"),
    [("cuda", "-DGGML_CUDA=ON"), ("rocm", "-DGGML_HIP=ON"), ("vulkan", "-DGGML_VULKAN=ON")],
)
def test_gpu_flags_sit_on_portable_cpu_flags(backend: BuildBackend, flag: str) -> None:
    flags = cmake_backend_flags(backend)
    assert flag in flags
    assert set(PORTABLE_CPU_FLAGS) <= set(flags)
    argv = configure_command(Path("/src"), Path("/build"), backend)
    assert flag in argv and "-DGGML_RPC=ON" in argv


def test_cpu_and_metal_flags() -> None:
    assert cmake_backend_flags("cpu") == PORTABLE_CPU_FLAGS
    assert cmake_backend_flags("metal") == ("-DGGML_METAL=ON",)


def test_missing_for_names_what_to_install() -> None:
    assert missing_for("cuda", Toolchains(nvidia_gpu=True)) == ["nvcc (CUDA toolkit)"]
    assert missing_for("vulkan", Toolchains(glslc=True, render_node=True)) == [
        "Vulkan headers (libvulkan-dev)"
    ]
    assert missing_for("cpu", Toolchains()) == []


def test_parse_list_devices() -> None:
    assert parse_list_devices("Available devices:\n  (none)\n") == "cpu"
    assert parse_list_devices("Available devices:\n  CUDA0: NVIDIA RTX 4090 (24 GiB)\n") == "cuda"
    assert parse_list_devices("Available devices:\n  Vulkan0: AMD Radeon (8 GiB)\n") == "vulkan"
    assert parse_list_devices("Available devices:\n  ROCm0: gfx1100\n") == "rocm"
    assert parse_list_devices("Available devices:\n  Metal: Apple M2\n") == "metal"


def test_binaries_backend_prefers_build_info(tmp_path: Path) -> None:
    (tmp_path / "build-info.json").write_text(json.dumps({"backend": "cuda"}))
    assert binaries_backend(tmp_path / "llama-server") == "cuda"  # never runs the program


def test_binaries_backend_asks_the_program_without_build_info(tmp_path: Path) -> None:
    server = tmp_path / "llama-server"
    server.write_text("#!/bin/sh\necho 'Available devices:'\necho '  Vulkan0: iGPU'\n")
    server.chmod(0o755)
    assert binaries_backend(server) == "vulkan"
    assert binaries_backend(tmp_path / "absent") is None


def test_backend_warning() -> None:
    assert backend_warning("cpu", "cpu", Toolchains()) is None
    assert backend_warning("cuda", "cuda", CUDA) is None
    assert backend_warning(None, "cuda", CUDA) is None
    assert backend_warning("vulkan", "cuda", CUDA) is None  # works, if slower
    cpu_on_gpu = backend_warning("cpu", "cuda", Toolchains(nvidia_gpu=True))
    assert cpu_on_gpu is not None
    assert "cuda GPU" in cpu_on_gpu and "install nvcc (CUDA toolkit)" in cpu_on_gpu
    rebuild = backend_warning("cpu", "cuda", CUDA)
    assert rebuild is not None and "rebuild" in rebuild
    gpu_on_cpu = backend_warning("cuda", "cpu", Toolchains())
    assert gpu_on_cpu is not None and "no such GPU" in gpu_on_cpu
