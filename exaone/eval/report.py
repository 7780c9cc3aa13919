"""Results -> a markdown table in the model card's layout, and a PNG chart comparing the modes.

Rows are benchmarks (the card's names), columns are modes (Reasoning | Non-Reasoning), cells
are the task's metric in percent; below the benchmarks, average generated tokens (reasoning
tokens in parentheses) and wall time per mode. A header block records model, commit, date and
settings, so a table never travels without its provenance. matplotlib is imported only by
`write_chart`, and a missing matplotlib only skips the chart. Must not import torch.
"""
from __future__ import annotations

import json
from pathlib import Path

from .tasks import CATEGORIES

# EXAONE 4.0 32B, the launch announcement's headline numbers (shared/research/exaone4-facts.md),
# shown under the table for orientation only: other model, other decoding, other data versions.
PUBLISHED_32B = {"mmlu_redux": 92.3, "mmlu_pro": 81.8, "livecodebench": 66.7, "gpqa_diamond": 75.4,
                 "aime2025": 85.3, "ifeval": 83.7}

MODE_TITLES = {"reasoning": "Reasoning", "non-reasoning": "Non-Reasoning"}


def _fmt(v, digits=1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(results: dict) -> str:
    modes = results["modes_run"]
    tasks = results["tasks"]
    lines = [f"# Evaluation: {results['model']}", "",
             f"- commit: `{results['commit']}` (exaone {results['version']})",
             f"- date: {results['date']}",
             f"- client: {results['client']}; concurrency {results['settings']['concurrency']}; "
             f"temperature {results['settings']['temperature']}"
             + (f", top-p {results['settings']['top_p']}, {results['settings']['samples']} sample(s) per item"
                if results['settings'].get('temperature') else " (greedy)") + "; max tokens "
             f"{results['settings']['max_tokens'] or 'task default'}; thinking budget "
             f"{results['settings']['thinking_budget'] if results['settings']['thinking_budget'] is not None else 'none'}; "
             f"limit {results['settings']['limit'] or 'none'}",
             "", "| Benchmark | " + " | ".join(MODE_TITLES.get(m, m) for m in modes) + " |",
             "|---|" + "---:|" * len(modes)]
    order = {c: i for i, c in enumerate(CATEGORIES)}
    rows = sorted(tasks.items(), key=lambda kv: order.get(next(iter(kv[1].values())).get("category"), len(order)))
    current = None
    for name, per_mode in rows:  # sorted() is stable: the run's task order within a group
        first = next(iter(per_mode.values()))
        if first.get("category") != current:
            current = first.get("category")
            lines.append(f"| ***{current}*** |" + " |" * len(modes))
        label = f"{first['title']} ({first['metric']})"
        cells = []
        for m in modes:
            r = per_mode.get(m)
            if r is None or r["score"] is None:
                cells.append("–")
                continue
            partial = "" if r["n"] == r["n_items"] else f" ({r['n']}/{r['n_items']})"
            cells.append(_fmt(r["score"]) + partial)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tok, rtok, wall = [], [], []
    for m in modes:
        rs = [pm[m] for pm in tasks.values() if m in pm and pm[m]["n"]]
        n = sum(r["n"] for r in rs)
        weighted = lambda k: (sum(r[k] * r["n"] for r in rs if r[k] is not None) / n) if n else None
        tok.append(_fmt(weighted("avg_completion_tokens"), 0))
        rtok.append(_fmt(weighted("avg_reasoning_tokens"), 0))
        wall.append(_fmt(results["runs"].get(m, {}).get("wall_seconds"), 1))
    lines.append("| *avg generated tokens (reasoning)* | " +
                 " | ".join(f"{t} ({r})" for t, r in zip(tok, rtok)) + " |")
    lines.append("| *wall time this run, s* | " + " | ".join(wall) + " |")
    gen = [str(results["runs"].get(m, {}).get("generated", 0)) + "/" +
           str(results["runs"].get(m, {}).get("generated", 0) + results["runs"].get(m, {}).get("cached", 0))
           for m in modes]
    lines.append("| *items generated this run / total* | " + " | ".join(gen) + " |")
    errs = [results["runs"].get(m, {}).get("errors", 0) for m in modes]
    if any(errs):
        lines.append("| *failed requests (retried on rerun)* | " + " | ".join(map(str, errs)) + " |")
    lines.append("")
    ife = [(m, pm[m]) for pm in tasks.values() for m in modes if m in pm and "prompt_loose" in pm[m]]
    if ife:
        lines += ["IFEval detail (prompt strict / prompt loose / instruction strict / instruction loose):", ""]
        lines += [f"- {MODE_TITLES.get(m, m)}: {_fmt(r['prompt_strict'])} / {_fmt(r['prompt_loose'])} / "
                  f"{_fmt(r['inst_strict'])} / {_fmt(r['inst_loose'])}" for m, r in ife]
        lines.append("")
    ref = [(tasks[n][next(iter(tasks[n]))]["title"], v) for n, v in PUBLISHED_32B.items() if n in tasks]
    if ref:
        lines.append("For orientation, EXAONE 4.0 32B's launch headline numbers (LiveCodeBench v6, AIME 2025): "
                     + ", ".join(f"{t} {v}" for t, v in ref) + ".")
        lines.append("")
    trunc = [(name, m, r["truncated"], r["n"]) for name, pm in tasks.items() for m, r in pm.items() if r["truncated"]]
    if trunc:
        lines.append("Hit the token limit: " + ", ".join(f"{n} {MODE_TITLES.get(m, m)} {t}/{k}" for n, m, t, k in trunc))
        lines.append("")
    return "\n".join(lines)


def write_chart(results: dict, path: Path) -> Path | None:
    """Two panels of grouped bars (one group per benchmark, one bar per mode): the score, and
    the average generated tokens (what the score costs). None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = results["modes_run"]
    names = list(results["tasks"])
    titles = [next(iter(results["tasks"][n].values()))["title"] for n in names]
    width = 0.8 / max(1, len(modes))
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.0 * len(names) + 3), 4.2))
    colors = {"reasoning": "#a50034", "non-reasoning": "#7f7f7f"}
    for ax, key, ylabel, fmt in ((axes[0], "score", "score (%)", "%.1f"),
                                 (axes[1], "avg_completion_tokens", "avg generated tokens", "%.0f")):
        for k, m in enumerate(modes):
            vals = [(results["tasks"][n].get(m) or {}).get(key) or 0.0 for n in names]
            xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(names))]
            bars = ax.bar(xs, vals, width, label=MODE_TITLES.get(m, m), color=colors.get(m))
            ax.bar_label(bars, fmt=fmt, fontsize=7, padding=1)
        ax.set_xticks(range(len(names)), titles, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15)
    axes[0].set_ylim(0, 105)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(str(results['model'])).name}: reasoning vs non-reasoning", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: Path, chart: bool = True) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(results) + "\n", encoding="utf-8")
    if chart:
        png = write_chart(results, out_dir / "results.png")
        if png is not None:
            paths["chart"] = png
    return paths
