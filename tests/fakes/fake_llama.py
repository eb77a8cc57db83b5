"""A fake llama-server: a tiny aiohttp app speaking `/health` and the OpenAI endpoints.

`/health` answers 503 until `healthy` is set, then 200. `POST /v1/chat/completions` and
`/v1/completions` answer OpenAI-shaped JSON, or with `"stream": true` an SSE stream of `chunks`
`data: {...}` events (`chunk_delay_s` apart) followed by `data: [DONE]`. When `hold_last_chunk`
is set, the stream waits for `release()` before the last chunk, so a test can observe that earlier
chunks arrived first. `/v1/embeddings` answers a fixed vector. The other llama-server paths
(`EXTRA_PATHS`: responses, rerank, Anthropic messages, tokenize, infill…) answer a small JSON
document naming the path (`/v1/messages` with `"stream": true`: Anthropic SSE events), or, for
paths in `fail_paths`, llama-server's own error shape with that status. Every request is
recorded; a streaming request whose client went away is counted in `cancelled`.

`serve(app)` runs any aiohttp app on 127.0.0.1 with an ephemeral port, the way the node does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

MODEL_ID = "fake-model"
CHAT_REPLY = "Hello from the fake llama-server."
EXTRA_PATHS = (
    "/v1/responses",
    "/v1/responses/input_tokens",
    "/v1/rerank",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/infill",
)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    path: str
    headers: CIMultiDict[str]  # case-insensitive, like HTTP
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class FakeLlama:
    """State and handlers of one fake llama-server."""

    def __init__(
        self,
        *,
        chunks: int = 3,
        chunk_delay_s: float = 0.0,
        healthy: bool = False,
        hold_last_chunk: bool = False,
        linger_after_done_s: float = 0.0,
    ) -> None:
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.healthy = healthy
        self.hold_last_chunk = hold_last_chunk
        self.linger_after_done_s = linger_after_done_s  # [DONE] sent, the response not ended
        self.requests: list[RecordedRequest] = []
        self.chunks_sent = 0
        self.streams_finished = 0
        self.cancelled = 0
        self.fail_paths: dict[str, int] = {}  # path → error status llama-server-style
        self._released = asyncio.Event()

    def release(self) -> None:
        """Let held streams send their last chunk."""
        self._released.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        for path in EXTRA_PATHS:
            app.router.add_post(path, self._extra)
        return app

    async def _extra(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        status = self.fail_paths.get(request.path)
        if status is not None:
            error = {"code": status, "message": f"fake failure on {request.path}", "type": "x"}
            return web.json_response({"error": error}, status=status)
        if request.path == "/v1/messages" and body.get("stream"):
            return await self._anthropic_stream(request)
        return web.json_response({"path": request.path, "model": body.get("model") or MODEL_ID})

    async def _anthropic_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = [
            ("message_start", {"type": "message_start", "message": {"id": "msg_fake"}}),
            *(
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "n": i})
                for i in range(self.chunks)
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in events:
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.chunks_sent += 1
        await response.write_eof()
        self.streams_finished += 1
        return response

    async def _health(self, request: web.Request) -> web.Response:
        if self.healthy:
            return web.json_response({"status": "ok"})
        return web.json_response({"error": {"code": 503, "message": "Loading model"}}, status=503)

    async def _record(self, request: web.Request) -> dict[str, object]:
        raw = await request.read()
        self.requests.append(RecordedRequest(request.path, CIMultiDict(request.headers), raw))
        body = json.loads(raw)
        assert isinstance(body, dict)
        return body

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = str(body.get("model") or MODEL_ID)
        if body.get("stream"):
            return await self._stream(request, model, chat=True)
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": CHAT_REPLY},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
            }
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = str(body.get("model") or MODEL_ID)
        if body.get("stream"):
            return await self._stream(request, model, chat=False)
        return web.json_response(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "text": " there was", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
            }
        )

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "model": str(body.get("model") or MODEL_ID),
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )

    async def _stream(self, request: web.Request, model: str, *, chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for index in range(self.chunks):
                last = index == self.chunks - 1
                if last and self.hold_last_chunk:
                    await self._released.wait()
                elif index and self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                chunk = stream_chunk(model, index, last=last, chat=chat)
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.chunks_sent += 1
            await response.write(b"data: [DONE]\n\n")
            if self.linger_after_done_s:
                await asyncio.sleep(self.linger_after_done_s)
            await response.write_eof()
        except asyncio.CancelledError:  # the client went away (handler_cancellation)
            self.cancelled += 1
            raise
        except ConnectionResetError:  # the client went away (no handler cancellation)
            self.cancelled += 1
            return response
        self.streams_finished += 1
        return response


def stream_chunk(model: str, index: int, *, last: bool, chat: bool) -> dict[str, object]:
    """The `index`-th SSE chunk; its content is `tok<index> `."""
    text = f"tok{index} "
    finish = "stop" if last else None
    if chat:
        choice: dict[str, object] = {
            "index": 0,
            "delta": {"role": "assistant", "content": text} if index == 0 else {"content": text},
            "finish_reason": finish,
        }
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": "chatcmpl-fake" if chat else "cmpl-fake",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


@asynccontextmanager
async def serve(
    app: web.Application, *, shutdown_timeout_s: float = 2.0, **server_args: Any
) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1:<ephemeral>; yields its base URL; cleans up on exit.

    `server_args` go to aiohttp's request handler (e.g. the API's `http_limits`).
    """
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        **server_args,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
