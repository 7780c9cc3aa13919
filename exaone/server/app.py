"""The HTTP routes: OpenAI-compatible chat and text completions, models, pricing, health,
metrics and the playground page. A thin layer: validate, authenticate, admit, enqueue, stream.

Per request: auth (Bearer key -> ledger) -> model check -> template + tokenize in a worker
thread -> rate limit and budget -> `backend.submit` (the engine's own thread does the work) ->
`async for` over the generation -> response or SSE stream -> exactly one ledger row, written
also when the client went away mid-stream (status "cancelled", billed for what was produced).
Every error is OpenAI-shaped; a client's mistake is never a 500.

This module must not touch tensors or SQL: the backend and the ledger do.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import json
import logging
import time
import uuid
from pathlib import Path

import anyio
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine_types import ContextLengthError
from .backend import Generation, Prepared, RequestError
from .metrics import CONTENT_TYPE, Metrics
from .protocol import Accumulator, ChatCompletionRequest, Choice, CompletionRequest, Usage, error_body, render
from .upstream import UpstreamError

log = logging.getLogger("exaone.server")

PLAYGROUND = Path(__file__).with_name("playground.html")
DISCONNECT_POLL_S = 0.5   # how often a non-streamed request checks that its client is still there
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_BEARER = HTTPBearer(auto_error=False, description="an API key made by `exaone keys create NAME`")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def _error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        e = errors[0]
        return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    # A union reports one error per member; of those on the first bad field, the deepest one is
    # from the member the client meant (a dict for tool_choice is a named choice, not a string).
    field = errors[0].get("loc", ())[:2]
    e = max((x for x in errors if x.get("loc", ())[:2] == field), key=lambda x: len(x.get("loc", ())))
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    loc = [x for x in loc if not ("[" in x or x[:1].isupper() or x in ("str", "int", "float", "bool", "list", "dict"))]
    param = ".".join(loc) or None
    return (f"{param}: {e.get('msg')}" if param else str(e.get("msg"))), param


class _SSE(StreamingResponse):
    """A StreamingResponse that, however it ends, closes its generator and runs `on_close` (cancel
    the generation, bill it) as soon as the client is gone, not whenever the generator is
    collected; `on_close` also covers a client gone before the first chunk, when the generator
    never started and so never reaches its own `finally`."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.on_close()


