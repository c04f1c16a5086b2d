"""The HTTP front: FastAPI routes in OpenAI's (and vLLM's adapter-loading) shapes, server-sent events, auth, the
body-size limit and the mapping of every error to OpenAI's JSON shape with its status.

    GET  /health                  no key needed
    GET  /metrics                 Prometheus text
    GET  /v1/models               the base and every adapter
    POST /v1/chat/completions     messages, rendered with the adapter's own chat template
    POST /v1/completions          a raw prompt (text or token ids)
    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}   (--allow-runtime-adapters)
    POST /v1/unload_lora_adapter  {"lora_name"}                (--allow-runtime-adapters)

Requests are checked here completely (fields, model, lengths) before the engine sees them; the engine only ever
fails a request from the inside (500 for that request alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from ..generation import Sampling, TextStream
from . import protocol
from .engine import Engine, QueueFull
from .metrics import Metrics
from .protocol import ApiError
from .registry import Registry
from .sequence import Event, Sequence


@dataclass(frozen=True)
class Settings:
    api_key: str | None
    max_model_len: int
    max_body_bytes: int
    allow_runtime_adapters: bool


def create_app(engine: Engine, registry: Registry, metrics: Metrics, settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    front = Front(engine, registry, metrics, settings)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.requests.labels(getattr(request.state, "model", "none"), str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code="not_found").body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {exc}").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        front.authorize(request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        front.authorize(request)
        return {"object": "list", "data": registry.listing()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        front.authorize(request)
        body = await parse(request, protocol.ChatCompletionRequest)
        entry = front.entry(request, body)
        if entry.template is None:
            raise ApiError(400, f"'{entry.name}' has no chat template (its tokenizer has none); use /v1/completions "
                                f"or start lorakit serve with template=NAME", param="model")
        try:
            prompt = entry.template.prompt_ids(body.conversation())
        except ValueError as exc:  # a template that cannot render this conversation
            raise ApiError(400, f"messages: {exc}", param="messages") from None
        return await front.answer(request, body, entry, prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        front.authorize(request)
        body = await parse(request, protocol.CompletionRequest)
        entry = front.entry(request, body)
        if isinstance(body.prompt, str):
            prompt = registry.tokenizer(body.prompt)["input_ids"]
        else:
            prompt = body.prompt
            vocab = registry.model.get_input_embeddings().num_embeddings
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        return await front.answer(request, body, entry, list(prompt), chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> Response:
        front.authorize(request)
        front.runtime_adapters()
        body = await parse(request, protocol.LoadAdapterRequest)
        registry.check_name(body.lora_name)
        await asyncio.wrap_future(engine.call(lambda: registry.attach(body.lora_name, body.lora_path)))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request) -> Response:
        front.authorize(request)
        front.runtime_adapters()
        body = await parse(request, protocol.UnloadAdapterRequest)
        entry = registry.resolve(body.lora_name)
        if entry is registry.base:
            raise ApiError(400, "the base model cannot be unloaded", param="lora_name")

        def mark() -> None:
            entry.unloading = True

        await asyncio.wrap_future(engine.call(mark))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


async def parse(request: Request, model: type[BaseModel]):
    """The body as `model`; 400 naming the field for bad JSON, a wrong type, a bad value or an unknown field."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"unknown field '{param}': lorakit serve does not implement it"
        elif first["type"] == "missing":
            message = f"{param}: a value is required"
        else:
            message = f"{param}: {first['msg']}" if param else first["msg"]
        raise ApiError(400, message, param=param) from None


