"""bundle/install.sh refuses a damaged bundle before it installs anything (no network needed).

The full offline install is proven by tests/e2e/test_bundle_install.py; here a tiny synthetic
bundle checks the manifest verification and the Python version check.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 60


def _bundle(tmp_path: Path, python: str) -> Path:
    top = tmp_path / "bundle"
    top.mkdir()
    shutil.copy2(REPO / "bundle" / "install.sh", top / "install.sh")
    (top / "wheels").mkdir()
    (top / "wheels" / "a.whl").write_bytes(b"wheel bytes")
    files = {
        name: hashlib.sha256((top / name).read_bytes()).hexdigest()
        for name in ("install.sh", "wheels/a.whl")
    }
    manifest = {"version": "0.0.0", "python": python, "files": files}
    (top / "manifest.json").write_text(json.dumps(manifest))
    return top


def _install(top: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    argv = ["bash", str(top / "install.sh"), "--python", sys.executable]
    argv += ["--prefix", str(tmp_path / "venv"), "--bin-dir", str(tmp_path / "bin")]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
    )


def _this_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def test_a_changed_file_stops_the_install(tmp_path: Path) -> None:
    top = _bundle(tmp_path, _this_python())
    (top / "wheels" / "a.whl").write_bytes(b"tampered")
    done = _install(top, tmp_path)
    assert done.returncode == 1
    assert "wheels/a.whl: sha256 mismatch" in done.stderr
    assert "damaged or incomplete" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_a_missing_file_stops_the_install(tmp_path: Path) -> None:
    top = _bundle(tmp_path, _this_python())
    (top / "wheels" / "a.whl").unlink()
    done = _install(top, tmp_path)
    assert done.returncode == 1
    assert "wheels/a.whl" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_another_python_minor_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    top = _bundle(tmp_path, "3.99")
    done = _install(top, tmp_path)
    assert done.returncode == 1
    assert "wheels are for Python 3.99" in done.stderr and "--python python3.99" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("option", ["--prefix", "--bogus"])
def test_bad_options_are_usage_errors(tmp_path: Path, option: str) -> None:
    top = _bundle(tmp_path, _this_python())
    done = subprocess.run(
        ["bash", str(top / "install.sh"), option],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert done.returncode != 0
    assert "install.sh" in done.stderr
