"""Load on the local server: many concurrent streams, a third of them dropped by their clients
mid-stream, then the books must balance. Per request id (every chunk carries it): one ledger row;
a finished request is billed exactly the usage its client got; a dropped one is "cancelled" and
billed for what the engine generated for it; the ledger's sums equal the engine's own counters of
prompt and generated tokens; and every cache slot is free again. A tiny random model on loopback,
bounded in time.
"""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from server_util import MODEL_NAME, LiveServer, chat_checkpoint, one_torch_thread, wait_for  # noqa: E402,F401

N_REQUESTS = 54
MAX_BATCH = 8
FINISH_TOKENS = 16        # requests that run to the end
DROP_TOKENS = 256         # requests dropped after a few chunks: long enough to be cut for sure
BUDGET = 3                # thinking budget of the requests with thinking on
WALL_S = 60


@pytest.fixture(scope="module")
def loaded(chat_checkpoint, tmp_path_factory):
    from exaone.server.app import create_app
    from exaone.server.backend import LocalBackend
    from exaone.server.ledger import Ledger
    from exaone.server.limits import Limiter

    # No prefix cache: the engine's prompt counter then equals the billed prompt tokens.
    backend = LocalBackend(chat_checkpoint, max_batch=MAX_BATCH, name=MODEL_NAME, prefill_chunk=64,
                           prefix_cache_bytes=0).start()
    ledger = Ledger(f"sqlite:///{tmp_path_factory.mktemp('load') / 'ledger.db'}")
    key, secret = ledger.create_key("load")
    live = LiveServer(create_app(backend, ledger=ledger, limiter=Limiter(ledger)))
    live.backend, live.ledger, live.secret = backend, ledger, secret
    yield live
    live.close()
    backend.stop()
    ledger.close()


def _plan(i: int, rng: random.Random) -> dict:
    drop = i % 3 == 0
    think = i % 2 == 1
    # logprobs: one entry per generated token, also for a token whose text is held back (a random
    # model may open a <tool_call> block and never close it), so the client can count tokens
    body = {"model": MODEL_NAME, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
            "logprobs": True,
            "messages": [{"role": "user", "content": f"Request {i}: which is bigger, 9.11 or 9.9?"}],
            "max_tokens": DROP_TOKENS if drop else rng.randint(FINISH_TOKENS // 2, FINISH_TOKENS)}
    if think:
        body.update(enable_thinking=True, thinking_token_budget=BUDGET)
    return {"body": body, "drop_after": rng.randint(1, 3) if drop else None}


async def _one(client: httpx.AsyncClient, url: str, secret: str, plan: dict) -> dict:
    out = {"id": None, "tokens": 0, "usage": None, "done": False, "dropped": False, "plan": plan}
    async with client.stream("POST", url, json=plan["body"], headers={"Authorization": f"Bearer {secret}"}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                break
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            out["id"] = obj["id"]
            if obj.get("usage"):
                out["usage"] = obj["usage"]
            lp = obj["choices"][0]["logprobs"] if obj["choices"] else None
            if lp and lp["content"]:
                out["tokens"] += len(lp["content"])
                if plan["drop_after"] is not None and out["tokens"] >= plan["drop_after"]:
                    out["dropped"] = True
                    break  # leaving the block closes the connection mid-stream
    return out


def test_load_with_dropped_clients_balances_the_books(loaded):
    backend, ledger = loaded.backend, loaded.ledger
    rng = random.Random(0)
    plans = [_plan(i, rng) for i in range(N_REQUESTS)]
    before = backend.stats()

    async def go():
        limits = httpx.Limits(max_connections=N_REQUESTS + 4)
        async with httpx.AsyncClient(timeout=WALL_S, limits=limits) as c:
            return await asyncio.gather(*[_one(c, loaded.base_url + "/chat/completions", loaded.secret, p)
                                          for p in plans])

    t0 = time.monotonic()
    results = asyncio.run(go())
    assert len({r["id"] for r in results}) == N_REQUESTS

    def idle():
        s = backend.stats()
        return s.running == 0 and s.waiting == 0 and s.prefilling == 0 and s.free_slots == s.max_batch

    assert wait_for(idle, timeout=20), backend.stats()
    assert wait_for(lambda: len(ledger.usage()) == N_REQUESTS, timeout=20), len(ledger.usage())
    assert time.monotonic() - t0 < WALL_S
    after = backend.stats()
    assert after.max_batch_seen == MAX_BATCH  # the batch was full at some point

    rows = {r["request_id"]: r for r in ledger.usage()}
    assert set(rows) == {r["id"] for r in results}  # one row per request, under the id clients saw
    finished = [r for r in results if not r["dropped"]]
    dropped = [r for r in results if r["dropped"]]
    forced = len(backend.engine.think_end_forced_ids)
    assert len(dropped) == N_REQUESTS // 3 and all(r["plan"]["drop_after"] for r in dropped)
    for r in finished:
        u, row = r["usage"], rows[r["id"]]
        assert r["done"] and row["status"] == "ok"
        assert u["completion_tokens"] == r["plan"]["body"]["max_tokens"]
        assert (row["prompt_tokens"], row["completion_tokens"], row["reasoning_tokens"], row["cached_tokens"]) == \
            (u["prompt_tokens"], u["completion_tokens"], u["completion_tokens_details"]["reasoning_tokens"],
             u["prompt_tokens_details"]["cached_tokens"])
        if r["plan"]["body"].get("enable_thinking"):  # the budget, or less if the model closed it itself
            assert 1 <= u["completion_tokens_details"]["reasoning_tokens"] <= BUDGET + forced
    for r in dropped:
        row = rows[r["id"]]
        assert row["status"] == "cancelled", row
        # billed for what was produced: at least what the client saw, less than it asked
        assert r["tokens"] <= row["completion_tokens"] < DROP_TOKENS
        assert row["reasoning_tokens"] <= row["completion_tokens"] and row["prompt_tokens"] > 0
        assert row["cost_usd"] > 0
    # The engine's own counters: every generated and every prefilled token is on somebody's bill.
    total = ledger.summary(group_by=())[0]
    assert total["requests"] == N_REQUESTS
    assert total["completion_tokens"] == after.tokens_generated - before.tokens_generated
    assert total["prompt_tokens"] == after.prompt_tokens - before.prompt_tokens
    assert total["completion_tokens"] == (sum(r["usage"]["completion_tokens"] for r in finished)
                                          + sum(rows[r["id"]]["completion_tokens"] for r in dropped))
    assert total["reasoning_tokens"] == (
        sum(r["usage"]["completion_tokens_details"]["reasoning_tokens"] for r in finished)
        + sum(rows[r["id"]]["reasoning_tokens"] for r in dropped))
    assert after.requests_cancelled - before.requests_cancelled == len(dropped)
    metrics = httpx.get(loaded.url + "/metrics").text
    assert "exaone_requests_in_flight 0.0" in metrics
