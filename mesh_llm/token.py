"""Invite tokens: the text a joiner pastes to reach a mesh, encoded and strictly decoded.

A token is URL-safe base64 (no padding) of a msgpack map
`{v, mesh_id, secret, node_id, addrs}`: the format version, the mesh id (32 hex chars), the
32-byte mesh secret, the node id (64 hex chars) of the node to dial, whose key the dialer pins,
and that node's addresses as `host:port` (`[v6addr]:port` for IPv6). `decode_token` survives
copy/paste damage (whitespace and line breaks anywhere, surrounding quotes or angle brackets,
missing padding) and raises only `TokenError`, with a one-line message, for anything else.
Unknown extra keys are ignored so that a token may grow optional fields. Pure: imports no I/O
module.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from typing import TypeVar

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information

from mesh_llm.core.types import NodeId
from mesh_llm.errors import TokenError

TOKEN_VERSION = 1
MAX_TOKEN_CHARS = 4096
# Generous room for whitespace added by mail clients and terminals around a token.
_MAX_INPUT_CHARS = 4 * MAX_TOKEN_CHARS
_SECRET_BYTES = 32
_NODE_ID_CHARS = 64
_MESH_ID_CHARS = 32
_HEX_DIGITS = frozenset("0123456789abcdef")
_SURROUNDING = "'\"<>`"
# Zero-width characters that some chat clients insert into long words.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_T = TypeVar("_T")
_AGAIN = "copy the whole token again or ask the mesh owner for a new one"


@dataclass(frozen=True, slots=True)
class InviteToken:
    """What a joiner needs: which mesh, its secret, which node to dial and where."""

    mesh_id: str
    secret: bytes = field(repr=False)
    node_id: NodeId
    addrs: tuple[str, ...]
    version: int = TOKEN_VERSION


def encode_token(token: InviteToken) -> str:
    """The token as URL-safe base64 without padding (ASCII, no whitespace)."""
    payload = {
        "v": token.version,
        "mesh_id": token.mesh_id,
        "secret": token.secret,
        "node_id": token.node_id,
        "addrs": list(token.addrs),
    }
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")


def decode_token(text: str) -> InviteToken:
    """Parse a pasted token. Raises `TokenError` (and nothing else) if it is not a valid token."""
    document = _unpack(_unbase64(_clean(text)))
    version = _field(document, "v", int, "an integer")
    if version != TOKEN_VERSION:
        raise TokenError(_version_message(version))
    mesh_id = _field(document, "mesh_id", str, "a string")
    secret = _field(document, "secret", bytes, "bytes")
    node_id = _field(document, "node_id", str, "a string")
    addrs = _field(document, "addrs", list, "a list")
    if not _is_lower_hex(mesh_id, _MESH_ID_CHARS):
        raise TokenError(f"invite token has a bad mesh id (not {_MESH_ID_CHARS} hex chars)")
    if len(secret) != _SECRET_BYTES:
        raise TokenError(
            f"invite token has a bad mesh secret ({len(secret)} bytes, not {_SECRET_BYTES})"
        )
    if not _is_lower_hex(node_id, _NODE_ID_CHARS):
        raise TokenError(f"invite token has a bad node id (not {_NODE_ID_CHARS} hex chars)")
    if not addrs:
        raise TokenError(f"invite token lists no address to connect to; {_AGAIN}")
    for addr in addrs:
        if not isinstance(addr, str):
            raise TokenError(f"invite token has an address that is a {_type_name(addr)}")
        parse_addr(addr)
    return InviteToken(mesh_id, secret, NodeId(node_id), tuple(addrs), version)


def parse_addr(text: str) -> tuple[str, int]:
    """Split `host:port` or `[ipv6]:port` into host (without brackets) and port 1..65535.

    The host is an IPv4 address, a host name, or (in brackets) an IPv6 address. Raises
    `TokenError`.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise TokenError(f"bad address {text!r}: expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise TokenError(f"bad address {text!r}: {host!r} is not an IPv6 address") from exc
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise TokenError(f"bad address {text!r}: expected host:port")
        if ":" in host:
            raise TokenError(f"bad address {text!r}: write IPv6 addresses as [addr]:port")
        if not _HOSTNAME.fullmatch(host):
            raise TokenError(f"bad address {text!r}: {host!r} is not a host name or IP address")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise TokenError(f"bad address {text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def format_addr(host: str, port: int) -> str:
    """`host:port`, with IPv6 hosts in brackets: the inverse of `parse_addr`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _clean(text: str) -> str:
    if not isinstance(text, str):
        raise TokenError(f"invite token must be text, not {_type_name(text)}")
    if len(text) > _MAX_INPUT_CHARS:
        raise TokenError(f"invite token is too long ({len(text)} characters); {_AGAIN}")
    compact = "".join(text.split()).translate(_INVISIBLE).strip(_SURROUNDING)
    if not compact:
        raise TokenError("invite token is empty; paste the token printed by the mesh owner")
    if len(compact) > MAX_TOKEN_CHARS:
        raise TokenError(f"invite token is too long ({len(compact)} characters); {_AGAIN}")
    return compact


def _unbase64(text: str) -> bytes:
    if not _BASE64URL.fullmatch(text):
        raise TokenError(f"invite token is not URL-safe base64 text; {_AGAIN}")
    unpadded = text.rstrip("=")
    try:
        return base64.b64decode(
            unpadded + "=" * (-len(unpadded) % 4), altchars=b"-_", validate=True
        )
    except binascii.Error as exc:
        raise TokenError(f"invite token is truncated or not base64; {_AGAIN}") from exc


def _unpack(data: bytes) -> dict[object, object]:
    try:
        document: object = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # UnicodeDecodeError, ExtraData, FormatError and StackError are ValueErrors.
        raise TokenError(f"invite token is truncated or corrupt; {_AGAIN}") from exc
    if not isinstance(document, dict):
        raise TokenError(f"invite token does not hold a map; {_AGAIN}")
    return document


def _field(document: dict[object, object], name: str, kind: type[_T], what: str) -> _T:
    if name not in document:
        raise TokenError(f"invite token is missing the {name!r} field; {_AGAIN}")
    value = document[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TokenError(
            f"invite token field {name!r} should be {what}, not {_type_name(value)}; {_AGAIN}"
        )
    return value


def _version_message(version: int) -> str:
    if version > TOKEN_VERSION:
        advice = "upgrade mesh-llm on this machine"
    else:
        advice = "the token comes from an older mesh-llm: upgrade the node that made it"
    return (
        f"invite token is version {version}, this mesh-llm accepts version {TOKEN_VERSION} "
        f"only; {advice}"
    )


def _is_lower_hex(text: str, length: int) -> bool:
    return len(text) == length and _HEX_DIGITS.issuperset(text)


def _type_name(value: object) -> str:
    return "nil" if value is None else type(value).__name__
