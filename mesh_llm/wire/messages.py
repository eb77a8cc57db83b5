"""Control-plane messages of the mesh protocol: frozen, slotted dataclasses with integer tags.

Each message class has a unique `TAG` (its integer `t` on the wire, never a class name). Fields
have defaults where a newer peer may omit them, so mixed versions interoperate: unknown fields
are ignored by the codec, missing fields take their defaults. `PROTOCOL_VERSION` travels in the
hello. The codec (`wire/codec.py`) maps these to msgpack maps. Pure: no I/O imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import ClassVar

# 2: API requests use one framing on every lane (length-framed body chunks and an end marker,
# also on QUIC streams, which are pooled): a version-1 host could not answer them.
PROTOCOL_VERSION = 2
ALPN = "mesh-llm/1"
NONCE_BYTES = 32


class StreamType(IntEnum):
    """First byte of every bidirectional QUIC stream."""

    CONTROL = 0x01
    RPC = 0x02
    HTTP = 0x04
    ROUTES = 0x05
    RELAY = 0x06  # to a relay: carry this stream to another node (net/relay.py)
    RELAYED = 0x07  # from a relay: a stream another node opened to us through it


class RefuseCode(IntEnum):
    """Why a peer was refused or disconnected (sent in `Refused`, used as QUIC error codes)."""

    PROTOCOL_ERROR = 1
    VERSION_MISMATCH = 2
    WRONG_MESH = 3
    BAD_SECRET = 4
    BAD_SIGNATURE = 5
    KEY_MISMATCH = 6
    DUPLICATE_NODE = 7
    TIMEOUT = 8
    SHUTTING_DOWN = 9
    UNKNOWN_STREAM = 10
    NO_ROUTE = 11  # a relay has no link to the node asked for


class Role(StrEnum):
    SERVING = "serving"
    STANDBY = "standby"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class ServingInfo:
    """One model a node serves: its role in it, whether its API is ready, and the host."""

    role: str = "host"  # "host" | "worker" | "loading"
    ready: bool = False
    host: str = ""  # node id of the host of this model's group
    aliases: tuple[str, ...] = ()  # other names requests may use for the model (catalog name)
    # endpoints it answers (core.capabilities.Capability values); empty: unknown (older peer)
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """Everything a node tells the mesh about itself; owned and versioned by that node."""

    node_id: str
    version: int
    name: str = ""
    addrs: tuple[str, ...] = ()
    role: str = Role.SERVING.value
    vram_bytes: int = 0
    backend: str = "cpu"
    build_id: str = ""
    rpc_protocol: str = ""
    models_on_disk: dict[str, int] = field(default_factory=dict)
    requested_models: tuple[str, ...] = ()
    serving: dict[str, ServingInfo] = field(default_factory=dict)
    rtt_ms: dict[str, float] = field(default_factory=dict)
    api_port: int = 0
    software_version: str = ""
    fast_lane_port: int = 0  # direct TCP+TLS lane for RPC traffic (0: none, use QUIC)
    split_models: tuple[str, ...] = ()  # models this node serves with --split (forced split)
    demand: dict[str, float] = field(default_factory=dict)  # API requests/min per model (EWMA)


# -- admission (control stream, before anything else) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Dialer → listener: who I am and a fresh nonce."""

    TAG: ClassVar[int] = 1
    version: int
    node_id: str
    mesh_id: str
    nonce: bytes
    client: bool = False


@dataclass(frozen=True, slots=True)
class HelloReply:
    """Listener → dialer: who I am, my nonce, and proofs over the transcript."""

    TAG: ClassVar[int] = 2
    version: int
    node_id: str
    mesh_id: str
    nonce: bytes
    signature: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class HelloFinish:
    """Dialer → listener: the dialer's proofs over the transcript."""

    TAG: ClassVar[int] = 3
    signature: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class Welcome:
    """Listener → dialer: admitted."""

    TAG: ClassVar[int] = 4


@dataclass(frozen=True, slots=True)
class Refused:
    """Either side: refused or disconnected, with a reason for the log of the other side."""

    TAG: ClassVar[int] = 5
    code: int
    reason: str = ""


# -- gossip and liveness -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Digest:
    """Push-pull anti-entropy: the versions of every record the sender holds."""

    TAG: ClassVar[int] = 10
    versions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Records:
    """Records newer than the receiver's (answer to a digest, or a push on change)."""

    TAG: ClassVar[int] = 11
    records: tuple[NodeRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class Want:
    """Ask for the records of these nodes (the sender's copies are older or missing)."""

    TAG: ClassVar[int] = 12
    node_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ping:
    TAG: ClassVar[int] = 20
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    TAG: ClassVar[int] = 21
    seq: int


@dataclass(frozen=True, slots=True)
class PeerDown:
    """The sender believes `node_id` is dead; receivers verify before dropping it."""

    TAG: ClassVar[int] = 30
    node_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Leaving:
    """The sender leaves the mesh cleanly; drop it at once."""

    TAG: ClassVar[int] = 31
    node_id: str


# -- passive clients (ROUTES stream) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteRequest:
    TAG: ClassVar[int] = 40


@dataclass(frozen=True, slots=True)
class RouteReply:
    """The routing table a passive client pulls: the records of the serving nodes."""

    TAG: ClassVar[int] = 41
    records: tuple[NodeRecord, ...] = ()


# -- API requests (HTTP stream): one framed head each way, then raw body bytes ---------------


@dataclass(frozen=True, slots=True)
class HttpRequestHead:
    """Requester → host: one API request; `body_len` raw body bytes follow the frame."""

    TAG: ClassVar[int] = 50
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body_len: int = 0


@dataclass(frozen=True, slots=True)
class HttpResponseHead:
    """Host → requester: the response status and headers; body chunks follow until the end."""

    TAG: ClassVar[int] = 51
    status: int
    headers: dict[str, str] = field(default_factory=dict)


Message = (
    Hello
    | HelloReply
    | HelloFinish
    | Welcome
    | Refused
    | Digest
    | Records
    | Want
    | Ping
    | Pong
    | PeerDown
    | Leaving
    | RouteRequest
    | RouteReply
    | HttpRequestHead
    | HttpResponseHead
)

MESSAGE_TYPES: tuple[type[Message], ...] = (
    Hello,
    HelloReply,
    HelloFinish,
    Welcome,
    Refused,
    Digest,
    Records,
    Want,
    Ping,
    Pong,
    PeerDown,
    Leaving,
    RouteRequest,
    RouteReply,
    HttpRequestHead,
    HttpResponseHead,
)
