"""A failed task of the node ends it with one `MeshError` for the CLI, never an ExceptionGroup."""

from __future__ import annotations

import logging

import pytest

from mesh_llm.errors import PROTOCOL_ERROR_CODE, DecodeError, MeshError, PeerUnavailable
from mesh_llm.errors import one_error as _one_error
from mesh_llm.wire.messages import RefuseCode


def test_a_mesh_error_comes_out_as_it_is() -> None:
    error = PeerUnavailable("no route")
    inner = ExceptionGroup("placement", [error])
    assert _one_error(ExceptionGroup("node", [inner])) is error


def test_a_bug_becomes_a_mesh_error_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="mesh_llm.node"):
        error = _one_error(ExceptionGroup("node", [KeyError("model")]))
    assert type(error) is MeshError
    assert "internal error" in str(error) and "KeyError" in str(error)
    assert any(r.exc_info for r in caplog.records if "task of the node failed" in r.message)


def test_a_mesh_error_wins_over_a_bug_that_is_still_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = PeerUnavailable("gone")
    with caplog.at_level(logging.ERROR, logger="mesh_llm.node"):
        assert _one_error(ExceptionGroup("node", [ValueError("x"), error])) is error
    assert any("task of the node failed" in r.message for r in caplog.records)


def test_decode_error_carries_the_wire_protocol_error_code() -> None:
    assert PROTOCOL_ERROR_CODE == RefuseCode.PROTOCOL_ERROR
    assert DecodeError("bad frame").code == RefuseCode.PROTOCOL_ERROR
