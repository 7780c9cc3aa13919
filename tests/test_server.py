"""The OpenAI-compatible server, end to end: the real app under uvicorn over a tiny random model,
driven by the `openai` client and raw httpx. The model's text is gibberish, so these tests check
structure: fields, counts, modes, ledger rows. The response builder is also tested alone on
canned engine records (tool calls, reasoning), where the text is known.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from exaone.engine_types import Output  # noqa: E402
from exaone.server.backend import Generation  # noqa: E402
from exaone.server.protocol import (REASONING_EFFORT_BUDGETS, Accumulator, ChatCompletionRequest,  # noqa: E402
                                    Choice, reasoning_control, render)
from server_util import MODEL_NAME, backend, chat_checkpoint, ledger, server  # noqa: E402,F401

USER = [{"role": "user", "content": "Which is bigger, 9.11 or 9.9?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.secret, max_retries=0, timeout=60)


def _row(server, request_id):
    rows = [r for r in server.ledger.usage() if r["request_id"] == request_id]
    assert len(rows) == 1, f"expected one ledger row for {request_id}, got {len(rows)}"
    return rows[0]


def _sse(resp: httpx.Response) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded ([DONE] kept as the string)."""
    out = []
    for block in resp.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ---- plain endpoints ---------------------------------------------------------------------------
def test_models_health_openapi(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL_NAME and h["max_batch"] == 4
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"thinking_token_budget", "max_thinking_tokens", "reasoning_effort", "chat_template_kwargs",
            "enable_thinking"} <= set(props)
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    price = httpx.get(server.base_url + "/pricing").json()
    assert price["model"] == MODEL_NAME and price["price"]["completion"] > 0


# ---- chat --------------------------------------------------------------------------------------
def test_chat_non_thinking(server, client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=6, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL_NAME
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason == "length"
    extra = c.message.model_extra
    assert extra["reasoning_content"] is None and extra["reasoning"] is None  # thinking is off by default
    u = r.usage
    assert u.completion_tokens == 6 and u.total_tokens == u.prompt_tokens + 6
    assert u.completion_tokens_details.reasoning_tokens == 0
    assert u.prompt_tokens_details.cached_tokens == 0
    assert u.model_extra["cost_usd"] > 0
    row = _row(server, r.id)
    assert row["status"] == "ok" and row["key_id"] == server.key.id
    assert (row["prompt_tokens"], row["completion_tokens"], row["reasoning_tokens"]) == (u.prompt_tokens, 6, 0)
    assert float(row["cost_usd"]) == pytest.approx(u.model_extra["cost_usd"])


def test_chat_thinking_budget(server, client, backend):
    budget = 3
    forced = len(backend.engine.think_end_forced_ids)
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=12,
        seed=3, extra_body={"chat_template_kwargs": {"enable_thinking": True}, "thinking_token_budget": budget,
                            "ignore_eos": True})
    msg, u = r.choices[0].message, r.usage
    rt = u.completion_tokens_details.reasoning_tokens
    assert budget <= rt <= budget + forced
    assert u.completion_tokens == 12
    assert isinstance(msg.model_extra["reasoning_content"], str)
    assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"]
    assert "</think>" not in (msg.content or "") and "</think>" not in msg.model_extra["reasoning_content"]
    assert _row(server, r.id)["reasoning_tokens"] == rt


def test_include_reasoning_false(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=6, seed=3,
                                       response_format={"type": "text"},
                                       extra_body={"enable_thinking": True, "thinking_token_budget": 2,
                                                   "include_reasoning": False, "ignore_eos": True})
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] is None and msg.model_extra["reasoning"] is None
    assert r.usage.completion_tokens_details.reasoning_tokens >= 2  # still counted and billed


