"""Decode attention (one query per row) on the 1.2B shape's heads: exaone.kernels' decode_attention
against torch's fused scaled_dot_product_attention and the two-GEMM `cache.matmul_attention`.

    python bench/bench_attention.py [--threads 2] [--cases 1x48,1x512,1x4096,16x48,16x512] [--cold]

Microseconds per layer call (median), 32 query heads over 8 kv heads of 64, float32 and bfloat16;
each case is ROWSxKEYS. `--cold` reads a 128 MB buffer before every timed call, as a decode
step's weight stream does between two layers' attention, so k and v come from memory rather than
from the caches (the case decode meets). Run on an otherwise idle machine: numbers compare only
within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from exaone import kernels
from exaone.cache import matmul_attention


def _median_us(fn, calls: int = 50, before=None) -> float:
    fn()
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="1x48,1x512,1x4096,16x48,16x512")
    ap.add_argument("--cold", action="store_true", help="evict k and v (a 128 MB read) before every timed call")
    args = ap.parse_args(argv)
    sweep = torch.ones(1 << 25) if args.cold else None
    before = (lambda: sweep.sum()) if args.cold else None
    calls = 20 if args.cold else 50
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"exaone kernels unavailable: {kernels.disabled_reason()}")
    print("| dtype | rows x keys | kernel | two GEMMs | fused sdpa |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for case in args.cases.split(","):
            B, L = (int(v) for v in case.split("x"))
            q = torch.randn(B, 32, 1, 64).to(dtype)
            k, v = torch.randn(B, 8, L, 64).to(dtype), torch.randn(B, 8, L, 64).to(dtype)
            lengths = torch.full((B,), L)
            with torch.inference_mode():
                ours = _median_us(lambda: kernels.GEMM.module.decode_attention(q[:, :, 0], k, v, lengths, 0.125),
                                  calls, before)
                gemms = _median_us(lambda: matmul_attention(q, k, v, None), calls, before)
                fused = _median_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), calls, before)
            print(f"| {str(dtype)[6:]} | {B} x {L} | {ours:.0f} | {gemms:.0f} | {fused:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
