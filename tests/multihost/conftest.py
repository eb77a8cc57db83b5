"""Fixtures of the multi-host tier: a fresh `Lab` per test, removed in `finally`.

Skips (with the reason) when the machine cannot build namespaces: not root, or no
`ip`/`tc`/`nft`. Lab namespaces left by a crashed earlier run (their creator's pid is gone)
are removed first.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
