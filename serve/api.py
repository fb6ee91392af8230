"""The OpenAI-compatible HTTP API over an `EngineThread` (FastAPI).

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the artifact's chat template),
GET /health, GET /metrics. `stream: true` answers server-sent events whose chunks carry the new
text (`choices[].text` / `choices[].delta`), then `data: [DONE]`. A client that goes away cancels
its request: its row is free at the next step.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from skiptree.errors import GenerationError
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tokenizer import StreamDecoder
from skiptree.serve.engine import Request as EngineRequest
from skiptree.serve.schema import ChatRequest, CompletionRequest, OpenAIError, Sampling
from skiptree.serve.worker import EngineThread, bridge

ENGINE_FAILED = OpenAIError(500, "the engine failed on a step of this request (the server log says why); "
                                 "retry it", kind="server_error")  # fmt: skip


class TextStream:
    """Token ids to text deltas, cut at the first stop string (text that may begin one is held)."""

    def __init__(self, decoder: StreamDecoder, stops: list[str]):
        self.decoder, self.stops = decoder, stops
        self.text, self.sent, self.stopped = "", 0, False
        self.hold = max((len(stop) for stop in stops), default=1) - 1

    def push(self, tokens: list[int]) -> None:
        for token in tokens:
            if self.stopped:
                return
            self.text += self.decoder.push(token)
            found = [i for i in (self.text.find(stop, max(0, self.sent - self.hold)) for stop in self.stops)
                     if i >= 0]  # fmt: skip
            if found:
                self.text, self.stopped = self.text[: min(found)], True

    def ready(self, final: bool = False) -> str:
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : end], end
        return delta


def create_app(
    engine: EngineThread, model_id: str, api_key: str | None = None, max_queue: int = 64
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()  # uvicorn has drained the requests in flight by now

    app = FastAPI(title="skiptree", lifespan=lifespan)
    metrics, max_seq_len = engine.metrics, engine.rows.max_seq_len

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        metrics.requests.labels(endpoint_of(request), str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = f"{field or 'body'}: {first.get('msg', 'invalid request')}"
        metrics.requests.labels(endpoint_of(request), "400").inc()
        return JSONResponse(OpenAIError(400, message, param=field).body(), status_code=400)

    def endpoint_of(request: Request) -> str:
        """The metrics label of a path: "completions", "chat" or the path itself."""
        path = request.url.path
        return {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(path, path)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise OpenAIError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                              kind="authentication_error", code="invalid_api_key")  # fmt: skip

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": model_id,
            "active": engine.engine.active,
            "queued": engine.queue_length,
            "pid": os.getpid(),  # which engine answered (Ray Serve replicas)
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "skiptree",
                "max_model_len": max_seq_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    def start(body: Sampling, prompt_ids: list[int], max_tokens: int | None, endpoint: str) -> EngineRequest:
        body.refuse_unsupported()
        if body.model != model_id:
            raise OpenAIError(404, f"the model '{body.model}' does not exist: this server serves "
                                   f"'{model_id}'", param="model", code="model_not_found")  # fmt: skip
        param = "messages" if endpoint == "chat" else "prompt"
        limit = max_tokens if max_tokens is not None else max_seq_len - len(prompt_ids)
        if len(prompt_ids) + max(limit, 1) > max_seq_len:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {max_seq_len} tokens. However, "
                f"you requested {len(prompt_ids) + limit} tokens ({len(prompt_ids)} in the "
                f"prompt, {limit} for the completion). Please reduce the prompt or the "
                "completion length.",
                param=param,
                code="context_length_exceeded",
            )
        if engine.queue_length >= max_queue:
            raise OpenAIError(429, f"the queue is full ({max_queue} requests waiting): retry later",
                              kind="rate_limit_error")  # fmt: skip
        try:
            greedy = body.temperature == 0
            sampling = SamplingConfig(not greedy, body.temperature if not greedy else 1.0, 0, body.top_p)
        except GenerationError as error:
            raise OpenAIError(400, str(error)) from error
        return EngineRequest(prompt_ids, limit, sampling, body.seed, engine.eos_token_ids)

    async def run(http: Request, body: Sampling, prompt_ids: list[int], max_tokens: int | None, chat: bool):
        endpoint = "chat" if chat else "completions"
        request = start(body, prompt_ids, max_tokens, endpoint)
        events: asyncio.Queue = asyncio.Queue()
        bridge(asyncio.get_running_loop(), events, request)
        text = TextStream(StreamDecoder(engine.tokenizer), body.stop_strings())
        engine.submit(request)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            stream = sse(http, request, events, text, ident, created, chat, body)
            return StreamingResponse(stream, media_type="text/event-stream")
        reason = await collect(http, request, events, text)
        metrics.requests.labels(endpoint, "200").inc()
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        content = text.ready(final=True)
        choice.update({"message": {"role": "assistant", "content": content}} if chat else {"text": content})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_id, "choices": [choice], "usage": usage(request)}  # fmt: skip

    def usage(request: EngineRequest) -> dict:
        prompt, completion = len(request.prompt_ids), len(request.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def finished(request: EngineRequest, reason: str, text: TextStream) -> str:
        metrics.prompt_tokens.inc(len(request.prompt_ids))
        metrics.generated_tokens.inc(len(request.tokens))
        metrics.request_seconds.observe(time.perf_counter() - request.arrived)
        if reason == "error":
            return reason
        return "stop" if text.stopped or reason == "stop" else "length"

    def on_event(request: EngineRequest, event: tuple, text: TextStream) -> str | None:
        """Apply one engine event; returns the finish reason once finished."""
        if event[0] == "tokens":
            if not text.decoder.ids:  # the first tokens: event[2] is when the engine emitted them
                metrics.time_to_first_token.observe(event[2] - request.arrived)
            text.push(event[1])
            if text.stopped:
                request.cancel()  # a stop string matched: free the row at the next step
            return None
        return finished(request, event[1], text)

    async def collect(http: Request, request: EngineRequest, events: asyncio.Queue, text: TextStream) -> str:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                    raise OpenAIError(499, "the client closed the request") from None
                continue
            reason = on_event(request, event, text)
            if reason == "error":
                raise ENGINE_FAILED
            if reason is not None:
                return reason

    async def sse(http: Request, request: EngineRequest, events: asyncio.Queue, text: TextStream, ident: str,
                  created: int, chat: bool, body: Sampling) -> AsyncIterator[str]:  # fmt: skip
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                part = ({"role": "assistant", "content": delta or ""} if first else
                        {} if delta is None else {"content": delta})  # fmt: skip
                choice = {"index": 0, "delta": part, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            data = {"id": ident, "object": kind, "created": created, "model": model_id, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                yield chunk("", None, first=True)
            while True:
                event = await events.get()
                reason = on_event(request, event, text)
                delta = text.ready(final=reason is not None)
                if delta:
                    yield chunk(delta, None)
                if reason is not None:
                    break
            if reason == "error":
                yield f"data: {json.dumps(ENGINE_FAILED.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield chunk(None, reason)
            if body.stream_options and body.stream_options.include_usage:
                data = {"id": ident, "object": kind, "created": created, "model": model_id, "choices": [],
                        "usage": usage(request)}  # fmt: skip
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
            metrics.requests.labels("chat" if chat else "completions", "200").inc()
        finally:
            request.cancel()  # no-op once finished; frees the row when the client went away mid-stream

    @app.post("/v1/completions")
    async def completions(http: Request, body: CompletionRequest):
        authorize(http)
        prompt = body.prompt_value()
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        return await run(http, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request, body: ChatRequest):
        authorize(http)
        if body.tools:
            raise OpenAIError(400, "tools are not supported by skiptree serve", param="tools")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]  # fmt: skip
        if not engine.tokenizer.chat_template:
            raise OpenAIError(400, f"the model '{model_id}' has no chat template: send a raw prompt to "
                                   "/v1/completions", param="messages")  # fmt: skip
        try:
            ids = engine.tokenizer.apply_chat_template(messages)
        except GenerationError as error:
            raise OpenAIError(400, str(error), param="messages") from error
        return await run(http, body, ids, body.limit(), chat=True)

    return app
