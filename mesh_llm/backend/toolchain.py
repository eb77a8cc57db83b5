"""Which GPU backend to build llama.cpp with: toolchain facts in, backend and cmake flags out.

`select_backend` and `cmake_backend_flags` are pure. A GPU backend needs both its compiler and
a device it can run on (a compiler alone makes a slow build of a backend nothing here can use):
Metal on Apple silicon; CUDA with `nvcc` and an NVIDIA GPU; ROCm with `hipcc` and `/dev/kfd`;
Vulkan with `glslc`, the Vulkan headers and a render node. Otherwise portable CPU flags.
`probe_toolchains` gathers the facts (PATH look-ups and file checks only; NVML for NVIDIA).
`binaries_backend` tells which backend built binaries have (build-info.json, else their
`--list-devices` output).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mesh_llm.config import BackendConfig

_DEFAULTS = BackendConfig()  # the timeout of callers that pass none
BuildBackend = Literal["cpu", "cuda", "rocm", "vulkan", "metal"]
PORTABLE_CPU_FLAGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
)
_GPU_FLAGS: dict[BuildBackend, tuple[str, ...]] = {
    "cpu": (),
    "cuda": ("-DGGML_CUDA=ON",),
    "rocm": ("-DGGML_HIP=ON",),
    "vulkan": ("-DGGML_VULKAN=ON",),
    "metal": ("-DGGML_METAL=ON",),
}
VULKAN_HEADER = Path("/usr/include/vulkan/vulkan.h")
_DEVICE_LINE = re.compile(r"^\s*(CUDA|ROCm|HIP|Vulkan|Metal|MTL)\d*\s*:", re.MULTILINE)
_DEVICE_BACKEND: dict[str, BuildBackend] = {
    "CUDA": "cuda",
    "ROCm": "rocm",
    "HIP": "rocm",
    "Vulkan": "vulkan",
    "Metal": "metal",
    "MTL": "metal",
}


@dataclass(frozen=True, slots=True)
class Toolchains:
    """What the machine has for each GPU backend: a compiler and a device to run on."""

    apple_silicon: bool = False
    nvcc: bool = False
    nvidia_gpu: bool = False
    hipcc: bool = False
    amd_gpu: bool = False  # /dev/kfd: the ROCm compute interface
    glslc: bool = False
    vulkan_headers: bool = False
    render_node: bool = False  # /dev/dri/renderD*: a GPU Vulkan can drive


def select_backend(found: Toolchains) -> BuildBackend:
    """The backend to build (pure): the first one whose compiler and device are both present."""
    if found.apple_silicon:
        return "metal"
    if found.nvcc and found.nvidia_gpu:
        return "cuda"
    if found.hipcc and found.amd_gpu:
        return "rocm"
    if found.glslc and found.vulkan_headers and found.render_node:
        return "vulkan"
    return "cpu"


def cmake_backend_flags(backend: BuildBackend) -> tuple[str, ...]:
    """cmake flags for `backend` (pure): Metal as is; the others on top of portable CPU code."""
    if backend == "metal":
        return _GPU_FLAGS["metal"]
    return (*PORTABLE_CPU_FLAGS, *_GPU_FLAGS[backend])


def missing_for(backend: BuildBackend, found: Toolchains) -> list[str]:
    """What this machine lacks to build `backend` (pure); [] when nothing is missing."""
    needs: dict[BuildBackend, list[tuple[bool, str]]] = {
        "cpu": [],
        "metal": [(found.apple_silicon, "Apple silicon")],
        "cuda": [(found.nvcc, "nvcc (CUDA toolkit)"), (found.nvidia_gpu, "an NVIDIA GPU")],
        "rocm": [(found.hipcc, "hipcc (ROCm)"), (found.amd_gpu, "/dev/kfd (AMD GPU)")],
        "vulkan": [
            (found.glslc, "glslc"),
            (found.vulkan_headers, "Vulkan headers (libvulkan-dev)"),
            (found.render_node, "a GPU render node"),
        ],
    }
    return [what for present, what in needs[backend] if not present]


def probe_toolchains() -> Toolchains:
    """The facts of this machine (blocking; quick)."""
    return Toolchains(
        apple_silicon=sys.platform == "darwin" and _machine() == "arm64",
        nvcc=shutil.which("nvcc") is not None,
        nvidia_gpu=_nvidia_gpu_count() > 0,
        hipcc=shutil.which("hipcc") is not None,
        amd_gpu=Path("/dev/kfd").exists(),
        glslc=shutil.which("glslc") is not None,
        vulkan_headers=VULKAN_HEADER.is_file(),
        render_node=any(Path("/dev/dri").glob("renderD*")),
    )


def parse_list_devices(output: str) -> BuildBackend:
    """The backend of `llama-server --list-devices` output (pure): CPU when no GPU is listed."""
    match = _DEVICE_LINE.search(output)
    return "cpu" if match is None else _DEVICE_BACKEND[match.group(1)]


def binaries_backend(
    llama_server: Path, list_devices_timeout_s: float = _DEFAULTS.list_devices_timeout_s
) -> BuildBackend | None:
    """The backend the binaries were built with: build-info.json, else their device list
    (`llama-server --list-devices`, given up after `list_devices_timeout_s`)."""
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((llama_server.parent / "build-info.json").read_text("utf-8"))
        if info.get("backend") in _GPU_FLAGS:
            backend: BuildBackend = info["backend"]
            return backend
    try:
        done = subprocess.run(
            [str(llama_server), "--list-devices"],
            capture_output=True,
            text=True,
            timeout=list_devices_timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_list_devices(done.stdout + done.stderr) if done.returncode == 0 else None


def _machine() -> str:
    import platform

    return platform.machine()


def _nvidia_gpu_count() -> int:
    if shutil.which("nvcc") is None and not Path("/dev/nvidiactl").exists():
        return 0
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    return 0


def backend_warning(binaries: BuildBackend | None, machine: str, found: Toolchains) -> str | None:
    """Why the binaries do not fit this machine's accelerator (pure), or None when they do.

    `machine` is the detected hardware backend (cuda, rocm, vulkan, metal or cpu).
    """
    if binaries is None or binaries == machine:
        return None
    if binaries == "vulkan" and machine != "cpu":
        return None  # Vulkan drives NVIDIA and AMD GPUs too, if slower than their own backend
    if machine == "cpu":
        return f"the binaries are built for {binaries} but this machine has no such GPU"
    wanted: BuildBackend = machine if machine in _GPU_FLAGS else "cpu"
    lacking = missing_for(wanted, found)
    how = (
        f"install {', '.join(lacking)} and rebuild"
        if lacking
        else "delete the llama.cpp cache to rebuild"
    )
    return (
        f"this machine has a {machine} GPU but the binaries are built for {binaries}: "
        f"the GPU stays unused ({how}, or pass --bin-dir with {machine} binaries)"
    )