class Front:
    """What the generation routes share: auth, the model lookup, the checks, and streaming the engine's events."""

    def __init__(self, engine: Engine, registry: Registry, metrics: Metrics, settings: Settings) -> None:
        self.engine, self.registry, self.metrics, self.settings = engine, registry, metrics, settings

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")

    def runtime_adapters(self) -> None:
        if not self.settings.allow_runtime_adapters:
            raise ApiError(404, "loading adapters at run time is off; start lorakit serve with "
                                "--allow-runtime-adapters", code="not_enabled")

    def entry(self, request: Request, body: protocol.GenerationFields):
        entry = self.registry.resolve(body.model)
        request.state.model = entry.name
        if body.adapters is not None and entry is not self.registry.base:
            raise ApiError(400, f"with adapters, model must be the base id '{self.registry.base_id}'",
                           param="model")
        return entry

    def sequence(self, body, entry, prompt: list[int], emit) -> Sequence:
        limit = self.settings.max_model_len
        if len(prompt) >= limit:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context is {limit} (max_model_len)",
                           param="messages" if hasattr(body, "messages") else "prompt",
                           code="context_length_exceeded")
        max_tokens = body.limit() or limit - len(prompt)
        if len(prompt) + max_tokens > limit:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is over the "
                                f"context of {limit} tokens (max_model_len)", param="max_tokens",
                           code="context_length_exceeded")
        adapter = self.registry.weights(body.adapters) if body.adapters is not None else entry.adapter
        sampling = Sampling(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed)
        generator = torch.Generator().manual_seed(body.seed) if body.seed is not None else None
        return Sequence(uuid.uuid4().hex[:24], prompt, adapter, sampling,
                        frozenset() if body.ignore_eos else entry.stop_ids, tuple(body.stop or ()),
                        TextStream(self.registry.tokenizer), emit, generator)

    async def answer(self, request: Request, body, entry, prompt: list[int], chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        seq = self.sequence(body, entry, prompt, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            self.engine.add(seq)
        except QueueFull as exc:
            raise ApiError(429, str(exc)) from None
        request_id = ("chatcmpl-" if chat else "cmpl-") + seq.request_id
        if body.stream:
            return StreamingResponse(self.stream(seq, events, request_id, body, entry.name, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.whole(request, seq, events, request_id, body.model, entry.name, chat)

    async def whole(self, request: Request, seq: Sequence, events: asyncio.Queue, request_id: str, model: str,
                    label: str, chat: bool) -> Response:
        gone = asyncio.ensure_future(_disconnected(request))
        pieces = []
        try:
            while True:
                getting = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getting, gone}, return_when=asyncio.FIRST_COMPLETED)
                if getting not in done:  # the client left: free the row
                    getting.cancel()
                    self.engine.abort(seq)
                    self.metrics.requests.labels(label, "499").inc()
                    return Response(status_code=499)
                event = getting.result()
                if event.kind == "text":
                    pieces.append(event.text)
                elif event.kind == "error":
                    raise ApiError(500, event.text)
                else:
                    break
        finally:
            gone.cancel()
        build = protocol.chat_response if chat else protocol.completion_response
        self.metrics.requests.labels(label, "200").inc()
        return JSONResponse(build(request_id, model, "".join(pieces), event.finish_reason, event.prompt_tokens,
                                  event.completion_tokens))

    async def stream(self, seq: Sequence, events: asyncio.Queue, request_id: str, body, label: str,
                     chat: bool) -> AsyncIterator[str]:
        """Server-sent events: `data: {chunk}` per text increment, the finish, the usage if asked, `data: [DONE]`."""
        model, with_usage = body.model, body.include_usage()

        def chunk(text: str | None, finish: str | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                payload = protocol.chat_chunk(request_id, model, delta, finish, with_usage)
            else:
                payload = protocol.completion_chunk(request_id, model, text or "", finish, with_usage)
            return f"data: {json.dumps(payload)}\n\n"

        status = "499"
        try:
            if chat:
                first = protocol.chat_chunk(request_id, model, {"role": "assistant", "content": ""}, None, with_usage)
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                event = await events.get()
                if event.kind == "text":
                    yield chunk(event.text)
                    continue
                if event.kind == "error":
                    status = "500"
                    yield f"data: {json.dumps(ApiError(500, event.text).body())}\n\n"
                    break
                yield chunk(None, event.finish_reason)
                if with_usage:
                    kind = "chat.completion.chunk" if chat else "text_completion"
                    usage = protocol.usage_chunk(request_id, model, kind, event.prompt_tokens,
                                                 event.completion_tokens)
                    yield f"data: {json.dumps(usage)}\n\n"
                status = "200"
                break
            yield "data: [DONE]\n\n"
        finally:
            if not seq.finished:
                self.engine.abort(seq)
            self.metrics.requests.labels(label, status).inc()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before any route runs."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = json.dumps(ApiError(413, f"the request body is over {self.limit} bytes").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
