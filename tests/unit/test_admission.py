"""Per-model admission of requests to local backends: depth, release, independence of models."""

from __future__ import annotations

import pytest

from mesh_llm.api.admission import LocalAdmission


def test_refuses_past_the_depth_and_admits_again_after_release() -> None:
    admission = LocalAdmission(2)
    first = admission.try_acquire("a")
    second = admission.try_acquire("a")
    assert first is not None and second is not None
    assert admission.try_acquire("a") is None
    assert admission.in_flight() == {"a": 2}
    first()
    assert admission.in_flight() == {"a": 1}
    third = admission.try_acquire("a")
    assert third is not None
    second()
    third()
    assert admission.in_flight() == {}


def test_release_is_idempotent() -> None:
    admission = LocalAdmission(1)
    release = admission.try_acquire("a")
    assert release is not None
    release()
    release()
    assert admission.in_flight() == {}
    other = admission.try_acquire("a")
    assert other is not None
    release()  # a stale release must not free the new holder's slot
    assert admission.try_acquire("a") is None


def test_models_have_separate_counters() -> None:
    admission = LocalAdmission(1)
    assert admission.try_acquire("a") is not None
    assert admission.try_acquire("b") is not None
    assert admission.try_acquire("a") is None
    assert admission.in_flight() == {"a": 1, "b": 1}


@pytest.mark.parametrize("depth", [0, -1])
def test_depth_below_one_is_refused(depth: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LocalAdmission(depth)
