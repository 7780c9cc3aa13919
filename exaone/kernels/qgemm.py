"""int8 / int4 weight x int8 activation linears on AVX-512 VNNI (qgemm.cpp), with their weight layouts.

    w8 = pack_int8(q)            q int8 (N, K), w = q * s[n]                     -> int8_linear(x, w8, s8, N)
    w4 = pack_int4(c)            c codes 0..15 (N, K), w = (c - 8) * s + z       -> int4_linear(x, w4, sz4, N, group)
    s8 = pack_int8_scales(s)     sz4 = pack_int4_scales(s, z)  (s, z: (N, K/group))

The kernel quantizes x per call to int8 in blocks along K (32 for int8 weights, as llama.cpp's
Q8_0; the weight group for int4), one float scale per block, and multiplies bytes (vpdpbusd).
`quantize_activations` is the same rounding in torch, so `reference_linear` is the float
reference of what the kernel computes (tests). Layouts are documented in qgemm.cpp; the packing
here is plain torch reshapes, and `unpack_*` invert it. Packed weights are written straight into
2 MB pages (exaone.hugepages): the kernel streams them once a token. This module must not decide
when the kernel is used: exaone.quant does.
"""
from __future__ import annotations

import torch

from .. import hugepages
from ._ext import BASE_FLAGS, Extension

__all__ = ["available", "disabled_reason", "int8_linear", "int4_linear", "pack_int8", "pack_int4", "unpack_int8",
           "unpack_int4", "pack_int8_scales", "pack_int4_scales", "unpack_int4_scales", "quantize_activations",
           "reference_linear", "TILE", "INT8_BLOCK", "QGEMM"]

QGEMM = Extension("exaone_qgemm", "qgemm.cpp", BASE_FLAGS + ["-mavx512vnni"])
TILE = 64        # output channels per packed tile
INT8_BLOCK = 32  # activation block for int8 weights


def available() -> bool:
    """True when the VNNI kernel is built and usable here; builds it on the first call (~1 min)."""
    return QGEMM.available()


def disabled_reason() -> str | None:
    return QGEMM.reason


def _tiles(n: int) -> int:
    return -(-n // TILE)


def _check_2d(name: str, t: torch.Tensor, dtypes) -> None:
    if t.dim() != 2 or t.dtype not in dtypes or t.device.type != "cpu":
        raise ValueError(f"{name} must be a 2-D CPU tensor of {[str(d) for d in dtypes]}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


# ---- layouts -------------------------------------------------------------------------------------
def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) in [-127, 127] -> uint8 (tiles, Kp/4 * 256): q + 128, 64 channels x 4 k per 256 bytes."""
    _check_2d("q", q, (torch.int8,))
    n, k = q.shape
    kp = -(-k // INT8_BLOCK) * INT8_BLOCK
    u = torch.full((_tiles(n) * TILE, kp), 128, dtype=torch.uint8)  # padding: weight 0
    u[:n, :k] = (q.to(torch.int16) + 128).to(torch.uint8)
    out = hugepages.empty((_tiles(n), kp * TILE), torch.uint8)
    out.view(-1, kp // 4, TILE, 4).copy_(u.view(-1, TILE, kp // 4, 4).permute(0, 2, 1, 3))
    return out


def unpack_int8(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    kp = w.shape[1] // TILE
    u = w.view(-1, kp // 4, TILE, 4).permute(0, 2, 1, 3).reshape(-1, kp)[:n, :k]
    return (u.to(torch.int16) - 128).to(torch.int8)


def pack_int4(c: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (N, K), K % 4 == 0 -> uint8 (tiles, K/4 * 128); see qgemm.cpp for the nibble order."""
    _check_2d("codes", c, (torch.uint8, torch.int32, torch.int64, torch.int16))
    n, k = c.shape
    if k % 4:
        raise ValueError(f"int4 packing needs K divisible by 4, got {k}")
    u = torch.zeros(_tiles(n) * TILE, k, dtype=torch.uint8)
    u[:n] = c.to(torch.uint8)
    u = u.view(-1, 2, 2, 16, k // 4, 4).permute(0, 4, 1, 2, 3, 5)  # (tile, step, half, nibble, n, kk)
    out = hugepages.empty((_tiles(n), k * TILE // 2), torch.uint8)
    torch.bitwise_or(u[:, :, :, 0], u[:, :, :, 1] << 4, out=out.view(_tiles(n), k // 4, 2, 16, 4))
    return out


def unpack_int4(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 codes (N, K)."""
    b = w.view(-1, k // 4, 2, 16, 4)
    u = torch.stack([b & 15, b >> 4], dim=3)  # (tile, step, half, nibble, n, kk)
    return u.permute(0, 2, 3, 4, 1, 5).reshape(-1, k)[:n]


def pack_int8_scales(s: torch.Tensor) -> torch.Tensor:
    """(N,) -> float32 (tiles * 64,), zero-padded."""
    out = torch.zeros(_tiles(s.shape[0]) * TILE, dtype=torch.float32)
    out[:s.shape[0]] = s.float()
    return out


def pack_int4_scales(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale, zero (N, groups) -> bfloat16 (tiles, groups, 2, 64): per tile and group, 64 scales then 64 zeros."""
    n, g = scale.shape
    sz = torch.zeros(2, _tiles(n) * TILE, g, dtype=torch.bfloat16)
    sz[0, :n], sz[1, :n] = scale, zero
    return sz.view(2, -1, TILE, g).permute(1, 3, 0, 2).contiguous()


def unpack_int4_scales(sz: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_int4_scales: scale, zero (N, groups) bfloat16."""
    t = sz.permute(2, 0, 3, 1).reshape(2, -1, sz.shape[1])[:, :n]
    return t[0], t[1]


# ---- the kernel ----------------------------------------------------------------------------------
def _call(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, n: int, bits: int, block: int) -> torch.Tensor:
    if not available():
        raise RuntimeError(f"the exaone VNNI kernel is unavailable: {QGEMM.reason}")
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or x.dim() < 1:
        raise ValueError(f"x must be a float32 or bfloat16 CPU tensor (..., K), got {x.dtype} {tuple(x.shape)} on {x.device}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return QGEMM.module.qlinear(x2, w, scales, n, bits, block).view(*x.shape[:-1], n)


def int8_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """x (..., K) float32/bfloat16 @ (pack_int8 weights with pack_int8_scales).T -> (..., N) in x's dtype."""
    return _call(x, w, scales, n, 8, INT8_BLOCK)


def int4_linear(x: torch.Tensor, w: torch.Tensor, scales_zeros: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """x (..., K) float32/bfloat16 @ (pack_int4 codes with pack_int4_scales).T -> (..., N) in x's dtype."""
    return _call(x, w, scales_zeros, n, 4, group)


# ---- the slow reference --------------------------------------------------------------------------
def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (M, K) as the kernel sees it: round(x * 127 / amax) * amax / 127 per block of K (float32)."""
    m, k = x.shape
    kp = -(-k // block) * block
    xb = torch.nn.functional.pad(x.float(), (0, kp - k)).view(m, kp // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).view(m, kp)[:, :k]


def reference_linear(x: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """float64 x_q @ w.T, x_q = quantize_activations(x, block): what the kernel computes, without its rounding."""
    return quantize_activations(x.reshape(-1, x.shape[-1]), block).double() @ w.double().T
