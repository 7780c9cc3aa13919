"""`exaone serve --upstream`: the front (keys, ledger, limits, reasoning split) over OpenAI-compatible
engines. The engines here are two more instances of our own server (a tiny random model,
--no-auth, each with its own ledger, so their usage can be compared with the front's), plus a
scripted fake engine for what ours never sends (raw <think> text, vLLM's tool-call deltas,
usage in every chunk, a death mid-stream). Everything runs on loopback.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402
from server_util import MODEL_NAME, LiveServer, chat_checkpoint, one_torch_thread, wait_for  # noqa: E402,F401

USER = [{"role": "user", "content": "Which is bigger, 9.11 or 9.9?"}]


class _SlowGen:
    """A generation whose pieces reach the client `delay` s apart (so streams are long enough to cut)."""

    def __init__(self, gen, delay):
        self._gen, self._delay = gen, delay

    def __getattr__(self, name):
        return getattr(self._gen, name)

    async def __aiter__(self):
        async for p in self._gen:
            if self._delay:
                await asyncio.sleep(self._delay)
            yield p


class _Slowable:
    """A LocalBackend whose streams can be slowed (`delay`), all else delegated."""

    def __init__(self, backend):
        self._b, self.delay = backend, 0.0

    def __getattr__(self, name):
        return getattr(self._b, name)

    def submit(self, prep, request_id=None):
        return _SlowGen(self._b.submit(prep, request_id), self.delay)


def _engine(checkpoint, tmp_path, tag):
    """One upstream: our server, --no-auth, its own ledger; `.backend` is the slowable LocalBackend."""
    from exaone.server.app import create_app
    from exaone.server.backend import LocalBackend
    from exaone.server.ledger import Ledger

    local = LocalBackend(checkpoint, max_batch=8, name=MODEL_NAME, prefill_chunk=64).start()
    ledger = Ledger(f"sqlite:///{tmp_path / f'engine_{tag}.db'}")
    backend = _Slowable(local)
    live = LiveServer(create_app(backend, ledger=ledger, no_auth=True))
    live.backend, live.ledger, live.local = backend, ledger, local
    return live


def _close_engine(live):
    live.close()
    live.local.stop()
    live.ledger.close()


def _front(urls, tmp_path, tag="front", **kw):
    from exaone.server.app import create_app
    from exaone.server.ledger import Ledger
    from exaone.server.limits import Limiter
    from exaone.server.upstream import UpstreamBackend

    ledger = Ledger(f"sqlite:///{tmp_path / f'{tag}.db'}")
    key, secret = ledger.create_key("front")
    backend = UpstreamBackend(urls, **kw).start()
    live = LiveServer(create_app(backend, ledger=ledger, limiter=Limiter(ledger)))
    live.ledger, live.secret, live.key, live.upstream = ledger, secret, key, backend
    live.client = openai.OpenAI(base_url=live.base_url, api_key=secret, max_retries=0, timeout=60)
    return live


def _close_front(live):
    live.close()
    live.ledger.close()


@pytest.fixture(scope="module")
def engines(chat_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    pair = [_engine(chat_checkpoint, tmp, "a"), _engine(chat_checkpoint, tmp, "b")]
    yield pair
    for e in pair:
        _close_engine(e)


@pytest.fixture(scope="module")
def front(engines, tmp_path_factory):
    live = _front([e.url for e in engines], tmp_path_factory.mktemp("front"))
    yield live
    _close_front(live)


def _engine_rows(engines) -> dict:
    return {r["request_id"]: r for e in engines for r in e.ledger.usage()}


def _new_engine_row(engines, before: dict) -> dict:
    assert wait_for(lambda: len(_engine_rows(engines)) > len(before))
    new = [r for rid, r in _engine_rows(engines).items() if rid not in before]
    assert len(new) == 1, new
    return new[0]


def _front_row(front, rid) -> dict:
    rows = [r for r in front.ledger.usage() if r["request_id"] == rid]
    assert len(rows) == 1, rows
    return rows[0]


def _tokens(u) -> tuple:
    if isinstance(u, dict):
        return (u["prompt_tokens"], u["completion_tokens"], u["reasoning_tokens"], u["cached_tokens"])
    return (u.prompt_tokens, u.completion_tokens, u.completion_tokens_details.reasoning_tokens,
            u.prompt_tokens_details.cached_tokens)


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}/v1"


# ---- through the front -------------------------------------------------------------------------
def test_models_and_health(front):
    assert [m.id for m in front.client.models.list().data] == [MODEL_NAME]
    h = httpx.get(front.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL_NAME
    assert [b["healthy"] for b in h["backends"]] == [True, True]


def test_chat_non_stream_equals_engine(front, engines):
    before = _engine_rows(engines)
    kw = dict(model=MODEL_NAME, messages=USER, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
    r = front.client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.choices[0].message.model_extra["reasoning_content"] is None  # thinking off by default
    engine_row = _new_engine_row(engines, before)
    row = _front_row(front, r.id)
    assert _tokens(r.usage) == _tokens(engine_row) == _tokens(row)
    assert row["status"] == "ok" and row["key_id"] == front.key.id and row["cost_usd"] > 0
    # the text is the engine's own (same checkpoint on both engines, greedy)
    direct = openai.OpenAI(base_url=engines[0].base_url, api_key="x", max_retries=0).chat.completions.create(**kw)
    assert r.choices[0].message.content == direct.choices[0].message.content


def test_chat_thinking_budget_through_front(front, engines):
    before = _engine_rows(engines)
    kw = dict(model=MODEL_NAME, messages=USER, max_tokens=12, temperature=0.0,
              extra_body={"enable_thinking": True, "thinking_token_budget": 3, "ignore_eos": True})
    r = front.client.chat.completions.create(**kw)
    msg, u = r.choices[0].message, r.usage
    rt = u.completion_tokens_details.reasoning_tokens
    assert 3 <= rt <= 3 + len(engines[0].local.engine.think_end_forced_ids)
    assert _tokens(u) == _tokens(_new_engine_row(engines, before)) == _tokens(_front_row(front, r.id))
    direct = openai.OpenAI(base_url=engines[1].base_url, api_key="x", max_retries=0).chat.completions.create(**kw)
    assert msg.model_extra["reasoning_content"] == direct.choices[0].message.model_extra["reasoning_content"]
    assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"]
    assert msg.content == direct.choices[0].message.content


def test_chat_stream_through_front(front, engines):
    before = _engine_rows(engines)
    chunks = list(front.client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=10, stream=True, stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "thinking_token_budget": 2,
                    "ignore_eos": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 10
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1
    assert usage.completion_tokens_details.reasoning_tokens >= 1  # sampled: the model may close it before 2
    assert _tokens(usage) == _tokens(_new_engine_row(engines, before)) == _tokens(_front_row(front, chunks[-1].id))
    deltas = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    # thinking off, no usage asked: no usage chunk, no reasoning
    chunks = list(front.client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4, stream=True,
                                                       extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    assert not any((c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks)


def test_n_and_logprobs_through_front(front, engines):
    before = _engine_rows(engines)
    r = front.client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4, n=2, seed=1,
                                             logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens == 8
    for c in r.choices:
        assert len(c.logprobs.content) == 4 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert _tokens(r.usage) == _tokens(_new_engine_row(engines, before))
    lp = front.client.completions.create(model=MODEL_NAME, prompt="Seoul is", max_tokens=3, logprobs=2,
                                         extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(lp.tokens) == 3 and lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)


def test_completions_through_front(front):
    r = front.client.completions.create(model=MODEL_NAME, prompt="The capital of Korea is", max_tokens=5,
                                        extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert _front_row(front, r.id)["completion_tokens"] == 5
    chunks = list(front.client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=3, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 3


def test_engine_4xx_passes_through_unbilled(front):
    before = len(front.ledger.usage())
    long = [{"role": "user", "content": "word " * 600}]
    r = httpx.post(front.base_url + "/chat/completions", json={"model": MODEL_NAME, "messages": long},
                   headers={"Authorization": f"Bearer {front.secret}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    bad = httpx.post(front.base_url + "/chat/completions", json={"model": MODEL_NAME, "messages": USER, "n": 0},
                     headers={"Authorization": f"Bearer {front.secret}"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    assert len(front.ledger.usage()) == before


def test_balancing_spreads_requests(front):
    def counts():
        return [b["requests"] for b in httpx.get(front.url + "/health").json()["backends"]]

    c0 = counts()
    for _ in range(4):  # one at a time: both idle, so round robin alternates
        front.client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2)
    c1 = counts()
    assert [b - a for a, b in zip(c0, c1)] == [2, 2]

    async def burst():
        async with openai.AsyncOpenAI(base_url=front.base_url, api_key=front.secret, max_retries=0) as c:
            return await asyncio.gather(*[c.chat.completions.create(
                model=MODEL_NAME, messages=USER, max_tokens=8, extra_body={"ignore_eos": True}) for _ in range(6)])

    assert all(r.usage.completion_tokens == 8 for r in asyncio.run(burst()))
    spread = [b - a for a, b in zip(c1, counts())]
    assert sum(spread) == 6 and min(spread) >= 2


def test_client_gone_cancels_on_the_engine(front, engines):
    before = _engine_rows(engines)
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": True,
            "logprobs": True}  # one logprob entry per token, even when its text is held back
    rid, seen = None, 0
    with httpx.stream("POST", front.base_url + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {front.secret}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                rid = obj["id"]
                seen += len((obj["choices"][0]["logprobs"] or {}).get("content") or [])
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream
    engine_row = _new_engine_row(engines, before)
    assert wait_for(lambda: any(u["request_id"] == rid for u in front.ledger.usage()))
    row = _front_row(front, rid)
    # the engine stopped too, and billed its side; the front billed what reached it (no usage was reported)
    assert engine_row["status"] == "cancelled" and row["status"] == "cancelled"
    assert seen <= row["completion_tokens"] <= engine_row["completion_tokens"] < 400 and row["prompt_tokens"] == 0
    for e in engines:
        assert wait_for(lambda: e.local.stats().free_slots == e.local.stats().max_batch)
    assert wait_for(lambda: all(b.outstanding == 0 for b in front.upstream.backends))


def test_refused_backend_is_retried_transparently(engines, tmp_path):
    dead = _dead_url()
    front = _front([dead, engines[0].url], tmp_path, cooldown=0.0)  # cooldown 0: the dead one keeps being tried
    try:
        for _ in range(3):
            r = front.client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2)
            assert r.usage.completion_tokens >= 1
        status = {b["url"]: b for b in httpx.get(front.url + "/health").json()["backends"]}
        assert status[dead]["failures"] >= 2 and status[dead]["requests"] == 0
        assert status[engines[0].url + "/v1"]["requests"] == 3
        assert len(front.ledger.usage()) == 3
    finally:
        _close_front(front)
    # every engine down: a 503 in OpenAI's shape, nothing billed
    from exaone.server.upstream import UpstreamBackend
    down = _front([_dead_url(), _dead_url()], tmp_path, tag="down", name=MODEL_NAME)
    try:
        with pytest.raises(openai.APIStatusError) as e:
            down.client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "upstream_unavailable"
        assert e.value.body["type"] == "upstream_error"
        assert httpx.get(down.url + "/health").status_code == 503
        assert down.ledger.usage() == []
        with pytest.raises(RuntimeError, match="model-name"):
            UpstreamBackend([_dead_url()]).start()
    finally:
        _close_front(down)


# ---- an engine dies mid-load -------------------------------------------------------------------
def _kill(live) -> None:
    """Stop a uvicorn server hard: no new connections, and every open one cut (as a dead host)."""
    live.server.should_exit = True
    port = live.port

    def refused():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return False
        except OSError:
            return True

    assert wait_for(refused, timeout=5)
    for conn in list(live.server.server_state.connections):
        conn.loop.call_soon_threadsafe(conn.transport.abort)


async def _stream(client: httpx.AsyncClient, url, secret, started: asyncio.Event, counter: list, total: int,
                  max_tokens: int) -> dict:
    # logprobs: one entry per token, also for tokens whose text is held back (a random model
    # may open a <tool_call> block and never close it), so tokens can be counted exactly
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "logprobs": True, "stream_options": {"include_usage": True}}
    out = {"id": None, "tokens": 0, "usage": None, "error": None, "done": False}
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {secret}"}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out["done"] = True
                break
            obj = json.loads(data)
            if "error" in obj:
                out["error"] = obj["error"]
                continue
            out["id"] = obj["id"]
            if obj.get("usage"):
                out["usage"] = obj["usage"]
            lp = obj["choices"][0]["logprobs"] if obj["choices"] else None
            if lp and lp["content"]:
                before = out["tokens"]
                out["tokens"] += len(lp["content"])
                if before < 2 <= out["tokens"]:
                    counter[0] += 1
                    if counter[0] == total:
                        started.set()
    return out


def test_engine_killed_mid_load(chat_checkpoint, tmp_path):
    a, b = _engine(chat_checkpoint, tmp_path, "ka"), _engine(chat_checkpoint, tmp_path, "kb")
    front = _front([a.url, b.url], tmp_path, tag="kill")
    try:
        for e in (a, b):
            e.backend.delay = 0.03  # ~2 s streams: long enough to be cut
        n, later = 12, 4

        async def go():
            started, counter = asyncio.Event(), [0]
            async with httpx.AsyncClient(timeout=60) as c:
                first = [asyncio.create_task(_stream(c, front.url, front.secret, started, counter, n, 64))
                         for _ in range(n)]
                waiter = asyncio.create_task(started.wait())
                pending = {waiter, *first}
                while not started.is_set():  # a stream that failed early says why, rather than a timeout
                    done, pending = await asyncio.wait(pending, timeout=40, return_when=asyncio.FIRST_COMPLETED)
                    assert done, f"streams stalled: {counter[0]} of {n} started"
                    for t in done - {waiter}:
                        t.result()
                await asyncio.to_thread(_kill, a)
                ev, cnt = asyncio.Event(), [0]
                after = [asyncio.create_task(_stream(c, front.url, front.secret, ev, cnt, later, 8))
                         for _ in range(later)]
                return await asyncio.gather(*first), await asyncio.gather(*after)

        t0 = time.monotonic()
        first, after = asyncio.run(go())
        assert time.monotonic() - t0 < 60
        failed = [r for r in first if r["error"] is not None]
        ok = [r for r in first + after if r["error"] is None]
        assert 1 <= len(failed) <= n // 2 + 1, [r["tokens"] for r in first]
        for r in failed:  # an OpenAI-shaped error event, then [DONE]
            assert r["error"]["type"] == "upstream_error" and r["error"]["code"] == "upstream_error"
            assert r["done"] and r["usage"] is None
        assert all(r["done"] and r["usage"]["completion_tokens"] in (8, 64) for r in ok)
        assert all(r["usage"] and r["usage"]["completion_tokens"] == 8 for r in after)  # the survivor took them
        h = httpx.get(front.url + "/health").json()
        assert [x["healthy"] for x in h["backends"]] == [False, True]
        # Billing: one row per request; ok rows equal the usage returned; a request cut by the
        # engine's death is billed (status "error") for what was streamed to it: the tokens its
        # chunks carried, no prompt tokens (this engine reports usage only at its end).
        rows = {r["request_id"]: r for r in front.ledger.usage()}
        assert len(rows) == n + later and set(rows) == {r["id"] for r in first + after}
        for r in ok:
            assert rows[r["id"]]["status"] == "ok"
            assert _tokens(rows[r["id"]]) == (r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"],
                                              r["usage"]["completion_tokens_details"]["reasoning_tokens"],
                                              r["usage"]["prompt_tokens_details"]["cached_tokens"])
        for r in failed:
            row = rows[r["id"]]
            assert row["status"] == "error" and row["prompt_tokens"] == 0
            assert row["completion_tokens"] == r["tokens"] >= 2
        total = front.ledger.summary(group_by=())[0]
        assert total["completion_tokens"] == (sum(r["usage"]["completion_tokens"] for r in ok)
                                              + sum(r["tokens"] for r in failed))
        assert total["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in ok)
        assert wait_for(lambda: all(x.outstanding == 0 for x in front.upstream.backends))
    finally:
        _close_front(front)
        for e in (a, b):
            _close_engine(e)


# ---- a scripted engine: what ours never sends ----------------------------------------------------
class _Script:
    def __init__(self):
        self.chunks: list = []   # SSE payloads (dicts)
        self.die = False         # cut the connection after the chunks
        self.seen: list = []     # request bodies received


def _chunk(delta=None, finish=None, usage=None, index=0):
    choices = [] if delta is None and finish is None else [{"index": index, "delta": delta or {},
                                                              "finish_reason": finish}]
    return {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": choices,
            "usage": usage}


@pytest.fixture()
def scripted(tmp_path):
    script, app = _Script(), FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "served-model", "max_model_len": 4096}]}

    @app.get("/health")
    async def health():
        return {}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        script.seen.append(await request.json())

        async def gen():
            for c in script.chunks:
                yield f"data: {json.dumps(c)}\n\n"
                await asyncio.sleep(0.01)
            if script.die:
                raise RuntimeError("engine died")  # uvicorn cuts the chunked body short
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    engine = LiveServer(app)
    front = _front([engine.url], tmp_path, tag="scripted", name="exaone-32b", reasoning="auto")
    front.script = script
    yield front
    _close_front(front)
    engine.close()


def test_forwarded_body_and_raw_think_split(scripted):
    s = scripted.script
    s.chunks = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "<think>\nLet me "}),
                _chunk({"content": "compare.\n</th"}), _chunk({"content": "ink>\n\n9.9 is"}),
                _chunk({"content": " bigger."}), _chunk(finish="stop"),
                _chunk(usage={"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
                              "completion_tokens_details": {"reasoning_tokens": 5},
                              "prompt_tokens_details": {"cached_tokens": 16}})]
    r = scripted.client.chat.completions.create(model="exaone-32b", messages=USER, max_tokens=50,
                                                reasoning_effort="low")
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "Let me compare." and msg.content == "9.9 is bigger."
    assert _tokens(r.usage) == (20, 9, 5, 16) and r.model == "exaone-32b"
    row = _front_row(scripted, r.id)
    assert _tokens(row) == (20, 9, 5, 16) and row["status"] == "ok"
    body = s.seen[-1]
    assert body["model"] == "served-model" and body["stream"] is True
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["thinking_token_budget"] == 256
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "reasoning_effort" not in body and "enable_thinking" not in body and body["max_tokens"] == 50


def test_vllm_tool_call_deltas_and_missing_reasoning_count(scripted):
    s = scripted.script
    s.chunks = [_chunk({"role": "assistant", "reasoning": "Need the tool."}),
                _chunk({"tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                                        "function": {"name": "get_weather", "arguments": ""}}]}),
                _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
                _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Seoul"}'}}]}),
                _chunk(finish="tool_calls"),
                _chunk(usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42})]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = scripted.client.chat.completions.create(model="exaone-32b", messages=USER, tools=tools,
                                                extra_body={"enable_thinking": True})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.model_extra["reasoning_content"] == "Need the tool."
    (tc,) = c.message.tool_calls
    assert (tc.id, tc.function.name, json.loads(tc.function.arguments)) == ("call_abc", "get_weather",
                                                                             {"city": "Seoul"})
    # no reasoning_tokens from the engine: the chunks that carried reasoning are counted
    assert _tokens(r.usage) == (30, 12, 1, 0)


def test_engine_dies_mid_stream(scripted):
    s = scripted.script
    s.die = True
    s.chunks = [_chunk({"role": "assistant", "content": ""}, usage={"prompt_tokens": 20, "completion_tokens": 0,
                                                                   "total_tokens": 20})] + [
        _chunk({"content": f"w{k} "}, usage={"prompt_tokens": 20, "completion_tokens": k + 1,
                                            "total_tokens": 21 + k}) for k in range(3)]
    # non-streamed: a 502 upstream_error; billed for the engine's last report (continuous usage)
    with pytest.raises(openai.APIStatusError) as e:
        scripted.client.chat.completions.create(model="exaone-32b", messages=USER)
    assert e.value.status_code == 502 and e.value.body["type"] == "upstream_error"
    (row,) = scripted.ledger.usage()
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == ("error", 20, 3)
    # streamed: the content so far, an error event, [DONE]
    resp = httpx.post(scripted.base_url + "/chat/completions", timeout=30,
                      json={"model": "exaone-32b", "messages": USER, "stream": True},
                      headers={"Authorization": f"Bearer {scripted.secret}"})
    events = [b[len("data: "):] for b in resp.text.split("\n\n") if b.strip()]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "upstream_error"
    text = "".join(json.loads(x)["choices"][0]["delta"].get("content") or "" for x in events[:-2])
    assert text == "w0 w1 w2 "
    assert [r["status"] for r in scripted.ledger.usage()] == ["error", "error"]
    assert scripted.upstream.backends[0].failures >= 1


def test_serve_cli_upstream_wiring(scripted, tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    from exaone.cli import main

    seen = {}

    def fake_run(app, host, port, log_level):
        with TestClient(app) as c:
            seen["models"] = c.get("/v1/models").json()
            seen["health"] = c.get("/health").json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    url = scripted.upstream.backends[0].url
    assert main(["serve", "--upstream", url, "--upstream", _dead_url(), "--no-auth",
                 "--db", f"sqlite:///{tmp_path / 'cli.db'}"]) == 0
    assert [m["id"] for m in seen["models"]["data"]] == ["served-model"]  # no --model-name: the engine's id
    assert seen["health"]["status"] == "ok" and [b["healthy"] for b in seen["health"]["backends"]] == [True, False]


def test_reasoning_modes_when_the_engine_sent_no_reasoning(scripted):
    """Thinking on, and the engine (with its own parser) sent content only: "upstream" keeps it as
    content; "auto" cannot tell it from raw output and reads it as unfinished reasoning."""
    scripted.script.chunks = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "9.9"}),
                              _chunk(finish="stop")]
    kw = dict(model="exaone-32b", messages=USER, extra_body={"enable_thinking": True})
    scripted.upstream.reasoning = "upstream"
    msg = scripted.client.chat.completions.create(**kw).choices[0].message
    assert msg.content == "9.9" and msg.model_extra["reasoning_content"] == ""
    scripted.upstream.reasoning = "auto"
    msg = scripted.client.chat.completions.create(**kw).choices[0].message
    assert msg.content == "" and msg.model_extra["reasoning_content"] == "9.9"
    # thinking off: content is content in every mode
    msg = scripted.client.chat.completions.create(model="exaone-32b", messages=USER).choices[0].message
    assert msg.content == "9.9" and msg.model_extra["reasoning_content"] is None
