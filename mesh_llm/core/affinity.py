"""KV-cache affinity: which backend last served a request's prompt prefix (pure, bounded).

llama-server reuses its KV cache for the longest common prefix of a new prompt and one it
processed before, so a request whose leading part (system prompt, tool definitions, earlier
turns) was served by one replica is cheapest there. `prefix_keys(body)` turns a request body
into hashes of its leading part at fixed character boundaries (chunk 1, chunks 1–2, …, up to a
cap) over a canonical serialization of the fields that precede generation (tools, system,
messages, prompt, input); `AffinityTable` remembers, per model, which backend key last served
each hash, expires entries after `ttl_s` and keeps at most `max_entries` (oldest evicted).
`lookup` answers the backend of the longest remembered prefix. The router decides whether to
honour it (`core/router.within_fair_share`). Sans-I/O: `now` is passed in.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

# Fields whose content the chat template puts before the conversation, then the conversation:
# in this order they form the prompt's leading part on every endpoint.
PREFIX_FIELDS = ("tools", "system", "instructions", "messages", "input", "prompt", "input_prefix")
DIGEST_BYTES = 16


def prefix_keys(body: Mapping[str, Any], *, chunk_chars: int, max_chars: int) -> tuple[bytes, ...]:
    """Hashes of the first `k × chunk_chars` characters of the request's canonical prompt
    text, for every whole chunk up to `max_chars`, shortest first. A prompt shorter than one
    chunk has no keys (too short to be worth steering)."""
    if chunk_chars <= 0:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    text = _canonical(body)[:max_chars].encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    keys = []
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        digest.update(text[start : start + chunk_chars])
        keys.append(digest.copy().digest())
    return tuple(keys)


def _canonical(body: Mapping[str, Any]) -> str:
    parts = []
    for name in PREFIX_FIELDS:
        if name in body:
            value = body[name]
            # A message list serializes message by message so that turn N's text is a prefix
            # of turn N+1's; everything else as compact JSON with sorted keys.
            if isinstance(value, list) and name in ("messages", "input"):
                parts.append(f'"{name}":[' + "".join(_dump(item) + "," for item in value))
            else:
                parts.append(f'"{name}":' + _dump(value) + ";")
    return "".join(parts)


def _dump(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class AffinityTable:
    """Per model: prefix hash → (backend key, expiry). Bounded and expiring."""

    def __init__(self, *, max_entries: int, ttl_s: float) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("the affinity table needs max_entries ≥ 1 and ttl_s > 0")
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._entries: OrderedDict[tuple[str, bytes], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, model: str, keys: Sequence[bytes], now: float) -> str | None:
        """The backend that last served the longest of `keys` (None: none remembered)."""
        for key in reversed(keys):
            entry = self._entries.get((model, key))
            if entry is None:
                continue
            backend, expires = entry
            if expires <= now:
                del self._entries[(model, key)]
                continue
            return backend
        return None

    def record(self, model: str, keys: Sequence[bytes], backend: str, now: float) -> None:
        """`backend` has just processed a prompt with these prefix keys."""
        expires = now + self._ttl_s
        for key in keys:
            entry = (model, key)
            self._entries[entry] = (backend, expires)
            self._entries.move_to_end(entry)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        self._expire(now)

    def forget(self, backend: str) -> None:
        """Drop every entry of `backend` (it failed or left)."""
        for entry in [e for e, (b, _) in self._entries.items() if b == backend]:
            del self._entries[entry]

    def _expire(self, now: float) -> None:
        # Entries are ordered by last record: the oldest expire first.
        while self._entries:
            entry, (_, expires) = next(iter(self._entries.items()))
            if expires > now:
                return
            del self._entries[entry]
