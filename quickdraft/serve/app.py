"""The OpenAI-compatible HTTP server: a FastAPI app over one loaded Pair and its scheduler.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``. Every request body is read by hand (size, UTF-8, JSON)
and checked by a pydantic model, so a bad request gets a 4xx with an OpenAI-style error
body naming the field, never a 500. Generation runs on the scheduler's thread
(:mod:`quickdraft.serve.scheduler`); its events come back through ``asyncio`` queues.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from quickdraft.drafters import DRAFTERS
from quickdraft.ort_backend.generator import DecodeConfig, load_pair
from quickdraft.sampling import SamplingConfig
from quickdraft.serve.chat import ChatTemplateError, load_chat_template
from quickdraft.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from quickdraft.serve.scheduler import (
    Delta,
    Done,
    Failed,
    Job,
    QueueFull,
    Scheduler,
    ShuttingDown,
)
from quickdraft.serve.settings import ServeSettings

__all__ = ["create_app", "Engine", "APIError"]

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16
PID_HEADER = "x-quickdraft-pid"
ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- request models ------------------------------------------------------------------------

Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int = Annotated[int, Field(strict=True)]


def _refuse(*fields: str, unless: tuple = (None,), falsy: bool = False, why: str):
    """A validator of ``fields`` that refuses every value but ``unless`` (``falsy``: every
    value but a falsy one) with ``why``: the fields quickdraft does not compute."""
    def check(cls, v):
        if (bool(v) if falsy else v not in unless):
            raise ValueError(why)
        return v

    return field_validator(*fields)(classmethod(check))


def _utf8(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from JSON "\ud800" escapes
        raise ValueError(f"{what} is not valid UTF-8 text (character {e.start})") from None
    return text


class _Request(BaseModel):
    """Fields both endpoints take (OpenAI's, plus top_k, gamma and drafter)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    temperature: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1)] | None = 1.0
    top_k: Annotated[int, Field(strict=True, ge=0)] | None = 0
    seed: Annotated[int, Field(strict=True, ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    n: Annotated[int, Field(strict=True)] | None = 1
    gamma: Annotated[int, Field(strict=True, ge=1)] | Literal["auto"] | None = None
    drafter: Literal[DRAFTERS] | None = None  # type: ignore[valid-type]
    user: str | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict | None = None
    logprobs: Any = None
    top_logprobs: Any = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _utf8(v, "model")

    _n = _refuse("n", unless=(None, 1), why="only n = 1 is supported (one choice per request)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        for s in stops:
            if not s:
                raise ValueError("stop strings must not be empty")
            _utf8(s, "stop")
        return v

    _penalty = _refuse("presence_penalty", "frequency_penalty", unless=(None, 0),
                       why="penalties are not supported (they would change the target's "
                           "distribution); leave them at 0")
    _bias = _refuse("logit_bias", falsy=True, why="logit_bias is not supported")
    _logprobs = _refuse("logprobs", "top_logprobs", unless=(None, False, 0),
                        why="logprobs are not supported")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Request):
    prompt: str | list[Annotated[int, Field(strict=True)]] | list[str]
    echo: bool | None = False
    best_of: Annotated[int, Field(strict=True)] | None = None
    suffix: str | None = None

    _echo = _refuse("echo", falsy=True, why="echo is not supported")
    _best_of = _refuse("best_of", unless=(None, 1), why="only best_of = 1 is supported")
    _suffix = _refuse("suffix", falsy=True, why="suffix (insertion) is not supported")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return v if v is None else _utf8(v, "name")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return _utf8(self.content, "content")
        return "".join(_utf8(p.text, "content") for p in self.content)


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None

    _tools = _refuse("tools", "functions", falsy=True,
                     why="tool and function calls are not supported")
    _tool_choice = _refuse("tool_choice", "function_call", unless=(None, "none"),
                           why="tool and function calls are not supported")

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v is not None and v.get("type", "text") != "text":
            raise ValueError("only the text response format is supported")
        return v

    @model_validator(mode="after")
    def _one_limit(self):
        if None not in (self.max_tokens, self.max_completion_tokens) and \
                self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ: give one of them")
        return self

    def limit(self) -> tuple[int | None, str]:
        """(the token limit, the field that set it)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


def _param(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI names a parameter: messages.0.content ->
    messages.[0].content, with union branch names left out."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("str", "int", "float", "bool", "list", "dict", "literal['auto']",
                      "list[str]", "list[int]", "list[TextPart]", "none") or (
                item.startswith(("list[", "literal[", "function-", "constrained-"))):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or None


def _parse(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # the most specific error: of a union, the branch that got furthest into the value
        first = max(errors, key=lambda err: len(err.get("loc", ())))
        param = _param(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid value")
        if first.get("type") == "missing":
            msg = "a required field is missing"
        raise APIError(400, f"{param}: {msg}" if param else msg, param) from None


# -- the engine: pair, scheduler, metrics --------------------------------------------------


class Engine:
    """What one server (or one Ray replica) holds: the loaded pair, its scheduler and
    metrics, the chat template and the served name."""

    def __init__(self, settings: ServeSettings, pair):
        self.settings = settings
        self.pair = pair
        self.name = settings.served_name()
        self.metrics = Metrics()
        self.scheduler = Scheduler(pair, max_concurrency=settings.max_concurrency,
                                   max_queue=settings.max_queue, metrics=self.metrics).start()
        self.template, self.template_missing = load_chat_template(
            settings.resolved_model_dir() / "target")
        limits = [pair.target.max_length]
        if pair.draft is not None:
            limits.append(pair.draft.max_length)
        known = [x for x in limits if x is not None]
        self.context = min(known) if known else None
        self.vocab = pair.target.vocab_size
        self.gamma = settings.resolved_gamma()
        self.max_gamma = pair.max_draft
        self.created = int(time.time())
        self.pid = os.getpid()

    @classmethod
    def load(cls, settings: ServeSettings) -> Engine:
        from quickdraft.ort_backend.generator import DEFAULT_MAX_GAMMA

        gamma = settings.resolved_gamma()
        most = max(DEFAULT_MAX_GAMMA, gamma if isinstance(gamma, int) else 0)
        pair = load_pair(settings.resolved_model_dir(), device=settings.resolved_device(),
                         attention=settings.attention, max_gamma=most,
                         lanes=settings.resolved_lanes(),
                         draft_lanes=settings.draft_lanes)
        return cls(settings, pair)

    def close(self) -> None:
        self.scheduler.stop(drain_s=self.settings.shutdown_timeout)

    # -- building a job ----------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"model {name!r} is not served here; this server serves "
                           f"{self.name!r} (GET /v1/models)", "model", code="model_not_found")

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (got a list of "
                               f"{len(prompt)}); send them as separate requests", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                _utf8(prompt, "prompt")
            except ValueError as e:
                raise APIError(400, str(e), "prompt") from None
            if not prompt:
                raise APIError(400, "the prompt is empty: give some text to continue", "prompt")
            return list(self.pair.tokenizer.encode(prompt).ids)  # as Generator.encode does
        if not prompt:
            raise APIError(400, "the prompt is empty: give some text or token ids", "prompt")
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab})", "prompt")
        return list(prompt)

    def chat_ids(self, req: ChatRequest) -> list[int]:
        if self.template is None:
            raise APIError(400, self.template_missing, "messages", code="no_chat_template")
        messages = []
        for i, m in enumerate(req.messages):
            try:
                messages.append({"role": m.role, "content": m.text(),
                                 **({"name": m.name} if m.name else {})})
            except ValueError as e:
                raise APIError(400, str(e), f"messages.[{i}].content") from None
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise APIError(400, str(e), "messages") from None
        ids = list(self.pair.tokenizer.encode(text, add_special_tokens=False).ids)
        if not ids:
            raise APIError(400, "the messages render to an empty prompt", "messages")
        return ids

    def job(self, req: _Request, ids: list[int], max_tokens: int | None, default_max: int | None,
            emit, *, prompt_field: str = "prompt", max_field: str = "max_tokens") -> Job:
        """``prompt_field`` / ``max_field``: the request's fields errors name (a chat
        request's are messages and max_tokens or max_completion_tokens)."""
        limit = self.context
        if limit is not None and len(ids) >= limit:
            raise APIError(400, f"{len(ids)} tokens of {prompt_field} leave no room to "
                           f"generate in the model's context of {limit}: shorten the "
                           f"{prompt_field}", prompt_field, code="context_length_exceeded")
        room = None if limit is None else limit - len(ids)
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else room
            if room is not None:
                max_tokens = min(max_tokens, room)
        elif room is not None and max_tokens > room:
            raise APIError(400, f"{prompt_field} ({len(ids)} tokens) + {max_field} "
                           f"({max_tokens}) exceeds the model's context of {limit} tokens; "
                           f"use {max_field} <= {room}", max_field,
                           code="context_length_exceeded")
        if req.top_k is not None and req.top_k > self.vocab:
            raise APIError(400, f"top_k: must be <= the vocabulary size {self.vocab} "
                           "(0 disables it)", "top_k")
        try:
            sampling = SamplingConfig(
                temperature=float(1.0 if req.temperature is None else req.temperature),
                top_k=0 if req.top_k is None else req.top_k,
                top_p=float(1.0 if req.top_p is None else req.top_p))
            config = DecodeConfig(max_new_tokens=max_tokens, sampling=sampling, seed=req.seed)
        except (ValueError, TypeError) as e:
            name = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), "max_tokens" if name == "max_new_tokens" else name
                           ) from None
        gamma = self.gamma if req.gamma is None else req.gamma
        if gamma != "auto" and self.max_gamma is not None and gamma > self.max_gamma:
            raise APIError(400, f"gamma: at most {self.max_gamma} (the target's steps were "
                           "built for that many draft tokens)", "gamma")
        drafter = req.drafter or self.settings.drafter
        return Job(ids, config, gamma, drafter, emit, stop=req.stops(),
                   stream=bool(req.stream), timeout=self.settings.timeout)

    def submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            after = str(self.scheduler.retry_after_s())
            raise APIError(429, str(e), None, "rate_limit_error", "queue_full",
                           headers={"Retry-After": after}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), None, "server_shutdown") from None

    def snapshot(self) -> dict:
        return {"status": "ok" if self.scheduler.alive else "stopped", "pid": self.pid,
                "model": self.name, "device": str(self.pair.device), **self.scheduler.snapshot()}


