"""The explicit msgpack codec and length-prefixed framing of control-plane messages.

Input: message dataclasses from `wire/messages.py` (encode) or untrusted bytes from a peer
(decode). Output: a msgpack map `{"t": TAG, field: value, ...}`, framed as a `u32` big-endian
length + payload of at most `MAX_FRAME_BYTES`; or a validated message. Decoding is strict and
driven by the dataclass field types: unknown fields are ignored, missing fields take their
defaults, and anything malformed, mistyped or oversized raises `DecodeError` and nothing else.
Pure: imports no I/O, clock or concurrency module.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information

from mesh_llm.errors import DecodeError
from mesh_llm.wire.messages import MESSAGE_TYPES, Message

MAX_FRAME_BYTES: Final = 1 << 20
"""Largest payload of one frame, in bytes (the 4-byte length prefix not included)."""
MAX_STRING_BYTES: Final = 64 * 1024
"""Largest str or bytes value inside a message, in bytes (str: UTF-8 encoded)."""
MAX_ITEMS: Final = 10_000
"""Largest number of entries in one array or map inside a message."""

_LENGTH_BYTES: Final = 4
_TAG_KEY: Final = "t"


# -- encoding ----------------------------------------------------------------------------------


def _to_wire(value: object) -> object:
    """A msgpack-able form of a field value: nested records become maps, tuples arrays."""
    if isinstance(value, str | bytes | bool | int | float):
        return value
    if isinstance(value, tuple):
        return [_to_wire(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_wire(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise ValueError(f"cannot encode a value of type {type(value).__name__}")


def encode_message(msg: Message) -> bytes:
    """The msgpack payload of `msg` (no length prefix).

    Raises ValueError if a field holds a value msgpack cannot carry (an int outside 64 bits,
    a str that is not valid Unicode, a type the codec does not know).
    """
    document: dict[str, object] = {_TAG_KEY: msg.TAG}
    for f in dataclasses.fields(msg):
        document[f.name] = _to_wire(getattr(msg, f.name))
    try:
        payload: bytes = msgpack.packb(document, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"cannot encode {type(msg).__name__}: {exc}") from exc
    return payload


def encode_frame(msg: Message) -> bytes:
    """`msg` as one frame: its payload length as a big-endian u32, then the payload.

    Raises ValueError if the payload is larger than MAX_FRAME_BYTES or cannot be encoded.
    """
    payload = encode_message(msg)
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(
            f"{type(msg).__name__} encodes to {len(payload)} bytes, "
            f"more than the {MAX_FRAME_BYTES}-byte frame limit"
        )
    return len(payload).to_bytes(_LENGTH_BYTES, "big") + payload


# -- decoding ----------------------------------------------------------------------------------

_Check = Callable[[object, str], object]
"""Validates one decoded value found at a path (for error messages); returns the field value."""


def _type_name(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def _mistyped(path: str, expected: str, value: object) -> DecodeError:
    return DecodeError(f"{path}: expected {expected}, got {_type_name(value)}")


def _check_int(value: object, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _mistyped(path, "int", value)
    return value


def _check_float(value: object, path: str) -> float:
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # msgpack ints fit in 64 bits, so this cannot overflow
    if not isinstance(value, float):
        raise _mistyped(path, "float", value)
    if not math.isfinite(value):  # a NaN would poison every comparison made with it
        raise DecodeError(f"{path}: expected a finite float, got {value}")
    return value


def _check_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _mistyped(path, "bool", value)
    return value


def _check_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _mistyped(path, "str", value)
    if len(value) > MAX_STRING_BYTES:
        raise DecodeError(f"{path}: string longer than {MAX_STRING_BYTES} bytes")
    return value


def _check_bytes(value: object, path: str) -> bytes:
    if not isinstance(value, bytes):
        raise _mistyped(path, "bytes", value)
    if len(value) > MAX_STRING_BYTES:
        raise DecodeError(f"{path}: bytes longer than {MAX_STRING_BYTES}")
    return value


def _tuple_check(item: _Check) -> _Check:
    def check(value: object, path: str) -> tuple[object, ...]:
        if not isinstance(value, list):
            raise _mistyped(path, "array", value)
        if len(value) > MAX_ITEMS:
            raise DecodeError(f"{path}: more than {MAX_ITEMS} items")
        return tuple(item(element, f"{path}[{index}]") for index, element in enumerate(value))

    return check


def _dict_check(item: _Check) -> _Check:
    def check(value: object, path: str) -> dict[str, object]:
        if not isinstance(value, dict):
            raise _mistyped(path, "map", value)
        if len(value) > MAX_ITEMS:
            raise DecodeError(f"{path}: more than {MAX_ITEMS} entries")
        result: dict[str, object] = {}
        for key, element in value.items():
            name = _check_str(key, f"{path} key")
            result[name] = item(element, f"{path}[{name!r}]")
        return result

    return check


class _Struct:
    """Decodes a msgpack map into one dataclass, checking each field against its type."""

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls)
        self.fields: list[tuple[str, _Check, bool]] = []
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            self.fields.append((f.name, _check_for(hints[f.name]), required))
        if any(name == _TAG_KEY for name, _, _ in self.fields):
            raise TypeError(f"{cls.__name__} has a field named {_TAG_KEY!r}, the tag key")

    def __call__(self, value: object, path: str) -> object:
        if not isinstance(value, dict):
            raise _mistyped(path, "map", value)
        arguments: dict[str, object] = {}
        for name, check, required in self.fields:
            if name in value:
                arguments[name] = check(value[name], f"{path}.{name}")
            elif required:
                raise DecodeError(f"{path}: missing required field {name!r}")
        # Absent optional fields are left out so the dataclass applies its own default.
        return self.cls(**arguments)


_SCALAR_CHECKS: Final[dict[object, _Check]] = {
    int: _check_int,
    float: _check_float,
    bool: _check_bool,
    str: _check_str,
    bytes: _check_bytes,
}


def _check_for(hint: object) -> _Check:
    """The validator of one field type; raises TypeError (at import) for a type not handled."""
    if hint in _SCALAR_CHECKS:
        return _SCALAR_CHECKS[hint]
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(arguments) == 2 and arguments[1] is Ellipsis:
        return _tuple_check(_check_for(arguments[0]))
    if origin is dict and len(arguments) == 2 and arguments[0] is str:
        return _dict_check(_check_for(arguments[1]))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _Struct(hint)
    raise TypeError(f"the wire codec cannot carry a field of type {hint!r}")


def _build_decoders() -> dict[int, _Struct]:
    decoders: dict[int, _Struct] = {}
    for cls in MESSAGE_TYPES:
        if cls.TAG in decoders:
            raise TypeError(f"{cls.__name__} reuses tag {cls.TAG}")
        decoders[cls.TAG] = _Struct(cls)
    return decoders


_DECODERS: Final = _build_decoders()


def _unpack(payload: bytes) -> object:
    # unpackb has no max_buffer_size; the explicit length check plays its part.
    if len(payload) > MAX_FRAME_BYTES:
        raise DecodeError(f"message of {len(payload)} bytes exceeds {MAX_FRAME_BYTES} bytes")
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STRING_BYTES,
            max_bin_len=MAX_STRING_BYTES,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=MAX_STRING_BYTES,
        )
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        # UnicodeDecodeError, ExtraData, FormatError and StackError are ValueErrors.
        raise DecodeError(f"message is not valid msgpack: {exc}") from exc


def decode_message(payload: bytes) -> Message:
    """The message held by one msgpack payload (no length prefix).

    Raises DecodeError, and only DecodeError, for anything malformed: not msgpack, not a map,
    unknown tag, missing required field, wrong type, non-finite float, or an oversized payload,
    string, array or map (see MAX_FRAME_BYTES, MAX_STRING_BYTES, MAX_ITEMS).
    """
    document = _unpack(payload)
    if not isinstance(document, dict):
        raise _mistyped("message", "map", document)
    tag = document.get(_TAG_KEY)
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise _mistyped("message tag 't'", "int", tag)
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise DecodeError(f"unknown message type {tag}")
    # The decoder registered under a message class's tag builds an instance of that class.
    return typing.cast(Message, decoder(document, decoder.cls.__name__))


# -- framing -----------------------------------------------------------------------------------


class FrameDecoder:
    """Splits a byte stream into frames and decodes each one (sans-I/O).

    Buffers at most one partial frame, so never more than MAX_FRAME_BYTES + 4 bytes. After
    it raises DecodeError the stream is broken: every later `feed` raises DecodeError too.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed: DecodeError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """Every message completed by `data`, in order; partial frames wait for more bytes.

        Raises DecodeError for a declared length over MAX_FRAME_BYTES (as soon as the
        length prefix arrives) or a payload that is not a valid message.
        """
        if self._failed is not None:
            raise DecodeError(f"stream already failed: {self._failed}")
        try:
            return self._feed(memoryview(data))
        except DecodeError as exc:
            self._failed = exc
            self._buffer.clear()
            raise

    def _feed(self, view: memoryview) -> list[Message]:
        messages: list[Message] = []
        while view:
            if len(self._buffer) < _LENGTH_BYTES:
                view = self._take(view, _LENGTH_BYTES)
                if len(self._buffer) < _LENGTH_BYTES:
                    break
            length = int.from_bytes(self._buffer[:_LENGTH_BYTES], "big")
            if length > MAX_FRAME_BYTES:
                raise DecodeError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES} bytes")
            view = self._take(view, _LENGTH_BYTES + length)
            if len(self._buffer) < _LENGTH_BYTES + length:
                break
            payload = bytes(self._buffer[_LENGTH_BYTES:])
            self._buffer.clear()
            messages.append(decode_message(payload))
        return messages

    def _take(self, view: memoryview, target: int) -> memoryview:
        """Moves bytes from `view` into the buffer until it holds `target`; returns the rest."""
        count = min(target - len(self._buffer), len(view))
        self._buffer += view[:count]
        return view[count:]
