"""Downloads against a fake Hugging Face Hub on 127.0.0.1: full, resumed, verified, failing."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from mesh_llm.errors import DownloadError
from mesh_llm.models.download import download_from_hub, download_url
from mesh_llm.models.resolve import resolve_model
from tests.fakes.hub_server import FakeHub

DATA = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, more than one read chunk
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        yield server


def _unreachable_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_full_hub_download(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_file("org/repo", "model.gguf", DATA)
    seen: list[tuple[int, int | None]] = []
    path = download_from_hub(
        "org/repo",
        "model.gguf",
        tmp_path,
        endpoint=hub.endpoint,
        sha256=SHA,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert path == tmp_path / "model.gguf"
    assert path.read_bytes() == DATA
    assert seen[-1] == (len(DATA), len(DATA))
    [get] = hub.gets()
    assert get.path == "/org/repo/resolve/main/model.gguf"
    assert "mesh-llm/" in get.headers["User-Agent"]
    assert "Range" not in get.headers
    assert not (tmp_path / "model.gguf.part").exists()


def test_hub_download_resumes_a_cut_transfer(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_file("org/repo", "model.gguf", DATA)
    hub.cut_next_get_after(300_000)
    with pytest.raises(DownloadError, match="run again to resume"):
        download_from_hub("org/repo", "model.gguf", tmp_path, endpoint=hub.endpoint, sha256=SHA)
    part = tmp_path / "model.gguf.part"
    assert part.stat().st_size == 300_000
    assert not (tmp_path / "model.gguf").exists()

    seen: list[tuple[int, int | None]] = []
    path = download_from_hub(
        "org/repo",
        "model.gguf",
        tmp_path,
        endpoint=hub.endpoint,
        sha256=SHA,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert path.read_bytes() == DATA
    assert hub.gets()[-1].headers["Range"] == "bytes=300000-"
    assert seen[0] == (300_000, len(DATA))
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_file("org/repo", "model.gguf", DATA)
    (tmp_path / "model.gguf.part").write_bytes(DATA[:1000])
    hub.ignore_range()
    path = download_from_hub("org/repo", "model.gguf", tmp_path, endpoint=hub.endpoint)
    assert path.read_bytes() == DATA
    assert hub.gets()[-1].headers["Range"] == "bytes=1000-"


def test_part_file_that_is_already_complete_is_published(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_file("org/repo", "model.gguf", DATA)
    (tmp_path / "model.gguf.part").write_bytes(DATA)
    path = download_from_hub("org/repo", "model.gguf", tmp_path, endpoint=hub.endpoint, sha256=SHA)
    assert path.read_bytes() == DATA


def test_sha_mismatch_is_a_download_error(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_file("org/repo", "model.gguf", DATA)
    with pytest.raises(DownloadError, match="sha256"):
        download_from_hub(
            "org/repo", "model.gguf", tmp_path, endpoint=hub.endpoint, sha256="0" * 64
        )
    assert list(tmp_path.glob("model.gguf*")) == []


def test_size_mismatch_is_a_download_error(hub: FakeHub, tmp_path: Path) -> None:
    url = hub.endpoint + hub.add_path("/files/model.gguf", DATA)
    with pytest.raises(DownloadError, match="expected 5"):
        download_url(url, tmp_path / "model.gguf", expected_size=5)
    assert not (tmp_path / "model.gguf").exists()


def test_missing_file_is_a_download_error(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_from_hub("org/repo", "absent.gguf", tmp_path, endpoint=hub.endpoint)


def test_unreachable_hub_names_the_alternatives(tmp_path: Path) -> None:
    endpoint = _unreachable_endpoint()
    with pytest.raises(DownloadError) as caught:
        download_from_hub("org/repo", "model.gguf", tmp_path, endpoint=endpoint)
    message = str(caught.value)
    assert "--model /path/to/file.gguf" in message
    assert "gemma-3-270m" in message
    assert list(tmp_path.glob("model.gguf*")) == []


def test_offline_mode_names_the_alternatives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="offline") as caught:
        download_from_hub("org/repo", "model.gguf", tmp_path, endpoint=_unreachable_endpoint())
    assert "--model /path/to/file.gguf" in str(caught.value)


def test_plain_url_download_with_resume(hub: FakeHub, tmp_path: Path) -> None:
    url = hub.endpoint + hub.add_path("/files/model.gguf", DATA)
    hub.cut_next_get_after(123_456)
    with pytest.raises(DownloadError, match="resume"):
        download_url(url, tmp_path / "model.gguf", sha256=SHA)
    assert (tmp_path / "model.gguf.part").stat().st_size == 123_456
    path = download_url(url, tmp_path / "model.gguf", sha256=SHA, expected_size=len(DATA))
    assert path.read_bytes() == DATA
    assert hub.gets()[-1].headers["Range"] == "bytes=123456-"
    assert len(hub.gets()) == 2


def test_existing_destination_is_kept(hub: FakeHub, tmp_path: Path) -> None:
    url = hub.endpoint + hub.add_path("/files/model.gguf", DATA)
    (tmp_path / "model.gguf").write_bytes(b"already here")
    assert download_url(url, tmp_path / "model.gguf").read_bytes() == b"already here"
    assert hub.gets() == []


def test_resolve_hub_spec_downloads_every_split_part(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_file("org/repo", "sub/big-00001-of-00002.gguf", DATA)
    hub.add_file("org/repo", "sub/big-00002-of-00002.gguf", b"second part")
    seen: list[tuple[int, int | None]] = []
    model = resolve_model(
        "org/repo/sub/big-00001-of-00002.gguf",
        tmp_path,
        hub_endpoint=hub.endpoint,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert model.name == "big"
    assert model.path == tmp_path / "big-00001-of-00002.gguf"
    assert model.size_bytes == len(DATA) + len(b"second part")
    assert seen[-1][0] == model.size_bytes
    assert (tmp_path / "big-00002-of-00002.gguf").read_bytes() == b"second part"


def test_resolve_catalog_name_downloads_from_the_hub(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_file("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf", DATA)
    model = resolve_model("qwen2.5-0.5b", tmp_path, hub_endpoint=hub.endpoint)
    assert model.name == "qwen2.5-0.5b-instruct-q4_k_m"
    assert model.path.read_bytes() == DATA


def test_resolve_url_of_a_split_model(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_path("/dl/m-00001-of-00002.gguf", b"one")
    hub.add_path("/dl/m-00002-of-00002.gguf", b"two!")
    model = resolve_model(f"{hub.endpoint}/dl/m-00001-of-00002.gguf", tmp_path)
    assert (model.name, model.size_bytes) == ("m", 7)
    assert sorted(g.path for g in hub.gets()) == [
        "/dl/m-00001-of-00002.gguf",
        "/dl/m-00002-of-00002.gguf",
    ]
