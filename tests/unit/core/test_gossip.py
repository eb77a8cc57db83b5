"""Pure gossip decisions: summary hashes, digest comparison, record batching, RTT changes."""

from __future__ import annotations

import pytest

from mesh_llm.core.gossip import (
    BUCKETS,
    RECORDS_PER_MESSAGE,
    BucketSummaries,
    Listing,
    RootSummary,
    bucket_hashes,
    bucket_of,
    buckets_digest,
    compare_versions,
    listing_digest,
    parse_digest,
    records_messages,
    root_digest,
    root_hash,
    rtt_changed,
    summary_hash,
)
from mesh_llm.wire.codec import decode_message, encode_message
from mesh_llm.wire.messages import Digest

from .helpers import record


def test_summary_hash_depends_on_content_not_order() -> None:
    one = summary_hash({"a": 1, "b": 2})
    assert one == summary_hash({"b": 2, "a": 1})
    assert one != summary_hash({"a": 1, "b": 3})
    assert one != summary_hash({"a": 1})
    assert 0 <= one < 2**63


def test_one_changed_version_changes_one_bucket_and_the_root() -> None:
    versions = {f"{i:064x}": 1 for i in range(100)}
    before = bucket_hashes(versions)
    changed = f"{7:064x}"
    after = bucket_hashes({**versions, changed: 2})
    assert len(before) == BUCKETS
    assert [k for k in range(BUCKETS) if before[k] != after[k]] == [bucket_of(changed)]
    assert root_hash(before) != root_hash(after)


def roundtrip(digest: Digest) -> Digest:
    decoded = decode_message(encode_message(digest))
    assert isinstance(decoded, Digest)
    return decoded


def test_the_three_digest_shapes_survive_the_codec() -> None:
    versions = {"a" * 64: 3, "b" * 64: 1, "c" * 64: 7}
    assert parse_digest(roundtrip(root_digest(42))) == RootSummary(42)
    hashes = bucket_hashes(versions)
    expected = BucketSummaries(dict(enumerate(hashes)))
    assert parse_digest(roundtrip(buckets_digest(hashes))) == expected
    wanted = {bucket_of("a" * 64), 15 if bucket_of("a" * 64) != 15 else 14}
    listing = parse_digest(roundtrip(listing_digest(versions, wanted)))
    assert listing == Listing(
        {k: v for k, v in versions.items() if bucket_of(k) in wanted}, frozenset(wanted)
    )
    assert parse_digest(Digest(versions)) == Listing(versions, None)
    assert parse_digest(Digest({})) == Listing({}, None)


def test_malformed_special_keys_are_ignored() -> None:
    assert parse_digest(Digest({"#99": 1, "#x": 2, "#3": 5})) == BucketSummaries({3: 5})
    assert parse_digest(Digest({"a": 1, "+99": 0, "#2": 4})) == Listing({"a": 1}, None)


@pytest.mark.parametrize(
    ("ours", "theirs", "ignored", "push", "want"),
    [
        ({"a": 1}, {"a": 1}, (), [], []),
        ({"a": 2}, {"a": 1}, (), ["a"], []),
        ({"a": 1}, {"a": 2}, (), [], ["a"]),
        ({"a": 1}, {}, (), ["a"], []),
        ({}, {"a": 1}, (), [], ["a"]),
        ({}, {"a": 1, "d": 4}, ("d",), [], ["a"]),
        ({"a": 3, "b": 1}, {"a": 1, "b": 2, "c": 1}, (), ["a"], ["b", "c"]),
    ],
)
def test_compare_versions(
    ours: dict[str, int],
    theirs: dict[str, int],
    ignored: tuple[str, ...],
    push: list[str],
    want: list[str],
) -> None:
    assert compare_versions(ours, theirs, ignored) == (push, want)


def test_records_are_batched() -> None:
    records = [record("a", v) for v in range(RECORDS_PER_MESSAGE * 2 + 1)]
    batches = records_messages(records)
    assert [len(b.records) for b in batches] == [RECORDS_PER_MESSAGE, RECORDS_PER_MESSAGE, 1]
    assert [r for b in batches for r in b.records] == records
    assert records_messages([]) == []


@pytest.mark.parametrize(
    ("published", "measured", "changed"),
    [
        ({}, {}, False),
        ({}, {"a": (5.0, 0.0)}, True),
        ({"a": 20.0}, {"a": (24.9, 0.1)}, False),
        ({"a": 20.0}, {"a": (25.1, 0.1)}, True),
        ({"a": 20.0}, {"a": (14.9, 0.1)}, True),
        ({"a": 20.0}, {"a": (25.1, 2.0)}, False),  # within 5 standard errors: jitter
        ({"a": 20.0}, {"a": (31.0, 2.0)}, True),
        ({"a": 0.2}, {"a": (0.9, 0.0)}, False),  # sub-millisecond LAN jitter
        ({"a": 0.2}, {"a": (1.3, 0.0)}, True),
        ({"a": 20.0, "gone": 3.0}, {"a": (20.0, 0.1)}, False),
    ],
)
def test_rtt_changed(
    published: dict[str, float], measured: dict[str, tuple[float, float]], changed: bool
) -> None:
    assert rtt_changed(published, measured, 0.25, 1.0) is changed