# -- the app -------------------------------------------------------------------------------


class _Headers:
    """Pure ASGI middleware: the replica's pid on every response, and requests counted by
    endpoint and status (streams too, without buffering them)."""

    def __init__(self, app, get_engine):
        self.app = app
        self.get_engine = get_engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        pid = str(os.getpid()).encode()

        async def send_(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (PID_HEADER.encode(), pid)]
                engine = self.get_engine()
                if engine is not None:
                    engine.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_)


async def _read_json(request: Request, limit: int) -> dict:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def create_app(settings: ServeSettings | None = None, *, pair=None) -> FastAPI:
    """The server's FastAPI app. Its lifespan loads the pair (unless ``pair`` is given:
    one loaded already, shared) and starts the scheduler; shutdown finishes the in-flight
    requests for up to ``settings.shutdown_timeout`` seconds, cancels the rest and joins
    the scheduler's thread."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if pair is not None:
            engine = Engine(settings, pair)
        else:
            engine = await asyncio.to_thread(Engine.load, settings)
        app.state.engine = engine
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="quickdraft", version="0.1.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.engine = None
    app.state.settings = settings

    def engine_of(request: Request) -> Engine:
        engine = request.app.state.engine
        if engine is None:
            raise APIError(503, "the model is still loading", None, "server_starting")
        return engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), None,
                        "invalid_request_error" if exc.status_code < 500 else "server_error"
                        ).response()

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception):  # a bug: say so, stay up
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", None,
                        "server_error").response()

    @app.get("/health")
    async def health(request: Request):
        engine = request.app.state.engine
        if engine is None:
            return JSONResponse({"status": "loading", "pid": os.getpid()}, status_code=503)
        snap = engine.snapshot()
        return JSONResponse(snap, status_code=200 if snap["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        engine = engine_of(request)
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card(engine: Engine) -> dict:
        return {"id": engine.name, "object": "model", "created": engine.created,
                "owned_by": "quickdraft"}

    @app.get("/v1/models")
    async def models(request: Request):
        engine = engine_of(request)
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        engine = engine_of(request)
        engine.check_model(name)
        return model_card(engine)

    async def first_event(request: Request, engine: Engine, job: Job, queue: asyncio.Queue):
        """The job's first event, watching for the client going away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    engine.scheduler.wake()
                    return None
                if not engine.scheduler.alive:
                    return Failed(503, "the scheduler stopped", "server_shutdown")

    async def run(request: Request, kind: str):
        engine = engine_of(request)
        data = await _read_json(request, settings.max_body_bytes)
        req = _parse(CompletionRequest if kind == "text" else ChatRequest, data)
        engine.check_model(req.model)
        if kind == "text":
            ids = engine.prompt_ids(req)
            max_tokens, default = req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS
            fields = {"prompt_field": "prompt", "max_field": "max_tokens"}
        else:
            ids = engine.chat_ids(req)
            (max_tokens, max_field), default = req.limit(), None
            fields = {"prompt_field": "messages", "max_field": max_field}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = engine.job(req, ids, max_tokens, default,
                         lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), **fields)
        engine.submit(job)
        rid = ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            event = await first_event(request, engine, job, queue)
        except BaseException:
            job.cancel()
            engine.scheduler.wake()
            raise
        if event is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        if isinstance(event, Failed):
            raise APIError(event.status, event.message, event.param, event.type)
        if not job.stream:
            return JSONResponse(_body(kind, rid, created, engine.name, event))
        return StreamingResponse(_sse(kind, rid, created, engine, job, queue, event),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, "chat")

    return _wrap(app)


