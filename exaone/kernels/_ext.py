"""One lazily built C++ extension: compiled on first use by torch's JIT loader, cached on disk.

`Extension(name, source, flags)` holds one source file's state: `available()` builds it the first
time it is asked (not at import), `module` is the loaded module or None, `reason` says why not.
If the CPU lacks AVX-512, EXAONE_NO_KERNELS=1 is set, or the build fails (no compiler, no
ninja), `available()` is False, a failed build warns once, and callers keep their torch path.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from pathlib import Path

import torch

# -ffp-contract=off: a multiply and an add stay two roundings (the reference's), never one FMA unless written.
BASE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-ffp-contract=off", "-fopenmp"]
_STALE_LOCK_S = 600  # a build takes about a minute; a lock this old belongs to a dead process


def cpu_reason(extra_flags: tuple[str, ...] = ()) -> str | None:
    """Why no kernel can run here (environment switch or instruction set), else None."""
    if os.environ.get("EXAONE_NO_KERNELS", "") not in ("", "0"):
        return "EXAONE_NO_KERNELS is set"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return f"the CPU lacks AVX-512 (torch reports {capability})"
    if "-mavx512vnni" in extra_flags and not _cpu_has("avx512_vnni"):
        return "the CPU lacks AVX-512 VNNI"
    return None


def cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo ("" if absent), None where it cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines
                 if ":" in line and line.split(":", 1)[0].strip() == field), "")


def _cpu_has(flag: str) -> bool:
    flags = cpuinfo("flags")
    return True if flags is None else flag in flags.split()  # not Linux: trust the compiler and torch


def clear_stale_lock(name: str) -> None:
    """A build killed midway leaves its lock file, and torch would then wait for it forever."""
    from torch.utils.cpp_extension import _get_build_directory
    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass


class Extension:
    def __init__(self, name: str, source: str, flags: list[str] | None = None):
        self.name, self.source = name, Path(__file__).with_name(source)
        self.flags = list(BASE_FLAGS if flags is None else flags)
        self.module = None
        self.reason: str | None = None  # why it is off; None until the first available()
        self.tried = False
        self._lock = threading.Lock()

    def build(self, name: str | None = None, defines: tuple[str, ...] = ()):
        """Compile (or load from the cache); `name` and `defines` (e.g. "EXAONE_MB=8") for tuning."""
        from torch.utils.cpp_extension import load
        # One build directory per torch install: two pythons sharing ~/.cache would rebuild in turn.
        tag = hashlib.sha1(f"{torch.__version__} {Path(torch.__file__).parent}".encode()).hexdigest()[:8]
        full = f"{name or self.name}_{tag}"
        clear_stale_lock(full)
        return load(name=full, sources=[str(self.source)], extra_cflags=self.flags + [f"-D{d}" for d in defines],
                    extra_ldflags=["-fopenmp"], verbose=False)

    def available(self, build=None) -> bool:
        """True when the extension is built and usable here; builds it on the first call (~1 min)."""
        if self.tried:
            return self.module is not None
        with self._lock:  # the engine's worker thread and the main thread may both ask first
            if self.tried:
                return self.module is not None
            self.module, self.reason = None, cpu_reason(tuple(self.flags))
            if self.reason is None:
                try:
                    self.module = (build or self.build)()
                except Exception as e:  # no compiler, no ninja, or a compile error: keep torch's path
                    self.reason = f"building {self.source.name} failed: {type(e).__name__}: {str(e).strip()[-500:]}"
                    warnings.warn(f"exaone: CPU kernel {self.source.name} unavailable, using the slower torch "
                                  f"path ({self.reason}). Set EXAONE_NO_KERNELS=1 to skip the build.",
                                  RuntimeWarning, stacklevel=3)
            self.tried = True
            return self.module is not None

    def reset(self) -> None:
        """Forget the outcome of the last `available()` (tests, or after changing the environment)."""
        self.module, self.reason, self.tried = None, None, False
