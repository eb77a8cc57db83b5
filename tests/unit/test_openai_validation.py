"""Request validation per routed endpoint (OpenAI, Anthropic, llama.cpp), and the error body."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.api.openai import (
    APPLY_TEMPLATE_PATH,
    CHAT_PATH,
    COMPLETIONS_PATH,
    COUNT_TOKENS_PATH,
    DETOKENIZE_PATH,
    EMBEDDINGS_PATH,
    INFILL_PATH,
    MESSAGES_PATH,
    PROXIED_PATHS,
    RERANK_PATH,
    RESPONSES_PATH,
    RESPONSES_TOKENS_PATH,
    TOKENIZE_PATH,
    error_body,
    validate_request,
)
from mesh_llm.errors import InvalidRequest

MESSAGES = [{"role": "user", "content": "hi"}]

VALID: dict[str, dict[str, object]] = {
    CHAT_PATH: {"messages": MESSAGES},
    COMPLETIONS_PATH: {"prompt": "Once upon"},
    EMBEDDINGS_PATH: {"input": "hello"},
    RESPONSES_PATH: {"input": "hello"},
    RESPONSES_TOKENS_PATH: {"input": [{"role": "user", "content": "hi"}]},
    RERANK_PATH: {"query": "q", "documents": ["a", "b"]},
    MESSAGES_PATH: {"messages": MESSAGES, "max_tokens": 8},
    COUNT_TOKENS_PATH: {"messages": MESSAGES},
    TOKENIZE_PATH: {"content": "hello"},
    DETOKENIZE_PATH: {"tokens": [1, 2]},
    APPLY_TEMPLATE_PATH: {"messages": MESSAGES},
    INFILL_PATH: {"input_prefix": "def f(", "input_suffix": "):"},
}
REQUIRED = {
    CHAT_PATH: "messages",
    COMPLETIONS_PATH: "prompt",
    EMBEDDINGS_PATH: "input",
    RESPONSES_PATH: "input",
    RESPONSES_TOKENS_PATH: "input",
    RERANK_PATH: "query",
    MESSAGES_PATH: "messages",
    COUNT_TOKENS_PATH: "messages",
    TOKENIZE_PATH: "content",
    DETOKENIZE_PATH: "tokens",
    APPLY_TEMPLATE_PATH: "messages",
}


def test_every_path_has_a_valid_example() -> None:
    assert set(VALID) == set(PROXIED_PATHS)
    assert set(REQUIRED) == set(PROXIED_PATHS) - {INFILL_PATH}  # infill: all fields optional


@pytest.mark.parametrize("path", PROXIED_PATHS)
def test_valid_body_without_model_returns_none(path: str) -> None:
    assert validate_request(path, dict(VALID[path])) is None


@pytest.mark.parametrize("path", PROXIED_PATHS)
def test_valid_body_returns_the_model(path: str) -> None:
    body = {**VALID[path], "model": "qwen", "stream": True}
    assert validate_request(path, body) == "qwen"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (COMPLETIONS_PATH, {"prompt": ["a", "b"]}),
        (EMBEDDINGS_PATH, {"input": ["a", "b"]}),
        (CHAT_PATH, {"messages": [{"role": "system", "content": "x"}, *MESSAGES]}),
        (CHAT_PATH, {"messages": MESSAGES, "stream": False, "temperature": 0.2}),
    ],
)
def test_other_valid_shapes(path: str, body: dict[str, object]) -> None:
    assert validate_request(path, body) is None


@pytest.mark.parametrize("path", sorted(REQUIRED))
def test_missing_required_field(path: str) -> None:
    with pytest.raises(InvalidRequest, match=f"'{REQUIRED[path]}' is required") as info:
        validate_request(path, {"model": "m"})
    assert info.value.param == REQUIRED[path]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (CHAT_PATH, "hello"),
        (CHAT_PATH, {"role": "user"}),
        (CHAT_PATH, None),
        (COMPLETIONS_PATH, 42),
        (COMPLETIONS_PATH, {"text": "x"}),
        (EMBEDDINGS_PATH, None),
        (EMBEDDINGS_PATH, 1.5),
        (RESPONSES_PATH, 3),
        (RERANK_PATH, ["q"]),
        (MESSAGES_PATH, "hi"),
        (TOKENIZE_PATH, 7),
        (DETOKENIZE_PATH, "1 2"),
    ],
)
def test_required_field_of_wrong_type(path: str, value: object) -> None:
    field = REQUIRED[path]
    with pytest.raises(InvalidRequest, match="wrong type") as info:
        validate_request(path, {field: value})
    assert info.value.param == field


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (RERANK_PATH, {"query": "q"}, "documents"),
        (RERANK_PATH, {"query": "q", "documents": "a"}, "documents"),
        (RERANK_PATH, {"query": "q", "texts": ["a"], "top_n": True}, "top_n"),
        (MESSAGES_PATH, {"messages": MESSAGES, "max_tokens": "8"}, "max_tokens"),
        (MESSAGES_PATH, {"messages": [{"content": "no role"}]}, "messages"),
        (INFILL_PATH, {"input_prefix": 1}, "input_prefix"),
    ],
)
def test_endpoint_specific_fields(path: str, body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_request(path, body)
    assert info.value.param == param


def test_rerank_accepts_tei_texts() -> None:
    assert validate_request(RERANK_PATH, {"query": "q", "texts": ["a"], "top_n": 1}) is None


def test_empty_messages() -> None:
    with pytest.raises(InvalidRequest, match="must not be empty") as info:
        validate_request(CHAT_PATH, {"messages": []})
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    "messages",
    [["hi"], [{"content": "no role"}], [{"role": 3}], [*MESSAGES, None]],
)
def test_malformed_message(messages: list[object]) -> None:
    with pytest.raises(InvalidRequest, match=r"messages\[\d+\]") as info:
        validate_request(CHAT_PATH, {"messages": messages})
    assert info.value.param == "messages"


def test_malformed_message_names_its_index() -> None:
    with pytest.raises(InvalidRequest, match=r"'messages\[1\]'"):
        validate_request(CHAT_PATH, {"messages": [*MESSAGES, {"content": "x"}]})


@pytest.mark.parametrize("path", PROXIED_PATHS)
@pytest.mark.parametrize("body", [[], "text", 3, None, True, [{"messages": MESSAGES}]])
def test_non_object_body(path: str, body: object) -> None:
    with pytest.raises(InvalidRequest, match="JSON object") as info:
        validate_request(path, body)
    assert info.value.param is None


@pytest.mark.parametrize("path", PROXIED_PATHS)
@pytest.mark.parametrize("model", [3, ["a"], {"name": "a"}, True])
def test_model_not_a_string(path: str, model: object) -> None:
    with pytest.raises(InvalidRequest, match="'model' must be a string") as info:
        validate_request(path, {**VALID[path], "model": model})
    assert info.value.param == "model"


@pytest.mark.parametrize("path", PROXIED_PATHS)
@pytest.mark.parametrize("stream", ["true", 1, 0, None, []])
def test_stream_not_a_bool(path: str, stream: object) -> None:
    with pytest.raises(InvalidRequest, match="'stream' must be true or false") as info:
        validate_request(path, {**VALID[path], "stream": stream})
    assert info.value.param == "stream"


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (404, "invalid_request_error"),
        (429, "rate_limit_error"),
        (502, "upstream_error"),
        (503, "service_unavailable"),
        (500, "api_error"),
    ],
)
def test_error_body_shape(status: int, error_type: str) -> None:
    body = error_body(status, "what happened", "some_code", "messages")
    assert body == {
        "error": {
            "message": "what happened",
            "type": error_type,
            "param": "messages",
            "code": "some_code",
        }
    }


def test_error_body_param_defaults_to_none() -> None:
    assert error_body(404, "m", "model_not_found")["error"]["param"] is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(["model", "stream", "messages", "prompt", "input", "role"])
json_objects = st.dictionaries(field_names | st.text(max_size=8), json_values, max_size=6)


@given(path=st.sampled_from(PROXIED_PATHS), body=json_values | json_objects)
def test_arbitrary_json_only_returns_model_or_raises_invalid_request(
    path: str, body: object
) -> None:
    try:
        model = validate_request(path, body)
    except InvalidRequest as exc:
        assert str(exc)
        assert exc.param is None or isinstance(exc.param, str)
        return
    assert model is None or isinstance(model, str)
    assert isinstance(body, dict)
    assert model == body.get("model")
