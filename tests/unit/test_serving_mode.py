"""How a resolved model is served: capabilities and flags from its GGUF and `--embeddings`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_llm.backend.serving import serving_mode
from mesh_llm.config import BackendConfig, Config
from mesh_llm.core.capabilities import Capability
from mesh_llm.core.types import ModelName
from mesh_llm.errors import ModelError
from mesh_llm.models.resolve import ResolvedModel
from tests.fakes.gguf_writer import Tensor, Typed, llama_metadata, write_gguf

TENSORS = [Tensor("token_embd.weight", (16, 16))]


def _model(path: Path) -> ResolvedModel:
    return ResolvedModel(ModelName(path.stem), path, path.stat().st_size)


def _config(*embeddings: str) -> Config:
    return Config(backend=BackendConfig(embeddings=embeddings))


def test_an_llm_is_served_for_chat_only_unless_named_by_embeddings(tmp_path: Path) -> None:
    model = _model(write_gguf(tmp_path / "Tiny-Q4.gguf", llama_metadata(), TENSORS))
    plain = serving_mode(model, _config())
    assert Capability.EMBEDDINGS not in plain.capabilities and not plain.embeddings
    for name in ("Tiny-Q4", "Tiny-Q4.gguf", str(model.path), "tiny-alias"):
        mode = serving_mode(model, _config(name), spec="tiny-alias")
        assert mode.embeddings and mode.pooling == "mean", name
        assert Capability.EMBEDDINGS in mode.capabilities
    assert not serving_mode(model, _config("other-model")).embeddings


def test_an_embedding_gguf_is_served_with_its_pooling(tmp_path: Path) -> None:
    metadata = llama_metadata("bert", bert__pooling_type=Typed(4, 2))
    mode = serving_mode(_model(write_gguf(tmp_path / "e.gguf", metadata, TENSORS)), _config())
    assert (mode.capabilities, mode.embeddings, mode.pooling) == (
        (Capability.EMBEDDINGS,),
        True,
        "cls",
    )


def test_a_broken_file_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf")
    with pytest.raises(ModelError):
        serving_mode(_model(path), _config())
