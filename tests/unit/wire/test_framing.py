"""Length-prefixed framing: split points, partial frames, size limits, garbage streams."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.errors import DecodeError
from mesh_llm.wire.codec import MAX_FRAME_BYTES, FrameDecoder, encode_frame, encode_message
from mesh_llm.wire.messages import MESSAGE_TYPES, Message, Ping, Pong, Want, Welcome
from tests.unit.wire.strategies import messages

HEADER = 4


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def test_frame_is_big_endian_length_then_payload() -> None:
    payload = encode_message(Ping(seq=7))
    assert encode_frame(Ping(seq=7)) == len(payload).to_bytes(4, "big") + payload


@given(st.lists(messages, max_size=8), st.lists(st.integers(min_value=0), max_size=20))
def test_frames_survive_any_split(batch: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(msg) for msg in batch)
    decoder = FrameDecoder()
    received: list[Message] = []
    for chunk in _split(stream, cuts):
        received += decoder.feed(chunk)
        assert decoder.pending_bytes <= MAX_FRAME_BYTES + HEADER
    assert received == batch
    assert decoder.pending_bytes == 0


def test_one_byte_at_a_time() -> None:
    batch: list[Message] = [Ping(seq=1), Welcome(), Pong(seq=2)]
    stream = b"".join(encode_frame(msg) for msg in batch)
    decoder = FrameDecoder()
    received: list[Message] = []
    for index in range(len(stream)):
        received += decoder.feed(stream[index : index + 1])
    assert received == batch


def test_truncated_frame_waits_for_more_bytes() -> None:
    frame = encode_frame(Want(node_ids=("a", "b")))
    decoder = FrameDecoder()
    assert decoder.feed(frame[:2]) == []  # half a length prefix
    assert decoder.pending_bytes == 2
    assert decoder.feed(frame[2:-1]) == []  # all but the last payload byte
    assert decoder.pending_bytes == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [Want(node_ids=("a", "b"))]
    assert decoder.pending_bytes == 0


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.pending_bytes == 0


def test_oversized_declared_length_rejected_at_once() -> None:
    decoder = FrameDecoder()
    with pytest.raises(DecodeError, match="exceeds"):
        decoder.feed((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    assert decoder.pending_bytes == 0


def test_length_at_the_limit_waits() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(MAX_FRAME_BYTES.to_bytes(4, "big") + b"\x00" * 1000) == []
    assert decoder.pending_bytes == HEADER + 1000


def test_decoder_stays_failed_after_an_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(DecodeError):
        decoder.feed(b"\x00\x00\x00\x01\xc1")
    with pytest.raises(DecodeError, match="already failed"):
        decoder.feed(encode_frame(Welcome()))


def test_bad_payload_inside_a_frame_rejected() -> None:
    decoder = FrameDecoder()
    with pytest.raises(DecodeError, match="unknown message type"):
        decoder.feed(b"\x00\x00\x00\x04\x81\xa1t\x63")  # {"t": 99}
    with pytest.raises(DecodeError):
        FrameDecoder().feed(b"\x00\x00\x00\x00")  # empty payload


def test_large_feed_of_many_frames_buffers_at_most_one_partial() -> None:
    frame = encode_frame(Want(node_ids=tuple("x" * 1000 for _ in range(50))))
    count = 2 * MAX_FRAME_BYTES // len(frame) + 1
    decoder = FrameDecoder()
    received = decoder.feed(frame * count + frame[:-1])
    assert len(received) == count
    assert decoder.pending_bytes == len(frame) - 1


def test_encode_frame_rejects_oversized_payload() -> None:
    big = Want(node_ids=tuple("x" * 60_000 for _ in range(20)))
    with pytest.raises(ValueError, match="frame limit"):
        encode_frame(big)


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_chunks_only_raise_decode_error(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        for chunk in chunks:
            for msg in decoder.feed(chunk):
                assert isinstance(msg, MESSAGE_TYPES)
            assert decoder.pending_bytes <= MAX_FRAME_BYTES + HEADER
    except DecodeError:
        pass


@given(messages, st.binary(max_size=64), st.lists(st.integers(min_value=0), max_size=5))
def test_garbage_after_valid_frame(msg: Message, garbage: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(msg)) == [msg]
    try:
        for chunk in _split(garbage, cuts):
            for received in decoder.feed(chunk):
                assert isinstance(received, MESSAGE_TYPES)
    except DecodeError:
        assert decoder.pending_bytes == 0
