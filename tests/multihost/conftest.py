"""Fixtures of the multi-host tier: a fresh `Lab` per test, removed in `finally`.

Skips (with the reason) when the machine cannot build namespaces: not root, or no
`ip`/`tc`/`nft`. Lab namespaces left by a crashed earlier run (their creator's pid is gone)
are removed first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_llm.backend.build import Binaries
from tests.multihost.labmesh import LabMesh
from tests.multihost.netlab import Lab, skip_reason, sweep_stale


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    sweep_stale()
    made = Lab()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def mesh(
    lab: Lab, tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path
) -> Iterator[LabMesh]:
    """Nodes on `lab`'s hosts; stopped before the lab is taken down (fixtures end in reverse)."""
    group = LabMesh(tmp_path, llama_binaries, demo_models_dir)
    try:
        yield group
    finally:
        group.close()
