"""The msgpack codec: round trips, strict validation, and DecodeError as the only failure."""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.errors import DecodeError, ProtocolError
from mesh_llm.wire.codec import (
    MAX_FRAME_BYTES,
    MAX_ITEMS,
    MAX_STRING_BYTES,
    decode_message,
    encode_message,
)
from mesh_llm.wire.messages import (
    MESSAGE_TYPES,
    Digest,
    Hello,
    Message,
    NodeRecord,
    Ping,
    Records,
    RefuseCode,
    Refused,
    ServingInfo,
    Want,
    Welcome,
)
from tests.unit.wire.strategies import (
    MESSAGE_STRATEGIES,
    messages,
    msgpack_values,
    tagged_garbage,
)


def _pack(document: object) -> bytes:
    packed: bytes = msgpack.packb(document, use_bin_type=True)
    return packed


def _wire(msg: Message) -> dict[str, Any]:
    document: dict[str, Any] = msgpack.unpackb(encode_message(msg), raw=False)
    return document


def _decodes_or_rejects(payload: bytes) -> None:
    """Decoding `payload` gives a valid message or DecodeError, never another exception."""
    try:
        msg = decode_message(payload)
    except DecodeError:
        return
    assert isinstance(msg, MESSAGE_TYPES)
    assert decode_message(encode_message(msg)) == msg


def test_every_message_type_has_a_strategy() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_round_trip_each_type(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(MESSAGE_STRATEGIES[cls])
    decoded = decode_message(encode_message(msg))
    assert decoded == msg
    assert type(decoded) is cls


def test_wire_shape_is_a_map_with_integer_tag_and_named_fields() -> None:
    record = NodeRecord(
        node_id="n1", version=2, addrs=("a:1",), serving={"m": ServingInfo(ready=True)}
    )
    document = _wire(Records(records=(record,)))
    assert document["t"] == Records.TAG == 11
    (wire_record,) = document["records"]
    assert wire_record["node_id"] == "n1"
    assert wire_record["addrs"] == ["a:1"]
    assert wire_record["serving"] == {
        "m": {"role": "host", "ready": True, "host": "", "aliases": [], "capabilities": []}
    }
    hello = _wire(Hello(version=1, node_id="n", mesh_id="m", nonce=b"\x00\xff"))
    assert hello["nonce"] == b"\x00\xff"  # bytes stay bin, not str


def test_decode_error_is_a_protocol_error_with_code() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(b"\xc1")
    assert isinstance(caught.value, DecodeError)
    assert caught.value.code == RefuseCode.PROTOCOL_ERROR


@given(st.binary(max_size=200))
def test_random_bytes_only_raise_decode_error(payload: bytes) -> None:
    _decodes_or_rejects(payload)


@given(msgpack_values)
def test_random_documents_only_raise_decode_error(document: object) -> None:
    _decodes_or_rejects(_pack(document))


@given(tagged_garbage)
def test_tagged_garbage_only_raises_decode_error(document: dict[str, object]) -> None:
    _decodes_or_rejects(_pack(document))


def _mutate(node: Any, data: st.DataObject) -> Any:
    """`node` with one randomly chosen value, at any depth, replaced by an arbitrary one."""
    children: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        children = list(node.items())
    elif isinstance(node, list):
        children = list(enumerate(node))
    descend: bool = len(children) > 0 and data.draw(st.booleans())
    if descend:
        key, child = data.draw(st.sampled_from(children))
        copy = dict(node) if isinstance(node, dict) else list(node)
        copy[key] = _mutate(child, data)
        return copy
    return data.draw(msgpack_values)


@given(messages, st.data())
def test_mutated_messages_only_raise_decode_error(msg: Message, data: st.DataObject) -> None:
    document = _wire(msg)
    field = data.draw(st.sampled_from(sorted(document)))
    document[field] = _mutate(document[field], data)
    _decodes_or_rejects(_pack(document))


def test_unknown_tag() -> None:
    with pytest.raises(DecodeError, match="unknown message type 99"):
        decode_message(_pack({"t": 99}))


@pytest.mark.parametrize(
    "document",
    [[1, 2], {"x": 1}, {"t": "1"}, {"t": True}, {"t": None}, 7],
    ids=["array", "no-tag", "str-tag", "bool-tag", "nil-tag", "int"],
)
def test_not_a_tagged_map(document: object) -> None:
    with pytest.raises(DecodeError):
        decode_message(_pack(document))


def test_missing_required_field_is_named() -> None:
    document = _wire(Hello(version=1, node_id="n", mesh_id="m", nonce=b"x"))
    del document["nonce"]
    with pytest.raises(DecodeError, match="nonce"):
        decode_message(_pack(document))


def test_missing_required_field_of_nested_record_is_named() -> None:
    document = _wire(Records(records=(NodeRecord(node_id="n", version=1),)))
    del document["records"][0]["version"]
    with pytest.raises(DecodeError, match=r"records\[0\].*version"):
        decode_message(_pack(document))


@pytest.mark.parametrize(
    ("msg", "field", "bad"),
    [
        (Ping(seq=1), "seq", True),  # bool where int
        (Ping(seq=1), "seq", 1.0),
        (Ping(seq=1), "seq", "1"),
        (Hello(version=1, node_id="n", mesh_id="m", nonce=b"x"), "nonce", "x"),  # str for bytes
        (Hello(version=1, node_id="n", mesh_id="m", nonce=b"x"), "node_id", b"n"),
        (Hello(version=1, node_id="n", mesh_id="m", nonce=b"x"), "client", 1),  # int for bool
        (Want(node_ids=("a",)), "node_ids", "a"),
        (Want(node_ids=("a",)), "node_ids", [1]),
        (Digest(versions={"a": 1}), "versions", [["a", 1]]),
        (Digest(versions={"a": 1}), "versions", {"a": True}),
        (Records(), "records", [{"node_id": "n", "version": "1"}]),
        (Records(), "records", [[]]),
        (Refused(code=1), "reason", None),
    ],
)
def test_wrong_field_type(msg: Message, field: str, bad: object) -> None:
    document = _wire(msg)
    document[field] = bad
    with pytest.raises(DecodeError, match=field):
        decode_message(_pack(document))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("rtt_ms", {"peer": "fast"}),
        ("rtt_ms", {"peer": float("nan")}),
        ("rtt_ms", {"peer": float("inf")}),
        ("serving", {"m": {"ready": "yes"}}),
        ("serving", {"m": None}),
        ("models_on_disk", {"m": -1.5}),
        ("addrs", [None]),
    ],
)
def test_wrong_nested_type(name: str, value: object) -> None:
    document = _wire(Records(records=(NodeRecord(node_id="n", version=1),)))
    document["records"][0][name] = value
    with pytest.raises(DecodeError, match=name):
        decode_message(_pack(document))