class _Server:
    def __init__(self, backend, ledger, no_auth: bool, limiter, pricing):
        self.backend, self.ledger, self.no_auth, self.limiter = backend, ledger, no_auth, limiter
        self.pricing = pricing if pricing is not None else getattr(ledger, "pricing", None)
        self.metrics = Metrics(getattr(backend, "stats", None))

    # ---- admission ---------------------------------------------------------------------------
    async def authenticate(self, request: Request, creds: HTTPAuthorizationCredentials | None = Security(_BEARER)):
        if self.no_auth:
            return None
        secret = creds.credentials.strip() if creds is not None else request.headers.get("x-api-key", "")
        if not secret:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (create one with "
                                "`exaone keys create NAME`)", code="invalid_api_key")
        key = await asyncio.to_thread(self.ledger.authenticate, secret)
        if key is None:
            raise APIError(401, "invalid API key (unknown or revoked)", code="invalid_api_key")
        return key

    def check_model(self, model: str | None) -> str:
        name = self.backend.model_name
        if model is not None and model != name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        return name

    async def admit(self, key, prep: Prepared) -> None:
        if self.limiter is None or key is None:
            return
        from .limits import BudgetExceeded, RateLimited, RequestTooLarge
        try:
            await asyncio.to_thread(self.limiter.check, key, prep.estimated_tokens)
        except RequestTooLarge as e:
            raise APIError(429, e.message, type="requests", code="rate_limit_exceeded") from None
        except RateLimited as e:
            retry = max(1, int(e.retry_after + 0.999))
            raise APIError(429, e.message, type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(retry)}) from None
        except BudgetExceeded as e:
            raise APIError(429, e.message, type="insufficient_quota", code="insufficient_quota") from None

    # ---- one generation ----------------------------------------------------------------------
    async def run(self, request: Request, key, endpoint: str, body, prepare) -> Response:
        model = self.check_model(body.model)
        try:
            prep: Prepared = await asyncio.to_thread(prepare, body)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        await self.admit(key, prep)
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
        started = dt.datetime.now(dt.timezone.utc)
        try:
            gen = self.backend.submit(prep, rid)
            if inspect.isawaitable(gen):  # a remote backend (upstream.py) connects before answering
                gen = await gen
        except UpstreamError as e:
            self._release(key)
            raise APIError(e.status, e.message, e.type, e.param, e.code) from None
        except ContextLengthError as e:
            self._release(key)
            raise APIError(400, f"this model's maximum context length is {e.max_len} tokens: {e}",
                           param="messages" if endpoint == "chat" else "prompt",
                           code="context_length_exceeded") from None
        except ValueError as e:  # e.g. n above the engine's batch, token ids outside the vocabulary
            self._release(key)
            msg = str(e)
            param = "n" if msg.startswith("n=") else ("prompt" if "prompt" in msg else None)
            raise APIError(400, msg, param=param) from None
        run = _Run(self, gen, key, model, endpoint, started, time.perf_counter())
        self.metrics.started()
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _SSE(self.stream(run, rid, model, created, include_usage, prep), run.finish,
                        media_type="text/event-stream", headers=SSE_HEADERS)
        return await self.complete(request, run, rid, model, created, prep)

    async def complete(self, request, run: "_Run", rid, model, created, prep) -> JSONResponse:
        gen = run.gen
        acc = Accumulator(gen.n, prep.params.enable_thinking and prep.include_reasoning)
        watcher = asyncio.create_task(_watch_disconnect(request, gen))
        try:
            async for piece in gen:
                acc.add(piece)
        finally:
            watcher.cancel()
            with anyio.CancelScope(shield=True):
                usage = await run.finish()
        if gen.status == "error":
            raise _gen_error(gen, rid)
        kind = "chat" if prep.chat else "text"
        return JSONResponse(render(kind, id=rid, model=model, created=created, choices=acc.choices, usage=usage,
                                   stream=False, logprobs=prep.params.logprobs))

    async def stream(self, run: "_Run", rid, model, created, include_usage: bool, prep):
        gen, kind = run.gen, ("chat" if prep.chat else "text")
        lp = prep.params.logprobs

        def chunk(choices, usage=None, role=False, offsets=None, calls=None) -> str:
            obj = render(kind, id=rid, model=model, created=created, choices=choices, usage=usage, stream=True,
                         role=role, text_offsets=offsets, tool_call_index=calls, logprobs=lp)
            if not include_usage:
                obj.pop("usage", None)
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        offsets = [0] * gen.n     # text_offset of the next token (completions logprobs)
        calls = [0] * gen.n       # index of the next tool call, per choice
        try:
            if kind == "chat":
                yield chunk([Choice(i) for i in range(gen.n)], role=True)
            async for p in gen:
                if not (p.reasoning or p.content or p.tool_calls or p.logprobs or p.finish_reason):
                    continue
                c = Choice(p.index, p.reasoning, p.content, p.tool_calls, p.logprobs, p.finish_reason)
                yield chunk([c], offsets={p.index: offsets[p.index]}, calls={p.index: calls[p.index]})
                offsets[p.index] += sum(len(t.token) for t in p.logprobs)
                calls[p.index] += len(p.tool_calls)
            usage = await run.finish()
            if gen.status == "error":
                e = _gen_error(gen, rid)
                yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
            elif include_usage:
                yield chunk([], usage=usage)
            yield "data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):
                await run.finish()

    def _release(self, key) -> None:
        if self.limiter is not None and key is not None:
            self.limiter.add_tokens(key.id, 0)


class _Run:
    """One admitted request: finishing it (cancel if needed, bill, count) happens exactly once."""

    def __init__(self, server: _Server, gen: Generation, key, model: str, endpoint: str, started, t0: float):
        self.server, self.gen, self.key, self.model, self.endpoint = server, gen, key, model, endpoint
        self.started, self.t0 = started, t0
        self._done: asyncio.Future | None = None

    async def finish(self) -> Usage:
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            try:
                self._done.set_result(await self._finish())
            except BaseException as e:
                self._done.set_exception(e)
                raise
        return await asyncio.shield(self._done)

    async def _finish(self) -> Usage:
        s, gen = self.server, self.gen
        await gen.settle()
        usage, status = gen.usage(), gen.status
        if status == "error":
            log.error("request %s failed in the engine: %s", gen.request_id, gen.error)
        if s.ledger is not None:
            from .ledger import UsageRecord
            rec = UsageRecord(key_id=getattr(self.key, "id", None), model=self.model, request_id=gen.request_id,
                              prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                              completion_tokens=usage.completion_tokens, reasoning_tokens=usage.reasoning_tokens,
                              status=status, started_at=self.started, finished_at=dt.datetime.now(dt.timezone.utc))
            try:
                row = await asyncio.to_thread(s.ledger.record, rec)
                usage.cost_usd = float(row.cost_usd)
            except Exception:  # never lose the response over the ledger; the log says what failed
                log.exception("could not record usage of %s", gen.request_id)
        elif s.pricing is not None:
            usage.cost_usd = float(s.pricing.cost(self.model, usage.prompt_tokens, usage.cached_tokens,
                                                  usage.completion_tokens))
        if s.limiter is not None and self.key is not None:
            s.limiter.add_tokens(self.key.id, usage.prompt_tokens + usage.completion_tokens)
        s.metrics.finished(self.endpoint, status, usage, time.perf_counter() - self.t0, gen.ttft())
        return usage


