"""Hardware detection: which accelerator a node has and how many bytes of model it can hold.

`detect_hardware` probes, in order: NVIDIA GPUs through NVML (`pynvml`, from nvidia-ml-py; the
sum of the total memory of all devices), Apple Silicon (Metal; unified memory, of which a fixed
fraction is usable by the GPU), AMD GPUs through `rocm-smi --showmeminfo vram --json`, and else
CPU mode, which budgets a fraction of system RAM. Every probe failure is recorded in the
`reason` of the result and detection falls through to the next probe; nothing here raises for
missing hardware. The probes take their seams (the NVML module, the platform facts, the command
runner) as arguments so tests inject fakes; `choose_budget` and `parse_rocm_smi_vram` are pure.
Blocking (NVML calls, a subprocess): call `detect_hardware` from a thread in async code. Imports
no asyncio or network module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, Protocol

import psutil

from mesh_llm.config import BackendConfig, Config
from mesh_llm.errors import ConfigError

logger = logging.getLogger(__name__)
_DEFAULTS = BackendConfig()  # the probe timeout of callers that pass none

Backend = Literal["cuda", "metal", "rocm", "cpu"]

# Share of system RAM offered to models in CPU mode: the rest is left to the OS, the node itself
# and llama.cpp's buffers. To move to config.
CPU_RAM_FRACTION = 0.75
# Share of unified memory Metal may use: macOS lets the GPU wire about 2/3 to 3/4 of RAM
# (`recommendedMaxWorkingSetSize`); the upper end, as on machines of 36 GB and more.
METAL_RAM_FRACTION = 0.75
_ROCM_VRAM_KEY = "VRAM Total Memory (B)"

CommandRunner = Callable[[Sequence[str]], str]
"""Runs an argv and returns its stdout; raises OSError or subprocess.SubprocessError."""


@dataclass(frozen=True, slots=True)
class HardwareInfo:
    """What a node can offer: the backend to build and run, and its memory budget in bytes."""

    backend: Backend
    device_name: str
    vram_bytes: int
    system_ram_bytes: int
    reason: str


@dataclass(frozen=True, slots=True)
class GpuFound:
    """A successful probe: the accelerator and the bytes of memory it offers in total."""

    backend: Backend
    device_name: str
    memory_bytes: int
    detail: str


@dataclass(frozen=True, slots=True)
class SystemFacts:
    """The facts about the machine that detection needs, injectable for tests."""

    system: str
    machine: str
    total_ram_bytes: int
    cpu_count: int

    @classmethod
    def current(cls) -> SystemFacts:
        total: int = psutil.virtual_memory().total
        return cls(platform.system(), platform.machine(), int(total), os.cpu_count() or 1)


class NvmlMemoryInfo(Protocol):
    @property
    def total(self) -> int: ...


class NvmlApi(Protocol):
    """The part of the `pynvml` module that detection uses (names are pynvml's)."""

    @property
    def NVMLError(self) -> type[Exception]: ...
    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...
    def nvmlDeviceGetName(self, handle: object) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: object) -> NvmlMemoryInfo: ...


def detect_hardware(
    *,
    max_vram_bytes: int | None = None,
    cpu_ram_fraction: float = CPU_RAM_FRACTION,
    nvml: NvmlApi | None = None,
    system: SystemFacts | None = None,
    run_command: CommandRunner | None = None,
    rocm_smi_timeout_s: float = _DEFAULTS.rocm_smi_timeout_s,
) -> HardwareInfo:
    """Probe the machine and choose the memory budget (bytes) the node advertises.

    `max_vram_bytes` caps the budget; `cpu_ram_fraction` (0 < f <= 1) is the share of RAM used
    in CPU mode. `nvml`, `system` and `run_command` default to the real `pynvml`, this machine
    and `subprocess` (each command killed after `rocm_smi_timeout_s`). Raises `ConfigError` for
    a bad cap or fraction, nothing for missing hardware.
    """
    facts = system or SystemFacts.current()
    notes: list[str] = []
    found: GpuFound | None = None
    for probe in (
        lambda: probe_nvidia(nvml),
        lambda: probe_metal(facts),
        lambda: probe_rocm(run_command or partial(_run, timeout_s=rocm_smi_timeout_s)),
    ):
        result = probe()
        if isinstance(result, GpuFound):
            found = result
            break
        if result is not None:
            notes.append(result)
    info = choose_budget(
        found,
        notes,
        system_ram_bytes=facts.total_ram_bytes,
        max_vram_bytes=max_vram_bytes,
        cpu_ram_fraction=cpu_ram_fraction,
        cpu_name=f"CPU ({facts.cpu_count} threads)",
    )
    logger.info(
        "hardware: %s, %s, budget %s (%s)",
        info.backend,
        info.device_name,
        format_gib(info.vram_bytes),
        info.reason,
    )
    return info


