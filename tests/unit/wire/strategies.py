"""Hypothesis strategies for the wire tests: valid messages and arbitrary msgpack documents."""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from mesh_llm.wire.messages import (
    MESSAGE_TYPES,
    Digest,
    Hello,
    HelloFinish,
    HelloReply,
    HttpRequestHead,
    HttpResponseHead,
    Leaving,
    Message,
    NodeRecord,
    PeerDown,
    Ping,
    Pong,
    Records,
    Refused,
    RouteReply,
    RouteRequest,
    ServingInfo,
    Want,
    Welcome,
)

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1

ints = st.integers(min_value=INT64_MIN, max_value=UINT64_MAX)
texts = st.text(max_size=12)
blobs = st.binary(max_size=40)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)

serving_infos = st.builds(
    ServingInfo,
    role=texts,
    ready=st.booleans(),
    host=texts,
    aliases=st.lists(texts, max_size=2).map(tuple),
    capabilities=st.lists(texts, max_size=3).map(tuple),
)

node_records = st.builds(
    NodeRecord,
    node_id=texts,
    version=ints,
    name=texts,
    addrs=st.lists(texts, max_size=4).map(tuple),
    role=texts,
    vram_bytes=ints,
    backend=texts,
    build_id=texts,
    rpc_protocol=texts,
    models_on_disk=st.dictionaries(texts, ints, max_size=4),
    requested_models=st.lists(texts, max_size=4).map(tuple),
    serving=st.dictionaries(texts, serving_infos, max_size=3),
    rtt_ms=st.dictionaries(texts, finite_floats, max_size=4),
    api_port=ints,
    software_version=texts,
    fast_lane_port=ints,
    split_models=st.lists(texts, max_size=3).map(tuple),
    demand=st.dictionaries(texts, finite_floats, max_size=3),
)

record_tuples = st.lists(node_records, max_size=3).map(tuple)

MESSAGE_STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    Hello: st.builds(
        Hello, version=ints, node_id=texts, mesh_id=texts, nonce=blobs, client=st.booleans()
    ),
    HelloReply: st.builds(
        HelloReply,
        version=ints,
        node_id=texts,
        mesh_id=texts,
        nonce=blobs,
        signature=blobs,
        mac=blobs,
    ),
    HelloFinish: st.builds(HelloFinish, signature=blobs, mac=blobs),
    Welcome: st.builds(Welcome),
    Refused: st.builds(Refused, code=ints, reason=texts),
    Digest: st.builds(Digest, versions=st.dictionaries(texts, ints, max_size=6)),
    Records: st.builds(Records, records=record_tuples),
    Want: st.builds(Want, node_ids=st.lists(texts, max_size=6).map(tuple)),
    Ping: st.builds(Ping, seq=ints),
    Pong: st.builds(Pong, seq=ints),
    PeerDown: st.builds(PeerDown, node_id=texts, reason=texts),
    Leaving: st.builds(Leaving, node_id=texts),
    RouteRequest: st.builds(RouteRequest),
    RouteReply: st.builds(RouteReply, records=record_tuples),
    HttpRequestHead: st.builds(
        HttpRequestHead,
        method=texts,
        path=texts,
        headers=st.dictionaries(texts, texts, max_size=4),
        body_len=ints,
    ),
    HttpResponseHead: st.builds(
        HttpResponseHead, status=ints, headers=st.dictionaries(texts, texts, max_size=4)
    ),
}

messages: st.SearchStrategy[Message] = st.one_of(
    *(MESSAGE_STRATEGIES[cls] for cls in MESSAGE_TYPES)
)

# Any value msgpack can carry (floats include NaN and infinities; ints span 64 bits).
msgpack_scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(), st.text(max_size=8), st.binary(max_size=8)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=20,
)


def _field_names(cls: type) -> set[str]:
    names = {f.name for f in dataclasses.fields(cls)}
    return (
        names
        | {f.name for f in dataclasses.fields(NodeRecord)}
        | {"role", "ready", "host", "aliases", "capabilities"}
    )


FIELD_NAMES = sorted(set().union(*(_field_names(cls) for cls in MESSAGE_TYPES)))
VALID_TAGS = [cls.TAG for cls in MESSAGE_TYPES]

# Maps with a valid tag and real field names holding arbitrary values: gets past the tag
# check and exercises the field validators.
tagged_garbage = st.builds(
    lambda tag, fields: {**fields, "t": tag},
    st.sampled_from(VALID_TAGS),
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=4), msgpack_values),
)
