"""x @ w.T on the EXAONE-4.0-1.2B shape's matrices, fp32 or bf16: exaone.kernels against torch's paths.

    python bench/bench_kernels.py [--dtype bfloat16|float32] [--threads 2]
        [--rows 1,2,4,8,16,32,64,127,128,256,512] [--mats qo,kv,gate_up,down,lm_head]
        [--methods ours,linear,onednn,mv,upcast,model] [--budget 0.5] [--tune "KC=512 KC=2048,WIDEN_ROWS=3"]

For each weight (N, K) of random values in --dtype and each number of rows M of x, the median
ms per call, the GB/s of weight read (N * K * element size per call) and the GFLOP/s (2 M N K) of:
  ours    exaone.kernels.f32_linear / bf16_linear(x, w)
  linear  F.linear(x, w)                        (MKL for fp32; oneDNN for bf16, slow without
                                                avx512_bf16 / AMX, so M < 128 only there)
  onednn  torch.ops.mkldnn._linear_pointwise    (oneDNN's GEMM; Linear's fp32 route from 32 rows
                                                on non-Intel CPUs, where MKL is slow)
  mv      torch.mv(w, x[0])                     (M = 1 only)
  upcast  exaone.model.Linear.upcast(x, w)      (bf16 only: fp32 GEMM on the weight upcast slice by slice)
  model   exaone.model.Linear as wired          (the route the model takes for this M)
Each cell runs one warm-up call, then calls until `--budget` seconds (at least 3) and reports
the median; `--tune` adds an `ours` column per variant (space-separated; each a comma-separated
list of gemm.cpp settings without the EXAONE_ prefix: KC, WIDEN_ROWS, PF_HINT), each built once.
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


def _methods(names: list[str], tune: list[str], dtype: torch.dtype) -> dict:
    ours = kernels.f32_linear if dtype is torch.float32 else kernels.bf16_linear
    out = {}
    for name in names:
        if name == "ours":
            out[name] = ours
        elif name == "linear":
            out[name] = F.linear
        elif name == "mv":
            out[name] = lambda x, w: torch.mv(w, x[0]) if x.shape[0] == 1 else None
        elif name == "onednn":
            out[name] = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        elif name == "upcast" and dtype is torch.bfloat16:
            out[name] = Linear.upcast
        elif name == "model":
            out[name] = None  # a Linear per matrix, built in main
        elif name != "upcast":
            raise SystemExit(f"unknown method {name!r}; choose from ours, linear, onednn, mv, upcast, model")
    for variant in tune:
        if not re.fullmatch(r"[A-Z_]+=\w+(,[A-Z_]+=\w+)*", variant):
            raise SystemExit(f"--tune wants NAME=VALUE[,NAME=VALUE] per variant, got {variant!r}")
        defines = tuple(f"EXAONE_{d}" for d in variant.split(","))
        module = kernels.GEMM.build("exaone_gemm_" + re.sub(r"\W", "", variant.replace(",", "_")), defines)
        out[f"ours {variant}"] = getattr(module, ours.__name__)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,127,128,256,512")
    ap.add_argument("--mats", default=",".join(MATS))
    ap.add_argument("--methods", default="ours,linear,mv,upcast,model")
    ap.add_argument("--tune", default="", help="gemm.cpp variants to build and time, e.g. 'KC=512 KC=2048,WIDEN_ROWS=3'")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of calls per cell (at least 3 calls)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"exaone kernels unavailable: {kernels.disabled_reason()}")
    dtype = getattr(torch, args.dtype)
    methods = _methods(args.methods.split(","), args.tune.split(), dtype)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}; "
          f"{args.dtype}; ms per call (GB/s of weight read, GFLOP/s), median")
    print("| matrix | N x K | M | " + " | ".join(methods) + " | fastest |")
    print("|---|---|---|" + "---|" * (len(methods) + 1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mat in args.mats.split(","):
            n, k = MATS[mat]
            w = torch.randn(n, k, generator=gen).to(dtype)
            model = Linear(k, n, bias=False)
            model.weight = torch.nn.Parameter(w, requires_grad=False)
            for m in rows:
                x = torch.randn(m, k, generator=gen).to(dtype)
                cells = {}
                for name, fn in methods.items():
                    if (name == "mv" and m != 1) or (name == "linear" and m >= 128 and dtype is torch.bfloat16):
                        continue
                    call = (lambda: model(x)) if name == "model" else (lambda fn=fn: fn(x, w))
                    cells[name] = _median_s(call, args.budget)
                shown = [f"{cells[c] * 1e3:.2f} ({n * k * w.element_size() / cells[c] / 1e9:.1f}, "
                         f"{2 * m * n * k / cells[c] / 1e9:.0f})" if c in cells else "" for c in methods]
                best = min((c for c in cells if c != "model"), key=cells.get)
                print(f"| {mat} | {n} x {k} | {m} | " + " | ".join(shown) + f" | {best} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