def choose_budget(
    found: GpuFound | None,
    notes: Sequence[str],
    *,
    system_ram_bytes: int,
    max_vram_bytes: int | None,
    cpu_ram_fraction: float,
    cpu_name: str = "CPU",
) -> HardwareInfo:
    """The advertised hardware from a probe result (None: no GPU) and why the others failed.

    Pure. Raises `ConfigError` if `cpu_ram_fraction` is not in (0, 1] or the cap is negative.
    """
    if not 0.0 < cpu_ram_fraction <= 1.0:
        raise ConfigError(f"cpu RAM fraction must be in (0, 1], not {cpu_ram_fraction}")
    if max_vram_bytes is not None and max_vram_bytes < 0:
        raise ConfigError(f"max VRAM must be at least 0 bytes, not {max_vram_bytes}")
    backend: Backend
    if found is None:
        backend, device_name = "cpu", cpu_name
        vram = int(system_ram_bytes * cpu_ram_fraction)
        why = "; ".join(notes) or "no probe applies"
        reason = (
            f"no GPU found ({why}); CPU mode uses {cpu_ram_fraction:.0%} of system RAM "
            f"({format_gib(system_ram_bytes)})"
        )
    else:
        backend, device_name = found.backend, found.device_name
        vram, reason = found.memory_bytes, found.detail
    if max_vram_bytes is not None and max_vram_bytes < vram:
        reason = f"{reason}; capped at {format_gib(max_vram_bytes)} of {format_gib(vram)}"
        vram = max_vram_bytes
    return HardwareInfo(backend, device_name, vram, system_ram_bytes, reason)


def probe_nvidia(nvml: NvmlApi | None = None) -> GpuFound | str:
    """NVIDIA GPUs through NVML (default: the real `pynvml`), or why there are none."""
    if nvml is None:
        try:
            import pynvml  # optional: its absence is a probe result
        except ImportError:
            return "NVML: nvidia-ml-py is not installed"
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as exc:
        return f"NVML: {exc}"
    try:
        names: list[str] = []
        total = 0
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            total += int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            name = nvml.nvmlDeviceGetName(handle)
            names.append(name.decode(errors="replace") if isinstance(name, bytes) else name)
    except (nvml.NVMLError, OSError) as exc:
        return f"NVML: {exc}"
    finally:
        with contextlib.suppress(nvml.NVMLError, OSError):
            nvml.nvmlShutdown()
    if not names:
        return "NVML: no NVIDIA GPU"
    return GpuFound("cuda", _describe_devices(names), total, f"NVIDIA via NVML: {_gpus(names)}")


def probe_metal(facts: SystemFacts) -> GpuFound | None:
    """Apple Silicon's unified memory, or None on any other machine."""
    if facts.system != "Darwin" or facts.machine != "arm64":
        return None
    memory = int(facts.total_ram_bytes * METAL_RAM_FRACTION)
    detail = (
        f"Apple Silicon (Metal): unified memory, {METAL_RAM_FRACTION:.0%} of "
        f"{format_gib(facts.total_ram_bytes)} RAM"
    )
    return GpuFound("metal", "Apple Silicon", memory, detail)


def probe_rocm(run_command: CommandRunner) -> GpuFound | str:
    """AMD GPUs through `rocm-smi`, or why there are none."""
    try:
        output = run_command(["rocm-smi", "--showmeminfo", "vram", "--json"])
    except FileNotFoundError:
        return "rocm-smi: not installed"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"rocm-smi: {exc}"
    try:
        cards = parse_rocm_smi_vram(output)
    except ValueError as exc:
        return f"rocm-smi: {exc}"
    names = ["AMD GPU"] * len(cards)
    detail = f"AMD via rocm-smi: {_gpus(names)}"
    return GpuFound("rocm", _describe_devices(names), sum(cards), detail)


def parse_rocm_smi_vram(output: str) -> list[int]:
    """Total VRAM bytes of each card from `rocm-smi --showmeminfo vram --json` output.

    Tolerates text printed before the JSON object. Raises ValueError if no card is found.
    """
    start = output.find("{")
    if start < 0:
        raise ValueError("no JSON in the output")
    try:
        document, _ = json.JSONDecoder().raw_decode(output, start)
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad JSON ({exc.msg})") from exc
    if not isinstance(document, dict):
        raise ValueError("the JSON is not an object")
    cards: list[int] = []
    for key, value in sorted(document.items()):
        if isinstance(value, dict) and str(key).startswith("card") and _ROCM_VRAM_KEY in value:
            raw = str(value[_ROCM_VRAM_KEY]).strip()
            if not raw.isascii() or not raw.isdigit():
                raise ValueError(f"{key}: bad {_ROCM_VRAM_KEY!r} value {raw!r}")
            cards.append(int(raw))
    if not cards:
        raise ValueError("no card reports VRAM")
    return cards


def format_gib(size_bytes: int) -> str:
    """`size_bytes` in GiB with one decimal, for logs and tables."""
    return f"{size_bytes / 2**30:.1f} GiB"


def _run(argv: Sequence[str], timeout_s: float) -> str:
    executable = shutil.which(argv[0])
    if executable is None:
        raise FileNotFoundError(argv[0])
    completed = subprocess.run(
        [executable, *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    return completed.stdout


def _describe_devices(names: Sequence[str]) -> str:
    if len(set(names)) == 1 and len(names) > 1:
        return f"{len(names)}× {names[0]}"
    return ", ".join(names)


def _gpus(names: Sequence[str]) -> str:
    return f"{len(names)} GPU" if len(names) == 1 else f"{len(names)} GPUs"


def max_vram_bytes(config: Config) -> int | None:
    """The `--max-vram` cap in bytes (GB = 1e9 bytes), or None."""
    gb = config.backend.max_vram_gb
    return None if gb is None else int(gb * 1e9)