def _failed(rid: str) -> str:
    # The engine's own error text stays in the server log: it can name internals.
    return f"the server failed while generating (request {rid}); please retry"


def _gen_error(gen, rid: str) -> APIError:
    e = getattr(gen, "api_error", None)  # a remote backend's failure: 502 upstream_error
    if e is not None:
        return APIError(e.status, e.message, e.type, e.param, e.code)
    return APIError(500, _failed(rid), type="server_error", code="generation_failed")


async def _watch_disconnect(request: Request, gen: Generation) -> None:
    while not gen.finished:
        if await request.is_disconnected():
            gen.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def create_app(backend, ledger=None, no_auth: bool = False, limiter=None, pricing=None,
               cors_origins: list[str] | None = None) -> FastAPI:
    """The app over a started backend. Without `no_auth` a ledger is needed (keys live there).
    `cors_origins`: web pages on other origins allowed to call the API ("*" for any)."""
    if ledger is None and not no_auth:
        raise ValueError("serving with API keys needs a ledger; pass no_auth=True to serve without keys")
    srv = _Server(backend, ledger, no_auth, limiter, pricing)
    app = FastAPI(title="exaone", version=_version(),
                  description="OpenAI-compatible API for EXAONE 4.0 with reasoning control and metering.")
    app.state.server = srv
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key"])
    # A dependency, so that the key is checked before the body is validated, as OpenAI does.
    Key = Depends(srv.authenticate)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        srv.metrics.rejected(_endpoint(request), e.status)
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        srv.metrics.rejected(_endpoint(request), 400)
        message, param = _validation_message(e)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(e.status_code, str(e.detail), param=None, code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        srv.metrics.rejected(_endpoint(request), 500)
        return _error(500, "internal server error", type="server_error", code="internal_error")

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        if hasattr(backend, "health"):  # a remote backend probes its engines
            h = await backend.health()
            return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)
        s = backend.stats()
        return {"status": "ok", "model": backend.model_name, "running": s.running, "waiting": s.waiting,
                "free_slots": s.free_slots, "max_batch": s.max_batch}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(key=Key):
        return {"object": "list", "data": [_model_card(backend)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, key=Key):
        srv.check_model(model_id)
        return _model_card(backend)

    @app.get("/v1/pricing")
    async def prices():
        """USD per million tokens (prompt, cached prompt, completion; reasoning bills as completion)."""
        p = srv.pricing
        if p is None:
            return {"currency": "USD", "per": 1_000_000, "model": backend.model_name, "price": None}
        price = p.price(backend.model_name)
        return {"currency": "USD", "per": 1_000_000, "model": backend.model_name,
                "price": {"prompt": float(price.prompt), "cached": float(price.cached),
                          "completion": float(price.completion)}}

    @app.get("/v1/usage")
    async def usage(key=Key, since: str | None = None, until: str | None = None):
        """The caller's own usage: totals and per model and UTC day (since inclusive, until exclusive)."""
        if srv.ledger is None or key is None:
            raise APIError(404, "usage is not available: this server runs without API keys and a ledger",
                           code="not_found")
        try:
            rows = await asyncio.to_thread(srv.ledger.usage, key_id=key.id, since=since, until=until)
        except ValueError as e:
            raise APIError(400, f"since/until must be dates (YYYY-MM-DD): {e}", param="since") from None
        return usage_report(key, rows)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, key=Key):
        return await srv.run(request, key, "chat", body, backend.prepare_chat)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key=Key):
        return await srv.run(request, key, "completions", body, backend.prepare_completion)

    return app


def _endpoint(request: Request) -> str:
    path = request.url.path
    return {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(path, "other")


def _model_card(backend) -> dict:
    return {"id": backend.model_name, "object": "model", "created": 0, "owned_by": "exaone",
            "max_model_len": backend.max_len}


def _version() -> str:
    from .. import __version__
    return __version__


_USAGE_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")


def usage_report(key, rows: list[dict]) -> dict:
    """Sum ledger rows into the /v1/usage body: totals, and one bucket per (model, UTC day)."""
    from decimal import Decimal

    def empty():
        return {"requests": 0, **{f: 0 for f in _USAGE_FIELDS}, "cost_usd": Decimal(0)}

    total, buckets = empty(), {}
    for r in rows:
        day = r["started_at"].date().isoformat()
        b = buckets.setdefault((r["model"], day), {"model": r["model"], "day": day, **empty()})
        for acc in (total, b):
            acc["requests"] += 1
            for f in _USAGE_FIELDS:
                acc[f] += r[f]
            acc["cost_usd"] += Decimal(r["cost_usd"])
    fix = lambda d: {**d, "cost_usd": float(d["cost_usd"])}  # noqa: E731
    return {"object": "usage", "key": {"id": key.id, "name": key.name},
            "total": fix(total), "data": [fix(b) for b in buckets.values()]}
