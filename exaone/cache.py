"""The hybrid-attention KV cache: a ring for sliding layers, a growing buffer for global layers.

Layout (one pair of tensors per layer, rows = sequences that share the batch):

    global layer  k, v: (rows, kv_heads, capacity, head_dim)   slot = position
                  capacity grows in blocks of `block` tokens, up to max_len
    sliding layer k, v: (rows, kv_heads, window, head_dim)     slot = position % window

The cache holds no per-row lengths: the caller passes each query's absolute position, and
which slots are valid follows from it (positions of a row are written 0, 1, 2, ... with no
holes). A step runs on a contiguous range of rows (`rows=slice(a, b)`), so the batch is a view,
never a gather. This module only stores and attends; it must not know about requests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .config import Exaone4Config


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class KVCache:
    def __init__(self, config: Exaone4Config, rows: int, max_len: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 block: int = 256):
        self.config, self.rows, self.block = config, rows, block
        self.max_len = max_len or config.max_position_embeddings
        self.dtype, self.device = dtype, torch.device(device)
        self.sliding = config.is_sliding
        self.window = config.sliding_window
        shape = lambda n: (rows, config.num_key_value_heads, n, config.head_dim)  # noqa: E731
        self.capacity = 0  # global layers' current capacity, in tokens
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for s in self.sliding:
            n = self.window if s else 0
            self.k.append(torch.zeros(shape(n), dtype=dtype, device=self.device))
            self.v.append(torch.zeros(shape(n), dtype=dtype, device=self.device))
        self._step = None

    # ---- sizes ---------------------------------------------------------------------------
    def ensure_capacity(self, length: int) -> None:
        """Grow the global layers so positions < length fit (amortised: whole blocks)."""
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the cache's max_len {self.max_len}")
        if length <= self.capacity:
            return
        new = min(_round_up(max(length, 2 * self.capacity), self.block), self.max_len)
        for i, s in enumerate(self.sliding):
            if s:
                continue
            for store in (self.k, self.v):
                old = store[i]
                t = torch.zeros(old.shape[0], old.shape[1], new, old.shape[3], dtype=old.dtype, device=old.device)
                t[:, :, : old.shape[2]] = old
                store[i] = t
        self.capacity = new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_per_row(self) -> int:
        return self.nbytes() // max(self.rows, 1)

    # ---- row management (the engine keeps live rows contiguous) --------------------------
    def copy_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy one sequence's cache to another row (used to compact rows and to fork n > 1)."""
        if src == dst:
            return
        for i, s in enumerate(self.sliding):
            n = self.k[i].shape[2] if (s or length is None) else min(length, self.k[i].shape[2])
            self.k[i][dst, :, :n] = self.k[i][src, :, :n]
            self.v[i][dst, :, :n] = self.v[i][src, :, :n]

    # ---- one forward step ----------------------------------------------------------------
    def begin(self, rows: slice, positions: torch.Tensor) -> None:
        """Prepare masks and write slots for a step over `rows` with query positions (B, C),
        contiguous per row. Per step, not per layer: a decode step runs 30 layers on one token."""
        B, C = positions.shape
        pos = positions.to(self.device)
        last = int(pos.max()) + 1
        self.ensure_capacity(last)
        step = {"rows": rows, "pos": pos, "C": C, "len": last}
        if C == 1:
            self._begin_decode(step, B, int(pos.min()))
            self._step = step
            return
        ar = torch.arange(last, device=self.device)
        # Global slots: slot j holds position j; valid for a query at q iff j <= q.
        step["mask_global"] = (ar[None, None, :] <= pos[:, :, None])[:, None]
        step["slot_global"] = pos
        if self.window is not None and any(self.sliding):
            # Chunked prefill attends to [ring ; chunk] before writing, so the chunk never
            # overwrites keys its own earlier queries still need.
            # Only ring slots that can hold a position before the chunk take part: a fresh
            # prompt (p0 = 0) attends to the chunk alone, not to `window` empty slots.
            W = self.window
            p0 = pos[:, :1]
            n_ring = min(W, int(p0.max()))
            step["ring_len"] = n_ring
            j = torch.arange(n_ring, device=self.device)[None, :]
            ring_pos = p0 - 1 - torch.remainder(p0 - 1 - j, W)  # (B, n_ring); < 0 means empty
            key_pos = torch.cat([ring_pos, pos], dim=1)  # (B, n_ring + C)
            valid = (key_pos >= 0)[:, None, :]
            q = pos[:, :, None]
            kp = key_pos[:, None, :]
            step["mask_sliding"] = (valid & (kp <= q) & (q - kp < W))[:, None]
            step["slot_sliding"] = torch.remainder(pos, W)
        self._step = step

    def _begin_decode(self, step: dict, B: int, first: int) -> None:
        """One query per row. Decode writes first, then attends to slots [0, n): global slot j
        holds position j, ring slot j the newest position p = j (mod W), p in (q-W, q], which
        exists iff j <= q. So a mask is needed only where some row is shorter than n; where all
        rows sit at one position the write is a slice, not an index_put."""
        pos, last = step["pos"], step["len"]
        ar = torch.arange(last, device=self.device)
        step["mask_global"] = None if first == last - 1 else (ar[None, None, :] <= pos[:, :, None])[:, None]
        step["slot_global"] = last - 1 if first == last - 1 else pos
        if self.window is not None and any(self.sliding):
            n = min(self.window, last)
            step["mask_sliding"] = None if first >= n - 1 else (ar[None, None, :n] <= pos[:, :, None])[:, None]
            step["slot_sliding"] = ((last - 1) % self.window if first == last - 1
                                    else torch.remainder(pos, self.window))
        if first != last - 1:
            step["row_index"] = torch.arange(step["rows"].start, step["rows"].start + B, device=self.device)[:, None]
        # The same masks as counts of valid slots per row, for the decode attention kernel.
        step["pos1"] = pos[:, 0].long().contiguous()
        step["len_global"] = step["pos1"] + 1
        if self.window is not None:
            step["len_sliding"] = step["len_global"].clamp(max=min(self.window, last))

    def decode_target(self, layer: int):
        """For a fused decode kernel that writes and attends itself (kernels' `attend_decode`): in a
        one-token step, (k store, v store, first row, positions (B,) int64, window: 0 for a global
        layer, else the ring's slot count); None in other steps. The store's layout is the one in
        this module's docstring: the kernel writes position p at slot p, or p % window."""
        st = self._step
        if st is None or st["C"] != 1:
            return None
        return (self.k[layer], self.v[layer], st["rows"].start or 0, st["pos1"],
                self.window if self.sliding[layer] else 0)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, C, D), k/v (B, KVH, C, D) for the step's rows -> attention output (B, H, C, D)."""
        st = self._step
        rows, C, L = st["rows"], st["C"], st["len"]
        K, V = self.k[layer], self.v[layer]
        if k.dtype != K.dtype:
            k, v = k.to(K.dtype), v.to(V.dtype)
        if not self.sliding[layer]:
            _write(K, V, rows, st["slot_global"], k, v, st.get("row_index"))
            keys, vals, mask = K[rows, :, :L], V[rows, :, :L], st["mask_global"]
            if C == 1 and _kernel_attention_ok(q, keys):
                return _kernel_attention(q, keys, vals, st["len_global"])
        elif C == 1:
            _write(K, V, rows, st["slot_sliding"], k, v, st.get("row_index"))
            n = min(self.window, L)
            keys, vals, mask = K[rows, :, :n], V[rows, :, :n], st["mask_sliding"]
            if _kernel_attention_ok(q, keys):
                return _kernel_attention(q, keys, vals, st["len_sliding"])
        else:
            n_ring = st["ring_len"]
            keys = torch.cat([K[rows, :, :n_ring], k], dim=2)
            vals = torch.cat([V[rows, :, :n_ring], v], dim=2)
            mask = st["mask_sliding"]
            keep = min(C, self.window)  # only the newest `window` tokens survive in the ring
            _write(K, V, rows, st["slot_sliding"][:, -keep:], k[:, :, -keep:], v[:, :, -keep:])
        return sdpa(q, keys, vals, mask)


