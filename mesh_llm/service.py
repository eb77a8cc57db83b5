"""Running a node as a systemd service: render the unit, install, uninstall, show its status.

`render_unit` is pure: the node's argv and environment in, the unit file's text out. The node
gets SIGTERM alone (`KillMode=mixed`) and stops its llama.cpp children itself within its grace
period; only what is left after `TimeoutStopSec` is killed by systemd. Hardening leaves devices
(GPUs), executable memory (CUDA JIT) and the home directory (models, key) alone, which llama.cpp
and the node need. The other functions run `systemctl`; without it they say what to do by hand.
Reads no environment itself: callers pass what to write.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.errors import ServiceError

UNIT_NAME = "mesh-llm.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
RESTART_SEC_S = 5
# systemd >= 254 grows the restart delay from RestartSec up to this (exponential backoff).
RESTART_MAX_DELAY_S = 120
RESTART_STEPS = 6
# Older systemd has no growing delay: after this many failures in the interval it stops trying.
START_LIMIT_BURST = 10
START_LIMIT_INTERVAL_S = 600
STOP_MARGIN_S = 15.0
SYSTEMCTL_TIMEOUT_S = 60.0
_SAFE_ARG = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
_HARDENING_COMMON = (
    "NoNewPrivileges=yes",
    "LockPersonality=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
)
# Only in system units: the user manager cannot set up these namespaces without privileges.
_HARDENING_SYSTEM = (
    "PrivateTmp=yes",
    "ProtectSystem=full",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictNamespaces=yes",
    "SystemCallArchitectures=native",
)


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """What the unit runs: the node's argv (without --log-format), environment and who runs it."""

    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()
    user_unit: bool = False
    run_as: str | None = None  # User= of a system unit; None = root
    stop_timeout_s: float = 30.0
    systemd_version: int = 252


def stop_timeout_for(shutdown_grace_s: float, backend_stop_grace_s: float) -> float:
    """TimeoutStopSec: longer than the node's own shutdown, so systemd rarely has to kill."""
    return shutdown_grace_s + backend_stop_grace_s + STOP_MARGIN_S


def render_unit(spec: UnitSpec) -> str:
    """The unit file text for `spec` (pure). JSON logs go to the journal."""
    argv = [*spec.argv, "--log-format", "json"]
    lines = [
        "[Unit]",
        "Description=mesh-llm node (pooled OpenAI-compatible LLM endpoint)",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL_S}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={' '.join(_quote(a) for a in argv)}",
    ]
    if not spec.user_unit:  # the user manager has no network-online.target
        lines[2:2] = ["After=network-online.target", "Wants=network-online.target"]
    lines += [f"Environment={_quote(f'{k}={v}')}" for k, v in spec.environment]
    if not spec.user_unit and spec.run_as is not None:
        lines.append(f"User={spec.run_as}")
    lines += [
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC_S}",
    ]
    if spec.systemd_version >= 254:
        lines += [f"RestartSteps={RESTART_STEPS}", f"RestartMaxDelaySec={RESTART_MAX_DELAY_S}"]
    lines += [
        "# SIGTERM to the node only: it stops its llama.cpp children itself; systemd kills",
        "# whatever is left once TimeoutStopSec has passed.",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={round(spec.stop_timeout_s)}",
        "LimitNOFILE=65536",
        "SyslogIdentifier=mesh-llm",
        "StandardOutput=journal",
        "StandardError=journal",
        *_HARDENING_COMMON,
    ]
    if not spec.user_unit:
        lines += _HARDENING_SYSTEM
    lines += [
        "",
        "[Install]",
        f"WantedBy={'default.target' if spec.user_unit else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def unit_path(user_unit: bool, home: Path) -> Path:
    if user_unit:
        return home / ".config" / "systemd" / "user" / UNIT_NAME
    return SYSTEM_UNIT_DIR / UNIT_NAME


def journal_hint(user_unit: bool) -> str:
    return f"journalctl {'--user ' if user_unit else ''}-u {UNIT_NAME} -f"


def install_unit(spec: UnitSpec, path: Path) -> list[str]:
    """Write the unit and enable it now; returns the lines to show the user.

    Raises `ServiceError` when the file cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_unit(spec), encoding="utf-8")
    except OSError as exc:
        hint = "" if spec.user_unit else " (a system unit needs root: sudo, or use --user)"
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}{hint}") from exc
    out = [f"wrote {path}"]
    steps = [["daemon-reload"], ["enable", "--now", UNIT_NAME]]
    out += _systemctl_steps(steps, spec.user_unit)
    out.append(f"logs: {journal_hint(spec.user_unit)}")
    if spec.user_unit:
        out.append("to keep it running after you log out: loginctl enable-linger $USER")
    return out


def uninstall_unit(user_unit: bool, path: Path) -> list[str]:
    """Disable and stop the unit, then remove its file; returns the lines to show."""
    if not path.exists():
        return [f"no unit at {path}: nothing to remove"]
    out = _systemctl_steps([["disable", "--now", UNIT_NAME]], user_unit)
    try:
        path.unlink()
    except OSError as exc:
        raise ServiceError(f"cannot remove {path}: {exc.strerror or exc}") from exc
    out.append(f"removed {path}")
    out += _systemctl_steps([["daemon-reload"]], user_unit)
    return out


def unit_status(user_unit: bool, path: Path) -> list[str]:
    out = [f"unit file: {path} ({'present' if path.exists() else 'absent'})"]
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return [*out, "systemctl is not installed: cannot show the service state"]
    done = _run([systemctl, *_scope(user_unit), "status", "--no-pager", UNIT_NAME])
    out.append(done.strip() or "(systemctl printed nothing)")
    out.append(f"logs: {journal_hint(user_unit)}")
    return out


def systemd_version() -> int:
    """The running systemd's version from `systemctl --version`, or 0 when unknown."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return 0
    match = re.match(r"systemd (\d+)", _run([systemctl, "--version"]))
    return int(match.group(1)) if match else 0


def environment_for_unit(env: Mapping[str, str], home: Path) -> tuple[tuple[str, str], ...]:
    """MESH_LLM_* variables of the installing shell (the API key stays out), and the home."""
    kept = {k: v for k, v in env.items() if k.startswith("MESH_LLM_") and k != "MESH_LLM_API_KEY"}
    kept["MESH_LLM_HOME"] = str(home)
    return tuple(sorted(kept.items()))


def _systemctl_steps(steps: Sequence[Sequence[str]], user_unit: bool) -> list[str]:
    systemctl = shutil.which("systemctl")
    scope = _scope(user_unit)
    commands = [" ".join(["systemctl", *scope, *step]) for step in steps]
    if systemctl is None:
        return ["systemctl is not installed here; on a systemd machine run:", *commands]
    out: list[str] = []
    for step, command in zip(steps, commands, strict=True):
        done = subprocess.run(
            [systemctl, *scope, *step],
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()
            return [
                *out,
                f"`{command}` failed: {reason[-1] if reason else done.returncode}",
                "systemd may not be running here; once it is, run:",
                *commands[len(out) :],
            ]
        out.append(f"ran {command}")
    return out


def _scope(user_unit: bool) -> list[str]:
    return ["--user"] if user_unit else []


def _run(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return done.stdout + done.stderr


def _quote(arg: str) -> str:
    """systemd's command-line quoting: plain words stay, others in double quotes; % and $ are
    doubled so systemd expands neither specifiers nor variables."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _SAFE_ARG.match(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def describe(argv: Sequence[str]) -> str:
    """The argv as a shell line, for messages."""
    return shlex.join(argv)
