"""Compiled decode: one `torch.compile`d graph per (batch bucket, cache capacity), fixed shapes.

The eager decode step (`model(tokens, position_ids=..., cache=..., rows=slice(0, B))`) is the
reference. This module runs the same step through `torch.compile` (inductor) with every shape
fixed, like gpt-fast:

* the global layers attend over the cache's whole block-rounded `capacity` instead of the live
  length L: slots beyond a query's position are hidden by the mask, so padding L is exact up to
  summation order, and shapes change only when `KVCache.ensure_capacity` grows the buffer
  (a few times over a long generation, never within a block);
* sliding layers attend over the whole ring (W slots), also masked by position;
* the batch is padded up to a bucket (1, 2, 4, 8, 16, ..., max rows). Padding rows run on
  position 0 and write nothing: their K/V write puts back the value already in the slot, so a
  request being prefilled in those rows keeps its cache.

So steady decoding never recompiles; a new graph is built only for a new (bucket, capacity) pair.
The graph reuses the model's own modules (embedding, layers, norms, lm_head); only the cache
bookkeeping (`KVCache.begin/attend`) is replaced by the static `_StaticAttend` below. Compilation
is opt-in (`Engine(..., compile=True)`, CLI `--compile`): see docs/compiled-decode.md for when it
pays. This module must not know about requests.
"""
from __future__ import annotations

import torch

from .cache import KVCache, sdpa
from .model import rope_cos_sin

__all__ = ["CompiledDecode", "batch_buckets", "decode_step"]

_RECOMPILE_LIMIT = 64  # (buckets) x (capacity doublings): 5 x 9 for 64K context


def batch_buckets(rows: int) -> tuple[int, ...]:
    """Powers of two below `rows`, then `rows` itself: (1, 2, 4, 8, 16) for 16 rows."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return (*out, rows)


class _StaticAttend:
    """Duck-typed stand-in for `KVCache` inside the compiled graph: decode (C == 1) only,
    rows [0, Bp), keys over the full capacity (global) or the full ring (sliding)."""

    def __init__(self, ks, vs, positions, valid, sliding, window):
        self.ks, self.vs, self.sliding, self.window = ks, vs, sliding, window
        Bp = positions.shape[0]
        self.rows = torch.arange(Bp, device=positions.device)[:, None]  # (Bp, 1)
        self.pos = positions  # (Bp, 1)
        self.valid = valid[:, None, None, None]  # (Bp, 1, 1, 1)
        q = positions[:, :, None]  # (Bp, 1, 1)
        self.masks = {}
        for layer, s in enumerate(sliding):
            n = ks[layer].shape[2]
            if n not in self.masks:
                self.masks[n] = (torch.arange(n, device=positions.device)[None, None, :] <= q)[:, None]

    def decode_target(self, layer: int) -> None:
        """No fused write-and-attend kernel here: padding rows must keep their slots (`attend`)."""
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        K, V = self.ks[layer], self.vs[layer]
        Bp = q.shape[0]
        slot = torch.remainder(self.pos, self.window) if self.sliding[layer] else self.pos
        r = self.rows
        # Padding rows write back what the slot already holds: no row outside [0, B) changes.
        K[r, :, slot] = torch.where(self.valid, k.to(K.dtype).transpose(1, 2), K[r, :, slot])
        V[r, :, slot] = torch.where(self.valid, v.to(V.dtype).transpose(1, 2), V[r, :, slot])
        return sdpa(q, K[:Bp], V[:Bp], self.masks[K.shape[2]])


def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """One decode step over cache rows [0, Bp): tokens/positions (Bp, 1), valid (Bp,) bool;
    ks/vs the cache's per-layer tensors (written in place). Returns logits (Bp, vocab).

    Pure tensor code with static shapes: this is the function that gets compiled."""
    cfg = model.config
    x = model.model.embed_tokens(tokens)
    cos, sin = rope_cos_sin(model.inv_freq, positions, x.dtype)
    cache = _StaticAttend(ks, vs, positions, valid, cfg.is_sliding, cfg.sliding_window)
    for layer in model.model.layers:
        x = layer(x, cos, sin, None, cache)
    return model.lm_head(model.model.norm(x))[:, -1]


class CompiledDecode:
    """`CompiledDecode(model, cache)(tokens (B,1), positions (B,1))` -> logits (B, vocab),
    the same step as the eager `model(..., cache=cache, rows=slice(0, B))[:, -1]`.

    `compile=False` runs `decode_step` eagerly (same padding, no compiler); `backend="eager"`
    traces with dynamo but runs the graph eagerly (guards and recompiles without inductor's
    compile time): both for testing."""

    def __init__(self, model, cache: KVCache, compile: bool = True, mode: str | None = None,
                 backend: str = "inductor"):
        self.model, self.cache = model, cache
        self.buckets = batch_buckets(cache.rows)
        if compile:
            import torch._dynamo.config as dcfg

            for name in ("recompile_limit", "cache_size_limit"):  # one of them, depending on torch
                if hasattr(dcfg, name) and getattr(dcfg, name) < _RECOMPILE_LIMIT:
                    setattr(dcfg, name, _RECOMPILE_LIMIT)
            self._fn = torch.compile(decode_step, dynamic=False, fullgraph=True, mode=mode, backend=backend)
        else:
            self._fn = decode_step
        self.graphs: set[tuple[int, int]] = set()  # (bucket, capacity) pairs seen so far

    def bucket(self, B: int) -> int:
        for b in self.buckets:
            if b >= B:
                return b
        raise ValueError(f"batch {B} exceeds the cache's {self.cache.rows} rows")

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        B = tokens.shape[0]
        Bp = self.bucket(B)
        cache.ensure_capacity(int(positions.max()) + 1)  # eager: the only reallocation point
        tokens = tokens.reshape(B, 1)
        positions = positions.reshape(B, 1).to(tokens.device)
        valid = torch.ones(Bp, dtype=torch.bool, device=tokens.device)
        if Bp > B:
            pad = Bp - B
            tokens = torch.cat([tokens, tokens.new_zeros(pad, 1)])
            positions = torch.cat([positions, positions.new_zeros(pad, 1)])
            valid[B:] = False
        self.graphs.add((Bp, cache.capacity))
        logits = self._fn(self.model, tokens, positions, valid, cache.k, cache.v)
        return logits[:B]
