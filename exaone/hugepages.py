"""Weights in 2 MB pages: fewer TLB misses when a decode step streams every weight once.

A decode step at batch 1 reads ~0.7-5 GB of weights in address order; on 4 KB pages that is one
page walk every 4 KB, and the hardware prefetcher stops at every page boundary. Linux's
transparent huge pages (THP) back a 2 MB-aligned range with one page when the range is asked for
(`madvise(MADV_HUGEPAGE)`, the mode most distributions ship: `[madvise]` in
/sys/kernel/mm/transparent_hugepage/enabled) before anything touches it. torch's allocator does
neither, so weight tensors are allocated here instead: an anonymous mapping
with a 2 MB-aligned start, its whole 2 MB stretches advised before the first write, the tail in
4 KB pages (a partial huge page would be memory for nothing).

Where: every weight of 2 MB or more. `exaone.load` reads a checkpoint's tensors from the file
into `empty` ones (converted ones: `copy`), the packed int8/int4 weights are written into them
(exaone.kernels.qgemm), the benchmarks' random weights are made in them. Measured on the 1.2B
shape, whole engine steps against the same weights in 4 KB pages, paired in one process: fp32
+3 %, bf16 +12 %; the linears alone at a fast moment of the host, fp32 +6 % (docs/kernels.md,
"Huge pages"). The cost is at allocation: the first touch may wait while the kernel compacts
memory into free 2 MB pages (measured 0.05-1.7 s a GiB here).

Only allocation: a tensor from `empty`/`copy` is an ordinary CPU tensor (its storage exactly its
bytes of the mapping, unmapped when the last tensor on it goes). Tensors under 2 MB, systems without THP, THP mode
"never", and EXAONE_HUGEPAGES=0 get torch's allocator.
"""
from __future__ import annotations

import mmap
import os
from functools import lru_cache

import torch

HUGE = 2 << 20  # bytes in one huge page (x86-64, and arm64 with 4 KB base pages)
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


@lru_cache(maxsize=1)
def _thp_mode() -> str | None:
    """The selected THP mode ("always", "madvise", "never"), None where there is no THP."""
    try:
        with open(_THP) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def enabled() -> bool:
    """True when new weight tensors go to 2 MB-aligned, MADV_HUGEPAGE-advised mappings."""
    if os.environ.get("EXAONE_HUGEPAGES", "") in ("0", "off", "false"):
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and _thp_mode() in ("always", "madvise")


def _wanted(nbytes: int) -> bool:
    return nbytes >= HUGE and enabled()


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, in 2 MB pages when `enabled()` and it spans at least one."""
    shape = tuple(shape)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if not _wanted(nbytes):
        return torch.empty(shape, dtype=dtype)
    # The kernel picks the mapping's start (4 KB-aligned); map HUGE more and start at the first 2 MB
    # boundary. The slack before it is never touched, so it never gets memory.
    m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    off = -torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr() % HUGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, off, nbytes // HUGE * HUGE)
    except OSError:  # a kernel without THP for anonymous memory: still correct, 4 KB pages
        pass
    # A storage of exactly nbytes (what safetensors and copies see) that holds the mapping: it is
    # unmapped when the last tensor on it goes.
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=off).view(dtype).view(shape)


def copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` as `dtype` (default: its own) in 2 MB pages where `empty` would give them; otherwise
    `t.to(dtype)` (so `t` itself when nothing changes). CPU tensors only; others go through `.to`."""
    dtype = dtype or t.dtype
    if t.device.type != "cpu" or not _wanted(t.numel() * dtype.itemsize):
        return t.to(dtype)
    return empty(t.shape, dtype).copy_(t)


def in_huge_pages(t: torch.Tensor) -> bool:
    """Whether `t`'s memory lies in a mapping advised for huge pages ("hg" in /proc/self/smaps)
    and starts on a 2 MB boundary: what `empty` promises, checked against the kernel's own record."""
    addr = t.data_ptr()
    if addr % HUGE:
        return False
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "VmFlags:":
                    return "hg" in line.split()[1:]
    except OSError:
        pass
    return False


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim() -> None:
    """Hand the C heap's free memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Quantizing frees many tens-of-MB temporaries; glibc keeps them in its heap (its mmap threshold
    rises to 32 MB as big blocks are freed), and with the packed weights no longer carved from that
    heap it stayed there: quantizing the 1.2B shape to int8 left RSS at 3.25 GB, 1.93 after a trim."""
    f = _malloc_trim()
    if f is not None:
        f(0)