def test_float_field_accepts_int() -> None:
    document = _wire(Records(records=(NodeRecord(node_id="n", version=1),)))
    document["records"][0]["rtt_ms"] = {"peer": 3}
    decoded = decode_message(_pack(document))
    assert isinstance(decoded, Records)
    assert decoded.records[0].rtt_ms == {"peer": 3.0}
    assert isinstance(decoded.records[0].rtt_ms["peer"], float)


def test_unknown_fields_are_ignored() -> None:
    """Forward compatibility: a newer peer's extra fields, at any level, do not matter."""
    record = NodeRecord(node_id="n", version=1, serving={"m": ServingInfo()})
    document = _wire(Records(records=(record,)))
    document["future"] = {"anything": [1, 2]}
    document["records"][0]["gpu_count"] = 4
    document["records"][0]["serving"]["m"]["tokens_per_s"] = 12.5
    assert decode_message(_pack(document)) == Records(records=(record,))


def test_missing_defaulted_fields_take_defaults() -> None:
    """Backward compatibility: an older peer omits fields added since; they take defaults."""
    assert decode_message(_pack({"t": Welcome.TAG})) == Welcome()
    assert decode_message(_pack({"t": Refused.TAG, "code": 3})) == Refused(code=3, reason="")
    decoded = decode_message(_pack({"t": Records.TAG, "records": [{"node_id": "n", "version": 5}]}))
    assert decoded == Records(records=(NodeRecord(node_id="n", version=5),))
    assert isinstance(decoded, Records)
    assert decoded.records[0].serving == {}
    assert decoded.records[0].backend == "cpu"


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(DecodeError):
        decode_message(encode_message(Welcome()) + b"\x00")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x81\xa1t",  # truncated map
        b"\x81\xa1t\xc1",  # never-used type byte
        b"\x82\xa1t\x14\xa3seq\xc7\x03\xff\x00\x00\x00",  # malformed timestamp extension
        b"\x82\xa1t\x14\xa3seq\xd4\x05\x00",  # extension type instead of int
        b"\x82\xa1t\x1e\xa7node_id\xa2\xff\xfe",  # invalid UTF-8 in str
        b"\x81\x01\x01",  # integer map key
        b"\x91" * 5000,  # nesting deeper than the unpacker's stack
    ],
    ids=["empty", "truncated", "reserved", "timestamp", "ext", "utf8", "int-key", "deep"],
)
def test_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_message(payload)


def test_oversized_string_rejected() -> None:
    with pytest.raises(DecodeError):
        decode_message(_pack({"t": Want.TAG, "node_ids": ["x" * (MAX_STRING_BYTES + 1)]}))
    with pytest.raises(DecodeError):
        decode_message(_pack({"t": Hello.TAG, "nonce": b"x" * (MAX_STRING_BYTES + 1)}))


def test_oversized_collections_rejected() -> None:
    with pytest.raises(DecodeError):
        decode_message(_pack({"t": Want.TAG, "node_ids": [""] * (MAX_ITEMS + 1)}))
    versions = {str(i): 1 for i in range(MAX_ITEMS + 1)}
    with pytest.raises(DecodeError):
        decode_message(_pack({"t": Digest.TAG, "versions": versions}))


def test_collections_at_the_limit_accepted() -> None:
    msg = Want(node_ids=tuple(str(i) for i in range(MAX_ITEMS)))
    assert decode_message(encode_message(msg)) == msg


def test_oversized_payload_rejected() -> None:
    payload = _pack({"t": Welcome.TAG, "pad": [b"x" * 60_000] * 20})
    assert len(payload) > MAX_FRAME_BYTES
    with pytest.raises(DecodeError, match="exceeds"):
        decode_message(payload)


def test_encode_rejects_values_msgpack_cannot_carry() -> None:
    with pytest.raises(ValueError, match="Ping"):
        encode_message(Ping(seq=2**64))
