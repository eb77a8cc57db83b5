"""Hardware probes with injected NVML, platform and command runner; the pure budget choice."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from mesh_llm.backend.hardware import (
    CPU_RAM_FRACTION,
    METAL_RAM_FRACTION,
    GpuFound,
    HardwareInfo,
    SystemFacts,
    choose_budget,
    detect_hardware,
    parse_rocm_smi_vram,
    probe_nvidia,
    probe_rocm,
)
from mesh_llm.errors import ConfigError

GIB = 2**30
LINUX = SystemFacts("Linux", "x86_64", 64 * GIB, 16)
MAC = SystemFacts("Darwin", "arm64", 32 * GIB, 10)


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeMemory:
    total: int


@dataclass
class FakeNvml:
    """Stands in for the `pynvml` module."""

    devices: list[tuple[str | bytes, int]] = field(default_factory=list)
    fail_init: bool = False
    fail_on_device: int | None = None
    shutdowns: int = 0
    NVMLError: type[Exception] = FakeNVMLError

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        if index == self.fail_on_device:
            raise FakeNVMLError("GPU is lost")
        return index

    def nvmlDeviceGetName(self, handle: object) -> str | bytes:
        assert isinstance(handle, int)
        return self.devices[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> FakeMemory:
        assert isinstance(handle, int)
        return FakeMemory(self.devices[handle][1])


def no_rocm(argv: Sequence[str]) -> str:
    raise FileNotFoundError(argv[0])


ROCM_TWO_CARDS = """\
WARNING: AMD GPU device(s) is/are in a low-power state. Check power control/runtime_status

{"card0": {"VRAM Total Memory (B)": "17163091968", "VRAM Total Used Memory (B)": "10960896"},
 "card1": {"VRAM Total Memory (B)": "17163091968", "VRAM Total Used Memory (B)": "0"},
 "system": {"Driver version": "6.7.0"}}
