"""The systemd unit of `mesh-llm service install`: rendered text, checked by systemd-analyze."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mesh_llm import service
from mesh_llm.cli import main
from mesh_llm.service import UnitSpec, render_unit

VERIFY_TIMEOUT_S = 60


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_restarts_with_backoff_and_lets_the_node_stop_its_children() -> None:
    spec = UnitSpec(argv=("/opt/venv/bin/mesh-llm", "--model", "m"), stop_timeout_s=42.0)
    settings = _settings(render_unit(spec))
    assert settings["ExecStart"] == ["/opt/venv/bin/mesh-llm --model m --log-format json"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["KillMode"] == ["mixed"]
    assert settings["KillSignal"] == ["SIGTERM"]
    assert settings["TimeoutStopSec"] == ["42"]
    assert settings["StandardOutput"] == ["journal"]
    assert "RestartSteps" not in settings  # systemd 252 does not know it
    newer = _settings(render_unit(UnitSpec(argv=("x",), systemd_version=255)))
    assert newer["RestartSteps"] == [str(service.RESTART_STEPS)]
    assert newer["RestartMaxDelaySec"] == [str(service.RESTART_MAX_DELAY_S)]


def test_stop_timeout_is_longer_than_the_nodes_own_shutdown() -> None:
    assert service.stop_timeout_for(10.0, 5.0) > 15.0


def test_hardening_leaves_gpus_and_jit_alone() -> None:
    text = render_unit(UnitSpec(argv=("x",), run_as="alice"))
    settings = _settings(text)
    assert settings["User"] == ["alice"]
    assert settings["NoNewPrivileges"] == ["yes"]
    # CUDA needs /dev/nvidia* and writable+executable memory for its JIT; models live in $HOME.
    for breaking in ("PrivateDevices", "MemoryDenyWriteExecute", "ProtectHome", "DevicePolicy"):
        assert breaking not in settings
    user = _settings(render_unit(UnitSpec(argv=("x",), user_unit=True, run_as="alice")))
    assert "User" not in user and "ProtectSystem" not in user
    assert user["WantedBy"] == ["default.target"]


def test_arguments_are_quoted_for_systemd() -> None:
    text = render_unit(UnitSpec(argv=("/bin/mesh-llm", "--model", "my model$1%n.gguf")))
    assert 'ExecStart=/bin/mesh-llm --model "my model$$1%%n.gguf" --log-format json' in text


def test_environment_keeps_mesh_variables_but_not_the_api_key() -> None:
    env = {"MESH_LLM_PORT": "9400", "MESH_LLM_API_KEY": "secret", "PATH": "/bin"}
    kept = service.environment_for_unit(env, Path("/h/.mesh-llm"))
    assert kept == (("MESH_LLM_HOME", "/h/.mesh-llm"), ("MESH_LLM_PORT", "9400"))


def _verify(unit: Path, tmp_path: Path, user: bool) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    argv = [analyze, *(["--user"] if user else []), "verify", str(unit)]
    return subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=VERIFY_TIMEOUT_S, check=False
    )


@pytest.mark.parametrize("user", [False, True])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, user: bool) -> None:
    program = shutil.which("true")
    assert program is not None
    spec = UnitSpec(
        argv=(program, "--model", "a model.gguf"),
        environment=(("MESH_LLM_HOME", str(tmp_path)),),
        user_unit=user,
        run_as=None if user else "root",
        stop_timeout_s=service.stop_timeout_for(10.0, 5.0),
    )
    unit = tmp_path / service.UNIT_NAME
    unit.write_text(render_unit(spec))
    done = _verify(unit, tmp_path, user)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    # The check can fail: systemd-analyze reports a bad value in the same file.
    unit.write_text(render_unit(spec).replace("KillMode=mixed", "KillMode=bogus"))
    assert "kill mode" in _verify(unit, tmp_path, user).stderr.lower()


def test_cli_service_install_writes_a_user_unit_for_the_node_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MESH_LLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(shutil, "which", lambda _name: None)  # no systemctl here
    argv = ["--model", "m.gguf", "service", "install", "--user", "--", "--port", "9400"]
    assert main(argv) == 0
    unit = tmp_path / ".config" / "systemd" / "user" / service.UNIT_NAME
    (exec_start,) = _settings(unit.read_text())["ExecStart"]
    assert exec_start.endswith(" --model m.gguf --port 9400 --log-format json")
    out = capsys.readouterr().out
    assert "systemctl --user enable --now mesh-llm.service" in out
    assert "journalctl --user -u mesh-llm.service" in out
    assert main(["service", "status", "--user"]) == 0
    assert f"unit file: {unit} (present)" in capsys.readouterr().out
    assert main(["service", "uninstall", "--user"]) == 0
    assert not unit.exists()
    assert main(["service", "status", "--user"]) == 0
    assert "(absent)" in capsys.readouterr().out


def test_cli_service_install_without_node_flags_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MESH_LLM_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as exited:
        main(["service", "install", "--user"])
    assert exited.value.code == 2
