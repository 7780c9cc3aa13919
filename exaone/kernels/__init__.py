"""Optional C++ CPU kernels, compiled on first use with torch's JIT extension loader.

`bf16_linear(x, w)`: bfloat16 x @ w.T with fp32 accumulation for CPUs with AVX-512 but no
native bf16 GEMM (no avx512_bf16 / AMX), where oneDNN's bf16 GEMM is slow; see docs/kernels.md.

The source (bf16_gemm.cpp, shipped as package data) is built by `torch.utils.cpp_extension.load`
the first time `available()` is asked, not at import, and cached in the torch extensions
directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); see `_ext.Extension` for
the build, the switch EXAONE_NO_KERNELS=1 and the fallbacks. This module must not decide when
the kernel pays: model.Linear does, from measurements.
"""
from __future__ import annotations

import math

import torch

from ._ext import Extension, clear_stale_lock

__all__ = ["available", "bf16_linear", "disabled_reason", "BF16"]

BF16 = Extension("exaone_bf16_gemm", "bf16_gemm.cpp")


def disabled_reason() -> str | None:
    """Why the bf16 kernel is unavailable (after `available()` said so), else None."""
    return BF16.reason


def available() -> bool:
    """True when the bf16 kernel is built and usable here; builds it on the first call (~1 min)."""
    return BF16.available()


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) bfloat16 @ w (N, K).T -> (..., N) bfloat16; fp32 accumulation, one rounding.

    w must be a contiguous 2-D bfloat16 CPU tensor; x is made row-contiguous if it is not.
    """
    if not available():
        raise RuntimeError(f"exaone kernels are unavailable: {BF16.reason}")
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise TypeError(f"bf16_linear needs bfloat16 x and w, got {x.dtype} and {w.dtype}")
    if x.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError(f"bf16_linear runs on CPU tensors, got {x.device} and {w.device}")
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"bf16_linear needs x (..., K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError("bf16_linear needs a contiguous weight (call .contiguous() once, not per step)")
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return BF16.module.bf16_linear(x2, w).view(*x.shape[:-1], w.shape[0])
