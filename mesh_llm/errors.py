"""The error tree of mesh-llm.

Every error raised on purpose by the project derives from `MeshError`; its `str()` is a
user-facing sentence that says what happened and what to do. Library exceptions are translated
into these at the boundary; the CLI turns them into one line and an exit code, the API into
OpenAI-shaped JSON. Imports nothing of the project.
"""

from __future__ import annotations

import logging


class MeshError(Exception):
    """Base of every deliberate mesh-llm error; the message is meant for a person."""


class ConfigError(MeshError):
    """Bad configuration: flags, environment or config file."""


class IdentityError(MeshError):
    """The node key or mesh secret on disk cannot be read or is corrupt."""


class TokenError(MeshError):
    """An invite token is malformed, truncated or of another version."""


class ModelError(MeshError):
    """A model cannot be resolved, downloaded or read."""


class ModelNotFound(ModelError):
    """No model matches a name."""


class DownloadError(ModelError):
    """A model download failed (network, hub unreachable, checksum)."""


class GGUFError(ModelError):
    """A file is not a readable GGUF file."""


class BackendError(MeshError):
    """llama.cpp binaries or processes failed."""


class BuildError(BackendError):
    """Building llama.cpp failed; the message names the build log."""


class NoHostForModel(MeshError):
    """No node serves, or can serve yet, the requested model."""


class ProtocolError(MeshError):
    """A peer broke the wire protocol; `code` is the wire error code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class PeerUnavailable(MeshError):
    """A peer cannot be reached or went away."""


class AdmissionRefused(ProtocolError):
    """The hello exchange with a peer failed; `code` is a `RefuseCode`, the message says why."""


class UpstreamFailed(MeshError):
    """The backend of an API request failed (before the response head, or mid-body)."""


class StreamReset(PeerUnavailable):
    """A byte stream to a peer ended under us: reset, closed early, or its connection went."""


class FramingError(ProtocolError):
    """A peer sent bytes that are not a valid frame of the protocol on that stream."""


class ServiceError(MeshError):
    """Installing or removing the service unit failed."""


class ChecksumMismatch(ModelError):
    """Bytes written for a model do not have the expected size and sha256."""


class InvalidRequest(MeshError):
    """A request body the API refuses with 400; `param` names the bad field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BodyTimeout(MeshError):
    """The client did not send its request body within `api.body_read_timeout_s` (408)."""


# RefuseCode.PROTOCOL_ERROR of wire/messages.py (this module imports nothing of the project;
# a unit test checks that the two agree).
PROTOCOL_ERROR_CODE = 1


class DecodeError(ProtocolError):
    """Bytes from a peer are not a valid message or frame; the stream should be closed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=PROTOCOL_ERROR_CODE)


def one_error(failed: BaseExceptionGroup[BaseException]) -> MeshError:
    """The error a failed node task ends the node with: its `MeshError` as is; anything else is
    a bug, logged here with its traceback and reported as a `MeshError` that says so."""
    mesh_errors, others = failed.split(MeshError)
    if others is not None:
        logging.getLogger("mesh_llm.node").error("a task of the node failed", exc_info=others)
    leaves = list(_leaves(mesh_errors if mesh_errors is not None else failed))
    if mesh_errors is not None and isinstance(leaves[0], MeshError):
        return leaves[0]
    return MeshError(f"the node stopped after an internal error ({leaves[0]!r}); see the log")


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found
