"""`exaone bench`'s peak-RSS cells: each child process reports its own high-water mark."""
from __future__ import annotations

import argparse

import torch

from exaone.commands.bench import _measure_memory, add_arguments, bench_config, peak_rss_bytes


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_peak_rss_is_each_childs_own_not_the_parents():
    # One layer of the 1.2B shape: ~1.0 GB of fp32 weights (mostly the 102400 x 2048 embedding).
    args = _args("--layers", "1", "--prompt-len", "8", "--context", "4", "--batches", "1", "--threads", "1")
    cfg = bench_config(1)
    fp32_weights = 4 * (cfg.vocab_size * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size)
    # Make this process's peak larger than any child's: ru_maxrss would hand it down through exec.
    ballast = torch.ones(int(1.6e9) // 4)
    parent = peak_rss_bytes()
    assert parent > 1.6e9
    fp32 = _measure_memory(args, ["ours"], "float32")["ours"]
    bf16 = _measure_memory(args, ["ours"], "bfloat16")["ours"]
    del ballast
    assert fp32_weights < fp32 < parent, (fp32, parent)
    # bf16 weights are half the bytes; the rest (torch itself, the random pool) is the same in both.
    assert fp32 - bf16 > 0.4 * fp32_weights, (fp32, bf16)
