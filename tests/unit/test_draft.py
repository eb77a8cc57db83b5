"""Which draft model the host passes to llama-server (-md): --draft, catalog draft on disk, none."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_llm.backend.serving import find_draft
from mesh_llm.config import load_config
from mesh_llm.core.types import ModelName
from mesh_llm.errors import ModelError
from mesh_llm.models.catalog import find_entry, load_catalog
from mesh_llm.models.resolve import ResolvedModel


def _model_with_draft() -> tuple[ResolvedModel, str]:
    entry = next(e for e in load_catalog() if e.draft)
    assert entry.draft is not None
    model = ResolvedModel(entry.model_name, Path("/nonexistent/model.gguf"), 1)
    return model, find_entry(entry.draft).files[0]


def test_catalog_draft_used_only_when_on_disk(tmp_path: Path) -> None:
    model, draft_file = _model_with_draft()
    config = load_config({"models_dir": tmp_path, "home_dir": tmp_path / "home"})
    assert find_draft(model, config) is None
    (tmp_path / draft_file).write_bytes(b"GGUF")
    assert find_draft(model, config) == tmp_path / draft_file


def test_explicit_draft_and_no_draft(tmp_path: Path) -> None:
    model, draft_file = _model_with_draft()
    draft = tmp_path / "d.gguf"
    draft.write_bytes(b"GGUF")
    (tmp_path / draft_file).write_bytes(b"GGUF")
    flags = {"models_dir": tmp_path, "home_dir": tmp_path / "home"}
    assert find_draft(model, load_config({**flags, "backend.draft_path": draft})) == draft
    assert find_draft(model, load_config({**flags, "backend.no_draft": True})) is None
    with pytest.raises(ModelError, match="--draft"):
        find_draft(model, load_config({**flags, "backend.draft_path": tmp_path / "missing"}))


def test_model_without_catalog_draft(tmp_path: Path) -> None:
    model = ResolvedModel(ModelName("my-own-model"), tmp_path / "m.gguf", 1)
    assert find_draft(model, load_config({"models_dir": tmp_path, "home_dir": tmp_path})) is None
