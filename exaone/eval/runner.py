"""Run tasks against a model: clients, concurrency, the resume cache, per-item logs, aggregates.

Two clients with one method, `complete(prompt, enable_thinking, max_tokens, thinking_budget, decoding)`:
- `LocalClient`: the public API as an outside user would (`exaone.load`, `Engine`,
  `SamplingParams`); one engine with a worker thread, so concurrent requests are batched.
- `EndpointClient`: any OpenAI-compatible server (this project's, vLLM, ...), over httpx:
  `chat_template_kwargs.enable_thinking`, `message.reasoning_content` (or `reasoning`) and
  `usage.completion_tokens_details.reasoning_tokens`; the thinking budget is sent as vLLM's
  `thinking_token_budget`.

Generation runs in a thread pool of `concurrency`; scoring runs in the calling (main) thread,
which math-verify's signal-based timeouts need, except code, whose sandboxes run from a small
pool of their own. Every scored item is appended at once to
`OUT/items/<task>.<mode>.jsonl`; that log is also the cache: an item whose key (task, item,
mode, prompt, model, settings) is already there is not generated again. Failed requests go to
`OUT/errors.jsonl` and are retried by the next run. This module must not import the server.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .tasks import Item, Task, category

MODES = {"reasoning": True, "non-reasoning": False}
CODE_SCORERS = max(1, min(4, (os.cpu_count() or 2) // 2))  # sandboxes run at once


@dataclass(frozen=True)
class Decoding:
    """Per-request decoding. Greedy by default; with sampling, each of `--samples` gets seed + i."""
    temperature: float = 0.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def request_fields(self) -> dict:
        out = {"temperature": self.temperature, "top_p": self.top_p}
        if self.presence_penalty:
            out["presence_penalty"] = self.presence_penalty
        if self.seed is not None:
            out["seed"] = self.seed
        return out


@dataclass
class Completion:
    text: str                    # everything generated (reasoning block included)
    reasoning: str | None
    content: str
    completion_tokens: int
    reasoning_tokens: int
    finish_reason: str | None
    seconds: float


# ---- clients -----------------------------------------------------------------------------------
class LocalClient:
    def __init__(self, model: str | None = None, concurrency: int = 8, dtype: str | None = None,
                 device: str | None = None, max_len: int | None = None):
        import exaone
        from exaone.engine import Engine

        self.model = exaone.load(model, dtype=dtype, device=device)
        self.tokenizer = exaone.load_tokenizer(model)
        self.engine = Engine(self.model, tokenizer=self.tokenizer, max_batch=max(1, concurrency),
                             max_len=max_len).start()
        if model is None:
            from exaone.loader import default_model_path
            model = default_model_path()
        self.name = str(Path(model).resolve())
        # The resume cache must not serve a retrained checkpoint's old answers from the same path.
        weights = sorted(Path(self.name).glob("*.safetensors"))
        self.cache_id = self.name + "|" + ",".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}"
                                                   for w in weights)
        self.max_len = self.engine.max_len
        self._lock = threading.Lock()
        self._live: set = set()

    def complete(self, prompt: str, enable_thinking: bool, max_tokens: int, thinking_budget: int | None,
                 decoding: "Decoding | None" = None) -> Completion:
        from exaone.reasoning import parse
        from exaone.sampling import SamplingParams

        d = decoding or Decoding()
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 enable_thinking=enable_thinking)
        # Leave room in the context: the engine stops at max_len anyway, but the prompt must fit.
        room = self.max_len - len(ids)
        if room < 1:  # deterministic, so a scored (0) and cached outcome rather than an error
            return Completion("", None if not enable_thinking else "", "", 0, 0, "prompt_too_long", 0.0)
        params = SamplingParams(max_tokens=max(1, min(max_tokens, room)), temperature=d.temperature, top_p=d.top_p,
                                presence_penalty=d.presence_penalty, seed=d.seed, enable_thinking=enable_thinking,
                                thinking_budget=thinking_budget if enable_thinking else None)
        t0 = time.perf_counter()
        parts, last = [], None
        handle = self.engine.submit(ids, params)
        with self._lock:
            self._live.add(handle)
        try:
            for out in handle:
                parts.append(out.text)
                last = out
        finally:
            with self._lock:
                self._live.discard(handle)
        if last is not None and last.finish_reason in ("error", "cancelled"):  # never cached
            raise RuntimeError(f"generation {last.finish_reason}: {last.error or ''}")
        text = "".join(parts)
        p = parse(text, enable_thinking)
        return Completion(text, p.reasoning, p.content, last.completion_tokens if last else 0,
                          last.reasoning_tokens if last else 0, last.finish_reason if last else None,
                          time.perf_counter() - t0)

    def cancel_all(self) -> None:
        with self._lock:
            live = list(self._live)
        for h in live:
            h.cancel()

    def close(self) -> None:
        self.cancel_all()
        self.engine.stop()


class EndpointClient:
    RETRIES = 4

    def __init__(self, url: str, api_key: str | None = None, served_model: str | None = None,
                 timeout: float = 3600.0, extra_body: dict | None = None, transport=None):
        import httpx

        url = url.rstrip("/")
        if url.endswith("/chat/completions"):
            url = url[: -len("/chat/completions")]
        if not url.endswith("/v1"):
            url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)
        self.extra_body = extra_body or {}
        if served_model is None:
            try:
                r = self.http.get("/models")
            except httpx.HTTPError as e:
                raise ValueError(f"cannot reach {url}/models: {e}") from None
            if r.status_code >= 400:
                raise ValueError(f"{url}/models: HTTP {r.status_code}: {r.text[:300]}")
            data = r.json().get("data") or []
            if not data:
                raise ValueError(f"{url}/models lists no model; pass --served-model")
            served_model = data[0]["id"]
        self.served_model = served_model
        self.name = f"{url}#{served_model}"

    def complete(self, prompt: str, enable_thinking: bool, max_tokens: int, thinking_budget: int | None,
                 decoding: "Decoding | None" = None) -> Completion:
        import httpx

        from exaone.reasoning import parse

        body = {"model": self.served_model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, **(decoding or Decoding()).request_fields(),
                "chat_template_kwargs": {"enable_thinking": enable_thinking}, **self.extra_body}
        if enable_thinking and thinking_budget is not None:
            body["thinking_token_budget"] = thinking_budget  # vLLM's name; this project's server reads it too
        t0 = time.perf_counter()
        for attempt in range(self.RETRIES + 1):
            try:
                r = self.http.post("/chat/completions", json=body)
                if r.status_code in (429, 500, 502, 503, 504) and attempt < self.RETRIES:
                    time.sleep(min(30.0, 2.0 ** attempt))
                    continue
                if r.status_code >= 400:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                break
            except (httpx.TransportError, httpx.TimeoutException):
                if attempt >= self.RETRIES:
                    raise
                time.sleep(min(30.0, 2.0 ** attempt))
        data = r.json()
        choice = data["choices"][0]
        msg = choice.get("message") or {}
        content = msg.get("content") or ""
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if reasoning is None and "</think>" in content:  # a server without a reasoning parser
            p = parse(content, True)
            reasoning, content = p.reasoning, p.content
        usage = data.get("usage") or {}
        details = usage.get("completion_tokens_details") or {}
        text = (f"<think>\n{reasoning}\n</think>\n\n" if reasoning else "") + content
        return Completion(text, reasoning, content, int(usage.get("completion_tokens") or 0),
                          int(details.get("reasoning_tokens") or 0), choice.get("finish_reason"),
                          time.perf_counter() - t0)

    def close(self) -> None:
        self.http.close()


# ---- provenance --------------------------------------------------------------------------------
def project_commit() -> str:
    """`git rev-parse HEAD` of the checkout this package runs from (+ "-dirty"), else the version."""
    import subprocess

    import exaone

    here = Path(exaone.__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here, timeout=30).returncode
            return sha.stdout.strip() + ("-dirty" if dirty == 1 else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"exaone=={exaone.__version__}"


# ---- the run -----------------------------------------------------------------------------------
@dataclass
class Settings:
    max_tokens: int | None = None          # None: each task's default per mode
    thinking_budget: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    samples: int = 1                       # generations per item (seeds seed, seed+1, ...)
    seed: int = 0

    def decoding(self, sample: int) -> Decoding:
        greedy = self.temperature == 0.0
        return Decoding(self.temperature, self.top_p, self.presence_penalty, None if greedy else self.seed + sample)

    def tokens_for(self, task: Task, mode: str) -> int:
        return self.max_tokens or task.max_tokens[mode]


def item_key(model: str, task: Task, item: Item, mode: str, max_tokens: int, settings: Settings,
             sample: int = 0) -> str:
    d = settings.decoding(sample)
    blob = json.dumps([model, task.name, item.id, mode, hashlib.sha256(item.prompt.encode()).hexdigest(),
                       max_tokens, settings.thinking_budget if mode == "reasoning" else None,
                       d.temperature, d.top_p, d.presence_penalty, d.seed, sample], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, "rb+") as f:  # a line cut short by a crash: end it, so the next append starts clean
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    out = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:  # a line cut short by a crash: that item is simply redone
            continue
    return out


@dataclass
class ModeRun:
    wall_seconds: float = 0.0
    generated: int = 0
    cached: int = 0
    errors: int = 0
    task_wall: dict = field(default_factory=dict)


def run_eval(client, tasks: list[tuple[Task, list[Item]]], modes: list[str], out_dir: Path, settings: Settings,
             concurrency: int = 8, progress: bool = True) -> dict:
    """Generate and score every (mode, task, item) not in the cache; returns per-mode run stats
    and the records of the requested items (cached + new), keyed by (task, mode)."""
    out_dir = Path(out_dir)
    (out_dir / "items").mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    records: dict[tuple[str, str], dict[str, dict]] = {}
    runs: dict[str, ModeRun] = {}
    for mode in modes:
        run = runs[mode] = ModeRun()
        jobs = []
        for task, items in tasks:
            path = out_dir / "items" / f"{task.name}.{mode}.jsonl"
            done = {r["key"]: r for r in read_jsonl(path) if "key" in r}
            mt = settings.tokens_for(task, mode)
            recs = records[(task.name, mode)] = {}
            for item in items:
                for sample in range(settings.samples):
                    key = item_key(getattr(client, "cache_id", client.name), task, item, mode, mt, settings, sample)
                    if key in done:
                        recs[key] = done[key]
                        run.cached += 1
                    else:
                        jobs.append((task, item, key, mt, path, sample))
        t0 = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="exaone-eval")
        # Code runs in subprocesses, so it is scored off the main thread (many tests per problem
        # must not stall the next results); math-verify needs the main thread for its timeouts.
        code_pool = ThreadPoolExecutor(max_workers=CODE_SCORERS, thread_name_prefix="exaone-eval-code")
        try:
            with _progress(progress, f"{mode}", len(jobs)) as bar:
                def finish(task, item, key, mt, path, sample, comp, mode=mode, run=run, bar=bar):
                    rec = _score(task, item, mode, key, mt, comp)
                    rec["sample"] = sample
                    _append(path, rec, lock)
                    with lock:
                        records[(task.name, mode)][key] = rec
                        run.generated += 1
                    bar(task.name)

                futs, scoring = {}, []
                for task, item, key, mt, path, sample in jobs:
                    fut = pool.submit(_timed, client.complete, item.prompt, MODES[mode], mt,
                                      settings.thinking_budget if mode == "reasoning" else None,
                                      settings.decoding(sample))
                    futs[fut] = (task, item, key, mt, path, sample)
                for fut in as_completed(futs):
                    task, item, key, mt, path, sample = futs[fut]
                    started, ended, comp, err = fut.result()
                    tw = run.task_wall.setdefault(task.name, [started, ended])
                    tw[0], tw[1] = min(tw[0], started), max(tw[1], ended)
                    if err is not None:
                        run.errors += 1
                        _append(out_dir / "errors.jsonl", {"task": task.name, "id": item.id, "mode": mode,
                                                           "error": err, "time": time.time()}, lock)
                        bar(task.name)
                    elif task.kind == "code":
                        scoring.append(code_pool.submit(finish, task, item, key, mt, path, sample, comp))
                    else:
                        finish(task, item, key, mt, path, sample, comp)
                for f in scoring:
                    f.result()
        except BaseException:  # Ctrl-C: drop queued items, stop running ones; the logs keep what is done
            pool.shutdown(wait=False, cancel_futures=True)
            code_pool.shutdown(wait=False, cancel_futures=True)
            getattr(client, "cancel_all", lambda: None)()
            raise
        finally:
            pool.shutdown(wait=True)
            code_pool.shutdown(wait=True)
        run.wall_seconds = time.perf_counter() - t0
        run.task_wall = {k: v[1] - v[0] for k, v in run.task_wall.items()}
    return {"runs": {m: asdict(r) for m, r in runs.items()}, "records": records}


def _timed(fn, *args):
    started = time.perf_counter()
    try:
        result = fn(*args)
        return started, time.perf_counter(), result, None
    except Exception as e:  # noqa: BLE001 - one failed request must not end the run
        return started, time.perf_counter(), None, f"{type(e).__name__}: {e}"


def _score(task: Task, item: Item, mode: str, key: str, max_tokens: int, comp: Completion) -> dict:
    t0 = time.perf_counter()
    try:
        extracted, score, details = task.score(item, comp.content)
    except Exception as e:  # noqa: BLE001 - a scorer bug scores 0 and is logged, not fatal
        extracted, score, details = None, 0.0, {"scorer_error": f"{type(e).__name__}: {e}"}
    return {"key": key, "task": task.name, "id": item.id, "mode": mode, "meta": item.meta, "prompt": item.prompt,
            "output": comp.text, "reasoning": comp.reasoning, "content": comp.content,
            "extracted": extracted, "score": score, "details": details,
            "completion_tokens": comp.completion_tokens, "reasoning_tokens": comp.reasoning_tokens,
            "finish_reason": comp.finish_reason, "max_tokens": max_tokens, "seconds": round(comp.seconds, 4),
            "score_seconds": round(time.perf_counter() - t0, 4), "time": time.time()}


def _append(path: Path, rec: dict, lock: threading.Lock) -> None:
    line = json.dumps(rec, ensure_ascii=False, default=str) + "\n"
    with lock, open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class _progress:
    """A rich progress bar (stderr) that advances by one per finished item; silent when disabled."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled and total > 0, label, total

    def __enter__(self):
        if not self.enabled:
            return lambda desc=None: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.p.__enter__()
        self.t = self.p.add_task(self.label, total=self.total)
        return lambda desc=None: self.p.update(self.t, advance=1,
                                               description=f"{self.label} {desc}" if desc else self.label)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False