def _wrap(app: FastAPI) -> FastAPI:
    app.add_middleware(_Headers, get_engine=lambda: app.state.engine)
    return app


def _body(kind: str, rid: str, created: int, name: str, done: Done) -> dict:
    if kind == "text":
        choice = {"index": 0, "text": done.text, "logprobs": None,
                  "finish_reason": done.finish_reason}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                  "logprobs": None, "finish_reason": done.finish_reason}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice],
            "usage": _usage(done), "speculative": done.speculative}


def _chunk(kind: str, rid: str, created: int, name: str, text: str | None,
           finish: str | None = None, role: bool = False) -> dict:
    if kind == "text":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice]}


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(kind, rid, created, engine: Engine, job: Job, queue: asyncio.Queue, first):
    """Server-sent events: one chunk per Delta, a last chunk with finish_reason, usage and
    the speculative statistics, then ``data: [DONE]``; a failure mid-stream (the timeout)
    is an ``error`` event before ``[DONE]``."""
    name = engine.name
    event = first
    try:
        if kind == "chat":
            yield _data(_chunk(kind, rid, created, name, "", role=True))
        while True:
            if isinstance(event, Delta):
                yield _data(_chunk(kind, rid, created, name, event.text))
            elif isinstance(event, Done):
                last = _chunk(kind, rid, created, name, None if kind == "chat" else "",
                              event.finish_reason)
                last["usage"] = _usage(event)
                last["speculative"] = event.speculative
                yield _data(last)
                yield "data: [DONE]\n\n"
                return
            elif isinstance(event, Failed):
                err = APIError(event.status, event.message, event.param, event.type)
                yield _data(err.body())
                yield "data: [DONE]\n\n"
                return
            event = await queue.get()
    finally:  # the client went away (or the stream ended): free its stream now
        if not job.finished:
            job.cancel()
            engine.scheduler.wake()