def kernel_head_dim_ok(D: int) -> bool:
    """The head sizes exaone.kernels' decode attention (`decode_attention`, `attend_decode`) takes."""
    return D in (32, 64) or D % 128 == 0


def _kernel_attention_ok(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """exaone.kernels' decode attention, when something else built it (attention never builds it)."""
    return (kernels.GEMM.module is not None and q.is_cpu and q.dtype is keys.dtype
            and q.dtype in (torch.float32, torch.bfloat16)
            and kernel_head_dim_ok(q.shape[-1]) and not torch.compiler.is_compiling())


def _kernel_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One query per row (q (B, H, 1, D)) over the first lengths[b] slots of keys/vals (B, KVH, L, D)."""
    return kernels.GEMM.module.decode_attention(q[:, :, 0], keys, vals, lengths, q.shape[-1] ** -0.5)[:, :, None]


def _write(K, V, rows: slice, slots, k, v, row_index: torch.Tensor | None = None) -> None:
    """Store k/v (B, KVH, C, D) at `slots`: an int (one decode slot shared by all rows) or
    (B, C) tensor; `row_index` (B, 1), the rows as a tensor, when it is a per-row decode slot."""
    if isinstance(slots, int):
        K[rows, :, slots:slots + 1] = k
        V[rows, :, slots:slots + 1] = v
        return
    B, C = slots.shape
    if C > 1 and B == 1 and bool((slots[0, 1:] - slots[0, :-1] == 1).all()):
        s = int(slots[0, 0])  # a contiguous chunk: plain slice copy
        K[rows, :, s:s + C] = k
        V[rows, :, s:s + C] = v
        return
    r = row_index if row_index is not None else \
        torch.arange(rows.start, rows.start + B, device=K.device)[:, None].expand(B, C)
    K[r, :, slots] = k.transpose(1, 2)
    V[r, :, slots] = v.transpose(1, 2)


# CPUs without bf16 dot-product instructions (no avx512_bf16 / AMX) run bf16 GEMMs slowly.
SLOW_BF16 = not (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                 or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
_FEW_QUERIES = 8  # decode and speculative verification; prefill chunks keep the fused kernel


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention with a boolean mask (True = attend; None = every key).

    Up to `_FEW_QUERIES` queries per row on a CPU (decode, speculative verification) go through
    `matmul_attention`; torch's fused CPU kernel costs 3-26x more there (docs/kernels.md).
    Otherwise `enable_gqa` lets the fused kernel index kv head h // rep instead of materialising
    repeat_interleave copies of k and v; the result is bit-identical."""
    if q.device.type == "cpu" and q.shape[-2] <= _FEW_QUERIES:
        return matmul_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5,
                                          enable_gqa=q.shape[1] != k.shape[1])


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v as two batched GEMMs, the way transformers' eager attention
    computes it (scores in the input dtype, softmax in fp32). The `rep` query heads that share a
    kv head are stacked as rows of one GEMM against that head's keys: no copy of k or v. On a CPU
    without bf16 instructions, bf16 inputs are computed in fp32 (bf16 GEMMs are slow there).
    q (B, H, C, D), k/v (B, KVH, L, D), mask broadcastable to (B, 1, C, L) -> (B, H, C, D)."""
    dtype = q.dtype
    if dtype is torch.bfloat16 and SLOW_BF16:
        q, k, v = q.float(), k.float(), v.float()
    B, H, C, D = q.shape
    KVH, L = k.shape[1], k.shape[2]
    rep = H // KVH
    scores = torch.matmul(q.reshape(B, KVH, rep * C, D), k.transpose(-1, -2)).float().mul_(D ** -0.5)
    if mask is not None:  # rows are (head in group, query): the mask repeats over the group
        scores = scores.view(B, KVH, rep, C, L).masked_fill(~mask[:, :, None], float("-inf")).view(B, KVH, rep * C, L)
    probs = scores.softmax(-1).to(v.dtype)
    return torch.matmul(probs, v).view(B, H, C, D).to(dtype)


def cache_bytes(config: Exaone4Config, tokens: int, dtype: torch.dtype = torch.bfloat16, block: int = 256) -> dict:
    """Bytes that KVCache allocates for one sequence of `tokens` tokens, and the theoretical minimum.

    Built on the meta device through the real class, so the number is the allocator's, not a formula's.
    """
    cache = KVCache(config, rows=1, max_len=max(tokens, config.max_position_embeddings),
                    dtype=dtype, device="meta", block=block)
    cache.ensure_capacity(tokens)
    per_token_layer = 2 * config.num_key_value_heads * config.head_dim * torch.tensor([], dtype=dtype).element_size()
    n_global = sum(not s for s in config.is_sliding)
    n_local = len(config.is_sliding) - n_global
    local_tokens = min(tokens, config.sliding_window) if config.sliding_window else tokens
    minimum = per_token_layer * (n_global * tokens + n_local * local_tokens)
    full = per_token_layer * config.num_hidden_layers * tokens
    return {"allocated": cache.nbytes(), "minimum": minimum, "full_cache": full}