def test_chat_stream_thinking(server):
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 10, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "thinking": True, "max_thinking_tokens": 2, "seed": 4}
    resp = httpx.post(server.base_url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {server.secret}"}, timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = _sse(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in chunks[:-1])
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    for d in deltas:
        assert d.get("reasoning") == d.get("reasoning_content")  # both names, always together
    finish = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])
    rt = usage_chunk["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert 2 <= rt <= 2 + 4
    assert _row(server, usage_chunk["id"])["status"] == "ok"


def test_chat_stream_openai_client(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=5, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert isinstance(text, str)
    assert not any((c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks)


def test_prefix_cache_counts_cached_tokens(server, client):
    msgs = [{"role": "system", "content": "You are EXAONE, a helpful assistant. " * 20}, *USER]
    kw = dict(model=MODEL_NAME, messages=msgs, max_tokens=2, extra_body={"ignore_eos": True})
    client.chat.completions.create(**kw)
    r = client.chat.completions.create(**kw)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < r.usage.prompt_tokens
    row = _row(server, r.id)
    assert row["cached_tokens"] == cached
    assert r.usage.model_extra["cost_usd"] == pytest.approx(float(row["cost_usd"]))


@pytest.mark.parametrize("body,on,budget", [
    ({}, False, None),
    ({"chat_template_kwargs": {"enable_thinking": True}}, True, None),
    ({"enable_thinking": True, "thinking_token_budget": 7}, True, 7),
    ({"thinking": True, "max_thinking_tokens": 9}, True, 9),
    ({"thinking": {"type": "enabled", "budget_tokens": 11}}, True, 11),
    ({"thinking": {"type": "disabled"}}, False, None),
    ({"reasoning_effort": "low"}, True, REASONING_EFFORT_BUDGETS["low"]),
    ({"reasoning_effort": "high"}, True, REASONING_EFFORT_BUDGETS["high"]),
    ({"reasoning_effort": "none"}, False, None),
    ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}, False,
     REASONING_EFFORT_BUDGETS["high"]),
    ({"thinking_token_budget": 5}, False, 5),  # a budget alone does not switch thinking on (vLLM)
])
def test_reasoning_control_forms(body, on, budget):
    rc = reasoning_control(ChatCompletionRequest.model_validate({"messages": USER, **body}))
    assert (rc.enable_thinking, rc.budget) == (on, budget)


def test_n_and_logprobs(server, client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4, n=2, seed=1,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 8
    for c in r.choices:
        lp = c.logprobs.content
        assert len(lp) == 4
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
        assert all(t.bytes == list(t.token.encode()) for t in lp)
    assert _row(server, r.id)["completion_tokens"] == 8


def test_stream_n2_with_logprobs(server):
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 5, "n": 2, "stream": True, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 1, "stream_options": {"include_usage": True}}
    resp = httpx.post(server.base_url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {server.secret}"}, timeout=60)
    chunks = _sse(resp)[:-1]
    first, usage = chunks[0], chunks[-1]["usage"]
    assert sorted(c["index"] for c in first["choices"]) == [0, 1]  # the role chunk opens both choices
    tokens, finish = {0: 0, 1: 0}, {}
    for ch in chunks[1:-1]:
        (c,) = ch["choices"]
        if c["logprobs"] is not None:
            tokens[c["index"]] += len(c["logprobs"]["content"])
            assert all(len(t["top_logprobs"]) == 1 for t in c["logprobs"]["content"])
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert tokens == {0: 5, 1: 5} and finish == {0: "length", 1: "length"}
    assert usage["completion_tokens"] == 10


def test_stop_string(client):
    kw = dict(model=MODEL_NAME, messages=USER, max_tokens=16, temperature=0.0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    starts = [i for i in range(len(full) // 3, len(full) - 1)
              if full[i:i + 2].strip() == full[i:i + 2] and "\ufffd" not in full[i:i + 2]]
    assert starts, f"no usable stop string in {full!r}"
    stop = full[starts[0]:starts[0] + 2]
    cut = client.chat.completions.create(stop=[stop, "never-seen"], **kw).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[:full.index(stop)]


def test_completions(server, client):
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of Korea is", max_tokens=5, logprobs=2,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == 5 and len(c.logprobs.top_logprobs[0]) <= 2
    # Offsets advance by each token's text (a token alone may be part of a UTF-8 character, so the
    # joined tokens need not equal the text).
    offs, toks = c.logprobs.text_offset, c.logprobs.tokens
    assert offs[0] == 0 and all(offs[i + 1] == offs[i] + len(toks[i]) for i in range(len(toks) - 1))
    assert r.usage.completion_tokens == 5 and r.usage.completion_tokens_details.reasoning_tokens == 0
    assert _row(server, r.id)["status"] == "ok"
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 3
    assert chunks[-2].choices[0].finish_reason == "length"


# ---- tools -------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOL_TURNS = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Seoul?"}]},
    {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Seoul\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "맑음, 21°C"},
]


def test_tool_round_trip(server, client, backend):
    r = client.chat.completions.create(model=MODEL_NAME, messages=TOOL_TURNS, tools=[WEATHER], max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # What the model saw: the tool list, the earlier call and its result, in the EXAONE format.
    req = ChatCompletionRequest.model_validate({"messages": TOOL_TURNS, "tools": [WEATHER]})
    prompt = backend.tokenizer.decode(backend.prepare_chat(req).prompt_ids)
    assert "# Available Tools" in prompt and '<tool>{"type": "function"' in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Seoul"}}</tool_call>' in prompt
    assert '[|tool|]\n<tool_result>{"result": "맑음, 21°C"}</tool_result>[|endofturn|]' in prompt
    assert "I should call the tool." not in prompt  # earlier reasoning is dropped by the template
    assert prompt.endswith("[|assistant|]\n<think>\n\n</think>\n\n")
    # tool_choice "none" drops the tools from the prompt
    none = ChatCompletionRequest.model_validate({"messages": TOOL_TURNS, "tools": [WEATHER], "tool_choice": "none"})
    assert "# Available Tools" not in backend.tokenizer.decode(backend.prepare_chat(none).prompt_ids)


def test_multi_turn_reasoning_fields_accepted(client):
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning": "2+2=4"},
            {"role": "assistant", "content": "4", "reasoning_content": "again"},
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "and 3+3?"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=2)
    assert r.choices[0].message.role == "assistant"


# ---- the response builder on canned engine records ---------------------------------------------
class _CannedHandle:
    """Stands in for a RequestHandle: replays records, one per text delta."""

    def __init__(self, deltas: list[str], reasoning_upto: int = 0):
        self.request_id, self.n, self.prompt_tokens = "req-1", 1, 7
        self.finish_reasons = [None]
        self.records = []
        for k, text in enumerate(deltas):
            last = k == len(deltas) - 1
            self.records.append(Output("req-1", 0, 100 + k, text, -0.5, [(100 + k, -0.5)], "stop" if last else None,
                                       7, k + 1, min(k + 1, reasoning_upto), False, 0.01, 0.01 * (k + 1)))
        self.finish_reasons = ["stop"]

    @property
    def finished(self):
        return True

    def cancel(self):
        pass

    async def __aiter__(self):
        for r in self.records:
            yield r


def _build(deltas, enable_thinking, tools=True, reasoning_upto=0):
    gen = Generation(_CannedHandle(deltas, reasoning_upto), lambda i: f"<{i}>", chat=True,
                     enable_thinking=enable_thinking, tools=tools)

    async def collect():
        acc, pieces = Accumulator(1, enable_thinking), []
        async for p in gen:
            acc.add(p)
            pieces.append(p)
        return acc, pieces

    acc, pieces = asyncio.run(collect())
    return gen, acc, pieces


def test_builder_tool_call_block():
    deltas = ["Let me check.", "\n<tool_", 'call>{"name": "get_weather", "argu', 'ments": {"city": "</think>"}}',
              "</tool_call>", ""]
    gen, acc, pieces = _build(deltas, enable_thinking=False)
    obj = render("chat", id="x", model="m", created=0, choices=acc.choices, usage=gen.usage(), stream=False,
                 logprobs=True)
    choice = obj["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["content"] == "Let me check."
    (tc,) = msg["tool_calls"]
    assert tc["type"] == "function" and tc["id"].startswith("call_")
    assert tc["function"]["name"] == "get_weather"
    assert json.loads(tc["function"]["arguments"]) == {"city": "</think>"}  # a unit: no reasoning split inside
    assert msg["reasoning_content"] is None and msg["reasoning"] is None
    assert obj["usage"]["completion_tokens"] == len(deltas) and obj["usage"]["prompt_tokens"] == 7
    assert [t["token"] for t in choice["logprobs"]["content"]] == [f"<{100 + k}>" for k in range(len(deltas))]
    # the stream chunk of the call: OpenAI's delta shape with an index
    (p,) = [p for p in pieces if p.tool_calls]
    chunk = render("chat", id="x", model="m", created=0, stream=True, usage=None,
                   choices=[Choice(0, tool_calls=p.tool_calls)], tool_call_index={0: 0})
    assert chunk["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_builder_without_tools_keeps_block_as_text():
    gen, acc, _ = _build(['<tool_call>{"name": "f", "arguments": {}}</tool_call>'], enable_thinking=False,
                         tools=False)
    c = acc.choices[0]
    assert c.tool_calls == [] and c.finish_reason == "stop" and c.content.startswith("<tool_call>")


def test_builder_reasoning_split_starts_inside_thinking():
    # Thinking on: the prompt opened <think>, so the output starts in the reasoning and only </think> ends it.
    gen, acc, _ = _build(["9.9 is big", "ger.\n</th", "ink>\n\n", "9.9"], enable_thinking=True, reasoning_upto=3)
    obj = render("chat", id="x", model="m", created=0, choices=acc.choices, usage=gen.usage(), stream=False)
    msg = obj["choices"][0]["message"]
    assert msg["reasoning_content"] == msg["reasoning"] == "9.9 is bigger."
    assert msg["content"] == "9.9"
    assert obj["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3
    # Thinking off: the same text is all content, tags included.
    _, acc, _ = _build(["a</think>b"], enable_thinking=False)
    assert acc.choices[0].content == "a</think>b" and acc.choices[0].reasoning == ""


# ---- concurrency -------------------------------------------------------------------------------
def test_concurrent_requests_share_the_batch(server, backend):
    async def go():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=server.secret, max_retries=0) as c:
            return await asyncio.gather(*[
                c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=24,
                                          extra_body={"ignore_eos": True}) for _ in range(3)])

    before = backend.stats().max_batch_seen
    rs = asyncio.run(go())
    assert all(r.usage.completion_tokens == 24 for r in rs)
    assert max(before, backend.stats().max_batch_seen) >= 2
    assert len({r.id for r in rs}) == 3
