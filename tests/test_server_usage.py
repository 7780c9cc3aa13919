"""GET /v1/usage: a key sees its own usage, equal to what the ledger holds for it, and nobody else's."""
from __future__ import annotations

import httpx
import openai
import pytest

from server_util import MODEL_NAME, backend, chat_checkpoint, ledger, server  # noqa: F401


def _get(server, secret, **params):
    return httpx.get(server.url + "/v1/usage", params=params, headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def test_usage_is_own_and_matches_ledger(server):
    other_key, other_secret = server.ledger.create_key("usage-other")
    mine = openai.OpenAI(base_url=server.base_url, api_key=server.secret, max_retries=0, timeout=60)
    theirs = openai.OpenAI(base_url=server.base_url, api_key=other_secret, max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "hi"}]
    r1 = theirs.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=3)
    r2 = theirs.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=4,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    mine.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=2)

    body = _get(server, other_secret).json()
    assert body["key"] == {"id": other_key.id, "name": "usage-other"}
    total = body["total"]
    assert total["requests"] == 2
    assert total["prompt_tokens"] == r1.usage.prompt_tokens + r2.usage.prompt_tokens
    assert total["completion_tokens"] == r1.usage.completion_tokens + r2.usage.completion_tokens
    assert total["reasoning_tokens"] == r2.usage.completion_tokens_details.reasoning_tokens
    rows = server.ledger.usage(key_id=other_key.id)
    assert total["cost_usd"] == pytest.approx(float(sum(r["cost_usd"] for r in rows)))
    assert [(b["model"], b["requests"]) for b in body["data"]] == [(MODEL_NAME, 2)]
    # A date window with nothing in it.
    assert _get(server, other_secret, until="2000-01-01").json()["total"]["requests"] == 0


def test_usage_errors(server):
    assert _get(server, "sk-exa-not-a-key").status_code == 401
    r = _get(server, server.secret, since="not-a-date")
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"
