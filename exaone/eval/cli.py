"""`exaone eval`: benchmark a model (in-process or an OpenAI-compatible endpoint) in reasoning
and non-reasoning mode; resumable; per-item JSONL logs; results.json, results.md, results.png.

    exaone eval --tasks ifeval,humaneval,aime --mode both --limit 50 --out runs/eval
    exaone eval --endpoint http://host:8000/v1 --api-key K --tasks mmlu_redux --data-dir ~/bench
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

DEMO_TASKS = "nano"                                          # the demo model's own held-out problems
DEFAULT_TASKS = "ifeval,humaneval,aime,math500,mmath_ko"     # the benchmarks that ship / install offline


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    src.add_argument("--endpoint", default=None, metavar="URL", help="OpenAI-compatible base URL (…/v1)")
    p.add_argument("--api-key", default=None, help="bearer token for --endpoint (or $EXAONE_API_KEY)")
    p.add_argument("--served-model", default=None, metavar="NAME", help="model name at the endpoint "
                   "(default: the first of GET /v1/models)")
    p.add_argument("--tasks", default=None, help=f"comma-separated (default: {DEMO_TASKS} for the embedded demo "
                   f"model, else {DEFAULT_TASKS}); --list-tasks shows all")
    p.add_argument("--mode", choices=["reasoning", "non-reasoning", "both"], default="both")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N items of each task")
    p.add_argument("--date-range", default=None, metavar="START:END",
                   help="keep dated items (LiveCodeBench contest_date) with START <= date < END, ISO dates; "
                        "either side may be empty, e.g. 2025-02-01:2025-05-01")
    p.add_argument("--concurrency", type=int, default=8, metavar="K", help="requests in flight (= engine batch)")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="results, logs and the resume cache")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="local benchmark files, one folder per task (default: $EXAONE_EVAL_DATA)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="generation limit (default: per task)")
    p.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="reasoning mode: at most N reasoning tokens, then the answer is forced")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); the model card samples reasoning mode at 0.6 with top-p 0.95")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="the card suggests 1.5 against degeneration")
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="generations per item (needs --temperature > 0); score = mean over samples, plus pass@N")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--dtype", default="auto", help="in-process model dtype: float32, bfloat16 or auto")
    p.add_argument("--device", default=None, help="in-process device: cpu (default) or cuda")
    p.add_argument("--max-len", type=int, default=None, metavar="N",
                   help="in-process: context length of the engine's cache (default: the model's)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="in-process: torch intra-op threads (default: 1 for models under 100M parameters on CPU, "
                        "else torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and where their data comes from")


def list_tasks() -> str:
    from .tasks import TASKS

    w = max(len(n) for n in TASKS)
    return "\n".join(f"{n:<{w}}  {t.kind:<9} {t.title:<20} {t.source}" for n, t in TASKS.items())


SMALL_MODEL_PARAMS = 100_000_000  # in-process on CPU, below this: one torch thread unless --threads

# What each task kind needs beyond the core install (`pip install 'exaone[eval]'`).
NEEDS = {"math": ("math_verify",), "ifeval": ("langdetect", "nltk")}


def check_requirements(tasks) -> None:
    import importlib.util

    missing = sorted({m for t in tasks for m in NEEDS.get(t.kind, ()) if importlib.util.find_spec(m) is None})
    if missing:
        raise ValueError(f"{', '.join(t.name for t in tasks if set(NEEDS.get(t.kind, ())) & set(missing))} "
                         f"need(s) {', '.join(missing)}: pip install 'exaone[eval]'")


def filter_dates(items, spec: str):
    """Items whose meta `contest_date` lies in [START, END); undated items are kept."""
    start, sep, end = spec.partition(":")
    if not sep:
        raise ValueError(f"--date-range must be START:END (ISO dates, either may be empty), got {spec!r}")
    out = []
    for it in items:
        d = str(it.meta.get("contest_date") or "")[:10]
        if not d or ((not start or d >= start) and (not end or d < end)):
            out.append(it)
    return out


def run(args) -> int:
    import datetime
    import os

    import exaone

    from .report import write_report
    from .runner import EndpointClient, LocalClient, MODES, Settings, aggregate, project_commit, run_eval
    from .sandbox import network_isolation
    from .tasks import data_dir_default, get_tasks

    if args.list_tasks:
        print(list_tasks())
        return 0
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.samples < 1 or (args.samples > 1 and args.temperature == 0.0):
        raise ValueError("--samples N > 1 needs --temperature > 0 (greedy samples would all be the same)")
    modes = list(MODES) if args.mode == "both" else [args.mode]
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else data_dir_default()
    demo = args.model is None and args.endpoint is None
    tasks = get_tasks(args.tasks or (DEMO_TASKS if demo else DEFAULT_TASKS))
    check_requirements(tasks)
    loaded = []
    for t in tasks:
        items = t.load(data_dir)
        if args.date_range:
            items = filter_dates(items, args.date_range)
        items = items[:args.limit] if args.limit else items
        if not items:
            raise ValueError(f"{t.name}: no items")
        loaded.append((t, items))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if args.endpoint:
        client = EndpointClient(args.endpoint, api_key=args.api_key or os.environ.get("EXAONE_API_KEY"),
                                served_model=args.served_model)
        kind = "endpoint"
    else:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        client = LocalClient(args.model, concurrency=args.concurrency,
                             dtype=None if args.dtype == "auto" else args.dtype, device=args.device,
                             max_len=args.max_len)
        kind = "in-process"
        threads = args.threads
        n_params = sum(p.numel() for p in client.model.parameters())
        if threads is None and (args.device in (None, "cpu")) and n_params < SMALL_MODEL_PARAMS:
            import torch
            threads = 1  # measured 5-10x faster than the default on 2 cores: tiny matmuls, busy threads
            torch.set_num_threads(threads)
        args.threads = threads
    load_s = time.perf_counter() - t0
    settings = Settings(max_tokens=args.max_tokens, thinking_budget=args.thinking_budget,
                        temperature=args.temperature, top_p=args.top_p, presence_penalty=args.presence_penalty,
                        samples=args.samples, seed=args.seed)
    settings.decoding(0)  # fail fast on out-of-range values (the engine's SamplingParams checks them too)
    try:
        res = run_eval(client, loaded, modes, out, settings, concurrency=args.concurrency,
                       progress=not args.no_progress and sys.stderr.isatty())
    finally:
        client.close()

    per_task = {}
    for t, items in loaded:
        per_task[t.name] = {m: aggregate(t, list(res["records"][(t.name, m)].values()), len(items)) for m in modes}
        for m in modes:
            per_task[t.name][m]["wall_seconds"] = res["runs"][m]["task_wall"].get(t.name)
            per_task[t.name][m]["max_tokens"] = settings.tokens_for(t, m)
    results = {
        "model": client.name, "client": kind, "modes_run": modes,
        "commit": project_commit(), "version": exaone.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"temperature": settings.temperature, "top_p": settings.top_p,
                     "presence_penalty": settings.presence_penalty, "samples": settings.samples, "seed": settings.seed,
                     "max_tokens": settings.max_tokens,
                     "thinking_budget": settings.thinking_budget, "concurrency": args.concurrency,
                     "limit": args.limit, "date_range": args.date_range, "data_dir": str(data_dir) if data_dir else None,
                     "dtype": args.dtype, "device": args.device, "threads": args.threads, "max_len": args.max_len,
                     "sandbox_network_isolation": " ".join(network_isolation()) or "socket guard only"},
        "load_seconds": round(load_s, 3), "runs": res["runs"], "tasks": per_task,
    }
    paths = write_report(results, out, chart=not args.no_chart)
    print(paths["markdown"].read_text(encoding="utf-8"))
    errors = sum(r["errors"] for r in res["runs"].values())
    if errors:
        print(f"{errors} request(s) failed (see {out / 'errors.jsonl'}); rerun to retry them", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 1 if errors else 0
