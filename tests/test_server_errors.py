"""Every error class the server returns, in OpenAI's shape and with the right status (a client's
mistake is never a 500), plus auth, rate limits, metrics, and a client that goes away mid-stream
(its generation is cancelled, its slot freed, and it is billed for what was produced).
"""
from __future__ import annotations

import json
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from exaone.server.app import create_app  # noqa: E402
from exaone.server.limits import BudgetExceeded, RateLimited  # noqa: E402
from server_util import MODEL_NAME, LiveServer, backend, chat_checkpoint, ledger, server, wait_for  # noqa: E402,F401

USER = [{"role": "user", "content": "hello"}]


def _post(server, body, path="/chat/completions", key="valid", raw: bytes | None = None):
    headers = {"content-type": "application/json"}
    if key == "valid":
        headers["Authorization"] = f"Bearer {server.secret}"
    elif key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=60)


def _error(resp, status, code=None, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("body,param", [
    ({"messages": USER, "temperature": "hot"}, "temperature"),                 # wrong type
    ({"messages": USER, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ({"messages": USER, "temperature": 5}, "temperature"),                      # out of range
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "n": 99}, "n"),
    ({"messages": USER, "n": 5}, "n"),                                          # above the engine's batch
    ({"messages": USER, "seed": 2 ** 70}, "seed"),
    ({"messages": USER, "chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
    ({"messages": USER, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
    ({"messages": USER, "logit_bias": {"5": 10}}, "logit_bias"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": USER, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "enable_thinking": True, "thinking_token_budget": -1}, "thinking_token_budget"),
    ({"messages": USER, "thinking": True, "max_thinking_tokens": -5}, "max_thinking_tokens"),
    ({"messages": USER, "reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
])
def test_bad_chat_requests_are_400(server, body, param):
    _error(_post(server, body), 400, param=param)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "logprobs": 9}, "logprobs"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
])
def test_bad_completion_requests_are_400(server, body, param):
    _error(_post(server, body, path="/completions"), 400, param=param)


def test_invalid_json(server):
    err = _error(_post(server, None, raw=b'{"messages": [ oops'), 400)
    assert "JSON" in err["message"]
    _error(_post(server, None, raw=b"[1, 2]"), 400)


def test_over_context_prompt(server, backend):
    long = [{"role": "user", "content": "word " * (backend.max_len + 10)}]
    _error(_post(server, {"messages": long, "max_tokens": 1}), 400, code="context_length_exceeded", param="messages")
    _error(_post(server, {"prompt": list(range(5, 5 + backend.max_len)), "max_tokens": 1}, path="/completions"),
           400, code="context_length_exceeded", param="prompt")


def test_auth_errors(server):
    _error(_post(server, {"messages": USER}, key=None), 401, code="invalid_api_key")
    _error(_post(server, {"messages": USER}, key="sk-exa-not-a-real-key"), 401, code="invalid_api_key")
    _error(httpx.get(server.base_url + "/models"), 401, code="invalid_api_key")
    _error(_post(server, {"messages": "not a list", "temperature": "hot"}, key=None), 401)  # the key comes first
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-exa-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=1)
    revoked_key, secret = server.ledger.create_key("revoked")
    server.ledger.revoke_key(revoked_key.id)
    _error(_post(server, {"messages": USER}, key=secret), 401, code="invalid_api_key")


def test_unknown_model_and_route(server):
    good = openai.OpenAI(base_url=server.base_url, api_key=server.secret, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="gpt-9", messages=USER, max_tokens=1)
    _error(_post(server, {"model": "gpt-9", "messages": USER}), 404, code="model_not_found", param="model")
    _error(httpx.get(server.base_url + "/models/gpt-9", headers={"Authorization": f"Bearer {server.secret}"}), 404,
           code="model_not_found")
    _error(httpx.get(server.base_url + "/nothing-here"), 404)


class _StubLimiter:
    def __init__(self, exc):
        self.exc, self.added = exc, []

    def check(self, key, estimated_tokens):
        raise self.exc

    def add_tokens(self, key_id, n):
        self.added.append((key_id, n))


def test_rate_limit_and_budget_are_429(backend, ledger):
    key, secret = ledger.create_key("limited")
    app = create_app(backend, ledger=ledger, limiter=_StubLimiter(RateLimited(12.3, "rate limit of 1 rpm reached")))
    with LiveServer(app) as live:
        live.secret = secret
        r = _post(live, {"messages": USER, "max_tokens": 1})
        err = _error(r, 429, code="rate_limit_exceeded")
        assert r.headers["Retry-After"] == "13" and "1 rpm" in err["message"]
        c = openai.OpenAI(base_url=live.base_url, api_key=secret, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=1)
    app = create_app(backend, ledger=ledger, limiter=_StubLimiter(BudgetExceeded("budget of $1 spent")))
    with LiveServer(app) as live:
        live.secret = secret
        _error(_post(live, {"messages": USER, "max_tokens": 1}), 429, code="insufficient_quota")
    assert not [r for r in ledger.usage(key_id=key.id)]  # refused requests are not billed


def test_real_limiter_counts_tokens(backend, ledger):
    from exaone.server.limits import Limiter

    key, secret = ledger.create_key("two-per-minute", rpm_limit=2)
    limiter = Limiter(ledger)
    with LiveServer(create_app(backend, ledger=ledger, limiter=limiter)) as live:
        live.secret = secret
        for _ in range(2):
            assert _post(live, {"messages": USER, "max_tokens": 2, "ignore_eos": True}).status_code == 200
        r = _post(live, {"messages": USER, "max_tokens": 2})
        _error(r, 429, code="rate_limit_exceeded")
        assert int(r.headers["Retry-After"]) >= 1
    requests, tokens = limiter.usage(key.id)
    assert requests == 2 and tokens > 4


def test_server_bug_is_openai_shaped_500(backend):
    class Broken:
        def __getattr__(self, name):
            return getattr(backend, name)

        def prepare_chat(self, req):
            raise RuntimeError("a bug")

    with LiveServer(create_app(Broken(), no_auth=True)) as live:
        err = _error(httpx.post(live.base_url + "/chat/completions", json={"messages": USER}), 500)
        assert err["type"] == "server_error" and "a bug" not in err["message"]


def test_create_app_needs_ledger_or_no_auth(backend):
    with pytest.raises(ValueError, match="no_auth"):
        create_app(backend)


def test_no_auth_serves_without_key_and_cors(backend):
    with LiveServer(create_app(backend, no_auth=True, cors_origins=["http://ui.example"])) as live:
        r = httpx.post(live.base_url + "/chat/completions", json={"messages": USER, "max_tokens": 2},
                       headers={"Origin": "http://ui.example"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        pre = httpx.options(live.base_url + "/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200
        other = httpx.get(live.url + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_serve_cli_refuses_without_keys(tmp_path, capsys):
    from exaone.cli import main

    assert main(["serve", "--db", f"sqlite:///{tmp_path / 'empty.db'}"]) == 2
    err = capsys.readouterr().err
    assert "exaone keys create" in err and "--no-auth" in err


# ---- clients that go away ----------------------------------------------------------------------
def _slots_free(backend):
    s = backend.stats()
    return s.running == 0 and s.waiting == 0 and s.prefilling == 0 and s.free_slots == s.max_batch


def _slow_steps(monkeypatch, backend, seconds: float = 0.005) -> None:
    """Each engine step sleeps first, so a long generation on the tiny model outlasts the client
    (unpatched, 480 tokens can take under the client's 0.5 s)."""
    step = backend.engine.step
    monkeypatch.setattr(backend.engine, "step", lambda: time.sleep(seconds) or step())


def test_disconnect_mid_stream_cancels_and_bills(server, backend, monkeypatch):
    assert wait_for(lambda: _slots_free(backend))
    _slow_steps(monkeypatch, backend)
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": True}
    rid, seen = None, 0
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {server.secret}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                rid = json.loads(line[6:])["id"]
                seen += 1
                if seen == 3:
                    break  # leaving the block closes the connection mid-stream
    assert wait_for(lambda: _slots_free(backend)), backend.stats()
    assert wait_for(lambda: any(u["request_id"] == rid for u in server.ledger.usage()))
    (row,) = [u for u in server.ledger.usage() if u["request_id"] == rid]
    assert row["status"] == "cancelled"
    assert 1 <= row["completion_tokens"] < 400 and row["cost_usd"] > 0


def test_disconnect_non_streamed_cancels(server, backend, monkeypatch):
    assert wait_for(lambda: _slots_free(backend))
    _slow_steps(monkeypatch, backend)
    before = {u["request_id"] for u in server.ledger.usage()}
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        _post_timeout = httpx.post(server.base_url + "/chat/completions", json=body, timeout=0.5,
                                   headers={"Authorization": f"Bearer {server.secret}"})
        del _post_timeout
    assert wait_for(lambda: _slots_free(backend)), backend.stats()
    assert wait_for(lambda: len({u["request_id"] for u in server.ledger.usage()} - before) == 1)
    (row,) = [u for u in server.ledger.usage() if u["request_id"] not in before]
    assert row["status"] == "cancelled" and row["completion_tokens"] < 480


def test_metrics(server):
    _post(server, {"messages": USER, "max_tokens": 2})
    _post(server, {"messages": USER, "temperature": 9})
    text = httpx.get(server.url + "/metrics").text
    for name in ("exaone_requests_total", "exaone_prompt_tokens_total", "exaone_completion_tokens_total",
                 "exaone_reasoning_tokens_total", "exaone_request_latency_seconds_bucket",
                 "exaone_time_to_first_token_seconds_bucket", "exaone_queue_depth", "exaone_running_batch_size",
                 "exaone_free_slots", "exaone_requests_in_flight"):
        assert name in text, name
    assert 'exaone_requests_total{endpoint="chat",status="ok"}' in text
    assert 'exaone_requests_total{endpoint="chat",status="400"}' in text
    assert "exaone_requests_in_flight 0.0" in text


def test_client_gone_before_first_chunk(backend, ledger):
    """Driven at the ASGI level: the client disconnects right after sending its request."""
    import asyncio

    key, secret = ledger.create_key("gone")
    app = create_app(backend, ledger=ledger)
    body = json.dumps({"messages": USER, "max_tokens": 480, "ignore_eos": True, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {secret}".encode())]}
    sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert wait_for(lambda: _slots_free(backend)), backend.stats()
    (row,) = ledger.usage(key_id=key.id)
    assert row["status"] == "cancelled" and row["completion_tokens"] < 480


class _FailingHandle:
    """A request whose engine step fails after one token (as `Engine._fail_active` reports it)."""

    def __init__(self, rid):
        from exaone.engine_types import Output

        self.request_id, self.n, self.prompt_tokens = rid, 1, 3
        self.finish_reasons = ["error"]
        self.records = [Output(rid, 0, 7, "partial", None, None, None, 3, 1, 0, False, 0.01, 0.01),
                        Output(rid, 0, None, "", None, None, "error", 3, 1, 0, False, 0.01, 0.02,
                               error="RuntimeError: CUDA fell over")]
        self.finished = True

    def cancel(self):
        pass

    async def __aiter__(self):
        for r in self.records:
            yield r


class _FailingBackend:
    """No model at all: the app only needs these few members."""
    model_name, max_len = MODEL_NAME, 64

    def __init__(self, real):
        self.real = real

    def stats(self):
        return self.real.stats()

    def prepare_chat(self, req):
        return self.real.prepare_chat(req)

    def submit(self, prep, request_id=None):
        from exaone.server.backend import Generation

        return Generation(_FailingHandle(request_id), str, chat=True, enable_thinking=False, tools=False)


def test_engine_failure_is_500_and_billed_as_error(backend, ledger):
    key, secret = ledger.create_key("engine-failure")
    with LiveServer(create_app(_FailingBackend(backend), ledger=ledger)) as live:
        live.secret = secret
        err = _error(_post(live, {"messages": USER}), 500, code="generation_failed")
        assert err["type"] == "server_error" and "CUDA" not in err["message"]
        r = _post(live, {"messages": USER, "stream": True})
        assert r.status_code == 200  # the stream had begun: the error comes as an event
        events = [b[len("data: "):] for b in r.text.split("\n\n") if b.strip()]
        assert json.loads(events[1])["choices"][0]["delta"]["content"] == "partial"
        assert json.loads(events[-2])["error"]["code"] == "generation_failed" and events[-1] == "[DONE]"
    rows = ledger.usage(key_id=key.id)
    assert [r["status"] for r in rows] == ["error", "error"] and all(r["completion_tokens"] == 1 for r in rows)


def test_serve_cli_wiring(tmp_path, chat_checkpoint, monkeypatch):
    """`exaone serve` builds the app with the ledger, limiter and prices it was given (uvicorn stubbed)."""
    import uvicorn
    from fastapi.testclient import TestClient

    from exaone.cli import main
    from exaone.server.ledger import Ledger

    db = f"sqlite:///{tmp_path / 'serve.db'}"
    with Ledger(db) as led:
        _, secret = led.create_key("cli")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"default": {"prompt": 1, "completion": 2}}))
    seen = {}

    def fake_run(app, host, port, log_level):
        seen.update(host=host, port=port)
        with TestClient(app) as c:
            seen["pricing"] = c.get("/v1/pricing").json()["price"]
            seen["chat"] = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                  json={"messages": USER, "max_tokens": 2}).json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--model", str(chat_checkpoint), "--db", db, "--port", "9999", "--prices", str(prices),
                 "--max-batch", "2", "--prefix-cache-mb", "0"]) == 0
    assert seen["port"] == 9999 and seen["pricing"] == {"prompt": 1.0, "cached": 1.0, "completion": 2.0}
    usage = seen["chat"]["usage"]
    assert usage["cost_usd"] == pytest.approx((usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1e6)
    with Ledger(db) as led:
        assert len(led.usage()) == 1
