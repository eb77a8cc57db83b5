"""Naming of GGUF files on disk, including models split into `-00001-of-0000N` parts.

A model's name is its GGUF file stem; a split model is one model named after its first part
without the suffix, and its size is the sum of its parts. Pure path arithmetic plus `stat`;
imports nothing of the project but the id types and errors.
"""

from __future__ import annotations

import re
from pathlib import Path

from mesh_llm.core.types import ModelName
from mesh_llm.errors import ModelError

GGUF_SUFFIX = ".gguf"
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")


def split_index(file_name: str) -> tuple[int, int] | None:
    """`(index, count)` of a split part's file name (1-based), or None for a whole file."""
    match = _SPLIT_RE.match(_drop_suffix(file_name))
    if match is None:
        return None
    return int(match["index"]), int(match["count"])


def model_name_of(file_name: str) -> ModelName:
    """The model name of a GGUF file name: its stem without any split suffix."""
    stem = _drop_suffix(file_name)
    match = _SPLIT_RE.match(stem)
    return ModelName(match["stem"] if match else stem)


def part_names(first_name: str) -> list[str]:
    """All part file names of the split model whose first part is `first_name` (or itself)."""
    stem = _drop_suffix(first_name)
    match = _SPLIT_RE.match(stem)
    if match is None:
        return [first_name]
    count = int(match["count"])
    return [f"{match['stem']}-{i:05d}-of-{count:05d}{GGUF_SUFFIX}" for i in range(1, count + 1)]


def part_paths(first: Path) -> list[Path]:
    """The paths of every part of the model at `first` (just `first` when not split).

    Raises `ModelError` when `first` is a later part or a part is missing.
    """
    index = split_index(first.name)
    if index is not None and index[0] != 1:
        raise ModelError(
            f"{first} is part {index[0]} of {index[1]} of a split model: "
            "pass the first part (-00001-of-...)"
        )
    paths = [first.with_name(name) for name in part_names(first.name)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ModelError(
            f"split model {first.name} is incomplete: missing {', '.join(missing)} "
            f"in {first.parent}; download the missing parts or pass another model"
        )
    return paths


def total_size(first: Path) -> int:
    """Size in bytes of the model at `first`, summed over its parts. Raises `ModelError`."""
    return sum(p.stat().st_size for p in part_paths(first))


def _drop_suffix(file_name: str) -> str:
    name = file_name.rsplit("/", 1)[-1]
    return name[: -len(GGUF_SUFFIX)] if name.lower().endswith(GGUF_SUFFIX) else name
