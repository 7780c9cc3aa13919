"""Prefix caching: a reused prompt prefix is copied from stored KV blocks instead of prefilled.

Block-level, like vLLM's hashed blocks. A token sequence is cut into blocks of `block_size`
tokens; a block is named by a chain hash of every token up to its end, so it only matches when
the whole prefix before it matches too. A stored block holds, per layer (one sequence, no rows):

    global layer   k, v: (kv_heads, block_size, head_dim)   the block's own tokens
    sliding layer  k, v: (kv_heads, tail, head_dim)          its newest tail = min(block_size, W)

Why that is enough for a sliding layer: its ring at length P holds positions P-W..P-1. If P ends
block m, block m stores [P-tail, P); when W > block_size every earlier block b stores all of its
own tokens, so blocks m, m-1, ... together cover [P-W, P). It is the "ring snapshot at the
block's end" without storing W slots per block (for W = 4096 and 64-token blocks a snapshot
would be 64 times the block).

Capture: a block's tail must still be in the ring when it is copied out. After a chunk ending at
`end` the ring holds [end-W, end), so `chunk_end` stops prefill chunks early enough (at every
block boundary when W <= block_size; dense models are not limited). Decode writes one token at a
time, so blocks completed by generated tokens are captured too (a conversation's next turn
reuses the previous answer).

LRU eviction under a byte budget. A chain is touched from its deepest block to its root, so
eviction takes a prefix's tail before its head (a block whose parent is gone can never match).
This module knows KVCache's layout (`k`, `v`, `sliding`, `window`); it must not know requests,
sampling or the model.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from .cache import KVCache

PREFIX_CACHE_BYTES = 256 * 2**20  # the engine's default budget
BLOCK_SIZE = 64


@dataclass
class _Block:
    parent: int | None          # key of the block before it (None for the first block)
    tokens: tuple[int, ...]     # checked on lookup, so a hash collision is a miss, never a wrong hit
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    nbytes: int


class PrefixCache:
    """Stored KV blocks of token prefixes for one `KVCache` (same model, dtype and device)."""

    def __init__(self, cache: KVCache, budget_bytes: int = PREFIX_CACHE_BYTES, block_size: int = BLOCK_SIZE):
        if block_size < 1 or budget_bytes < 0:
            raise ValueError(f"block_size must be >= 1 and budget_bytes >= 0, got {block_size}, {budget_bytes}")
        self.cache, self.budget, self.block_size = cache, budget_bytes, block_size
        self.window = cache.window if any(cache.sliding) else None
        self.tail = min(block_size, self.window) if self.window else block_size
        self.blocks: OrderedDict[int, _Block] = OrderedDict()
        self.nbytes = 0
        self.counters = dict(lookups=0, hits=0, hit_tokens=0, stored_blocks=0, evicted_blocks=0)

    # ---- keys ------------------------------------------------------------------------------
    def _keys(self, tokens: Sequence[int], n_blocks: int) -> list[int]:
        keys, parent, bs = [], None, self.block_size
        for b in range(n_blocks):
            parent = hash((parent, tuple(tokens[b * bs:(b + 1) * bs])))
            keys.append(parent)
        return keys

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Keys of the longest cached chain of `tokens`, leaving at least one token to prefill."""
        bs, parent, chain = self.block_size, None, []
        for b in range((len(tokens) - 1) // bs):
            part = tuple(tokens[b * bs:(b + 1) * bs])
            key = hash((parent, part))
            blk = self.blocks.get(key)
            if blk is None or blk.parent != parent or blk.tokens != part:
                break
            chain.append(key)
            parent = key
        return chain

    def _touch(self, chain: list[int]) -> None:
        for key in reversed(chain):  # deepest first: the root ends up most recent
            if key in self.blocks:
                self.blocks.move_to_end(key)

    # ---- prefill scheduling ------------------------------------------------------------------
    def chunk_end(self, start: int, end: int, chunk: int) -> int:
        """End of the next prefill chunk from `start` so every block it completes can be captured."""
        b = min(end, start + chunk)
        if self.window is not None and self.budget > 0:
            first = (start // self.block_size + 1) * self.block_size  # the first block end after start
            if first < b:
                b = min(b, first + self.window - self.tail)  # that block's tail is still in the ring
        return b

    # ---- cache row <-> blocks ----------------------------------------------------------------
    def store(self, row: int, tokens: Sequence[int], start: int, end: int) -> int:
        """Store the blocks of `tokens` ending in (start, end]; row `row` holds tokens[:end]
        and was just written up to `end` (see `chunk_end`). Returns the number of new blocks."""
        if self.budget <= 0:
            return 0
        bs, c = self.block_size, self.cache
        last = end // bs
        first = start // bs + 1
        if last < first:
            return 0
        keys = self._keys(tokens, last)
        self._touch(keys[:first - 1])  # so that making room does not evict this chain's head
        new = 0
        for b in range(first, last + 1):
            key, e = keys[b - 1], b * bs
            if key in self.blocks:
                continue
            ks, vs = [], []
            for i, sliding in enumerate(c.sliding):
                if sliding:
                    slots = torch.arange(e - self.tail, e, device=c.device) % self.window
                    ks.append(c.k[i][row][:, slots].clone())
                    vs.append(c.v[i][row][:, slots].clone())
                else:
                    ks.append(c.k[i][row, :, e - bs:e].clone())
                    vs.append(c.v[i][row, :, e - bs:e].clone())
            nbytes = sum(t.numel() * t.element_size() for t in ks + vs)
            if nbytes > self.budget:
                return new
            self._evict(self.budget - nbytes)
            self.blocks[key] = _Block(keys[b - 2] if b > 1 else None, tuple(tokens[e - bs:e]), ks, vs, nbytes)
            self.nbytes += nbytes
            self.counters["stored_blocks"] += 1
            new += 1
        self._touch(keys)
        return new

    def restore(self, row: int, tokens: Sequence[int]) -> int:
        """Copy the longest cached prefix of `tokens` into row `row`; returns its length (0 = miss)."""
        self.counters["lookups"] += 1
        chain = self.match(tokens) if self.blocks else []
        if not chain:
            return 0
        c, bs = self.cache, self.block_size
        P = len(chain) * bs
        c.ensure_capacity(P)
        blocks = [self.blocks[key] for key in chain]
        for i, sliding in enumerate(c.sliding):
            if not sliding:
                c.k[i][row, :, :P] = torch.cat([blk.k[i] for blk in blocks], dim=1)
                c.v[i][row, :, :P] = torch.cat([blk.v[i] for blk in blocks], dim=1)
                continue
            lo = max(0, P - self.window)
            ks, vs = [], []
            for b in range(lo // bs, len(chain)):  # block b stores positions [e - tail, e)
                e = (b + 1) * bs
                skip = max(lo, e - self.tail) - (e - self.tail)
                ks.append(blocks[b].k[i][:, skip:])
                vs.append(blocks[b].v[i][:, skip:])
            slots = torch.arange(lo, P, device=c.device) % self.window
            c.k[i][row][:, slots] = torch.cat(ks, dim=1)
            c.v[i][row][:, slots] = torch.cat(vs, dim=1)
        self._touch(chain)
        self.counters["hits"] += 1
        self.counters["hit_tokens"] += P
        return P

    # ---- budget -----------------------------------------------------------------------------
    def _evict(self, limit: int) -> None:
        while self.blocks and self.nbytes > limit:
            _, blk = self.blocks.popitem(last=False)
            self.nbytes -= blk.nbytes
            self.counters["evicted_blocks"] += 1

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0

    def block_bytes(self) -> int:
        """Bytes one stored block takes (global layers: block_size tokens; sliding: tail tokens)."""
        c = self.cache
        itemsize = torch.tensor([], dtype=c.dtype).element_size()
        per_token = 2 * c.config.num_key_value_heads * c.config.head_dim * itemsize
        return per_token * sum(self.tail if s else self.block_size for s in c.sliding)
