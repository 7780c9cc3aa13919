"""The playground page in headless Chromium: type a message, see a streamed answer with its
reasoning (collapsed), token counts and cost.

Needs the `playwright` package and a system Chromium at /usr/bin/chromium (Debian: `apt-get
install -y chromium`); never `playwright install`. Skipped when either is missing.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from server_util import MODEL_NAME, backend, chat_checkpoint, ledger, server, wait_for  # noqa: E402,F401

CHROMIUM = os.environ.get("EXAONE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")


def test_playground_streams_an_answer(server):
    sent = []
    before = {r["request_id"] for r in server.ledger.usage(key_id=server.key.id)}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()

            def route(r):  # see what the page sends; pin the seed so the random model's output is fixed
                body = json.loads(r.request.post_data)
                sent.append(body)
                r.continue_(post_data=json.dumps({**body, "seed": 0, "ignore_eos": True}))

            page.route("**/v1/chat/completions", route)
            page.goto(server.url + "/")
            assert page.title() == "exaone playground"
            page.fill("#key", server.secret)
            page.dispatch_event("#key", "change")
            page.wait_for_function(f"document.querySelector('#model').value === {json.dumps(MODEL_NAME)}")
            page.check("#think")
            page.fill("#budget", "3")
            page.fill("#maxTokens", "16")
            page.fill("#input", "Which is bigger, 9.11 or 9.9?")
            page.press("#input", "Enter")

            meta = page.wait_for_selector(".msg.assistant .meta", timeout=30_000)
            assert "16 completion tokens" in meta.inner_text()
            assert "$" in meta.inner_text() and "length" in meta.inner_text()
            assert page.inner_text(".msg.user") == "Which is bigger, 9.11 or 9.9?"
            details = page.query_selector(".msg.assistant details.reasoning")
            assert details is not None and details.get_attribute("open") is None  # collapsed
            assert page.inner_text(".msg.assistant details summary").startswith("Reasoning (")
            assert page.eval_on_selector(".msg.assistant .reasoning-text", "e => e.textContent.length") > 0
            assert page.eval_on_selector(".msg.assistant .content", "e => e.textContent.length") > 0
            assert page.evaluate("localStorage.getItem('exaone.key')") == server.secret
            assert page.query_selector(".msg.error") is None

            # Stop: the fetch is aborted, the server cancels the generation and bills what was made.
            page.uncheck("#think")
            page.fill("#maxTokens", "450")
            page.fill("#input", "Tell me a long story.")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant .content')[1].textContent.length > 0",
                                   timeout=30_000)
            page.click("#stop")
            meta = page.wait_for_selector(".msg.assistant:nth-of-type(4) .meta", timeout=30_000)
            assert meta.inner_text().endswith("stopped")
            assert page.is_enabled("#send") and not page.is_enabled("#stop")
        finally:
            browser.close()
    body, long = sent
    assert long["max_tokens"] == 450 and long["chat_template_kwargs"] == {"enable_thinking": False}
    assert "thinking_token_budget" not in long
    assert wait_for(lambda: len(server.ledger.usage(key_id=server.key.id)) == len(before) + 2)
    new = sorted((r for r in server.ledger.usage(key_id=server.key.id) if r["request_id"] not in before),
                 key=lambda r: r["started_at"])
    assert [r["status"] for r in new] == ["ok", "cancelled"] and new[1]["completion_tokens"] < 450
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["thinking_token_budget"] == 3
    assert body["messages"][-1] == {"role": "user", "content": "Which is bigger, 9.11 or 9.9?"}
