"""Optional C++ CPU kernels, compiled on first use with torch's JIT extension loader.

`bf16_linear(x, w)`: bfloat16 x @ w.T with fp32 accumulation for CPUs with AVX-512 but no
native bf16 GEMM (no avx512_bf16 / AMX), where oneDNN's bf16 GEMM is slow; see docs/kernels.md.

The source (bf16_gemm.cpp, shipped as package data) is built by `torch.utils.cpp_extension.load`
the first time `available()` is asked, not at import, and cached in the torch extensions
directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). If the CPU lacks AVX-512,
EXAONE_NO_KERNELS=1 is set, or the build fails (no compiler, no ninja), `available()` is False
and callers keep their torch path; a failed build warns once. This module must not decide when
the kernel pays: model.Linear does, from measurements.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["available", "bf16_linear", "disabled_reason"]

_SOURCE = Path(__file__).with_name("bf16_gemm.cpp")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp"]
_STALE_LOCK_S = 600  # a build takes about a minute; a lock this old belongs to a dead process
_lock = threading.Lock()
_module = None
_reason: str | None = None  # why the kernels are off; None until the first available()
_tried = False


def disabled_reason() -> str | None:
    """Why the kernels are unavailable (after `available()` said so), else None."""
    return _reason


def _cpu_reason() -> str | None:
    if os.environ.get("EXAONE_NO_KERNELS", "") not in ("", "0"):
        return "EXAONE_NO_KERNELS is set"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return f"the CPU lacks AVX-512 (torch reports {capability})"
    return None


def _clear_stale_lock(name: str) -> None:
    """A build killed midway leaves its lock file, and torch would then wait for it forever."""
    from torch.utils.cpp_extension import _get_build_directory
    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass


def _build(name: str = "exaone_bf16_gemm", defines: tuple[str, ...] = ()):
    """Compile (or load from the cache) the extension; `defines` (e.g. "EXAONE_MB=8") for tuning."""
    from torch.utils.cpp_extension import load
    # One build directory per torch install: two pythons sharing ~/.cache would rebuild in turn.
    tag = hashlib.sha1(f"{torch.__version__} {Path(torch.__file__).parent}".encode()).hexdigest()[:8]
    _clear_stale_lock(f"{name}_{tag}")
    return load(name=f"{name}_{tag}", sources=[str(_SOURCE)], extra_cflags=_FLAGS + [f"-D{d}" for d in defines],
                extra_ldflags=["-fopenmp"], verbose=False)


def available() -> bool:
    """True when the kernel is built and usable here; builds it on the first call (~1 min)."""
    global _module, _reason, _tried
    if _tried:
        return _module is not None
    with _lock:  # the engine's worker thread and the main thread may both ask first
        if _tried:
            return _module is not None
        _module, _reason = None, _cpu_reason()
        if _reason is None:
            try:
                _module = _build()
            except Exception as e:  # no compiler, no ninja, or a compile error: keep torch's path
                _reason = f"building {_SOURCE.name} failed: {type(e).__name__}: {str(e).strip()[-500:]}"
                warnings.warn(f"exaone: bf16 CPU kernel unavailable, using the slower torch path ({_reason}). "
                              "Set EXAONE_NO_KERNELS=1 to skip the build.", RuntimeWarning, stacklevel=2)
        _tried = True
        return _module is not None


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) bfloat16 @ w (N, K).T -> (..., N) bfloat16; fp32 accumulation, one rounding.

    w must be a contiguous 2-D bfloat16 CPU tensor; x is made row-contiguous if it is not.
    """
    if not available():
        raise RuntimeError(f"exaone kernels are unavailable: {_reason}")
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
    return _module.bf16_linear(x2, w).view(*x.shape[:-1], w.shape[0])
