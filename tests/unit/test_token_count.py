"""Token counting of relayed responses: SSE events with text, JSON `usage`, chunk boundaries."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.api.token_count import (
    JSON_BODY_MAX_BYTES,
    JsonUsageCounter,
    NoTokenCounter,
    SseTokenCounter,
    counter_for,
)


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _delta(content: object, field: str = "content") -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {field: content}, "finish_reason": None}]}


# llama-server's shape: a role-only first event, text events, an empty final one, usage, DONE.
STREAM = b"".join(
    [
        _event({"choices": [{"delta": {"role": "assistant", "content": None}}]}),
        _event(_delta("Hello")),
        _event(_delta(" wor")),
        _event(_delta("ld", field="reasoning_content")),
        _event({"choices": [{"text": "!", "index": 0}]}),
        _event(_delta("")),
        _event({"choices": [], "usage": {"completion_tokens": 99}}),
        b"data: [DONE]\n\n",
    ]
)
STREAM_TOKENS = 4


def _count_sse(chunks: list[bytes]) -> int:
    counter = SseTokenCounter()
    return sum(counter.feed(chunk) for chunk in chunks) + counter.finish()


def test_sse_counts_events_with_text_only() -> None:
    assert _count_sse([STREAM]) == STREAM_TOKENS


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_sse_count_does_not_depend_on_chunk_boundaries(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    assert _count_sse(chunks) == STREAM_TOKENS


def test_sse_spaced_json_and_unterminated_last_event() -> None:
    counter = SseTokenCounter()
    assert counter.feed(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: {"ch') == 1
    assert counter.feed(b'oices": [{"delta": {"content": "b"}}]}') == 0
    assert counter.finish() == 1


def test_sse_ignores_comments_and_other_fields() -> None:
    counter = SseTokenCounter()
    assert counter.feed(b': keep-alive "content":"x"\nevent: ping\n\n') == 0


def test_json_usage_completion_tokens() -> None:
    counter = JsonUsageCounter()
    body = json.dumps(
        {
            "choices": [{"message": {"content": "hi"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7},
        }
    ).encode()
    assert counter.feed(body[:10]) == 0
    assert counter.feed(body[10:]) == 0
    assert counter.finish() == 7


def test_json_without_usage_counts_nothing() -> None:
    counter = JsonUsageCounter()
    counter.feed(b'{"data": [{"embedding": [0.1]}], "usage": {"prompt_tokens": 1}}')
    assert counter.finish() == 0


def test_json_over_the_cap_is_not_counted() -> None:
    counter = JsonUsageCounter()
    counter.feed(b'{"pad": "' + b"x" * JSON_BODY_MAX_BYTES + b'", ')
    counter.feed(b'"usage": {"completion_tokens": 3}}')
    assert counter.finish() == 0


def test_counter_for_content_types() -> None:
    assert isinstance(counter_for("text/event-stream; charset=utf-8"), SseTokenCounter)
    assert isinstance(counter_for("Application/JSON"), JsonUsageCounter)
    assert isinstance(counter_for("text/plain"), NoTokenCounter)
    assert counter_for("").feed(STREAM) == 0
