"""Reasoning vs non-reasoning, measured: held-out accuracy and generated tokens per task and mode.

    python -m exaone.train.report [--model DIR] [--n 50] [--json out.json]

Uses only the public API, as an outside user would: `exaone.load`, `exaone.load_tokenizer`, the
chat template with `enable_thinking`, and greedy `exaone.generate.generate`. The problems are the
fixed held-out split of data.py (never seen in training), scored by answer key. Prints a markdown
table. This module must not train or change the model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

MAX_TOKENS = {True: 256, False: 48}


def evaluate(model, tokenizer, tasks, n: int, seed: int = 1234, langs=None, on_result=None) -> list[dict]:
    """One row per (task, mode): accuracy, mean generated tokens, and the count of problems."""
    from exaone.generate import generate

    from . import data

    stop = [tokenizer.convert_tokens_to_ids("[|endofturn|]")]
    rows = []
    for task in tasks:
        problems = data.heldout_examples(task, n, seed=seed)
        for thinking in (True, False):
            correct, gen_tokens, t0 = 0, 0, time.time()
            for ex in problems:
                prompt = tokenizer.apply_chat_template(ex.messages(), add_generation_prompt=True,
                                                       enable_thinking=thinking)
                out = generate(model, prompt, max_tokens=MAX_TOKENS[thinking], stop_ids=stop)
                gen_tokens += len(out)
                ok = data.score(ex, tokenizer.decode(out))
                correct += ok
                if on_result:
                    on_result(ex, thinking, tokenizer.decode(out), ok)
            rows.append({"task": task, "mode": "reasoning" if thinking else "non-reasoning", "n": len(problems),
                         "accuracy": correct / len(problems), "avg_tokens": gen_tokens / len(problems),
                         "seconds": round(time.time() - t0, 1)})
    return rows


TASK_NAMES = {"add": "addition (2-4 digit)", "sub": "subtraction (3-4 digit)", "mul": "multiplication (3-digit × 1-digit)",
              "cmp": "compare decimals", "count": "count a letter", "sort": "sort 3-6 numbers",
              "word": "word problems / units"}


def markdown(rows: list[dict]) -> str:
    by = {(r["task"], r["mode"]): r for r in rows}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = ["| task | n | reasoning acc | non-reasoning acc | reasoning tokens | non-reasoning tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in tasks:
        r, d = by[(t, "reasoning")], by[(t, "non-reasoning")]
        lines.append(f"| {TASK_NAMES.get(t, t)} | {r['n']} | {r['accuracy']:.0%} | {d['accuracy']:.0%} | "
                     f"{r['avg_tokens']:.1f} | {d['avg_tokens']:.1f} |")
    mean = lambda mode, k: sum(by[(t, mode)][k] for t in tasks) / len(tasks)  # noqa: E731
    lines.append(f"| **mean** | | **{mean('reasoning', 'accuracy'):.0%}** | **{mean('non-reasoning', 'accuracy'):.0%}** | "
                 f"{mean('reasoning', 'avg_tokens'):.1f} | {mean('non-reasoning', 'avg_tokens'):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    import exaone

    from . import data

    p = argparse.ArgumentParser(prog="python -m exaone.train.report", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded exaone-4.0-nano)")
    p.add_argument("--n", type=int, default=50, help="held-out problems per task")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tasks", default=",".join(data.EVAL_TASKS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--verbose", action="store_true", help="print every answer")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = exaone.load(args.model)
    path = args.model or str(exaone.loader.default_model_path())
    tokenizer = exaone.load_tokenizer(path)

    def show(ex, thinking, text, ok):
        if args.verbose:
            print(f"[{'think' if thinking else 'direct'}] {'OK ' if ok else 'BAD'} {ex.question!r} -> {text!r}",
                  file=sys.stderr)

    t0 = time.time()
    rows = evaluate(model, tokenizer, args.tasks.split(","), args.n, seed=args.seed, on_result=show)
    print(markdown(rows))
    print(f"\nmodel {path}; {args.n} held-out problems per task (seed {args.seed}); greedy; "
          f"{time.time() - t0:.0f} s on {torch.get_num_threads()} thread(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path, "n": args.n, "seed": args.seed, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