# ---- aggregates --------------------------------------------------------------------------------
GROUP_KEYS = ("subject", "category", "domain", "kind", "data_source", "difficulty")

def aggregate(task: Task, recs: list[dict], n_items: int) -> dict:
    by_item: dict[str, list[float]] = {}
    for r in recs:
        by_item.setdefault(r["id"], []).append(r["score"])
    n = len(by_item)
    mean = lambda xs: (sum(xs) / len(xs)) if xs else None
    # score: per item the mean over its samples (avg@k = the pass@1 estimate), then over items
    out = {"title": task.title, "category": category(task.name), "kind": task.kind, "metric": task.metric,
           "n": n, "n_items": n_items,
           "samples": len(recs),
           "score": None if not n else 100.0 * sum(sum(v) / len(v) for v in by_item.values()) / n,
           "avg_completion_tokens": mean([r["completion_tokens"] for r in recs]),
           "avg_reasoning_tokens": mean([r["reasoning_tokens"] for r in recs]),
           "avg_seconds": mean([r["seconds"] for r in recs]),
           "truncated": sum(1 for r in recs if r.get("finish_reason") == "length")}
    k = min((len(v) for v in by_item.values()), default=1)
    if k > 1:  # pass@k over the samples: an item counts when any of its samples is right
        out[f"pass@{k}"] = 100.0 * sum(any(s >= 1.0 for s in v) for v in by_item.values()) / n
    groups: dict[str, list[float]] = {}
    for r in recs:  # per subject / category / generator, when the items carry one
        meta = r.get("meta") or {}
        g = next((meta[k] for k in GROUP_KEYS if meta.get(k) is not None), None)
        if g is not None:
            groups.setdefault(str(g), []).append(r["score"])
    if len(groups) > 1:
        out["by_group"] = {g: {"n": len(v), "score": 100.0 * sum(v) / len(v)} for g, v in sorted(groups.items())}
    if task.kind == "ifeval" and n:
        d = [r["details"] for r in recs if isinstance(r.get("details"), dict) and "strict" in r["details"]]
        inst = lambda k: 100.0 * sum(sum(x[k]) for x in d) / max(1, sum(len(x[k]) for x in d))
        out.update(prompt_strict=100.0 * sum(x["prompt_strict"] for x in d) / max(1, len(d)),
                   prompt_loose=100.0 * sum(x["prompt_loose"] for x in d) / max(1, len(d)),
                   inst_strict=inst("strict"), inst_loose=inst("loose"))
    return out