"""


def test_nvidia_devices_are_summed_and_nvml_shut_down() -> None:
    nvml = FakeNvml(devices=[("NVIDIA RTX 4090", 24 * GIB), (b"NVIDIA RTX 4090", 24 * GIB)])
    info = detect_hardware(nvml=nvml, system=LINUX, run_command=no_rocm)
    assert info == HardwareInfo(
        "cuda", "2× NVIDIA RTX 4090", 48 * GIB, 64 * GIB, "NVIDIA via NVML: 2 GPUs"
    )
    assert nvml.shutdowns == 1


def test_mixed_nvidia_devices_are_listed() -> None:
    nvml = FakeNvml(devices=[("A100", 80 * GIB), ("T4", 16 * GIB)])
    result = probe_nvidia(nvml)
    assert isinstance(result, GpuFound)
    assert result.device_name == "A100, T4"
    assert result.memory_bytes == 96 * GIB


def test_nvml_init_failure_falls_through_to_cpu_with_reason() -> None:
    info = detect_hardware(nvml=FakeNvml(fail_init=True), system=LINUX, run_command=no_rocm)
    assert info.backend == "cpu"
    assert info.vram_bytes == int(64 * GIB * CPU_RAM_FRACTION)
    assert info.system_ram_bytes == 64 * GIB
    assert info.reason.startswith("no GPU found (NVML: NVML Shared Library Not Found; ")
    assert "rocm-smi: not installed" in info.reason
    assert "CPU mode uses 75% of system RAM" in info.reason
    assert info.device_name == "CPU (16 threads)"


def test_nvml_error_during_enumeration_falls_through_and_shuts_down() -> None:
    nvml = FakeNvml(devices=[("A", GIB), ("B", GIB)], fail_on_device=1)
    assert probe_nvidia(nvml) == "NVML: GPU is lost"
    assert nvml.shutdowns == 1


def test_nvml_without_devices_is_not_a_gpu() -> None:
    assert probe_nvidia(FakeNvml()) == "NVML: no NVIDIA GPU"


def test_apple_silicon_uses_unified_memory_fraction() -> None:
    info = detect_hardware(nvml=FakeNvml(fail_init=True), system=MAC, run_command=no_rocm)
    assert info.backend == "metal"
    assert info.vram_bytes == int(32 * GIB * METAL_RAM_FRACTION)
    assert "unified memory" in info.reason


def test_intel_mac_is_not_metal() -> None:
    intel_mac = SystemFacts("Darwin", "x86_64", 16 * GIB, 8)
    info = detect_hardware(nvml=FakeNvml(fail_init=True), system=intel_mac, run_command=no_rocm)
    assert info.backend == "cpu"


def test_rocm_is_detected_from_rocm_smi() -> None:
    seen: list[Sequence[str]] = []

    def run(argv: Sequence[str]) -> str:
        seen.append(argv)
        return ROCM_TWO_CARDS

    info = detect_hardware(nvml=FakeNvml(fail_init=True), system=LINUX, run_command=run)
    assert seen == [["rocm-smi", "--showmeminfo", "vram", "--json"]]
    assert info.backend == "rocm"
    assert info.vram_bytes == 2 * 17163091968
    assert info.device_name == "2× AMD GPU"
    assert info.reason == "AMD via rocm-smi: 2 GPUs"


def test_parse_rocm_smi_vram() -> None:
    assert parse_rocm_smi_vram(ROCM_TWO_CARDS) == [17163091968, 17163091968]


@pytest.mark.parametrize(
    "output",
    [
        "",
        "not json",
        "{broken",
        "[1, 2]",
        '{"system": {"Driver version": "6"}}',
        '{"card0": {"VRAM Total Memory (B)": "lots"}}',
        '{"card0": {"VRAM Total Memory (B)": "-5"}}',
    ],
)
def test_parse_rocm_smi_vram_rejects(output: str) -> None:
    with pytest.raises(ValueError):
        parse_rocm_smi_vram(output)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (subprocess.CalledProcessError(1, ["rocm-smi"]), "rocm-smi: Command"),
        (subprocess.TimeoutExpired(["rocm-smi"], 10), "rocm-smi: Command"),
        (PermissionError("denied"), "rocm-smi: denied"),
    ],
)
def test_rocm_smi_failures_are_reasons(error: Exception, expected: str) -> None:
    def run(argv: Sequence[str]) -> str:
        raise error

    result = probe_rocm(run)
    assert isinstance(result, str)
    assert result.startswith(expected)


def test_bad_rocm_output_falls_through_to_cpu() -> None:
    info = detect_hardware(
        nvml=FakeNvml(fail_init=True), system=LINUX, run_command=lambda argv: "garbage"
    )
    assert info.backend == "cpu"
    assert "rocm-smi: no JSON in the output" in info.reason


def test_cap_lowers_budget_and_says_so() -> None:
    found = GpuFound("cuda", "GPU", 24 * GIB, "NVIDIA via NVML: 1 GPU")
    info = choose_budget(
        found, [], system_ram_bytes=GIB, max_vram_bytes=8 * GIB, cpu_ram_fraction=0.5
    )
    assert info.vram_bytes == 8 * GIB
    assert info.reason == "NVIDIA via NVML: 1 GPU; capped at 8.0 GiB of 24.0 GiB"


def test_cap_above_detected_changes_nothing() -> None:
    found = GpuFound("cuda", "GPU", 24 * GIB, "NVIDIA via NVML: 1 GPU")
    info = choose_budget(
        found, [], system_ram_bytes=GIB, max_vram_bytes=99 * GIB, cpu_ram_fraction=0.5
    )
    assert info.vram_bytes == 24 * GIB
    assert info.reason == "NVIDIA via NVML: 1 GPU"


def test_cpu_fraction_is_applied() -> None:
    info = choose_budget(
        None, ["x"], system_ram_bytes=10 * GIB, max_vram_bytes=None, cpu_ram_fraction=0.5
    )
    assert (info.backend, info.vram_bytes) == ("cpu", 5 * GIB)
    assert "50% of system RAM" in info.reason


@pytest.mark.parametrize(("fraction", "cap"), [(0.0, None), (1.5, None), (0.5, -1)])
def test_bad_budget_settings_raise(fraction: float, cap: int | None) -> None:
    with pytest.raises(ConfigError):
        choose_budget(None, [], system_ram_bytes=GIB, max_vram_bytes=cap, cpu_ram_fraction=fraction)


def test_real_machine_detection_gives_a_usable_answer() -> None:
    info = detect_hardware()
    assert info.backend in {"cuda", "metal", "rocm", "cpu"}
    assert info.vram_bytes > 0
    assert info.system_ram_bytes > 0
    assert info.reason
