"""bf16 x @ w.T on the EXAONE-4.0-1.2B shape's matrices: exaone.kernels against torch's paths.

    python bench/bench_kernels.py [--threads 2] [--rows 1,2,4,8,16,32,64,127,128,256,512]
        [--mats qo,kv,gate_up,down,lm_head] [--methods ours,linear,mv,upcast,model] [--budget 0.5]
        [--tune 4x4,8x2]

For each weight (N, K) of random bf16 and each number of rows M of x, the median ms per call
and the GB/s of weight read (N * K * 2 bytes per call) of:
  ours    exaone.kernels.bf16_linear(x, w)      (AVX-512, bf16 widened in registers)
  linear  F.linear(x, w) in bf16                (oneDNN; slow without avx512_bf16 / AMX; M < 128
                                                only: from there Linear upcasts, and it takes seconds)
  mv      torch.mv(w, x[0])                     (M = 1 only)
  upcast  exaone.model.Linear.upcast(x, w)      (fp32 GEMM on the weight upcast slice by slice)
  model   exaone.model.Linear as wired          (the route the model takes for this M)
Each cell runs one warm-up call, then calls until `--budget` seconds (at least 3) and reports
the median; `--tune MBxNB[pKB],...` adds an `ours` column per register blocking (and weight
panel size in KiB, p0 = one register block), each built once.
Run on an otherwise idle machine: the numbers are only comparable within one run.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

import torch
import torch.nn.functional as F

from exaone import kernels
from exaone.model import Linear

MATS = {  # name: (N, K) of the 1.2B shape (hidden 2048, 32 x 64 q heads, 8 x 64 kv, mlp 4096)
    "qo": (2048, 2048), "kv": (512, 2048), "gate_up": (4096, 2048), "down": (2048, 4096), "lm_head": (102400, 2048),
}


def _median_s(fn, budget: float) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _methods(names: list[str], tune: list[str]) -> dict:
    out = {}
    for name in names:
        if name == "ours":
            out[name] = kernels.bf16_linear
        elif name == "linear":
            out[name] = F.linear
        elif name == "mv":
            out[name] = lambda x, w: torch.mv(w, x[0]) if x.shape[0] == 1 else None
        elif name == "upcast":
            out[name] = Linear.upcast
        elif name == "model":
            out[name] = None  # a Linear per matrix, built in main
        else:
            raise SystemExit(f"unknown method {name!r}; choose from ours, linear, mv, upcast, model")
    for blocking in tune:  # MBxNB[pKB]: register block, weight panel in KiB
        found = re.fullmatch(r"(\d+)x(\d+)(?:p(\d+))?", blocking)
        if not found:
            raise SystemExit(f"--tune wants MBxNB or MBxNBpKB, got {blocking!r}")
        mb, nb, kb = found.groups()
        defines = (f"EXAONE_MB={mb}", f"EXAONE_NB={nb}") + ((f"EXAONE_PANEL_KB={kb}",) if kb else ())
        out[f"ours{blocking}"] = kernels.BF16.build(f"exaone_bf16_gemm_{blocking}", defines).bf16_linear
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,127,128,256,512")
    ap.add_argument("--mats", default=",".join(MATS))
    ap.add_argument("--methods", default="ours,linear,mv,upcast,model")
    ap.add_argument("--tune", default="", help="extra blockings MBxNB[pKB] to build and time, e.g. 8x2,4x4p0")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of calls per cell (at least 3 calls)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"exaone kernels unavailable: {kernels.disabled_reason()}")
    methods = _methods(args.methods.split(","), [t for t in args.tune.split(",") if t])
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}; "
          "ms per call (GB/s of bf16 weight read), median")
    print("| matrix | N x K | M | " + " | ".join(methods) + " | fastest |")
    print("|---|---|---|" + "---|" * (len(methods) + 1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mat in args.mats.split(","):
            n, k = MATS[mat]
            w = torch.randn(n, k, generator=gen).bfloat16()
            model = Linear(k, n, bias=False)
            model.weight = torch.nn.Parameter(w, requires_grad=False)
            for m in rows:
                x = torch.randn(m, k, generator=gen).bfloat16()
                cells = {}
                for name, fn in methods.items():
                    if (name == "mv" and m != 1) or (name == "linear" and m >= 128):
                        continue
                    call = (lambda: model(x)) if name == "model" else (lambda fn=fn: fn(x, w))
                    cells[name] = _median_s(call, args.budget)
                shown = [f"{cells[c] * 1e3:.2f} ({n * k * 2 / cells[c] / 1e9:.1f})" if c in cells else "" for c in methods]
                best = min((c for c in cells if c != "model"), key=cells.get)
                print(f"| {mat} | {n} x {k} | {m} | " + " | ".join(shown) + f" | {best} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
