"""Pure decisions of push-pull anti-entropy: digests, what to push and what to ask for.

A digest is a `Digest` message whose `versions` map takes one of three shapes. A *listing* maps
node ids to the record versions the sender holds (all of them after `link_up`; only some
buckets, marked by `"+k"` keys, otherwise). Periodic rounds send a *root summary*, `{"#": h}`,
a 63-bit hash of the sender's whole version map: at steady state every node holds the same map,
so a round costs a few bytes instead of ~70 bytes per node. On a mismatch the receiver answers
with its 16 *bucket summaries* (`{"#0": h0, ...}`; a node id falls in a bucket by its hash), and
the other side answers with a listing of just the buckets that differ, so one changed record
costs about one sixteenth of a full listing. Node ids are hex, so "#" and "+" never start one.
Inputs are plain mappings; outputs are wire messages. Imports no I/O module, reads no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import assert_never

from mesh_llm.wire.messages import Digest, NodeRecord, Records

SUMMARY_KEY = "#"
BUCKET_PREFIX = "#"
COVER_PREFIX = "+"
BUCKETS = 16
NOISE_SIGMAS = 5.0
RECORDS_PER_MESSAGE = 32
"""Records per `Records` message: keeps frames far below the 1 MiB cap even for big records."""


@dataclass(frozen=True, slots=True)
class RootSummary:
    """`{"#": hash}`: the hash of every bucket hash of the sender."""

    summary: int


@dataclass(frozen=True, slots=True)
class BucketSummaries:
    """`{"#0": hash, ..., "#15": hash}`: the hash of each bucket of the sender's version map."""

    hashes: dict[int, int]


@dataclass(frozen=True, slots=True)
class Listing:
    """`{node_id: version, ..., "+k": 0}`: versions of the buckets `covered` (None: all)."""

    versions: dict[str, int]
    covered: frozenset[int] | None


DigestContent = RootSummary | BucketSummaries | Listing


def bucket_of(node_id: str) -> int:
    return hashlib.blake2b(node_id.encode(), digest_size=1).digest()[0] % BUCKETS


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def summary_hash(versions: Mapping[str, int]) -> int:
    """A 63-bit hash of a version map, equal on every node holding the same map."""
    return _hash("\n".join(f"{node_id}:{version}" for node_id, version in sorted(versions.items())))


def bucket_hashes(versions: Mapping[str, int]) -> list[int]:
    """The summary hash of each of the `BUCKETS` buckets of a version map."""
    buckets: list[dict[str, int]] = [{} for _ in range(BUCKETS)]
    for node_id, version in versions.items():
        buckets[bucket_of(node_id)][node_id] = version
    return [summary_hash(bucket) for bucket in buckets]


def root_hash(hashes: Iterable[int]) -> int:
    return _hash(",".join(map(str, hashes)))


def root_digest(summary: int) -> Digest:
    return Digest({SUMMARY_KEY: summary})


def buckets_digest(hashes: Sequence[int]) -> Digest:
    return Digest({f"{BUCKET_PREFIX}{k}": h for k, h in enumerate(hashes)})


def listing_digest(versions: Mapping[str, int], buckets: Iterable[int]) -> Digest:
    """Our versions of the ids in `buckets`, marking each bucket covered (even if empty)."""
    wanted = set(buckets)
    listing = {k: v for k, v in versions.items() if bucket_of(k) in wanted}
    listing.update({f"{COVER_PREFIX}{k}": 0 for k in sorted(wanted)})
    return Digest(listing)


def parse_digest(digest: Digest) -> DigestContent:
    """What a digest carries; malformed special keys are ignored."""
    versions = digest.versions
    if SUMMARY_KEY in versions:
        return RootSummary(versions[SUMMARY_KEY])
    plain = {k: v for k, v in versions.items() if not k.startswith((BUCKET_PREFIX, COVER_PREFIX))}
    if versions and not plain and not any(k.startswith(COVER_PREFIX) for k in versions):
        return BucketSummaries(_numbered(versions, BUCKET_PREFIX))
    covered = _numbered(versions, COVER_PREFIX)
    return Listing(plain, frozenset(covered) if covered else None)


def _numbered(versions: Mapping[str, int], prefix: str) -> dict[int, int]:
    numbered: dict[int, int] = {}
    for key, value in versions.items():
        number = key[len(prefix) :]
        if key.startswith(prefix) and number.isdigit() and int(number) < BUCKETS:
            numbered[int(number)] = value
    return numbered


def compare_versions(
    ours: Mapping[str, int], theirs: Mapping[str, int], ignored: Container[str]
) -> tuple[list[str], list[str]]:
    """Against a full digest: (ids whose record we should push, ids we should ask for).

    Push where ours is newer or they lack it; ask where theirs is newer or we lack it, unless
    the id is `ignored` (dead peers, whose records must not come back).
    """
    push = [node_id for node_id, version in ours.items() if theirs.get(node_id, -1) < version]
    want = [
        node_id
        for node_id, version in theirs.items()
        if version > ours.get(node_id, -1) and node_id not in ignored
    ]
    return push, want


@dataclass(frozen=True, slots=True)
class DigestAnswer:
    """What to do about a received digest: a digest to reply, records to push, ids to want."""

    reply: Digest | None = None
    push: tuple[str, ...] = ()
    want: tuple[str, ...] = ()


def answer_digest(
    digest: Digest, ours: Mapping[str, int], our_buckets: Sequence[int], ignored: Container[str]
) -> DigestAnswer:
    """Root summary -> our bucket summaries -> listing of differing buckets -> push-pull."""
    match parse_digest(digest):
        case RootSummary(summary):
            if summary == root_hash(our_buckets):
                return DigestAnswer()
            return DigestAnswer(reply=buckets_digest(our_buckets))
        case BucketSummaries(hashes):
            differ = [k for k, h in sorted(hashes.items()) if our_buckets[k] != h]
            return DigestAnswer(reply=listing_digest(ours, differ) if differ else None)
        case Listing(versions, covered):
            if covered is not None:
                ours = {k: v for k, v in ours.items() if bucket_of(k) in covered}
            push, want = compare_versions(ours, versions, ignored)
            return DigestAnswer(push=tuple(push), want=tuple(want))
        case _:
            assert_never(digest)


def records_messages(records: Iterable[NodeRecord]) -> list[Records]:
    """`Records` messages carrying `records`, at most `RECORDS_PER_MESSAGE` each."""
    batch = list(records)
    return [
        Records(tuple(batch[i : i + RECORDS_PER_MESSAGE]))
        for i in range(0, len(batch), RECORDS_PER_MESSAGE)
    ]


def rtt_changed(
    published: Mapping[str, float],
    measured: Mapping[str, tuple[float, float]],
    ratio: float,
    floor_ms: float,
) -> bool:
    """Whether measured RTTs, `peer -> (rtt_ms, noise_ms)`, differ enough to republish.

    A new peer counts as a change; a value counts when it moved by more than `ratio` of the
    published value, by more than `floor_ms` (sub-millisecond LAN jitter is not gossiped) and
    by more than `NOISE_SIGMAS` times its standard error (a mean of jittery samples wanders).
    Peers only in `published` (gone since) do not count on their own.
    """
    for peer, (rtt, noise) in measured.items():
        old = published.get(peer)
        if old is None or abs(rtt - old) > max(ratio * old, floor_ms, NOISE_SIGMAS * noise):
            return True
    return False
