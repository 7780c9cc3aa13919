"""Optional C++ CPU kernels, compiled on first use with torch's JIT extension loader.

`f32_linear(x, w)` and `bf16_linear(x, w)`: x @ w.T for a few to ~128 rows of x, where torch's
CPU GEMMs are slow (MKL's fp32 GEMM for 2..64 rows; oneDNN's bf16 GEMM on CPUs without
avx512_bf16 / AMX). fp32 accumulation; see docs/kernels.md. `argmax(x)`: torch.argmax over rows.
The model reaches the module's other functions (fused norms, RoPE, decode attention) directly.

The source (gemm.cpp, shipped as package data) is built by `torch.utils.cpp_extension.load`
the first time `available()` is asked, not at import, and cached in the torch extensions
directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); see `_ext.Extension` for
the build, the switch EXAONE_NO_KERNELS=1 and the fallbacks. This module must not decide when
the kernel pays: model.Linear does, from measurements.
"""
from __future__ import annotations

import math

import torch

from ._ext import Extension, clear_stale_lock

__all__ = ["argmax", "available", "bf16_linear", "disabled_reason", "f32_linear", "GEMM"]

GEMM = Extension("exaone_gemm", "gemm.cpp")


def disabled_reason() -> str | None:
    """Why the kernels are unavailable (after `available()` said so), else None."""
    return GEMM.reason


def available() -> bool:
    """True when the kernels are built and usable here; builds them on the first call (~1 min)."""
    return GEMM.available()


def f32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) float32 @ w (N, K).T -> (..., N) float32.

    w must be a contiguous 2-D float32 CPU tensor; x is made row-contiguous if it is not.
    """
    return _linear("f32_linear", torch.float32, x, w)


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) bfloat16 @ w (N, K).T -> (..., N) bfloat16; fp32 accumulation, one rounding.

    w must be a contiguous 2-D bfloat16 CPU tensor; x is made row-contiguous if it is not.
    """
    return _linear("bf16_linear", torch.bfloat16, x, w)


def argmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """torch.argmax(x, dim) (first index of the maximum; NaN counts as the maximum), through the
    kernel for float32 / bfloat16 CPU rows when something else built it (it never builds it here):
    torch's reduction takes 0.1-0.4 ms over a 102400-token vocabulary row, the kernel ~0.01 ms."""
    if (GEMM.module is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16)
            or x.dim() not in (1, 2) or dim not in (-1, x.dim() - 1) or x.shape[-1] == 0 or x.stride(-1) != 1
            or torch.compiler.is_compiling()):
        return torch.argmax(x, dim)
    out = GEMM.module.argmax(x if x.dim() == 2 else x[None])
    return out if x.dim() == 2 else out[0]


def _linear(name: str, dtype: torch.dtype, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if not available():
        raise RuntimeError(f"exaone kernels are unavailable: {GEMM.reason}")
    if x.dtype != dtype or w.dtype != dtype:
        raise TypeError(f"{name} needs {str(dtype)[6:]} x and w, got {x.dtype} and {w.dtype}")
    if x.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError(f"{name} runs on CPU tensors, got {x.device} and {w.device}")
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{name} needs x (..., K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError(f"{name} needs a contiguous weight (call .contiguous() once, not per step)")
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return getattr(GEMM.module, name)(x2, w).view(*x.shape[:-1], w.shape[0])
