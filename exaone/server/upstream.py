"""The model behind the server when it runs elsewhere: one or more OpenAI-compatible engines
(vLLM with tensor parallelism, or another `exaone serve`), with the interface of `LocalBackend`,
so that the same front (keys, limits, ledger, reasoning control and splitting, usage) serves it.

Per request: `prepare_chat/prepare_completion` turn our request into the body an engine takes
(reasoning control as vLLM's `chat_template_kwargs.enable_thinking` and `thinking_token_budget`;
always a stream with usage) -> `await submit()` picks the backend with the fewest requests in
flight (round robin among equals), retries on another one when a backend refuses the connection
(nothing was sent, so nothing can run twice) and sets it aside for `COOLDOWN_S`, and returns once
the engine answered with its headers -> `UpstreamGeneration` reads the engine's SSE stream in a
task and yields our `Piece`s: reasoning from `reasoning_content`/`reasoning`, or split from raw
`<think>` text by our `ReasoningParser`; tool calls from `tool_calls` deltas or `<tool_call>` text.
`usage()` has the counts to bill, from the engine's own usage.

This module must not know auth or billing, and never touches tensors: it speaks HTTP to engines.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import httpx

from ..reasoning import ReasoningParser
from .backend import RequestError, template_kwargs
from .protocol import (ChatCompletionRequest, CompletionRequest, Piece, TokenLogprob,
                       ToolCallOut, Usage, reasoning_control)

__all__ = ["UpstreamBackend", "UpstreamGeneration", "UpstreamError"]

log = logging.getLogger("exaone.server.upstream")

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0    # between two chunks: a long prefill behind a full batch can take minutes
PROBE_TIMEOUT_S = 2.0     # /health and model discovery
COOLDOWN_S = 10.0         # a backend that refused a connection or died mid-stream is skipped this long
SETTLE_TIMEOUT_S = 5.0
CHARS_PER_TOKEN = 4       # the rate limiter's prompt estimate: the front does not tokenize
MAX_N = 128
REASONING_MODES = ("auto", "upstream", "front")
# Our names for reasoning control; the engine gets them as vLLM's fields instead.
_OURS = {"enable_thinking", "thinking", "reasoning_effort", "thinking_token_budget", "max_thinking_tokens",
         "chat_template_kwargs", "stream", "stream_options", "include_reasoning", "model"}


class UpstreamError(Exception):
    """What the front answers when the engines cannot serve a request (OpenAI error fields)."""

    def __init__(self, status: int, message: str, type: str = "upstream_error", param: str | None = None,
                 code: str | None = "upstream_error"):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class _Refused(Exception):
    """The backend could not be reached: nothing was sent, so another one may take the request."""


@dataclass
class Upstream:
    """One engine: its API base (ending in /v1) and what the balancer knows of it."""
    url: str
    model: str | None = None      # the id it serves (discovered from /v1/models)
    max_len: int | None = None
    outstanding: int = 0          # requests in flight on it now
    requests: int = 0             # requests it was given, all time
    failures: int = 0
    down_until: float = 0.0       # monotonic time before which it is skipped
    last_error: str | None = None

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until

    def as_dict(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "model": self.model, "outstanding": self.outstanding,
                "requests": self.requests, "failures": self.failures, "last_error": self.last_error}


def api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class UpstreamParams:
    """The part of `SamplingParams` the app reads."""
    enable_thinking: bool = False
    logprobs: bool = False
    n: int = 1
    max_tokens: int | None = None


@dataclass
class UpstreamPrepared:
    body: dict
    path: str                     # "chat/completions" or "completions"
    params: UpstreamParams
    chat: bool
    tools: bool
    prompt_estimate: int          # tokens, from characters (see CHARS_PER_TOKEN)
    max_len: int | None
    include_reasoning: bool = True

    @property
    def estimated_tokens(self) -> int:
        """Prompt + the most this request can generate (what a rate limit reserves)."""
        most = self.params.max_tokens
        if most is None:
            most = max(0, self.max_len - self.prompt_estimate) if self.max_len else 0
        return self.prompt_estimate + most * self.params.n


def _n(req) -> int:
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise RequestError(f"n must be in [1, {MAX_N}], got {n}", "n")
    return n


class UpstreamBackend:
    """OpenAI-compatible engines at `urls`, balanced; `api_key` is sent to each as a Bearer token.
    `reasoning`: "upstream" when the engines split reasoning themselves (vLLM --reasoning-parser),
    "front" when they return raw `<think>` text, "auto" to tell per request (see _Choice)."""

    def __init__(self, urls: list[str], api_key: str | None = None, name: str | None = None,
                 reasoning: str = "auto", cooldown: float = COOLDOWN_S):
        if not urls:
            raise ValueError("at least one upstream URL is needed")
        if reasoning not in REASONING_MODES:
            raise ValueError(f"reasoning: one of {REASONING_MODES}, got {reasoning!r}")
        self.backends = [Upstream(api_base(u)) for u in urls]
        self.api_key, self.reasoning, self.cooldown = api_key, reasoning, cooldown
        self._name = name
        self._rr = 0
        self._client: httpx.AsyncClient | None = None

    # ---- what the app reads ------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._name or next((b.model for b in self.backends if b.model), None) or "exaone"

    @property
    def max_len(self) -> int | None:
        lens = [b.max_len for b in self.backends if b.max_len]
        return min(lens) if lens else None

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> "UpstreamBackend":
        """Learn each engine's model id and context length now; unreachable ones are retried later."""
        with httpx.Client(timeout=PROBE_TIMEOUT_S, trust_env=False) as c:
            for b in self.backends:
                try:
                    self._learn(b, c.get(b.url + "/models", headers=self._headers()))
                except (httpx.HTTPError, UpstreamError) as e:
                    self._down(b, f"model discovery failed: {e!r}")
        if self._name is None and not any(b.model for b in self.backends):
            raise RuntimeError("no upstream answered /v1/models; name the model with --model-name")
        return self

    def stop(self) -> None:
        self._client = None  # its connections close with the event loop that owns them

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # created in the server's event loop, which its connections belong to
            self._client = httpx.AsyncClient(
                trust_env=False, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                timeout=httpx.Timeout(CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S))
        return self._client

    async def health(self) -> dict:
        """Probe every engine's /health now; one that answers is usable again."""
        async def probe(b: Upstream) -> None:
            try:
                r = await self.client().get(b.url[:-len("/v1")] + "/health", timeout=PROBE_TIMEOUT_S)
                if r.status_code == 200:
                    b.down_until, b.last_error = 0.0, None
                else:
                    self._down(b, f"/health answered {r.status_code}")
            except httpx.HTTPError as e:
                self._down(b, f"/health failed: {e!r}")
        await asyncio.gather(*(probe(b) for b in self.backends))
        ok = any(b.healthy for b in self.backends)
        return {"status": "ok" if ok else "unavailable", "model": self.model_name,
                "running": sum(b.outstanding for b in self.backends),
                "backends": [b.as_dict() for b in self.backends]}

    # ---- requests -> engine bodies (cheap; the app calls them in a worker thread) --------------
    def prepare_chat(self, req: ChatCompletionRequest) -> UpstreamPrepared:
        rc = reasoning_control(req)
        kwargs = template_kwargs(req, rc)
        n = _n(req)
        body = req.model_dump(exclude_none=True, exclude=_OURS)
        for m in body["messages"]:
            for tc in m.get("tool_calls", []):  # OpenAI engines take the arguments as a JSON string
                if isinstance(tc["function"].get("arguments"), dict):
                    tc["function"]["arguments"] = json.dumps(tc["function"]["arguments"], ensure_ascii=False)
        body["chat_template_kwargs"] = kwargs
        if rc.enable_thinking and rc.budget is not None:
            body["thinking_token_budget"] = rc.budget  # vLLM's field (with --reasoning-config)
        chars = len(json.dumps(body["messages"], ensure_ascii=False)) + len(json.dumps(body.get("tools", [])))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        tools = bool(req.tools) and req.tool_choice != "none"
        return UpstreamPrepared(body, "chat/completions",
                                UpstreamParams(rc.enable_thinking, bool(req.logprobs), n, max_tokens),
                                chat=True, tools=tools, prompt_estimate=chars // CHARS_PER_TOKEN,
                                max_len=self.max_len, include_reasoning=req.include_reasoning)

    def prepare_completion(self, req: CompletionRequest) -> UpstreamPrepared:
        prompt = req.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            estimate = len(prompt) // CHARS_PER_TOKEN
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            estimate = len(prompt)
        else:
            raise RequestError("prompt must be a string or a list of token ids (batches of several prompts "
                               "are not supported; send one request each)", "prompt")
        body = req.model_dump(exclude_none=True, exclude=_OURS)
        body["prompt"] = prompt
        return UpstreamPrepared(body, "completions",
                                UpstreamParams(False, req.logprobs is not None, _n(req), req.max_tokens or 16),
                                chat=False, tools=False, prompt_estimate=estimate, max_len=self.max_len)

    # ---- balancing ---------------------------------------------------------------------------
    def _pick(self, tried: set[int]) -> Upstream | None:
        """Fewest in flight among the healthy, round robin among equals; when every untried one
        is cooling down, try them anyway (the cooldown is a guess, a refused request is certain)."""
        untried = [i for i in range(len(self.backends)) if i not in tried]
        if not untried:
            return None
        pool = [i for i in untried if self.backends[i].healthy] or untried
        k = len(self.backends)
        i = min(pool, key=lambda i: (self.backends[i].outstanding, (i - self._rr) % k))
        self._rr = (i + 1) % k
        return self.backends[i]

    def _down(self, b: Upstream, why: str) -> None:
        b.failures += 1
        b.last_error = why
        b.down_until = time.monotonic() + self.cooldown
        log.warning("upstream %s set aside for %.0f s: %s", b.url, self.cooldown, why)

    def _learn(self, b: Upstream, r: httpx.Response) -> None:
        try:
            data = (r.json().get("data") or [{}])[0] if r.status_code == 200 else {}
            b.model, b.max_len = data.get("id"), data.get("max_model_len")
        except (ValueError, AttributeError, IndexError, TypeError):
            b.model = None
        if not b.model:  # the detail names our engines: it goes to the log, not to clients
            log.error("upstream %s: no model at /models (HTTP %s)", b.url, r.status_code)
            raise UpstreamError(502, "the upstream engine did not say which model it serves; please retry")

    # ---- the engine ----------------------------------------------------------------------------
    async def submit(self, prep: UpstreamPrepared, request_id: str | None = None) -> "UpstreamGeneration":
        """Send the request to a backend and wait for its headers. Raises UpstreamError: the
        engine's own 4xx (the client's mistake, passed on), 502 (it failed), 503 (none reachable)."""
        tried: set[int] = set()
        errors: list[str] = []
        while (b := self._pick(tried)) is not None:
            tried.add(self.backends.index(b))
            b.outstanding += 1
            try:
                resp = await self._open(b, prep, request_id)
            except _Refused as e:
                b.outstanding -= 1
                self._down(b, str(e))
                errors.append(f"{b.url}: {e}")
                continue
            except BaseException:
                b.outstanding -= 1
                raise
            b.requests += 1
            return UpstreamGeneration(self, b, resp, prep, request_id or "")
        log.error("no upstream reachable: %s", "; ".join(errors))
        raise UpstreamError(503, "no upstream engine could be reached; please retry", code="upstream_unavailable")

    async def _open(self, b: Upstream, prep: UpstreamPrepared, request_id: str | None) -> httpx.Response:
        c, headers = self.client(), self._headers()
        try:
            if b.model is None:
                self._learn(b, await c.get(b.url + "/models", headers=headers, timeout=PROBE_TIMEOUT_S))
            body = {**prep.body, "model": b.model, "stream": True,
                    # continuous_usage_stats: vLLM reports usage in every chunk, so a request cut
                    # short is billed exactly; engines that do not know it ignore it
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
            if request_id:
                headers = {**headers, "X-Request-Id": request_id}
            req = c.build_request("POST", f"{b.url}/{prep.path}", json=body, headers=headers)
            resp = await c.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise _Refused(f"connection refused or timed out ({type(e).__name__})") from None
        except httpx.HTTPError as e:
            self._down(b, repr(e))
            raise UpstreamError(502, f"the upstream engine failed before answering ({type(e).__name__}); "
                                     "please retry") from None
        if resp.status_code == 200:
            return resp
        try:
            raw = await resp.aread()
        finally:
            await resp.aclose()
        if resp.status_code == 503:  # starting or overloaded: nothing ran, another one may take it
            raise _Refused("HTTP 503")
        try:
            err = json.loads(raw)["error"]
            message, etype, param, code = err.get("message"), err.get("type"), err.get("param"), err.get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            message, etype, param, code = raw[:300].decode("utf-8", "replace"), None, None, None
        if resp.status_code == 404 and "model" in str(message).lower():
            b.model = None  # it serves another model now: learn it again next time
        if 400 <= resp.status_code < 500 and resp.status_code not in (401, 403, 404):
            # the client's request as the engine judged it (context length, bad values): pass it on
            return_type = etype if isinstance(etype, str) else "invalid_request_error"
            raise UpstreamError(resp.status_code, str(message), return_type, param if isinstance(param, str) else None,
                                code if isinstance(code, str) else None)
        log.error("upstream %s answered HTTP %s: %s", b.url, resp.status_code, message)
        raise UpstreamError(502, f"the upstream engine answered HTTP {resp.status_code}; please retry")

    def _release(self, b: Upstream, failure: str | None) -> None:
        b.outstanding -= 1
        if failure is not None:
            self._down(b, failure)


class _Choice:
    """One choice's state while its stream is read."""

    def __init__(self):
        self.parser: ReasoningParser | None | bool = None  # False: content passes through
        self.upstream_splits = False   # the engine sent reasoning fields: it splits, we do not
        self.calls: dict[int, dict] = {}  # tool-call deltas by their index, until the choice ends
        self.made_calls = False
        self.chunks = 0                # tokens streamed, as far as chunks tell (see usage())
        self.reasoning_chunks = 0
        self.finish: str | None = None


class UpstreamGeneration:
    """One request's stream from an engine: SSE chunks in, `Piece`s out; the counts to bill."""

    def __init__(self, pool: UpstreamBackend, upstream: Upstream, resp: httpx.Response, prep: UpstreamPrepared,
                 request_id: str):
        self.pool, self.upstream, self.resp, self.prep = pool, upstream, resp, prep
        self.request_id = request_id
        self.n = prep.params.n
        self.chat, self.tools = prep.chat, prep.tools
        self.enable_thinking = prep.params.enable_thinking
        self.choices = [_Choice() for _ in range(self.n)]
        self.error: str | None = None              # for the log
        self.api_error: UpstreamError | None = None  # for the client
        self.cancelled = False
        self.finished = False
        self.reported: dict | None = None          # the engine's latest usage
        self._t0, self._ttft = time.perf_counter(), None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._failure: str | None = None           # why the transport failed, if it did
        self._task = asyncio.get_running_loop().create_task(self._pump())
        self._task.add_done_callback(self._ended)

    async def __aiter__(self) -> AsyncIterator[Piece]:
        while True:
            p = await self._queue.get()
            if p is None:
                self._queue.put_nowait(None)  # the end stays the end for any later reader
                return
            yield p

    # ---- reading the engine ------------------------------------------------------------------
    async def _pump(self) -> None:
        try:
            done = False
            async for line in self.resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if isinstance(obj, dict) and obj.get("error") and not obj.get("choices"):
                    err = obj["error"]
                    self._fail(f"the engine reported an error: {err.get('message') if isinstance(err, dict) else err}")
                    break
                self._chunk(obj)
            if not done and self.api_error is None:
                self._failure = "the stream ended before [DONE]"
                self._fail(self._failure)
        except asyncio.CancelledError:
            self.cancelled = True  # the client went away: closing the stream tells the engine to stop
        except (httpx.HTTPError, ValueError, AttributeError, TypeError) as e:
            self._failure = f"{type(e).__name__}: {e}"
            self._fail(self._failure)
        finally:
            try:
                await self.resp.aclose()
            except Exception:
                pass

    def _ended(self, task: asyncio.Task) -> None:
        # A done callback, not a `finally`: a task cancelled before its first step never runs its body.
        if not self.resp.is_closed:
            asyncio.ensure_future(self.resp.aclose())
        if task.cancelled():
            self.cancelled = True
        # a transport failure says the backend is gone; an error it reported says it is alive
        self.pool._release(self.upstream, self._failure if not self.cancelled else None)
        self.finished = True
        self._queue.put_nowait(None)

    def _fail(self, why: str) -> None:
        self.error = f"upstream {self.upstream.url}: {why}"
        self.api_error = UpstreamError(502, f"the upstream engine failed while generating (request "
                                            f"{self.request_id}); please retry")

    def _chunk(self, obj: dict) -> None:
        if obj.get("usage"):
            self.reported = obj["usage"]
        for ch in obj.get("choices") or []:
            i = ch.get("index", 0)
            if not isinstance(i, int) or not 0 <= i < self.n:
                continue
            p = self._chat(ch, i) if self.chat else self._text(ch, i)
            if p.reasoning or p.content or p.tool_calls:
                if self._ttft is None:
                    self._ttft = time.perf_counter() - self._t0
            self._queue.put_nowait(p)

    def _text(self, ch: dict, i: int) -> Piece:
        c, p = self.choices[i], Piece(i, content=ch.get("text") or "")
        lp = ch.get("logprobs") or {}
        tops = lp.get("top_logprobs") or []
        for k, (tok, val) in enumerate(zip(lp.get("tokens") or [], lp.get("token_logprobs") or [])):
            top = tuple((t, v) for t, v in (tops[k] or {}).items()) if k < len(tops) else ()
            p.logprobs.append(TokenLogprob(tok, val if val is not None else 0.0, top))
        c.chunks += max(int(bool(p.content)), len(p.logprobs))
        if ch.get("finish_reason"):
            p.finish_reason = c.finish = ch["finish_reason"]
        return p

    def _chat(self, ch: dict, i: int) -> Piece:
        c, p = self.choices[i], Piece(i)
        d = ch.get("delta") or {}
        # our server sends both names with the same text, vLLM one of them
        r = d.get("reasoning_content") or d.get("reasoning")
        if r:
            c.upstream_splits = True
            c.reasoning_chunks += 1
            if self.prep.include_reasoning:
                p.reasoning += r
        text = d.get("content")
        if text:
            if c.parser is None:
                # Raw output starts inside the reasoning when thinking is on (the prompt opened
                # <think>); an engine that splits sent its reasoning fields first, or is said to.
                # Without raw reasoning or tools to find, content passes through as it came.
                raw = self.enable_thinking and self.pool.reasoning != "upstream" and not c.upstream_splits
                c.parser = ReasoningParser(raw) if raw or self.tools else False
            if c.parser is False:
                p.content += text
            else:
                if c.parser.state == "reasoning":
                    c.reasoning_chunks += 1
                self._events(c, p, c.parser.feed(text))
        for tc in d.get("tool_calls") or []:
            slot = c.calls.setdefault(tc.get("index", len(c.calls)), {"id": None, "name": "", "arguments": ""})
            fn = tc.get("function") or {}
            slot["id"] = tc.get("id") or slot["id"]
            slot["name"] += fn.get("name") or ""
            slot["arguments"] += fn.get("arguments") or ""
        lp = (ch.get("logprobs") or {}).get("content") or []
        for t in lp:
            top = tuple((x.get("token", ""), x.get("logprob", 0.0)) for x in t.get("top_logprobs") or [])
            p.logprobs.append(TokenLogprob(t.get("token", ""), t.get("logprob", 0.0), top))
        # tokens seen: one per logprob entry (exact; a token whose text is held back still has
        # one), else one per chunk that carried output
        c.chunks += max(int(bool(r or text or d.get("tool_calls"))), len(p.logprobs))
        reason = ch.get("finish_reason")
        if reason:
            if c.parser:
                self._events(c, p, c.parser.finish())
            for k in sorted(c.calls):  # streamed in pieces by the engine; whole in our chunks
                s = c.calls[k]
                p.tool_calls.append(ToolCallOut(s["id"] or f"call_{self.request_id[-12:]}_{k}", s["name"],
                                                s["arguments"] or "{}"))
            c.calls.clear()
            if p.tool_calls:
                c.made_calls = True
            if reason == "stop" and c.made_calls:
                reason = "tool_calls"
            p.finish_reason = c.finish = reason
        return p

    def _events(self, c: _Choice, p: Piece, events) -> None:
        for ev in events:
            if ev.kind == "reasoning":
                if self.prep.include_reasoning:
                    p.reasoning += ev.text
            elif ev.kind == "content":
                p.content += ev.text
            elif self.tools:
                tc = ev.tool_call
                p.tool_calls.append(ToolCallOut(tc.id, tc.name, tc.arguments))
                c.made_calls = True
            else:  # no tools offered: a tool-call block is just text
                tc = ev.tool_call
                p.content += f'<tool_call>{{"name": {json.dumps(tc.name)}, "arguments": {tc.arguments}}}</tool_call>'

    # ---- the Generation interface --------------------------------------------------------------
    def cancel(self) -> None:
        if not self._task.done():
            self.cancelled = True
            self._task.cancel()

    async def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Stop reading if still running (closing the stream stops the engine) and wait for the end."""
        self.cancel()
        await asyncio.wait({self._task}, timeout=timeout)

    @property
    def status(self) -> str:
        if self.api_error is not None or any(c.finish == "error" for c in self.choices):
            return "error"
        if self.cancelled or any(c.finish is None for c in self.choices):
            return "cancelled"
        return "ok"

    def usage(self) -> Usage:
        """Billing rule: the engine's usage, as it reported it. A stream cut short (client gone,
        engine died) is billed for the engine's last report (vLLM reports in every chunk with
        continuous_usage_stats) or, if that is less, for what was streamed: one completion token
        per logprob entry, or per chunk that carried output when there are none (an engine sends
        at most one chunk per token, so this never over-bills); prompt tokens only as reported,
        else 0. Reasoning tokens: the engine's
        `completion_tokens_details.reasoning_tokens`, else the chunks that carried reasoning."""
        u = self.reported or {}
        streamed = sum(c.chunks for c in self.choices)
        completion = max(_int(u.get("completion_tokens")), streamed)
        prompt = _int(u.get("prompt_tokens"))
        details = u.get("completion_tokens_details") or {}
        reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
        if not isinstance(reasoning, int):
            reasoning = sum(c.reasoning_chunks for c in self.choices) if self.enable_thinking else 0
        cached = _int((u.get("prompt_tokens_details") or {}).get("cached_tokens")) \
            if isinstance(u.get("prompt_tokens_details"), dict) else 0
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     reasoning_tokens=min(max(reasoning, 0), completion), cached_tokens=min(cached, prompt))

    def ttft(self) -> float | None:
        return self._ttft


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0
