"""Invite token encoding, strict decoding and copy/paste tolerance."""

from __future__ import annotations

import base64

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.core.types import NodeId
from mesh_llm.errors import TokenError
from mesh_llm.token import (
    MAX_TOKEN_CHARS,
    TOKEN_VERSION,
    InviteToken,
    decode_token,
    encode_token,
    format_addr,
    parse_addr,
)

hex_of = st.binary
ports = st.integers(min_value=1, max_value=65535)
hostnames = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?", fullmatch=True)
ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_addrs = st.builds(lambda ip, port: f"[{ip}]:{port}", st.ip_addresses(v=6), ports)
plain_addrs = st.builds(lambda host, port: f"{host}:{port}", hostnames | ipv4_hosts, ports)
addrs = st.lists(plain_addrs | ipv6_addrs, min_size=1, max_size=8).map(tuple)

tokens = st.builds(
    InviteToken,
    mesh_id=st.binary(min_size=16, max_size=16).map(bytes.hex),
    secret=st.binary(min_size=32, max_size=32),
    node_id=st.binary(min_size=32, max_size=32).map(lambda raw: NodeId(raw.hex())),
    addrs=addrs,
)


def _valid_map() -> dict[str, object]:
    return {
        "v": TOKEN_VERSION,
        "mesh_id": "ab" * 16,
        "secret": b"\x01" * 32,
        "node_id": "cd" * 32,
        "addrs": ["192.0.2.1:9000", "[2001:db8::1]:9000"],
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pack(document: object) -> str:
    return _b64(msgpack.packb(document, use_bin_type=True))


@given(tokens)
def test_round_trip(token: InviteToken) -> None:
    text = encode_token(token)
    assert text.isascii()
    assert "=" not in text
    assert decode_token(text) == token


@given(tokens, st.data())
def test_whitespace_and_quote_mangled_tokens_decode(
    token: InviteToken, data: st.DataObject
) -> None:
    text = encode_token(token)
    pieces = []
    for char in text:
        pieces.append(char)
        pieces.append(data.draw(st.sampled_from(["", "", "", " ", "\n", "\r\n", "\t", "\u200b"])))
    quote = data.draw(st.sampled_from(["", "'", '"', "<", "`"]))
    closing = {"<": ">"}.get(quote, quote)
    mangled = f"  {quote}{''.join(pieces)}{closing}\n"
    assert decode_token(mangled) == token


def test_padded_token_decodes() -> None:
    text = _pack(_valid_map())
    padded = text + "=" * (-len(text) % 4)
    assert decode_token(padded) == decode_token(text)


@given(st.text(max_size=300))
def test_random_text_raises_only_token_error(text: str) -> None:
    with pytest.raises(TokenError):
        decode_token(text)


@given(st.binary(max_size=600))
def test_random_base64_bytes_raise_only_token_error(data: bytes) -> None:
    with pytest.raises(TokenError):
        decode_token(_b64(data))


@given(tokens, st.data())
def test_truncated_tokens_raise_token_error(token: InviteToken, data: st.DataObject) -> None:
    text = encode_token(token)
    cut = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    with pytest.raises(TokenError):
        decode_token(text[:cut])


@given(st.integers().filter(lambda v: v != TOKEN_VERSION))
def test_other_versions_are_rejected_with_both_versions_named(version: int) -> None:
    document = _valid_map()
    document["v"] = version
    try:
        text = _pack(document)
    except OverflowError:  # beyond msgpack's 64-bit integers
        return
    with pytest.raises(TokenError, match="upgrade") as info:
        decode_token(text)
    assert f"version {version}" in str(info.value)
    assert f"accepts version {TOKEN_VERSION}" in str(info.value)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


@given(st.sampled_from(list(_valid_map())), msgpack_values)
def test_wrong_field_values_raise_only_token_error(name: str, value: object) -> None:
    document = _valid_map()
    document[name] = value
    try:
        token = decode_token(_pack(document))
    except TokenError:
        return
    # The only acceptable values are valid ones, e.g. another 64-hex string for node_id.
    assert encode_token(token)


@pytest.mark.parametrize("name", list(_valid_map()))
def test_missing_field_is_named(name: str) -> None:
    document = _valid_map()
    del document[name]
    with pytest.raises(TokenError, match=f"missing the '{name}' field"):
        decode_token(_pack(document))


@given(msgpack_values)
def test_any_msgpack_document_raises_only_token_error(document: object) -> None:
    with pytest.raises(TokenError):
        decode_token(_pack(document))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": True}, "should be an integer"),
        ({"v": "1"}, "should be an integer"),
        ({"mesh_id": "xyz"}, "mesh id"),
        ({"secret": b"short"}, "5 bytes"),
        ({"secret": "ab" * 32}, "should be bytes"),
        ({"node_id": "CD" * 32}, "node id"),
        ({"node_id": "cd" * 31}, "node id"),
        ({"addrs": []}, "no address"),
        ({"addrs": "1.2.3.4:5"}, "should be a list"),
        ({"addrs": [5]}, "int"),
        ({"addrs": ["1.2.3.4"]}, "host:port"),
        ({"addrs": ["1.2.3.4:0"]}, "1 to 65535"),
        ({"addrs": ["1.2.3.4:65536"]}, "1 to 65535"),
        ({"addrs": ["::1:80"]}, r"\[addr\]:port"),
        ({"addrs": ["[::zz]:80"]}, "not an IPv6"),
    ],
)
def test_specific_errors(change: dict[str, object], message: str) -> None:
    document = _valid_map() | change
    with pytest.raises(TokenError, match=message):
        decode_token(_pack(document))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("  \n\t '' ", "empty"),
        ("abc$def", "not URL-safe base64"),
        ("a", "truncated or not base64"),
        (_b64(b"\x93\x01\x02\x03"), "does not hold a map"),
        ("A" * (MAX_TOKEN_CHARS + 1), "too long"),
        (" " * (5 * MAX_TOKEN_CHARS), "too long"),
    ],
)
def test_malformed_text(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        decode_token(text)


def test_error_messages_are_one_line() -> None:
    for text in ["", "$", "a", _b64(b"\xc1"), _pack({"v": 7})]:
        with pytest.raises(TokenError) as info:
            decode_token(text)
        assert "\n" not in str(info.value)


def test_extra_fields_are_ignored() -> None:
    document = _valid_map() | {"future": [1, 2]}
    assert decode_token(_pack(document)).node_id == "cd" * 32


def test_secret_is_not_in_repr() -> None:
    token = decode_token(_pack(_valid_map()))
    assert (b"\x01" * 32).hex() not in repr(token)
    assert repr(b"\x01" * 32) not in repr(token)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("example.com:1", ("example.com", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ],
)
def test_parse_addr(text: str, expected: tuple[str, int]) -> None:
    assert parse_addr(text) == expected
    assert format_addr(*expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":80",
        "host:",
        "host:port",
        "host:+80",
        "host:８０",
        "[::1]",
        "[::1]80",
        "-bad:80",
        "a b:1",
    ],
)
def test_parse_addr_rejects(text: str) -> None:
    with pytest.raises(TokenError):
        parse_addr(text)
