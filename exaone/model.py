"""EXAONE 4.0 in PyTorch: token ids (+ positions, + cache) -> logits.

Top-down: norm -> RoPE -> attention -> MLP -> block -> model. Module names equal the
checkpoint's tensor names, so loading needs no renaming table. QK-Reorder-Norm: no pre-norm;
RMSNorm on q and k per head before RoPE; post-attention and post-feedforward norms before each
residual add. Hybrid models: sliding layers use RoPE and a window, global layers no RoPE.
This module imports only torch, the config, the cache and the optional kernels; no sampling, no I/O.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels._ext import cpuinfo
from .cache import SLOW_BF16, KVCache, kernel_head_dim_ok, sdpa
from .config import Exaone4Config, llama3_inv_freq


# CPUs without bf16 dot-product instructions (no avx512_bf16 / AMX) run oneDNN's bf16 GEMM slowly.
_SLOW_BF16_GEMM = SLOW_BF16
_UPCAST_ROWS = 128          # from this many rows an fp32 GEMM on the upcast weight beats oneDNN's bf16
_UPCAST_CHUNK = 1 << 24     # weight elements upcast at a time (64 MB of fp32): lm_head goes in slices
# 1.._UPCAST_ROWS-1 bf16 rows go to exaone.kernels.bf16_linear when it is built (one row: faster
# than torch.mv's GEMV, lm_head 25.5 vs 24.4 GB/s), except that from _KERNEL_UPCAST_ROWS rows a
# weight under _KERNEL_MIN_WEIGHTS elements (k/v) is upcast instead: both measured faster
# (bench/bench_kernels.py, docs/kernels.md).
_KERNEL_UPCAST_ROWS = 64
_KERNEL_MIN_WEIGHTS = 1 << 22
# fp32 rows up to _F32_KERNEL_ROWS go to exaone.kernels.f32_linear, which beats MKL's GEMM there (MKL
# is tuned for one row or many: on Intel its 1-2 row GEMV is as fast, from 32 rows its GEMM; on AMD
# Zen 5 our kernel streams a single row at 2.6x MKL's speed).
_F32_KERNEL_ROWS = 31
# bf16 on CPUs with native bf16 (avx512_bf16 / AMX): the kernel up to _NATIVE_BF16_KERNEL_ROWS rows
# (1-2: its memory-bound loop, 1.5-2x oneDNN; 3-32: its vdpbf16ps tiles), oneDNN's GEMM from there.
# All linears of a 1.2B decode step, weights cold (Zen 5; oneDNN streams them badly at few rows):
# 4 rows 80 vs 160 ms, 8 rows 75 vs 105-196 ms, 16 rows 92-99 vs 130-141 ms, 32 rows 186 vs 233,
# 64 rows 373 vs 353 (docs/kernels.md).
_NATIVE_BF16_KERNEL_ROWS = 32
# Weights under this many elements keep torch's paths: a call costs microseconds either way, and a
# model made only of them (the demo model: 192 x 192) should not pay the kernel's one-time build.
_KERNEL_MIN_ELEMENTS = 1 << 20


# From _F32_KERNEL_ROWS + 1 rows (prefill), fp32 goes to MKL's GEMM on Intel CPUs and to oneDNN's
# elsewhere: MKL takes a slower path on other vendors' CPUs (AMD Zen 5, 2 threads: 145-195 against
# 325-420 GFLOP/s from 128 rows; docs/kernels.md). oneDNN builds a primitive per new shape (~1 ms),
# so weights under _KERNEL_MIN_ELEMENTS stay on MKL.
_ONEDNN_F32 = ((cpuinfo("vendor_id") or "") not in ("", "GenuineIntel") and torch.backends.mkldnn.is_available()
               and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear(nn.Linear):
    """nn.Linear with faster CPU paths for a few rows of x; otherwise F.linear.

    float32: 1..31 rows (decode) through exaone.kernels' AVX-512 GEMM; more rows through MKL's
    GEMM on Intel CPUs, oneDNN's on others.
    bfloat16: on CPUs with native bf16 GEMM, 1-32 rows through exaone.kernels;
    without it, up to 127 rows through exaone.kernels (bf16 weights widened to fp32 in the kernel;
    torch.mv for one row when it is not built), long chunks through an fp32 GEMM on the weight
    upcast slice by slice.
    All accumulate in fp32 (and round to bf16 once, as the bf16 GEMM does); only the summation
    order differs. The kernels have no autograd and dynamo cannot trace them: with gradients or
    under torch.compile, torch's paths. See docs/kernels.md.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]  # not self.weight: nn.Module's lookup costs ~0.8 us, 7 a layer
        if not x.is_cpu or self._parameters["bias"] is not None or x.dtype is not w.dtype or (
                torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return F.linear(x, w, self.bias)
        rows = x.numel() // x.shape[-1]
        if rows <= kernel_rows(w) and self._kernel_ok(w):
            return _kernel(kernels.GEMM.module.f32_linear if w.dtype is torch.float32 else kernels.GEMM.module.bf16_linear,
                           x, w)
        if x.dtype is torch.float32:
            if _ONEDNN_F32 and w.numel() >= _KERNEL_MIN_ELEMENTS and x.is_contiguous() and \
                    not torch.compiler.is_compiling():
                return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            return F.linear(x, w)
        if x.dtype is not torch.bfloat16 or not _SLOW_BF16_GEMM:
            return F.linear(x, w)
        if rows < _UPCAST_ROWS and not self._kernel_ok(w):
            return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0]) if rows == 1 else F.linear(x, w)
        return self.upcast(x, w)

    @staticmethod
    def _kernel_ok(w: torch.Tensor) -> bool:
        return (w.numel() >= _KERNEL_MIN_ELEMENTS and not torch.compiler.is_compiling() and w.is_contiguous()
                and kernels.available())

    @staticmethod
    def upcast(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T as an fp32 GEMM on w upcast `_UPCAST_CHUNK` elements at a time, in x's dtype."""
        xf = x.float()
        step = max(1, _UPCAST_CHUNK // w.shape[1])
        if step >= w.shape[0]:
            return F.linear(xf, w.float()).to(x.dtype)
        out = x.new_empty(*x.shape[:-1], w.shape[0])
        for s in range(0, w.shape[0], step):
            out[..., s:s + step] = F.linear(xf, w[s:s + step].float())
        return out


def kernel_rows(w: torch.Tensor) -> int:
    """Up to how many rows of x `Linear` sends to exaone.kernels' GEMM for weight w (when the
    kernel is usable, `Linear._kernel_ok`): the routing of the table in docs/kernels.md."""
    if w.dtype is torch.float32:
        return _F32_KERNEL_ROWS
    if w.dtype is not torch.bfloat16:
        return 0
    if not _SLOW_BF16_GEMM:
        return _NATIVE_BF16_KERNEL_ROWS
    return _UPCAST_ROWS - 1 if w.numel() >= _KERNEL_MIN_WEIGHTS else _KERNEL_UPCAST_ROWS - 1


def _kernel(fn, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A GEMM of exaone.kernels' built module on x (..., K) without the public wrapper's checks
    (`Linear` made them): microseconds a call, 7 calls a layer, every step."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return fn(x2, w).view(*x.shape[:-1], w.shape[0])


def warm_kernels(model: nn.Module) -> bool:
    """Build exaone.kernels now if the model would use it (float32 or bfloat16 decode: GEMMs,
    norms), so that the one-time compile (about a minute) happens at load and not in the first
    decode step. True when the kernel is ready; False without building when no linear layer is
    large enough to use it."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16):
        return False
    # Linear and quantized linears alike (the fused norms pay in both): anything with the features.
    if not any(getattr(m, "in_features", 0) * getattr(m, "out_features", 0) >= _KERNEL_MIN_ELEMENTS
               for m in model.modules()):
        return False
    return kernels.available()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x), or residual + norm(x) (the post-norm block's add, fused where it can be)."""
        w = self._parameters["weight"]  # not self.weight: nn.Module's lookup costs ~0.8 us, 4 norms a layer
        if self._kernel_ok(x, w) and x.is_contiguous() and \
                (residual is None or (residual.dtype is x.dtype and residual.is_contiguous())):
            # One C++ call instead of 7-9 small ops (four norms a layer, every step); same rounding.
            return kernels.GEMM.module.rms_norm(x, w, self.eps, residual)
        if x.dtype is torch.float32:  # the same ops without two no-op casts
            out = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        else:  # normalise in float32, scale in the input dtype: the reference's rounding, bit for bit
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            out = w * h.to(x.dtype)
        return out if residual is None else residual + out

    @staticmethod
    def _kernel_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
        """The kernels (built by whoever needed them first; a norm never builds them) take rows of
        contiguous values, have no autograd, and dynamo cannot trace them."""
        return (kernels.GEMM.module is not None and x.is_cpu and x.dtype is w.dtype
                and x.dtype in (torch.float32, torch.bfloat16) and x.stride(-1) == 1
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and not torch.compiler.is_compiling())


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions (B, C) -> cos, sin (B, 1, C, head_dim), computed in float32 then cast.

    sin's first half is negated, once per step, so that `apply_rope` rotates with one roll
    instead of slice/neg/cat in every layer: (-x2) * s == x2 * (-s) exactly, so bit-identical."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    sin = emb.sin()
    sin[..., : sin.shape[-1] // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with `sin` as `rope_cos_sin` returns it (first half negated)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, config: Exaone4Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.use_rope = config.use_rope[layer_idx]
        h = config.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, C, _ = x.shape
        m = self._modules  # not self.q_proj...: nn.Module's lookup costs ~0.8 us, ~13 a layer every step
        q, k, v = project(x, (m["q_proj"], m["k_proj"], m["v_proj"]))
        target = cache.decode_target(self.layer_idx) if cache is not None and C == 1 else None
        if target is not None and self._fused_ok(q, target[0]):
            # Decode: norms, RoPE, the cache write and attention in one C++ call (~25 torch ops).
            K, V, row0, pos, window = target
            qn, kn = m["q_norm"], m["k_norm"]
            rope = (cos.view(B, -1), sin.view(B, -1)) if self.use_rope else (None, None)
            out = kernels.GEMM.module.attend_decode(q.view(B, -1), k.view(B, -1), v.view(B, -1),
                                                    qn._parameters["weight"], kn._parameters["weight"], qn.eps,
                                                    *rope, K, V, row0, pos, window, self.head_dim ** -0.5)
            return m["o_proj"](out.view(B, 1, -1))
        q = self._norm_rope(q, m["q_norm"], self.n_heads, cos, sin)
        k = self._norm_rope(k, m["k_norm"], self.n_kv, cos, sin)
        v = v.view(B, C, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v)
        else:
            out = sdpa(q, k, v, mask)
        return m["o_proj"](out.transpose(1, 2).reshape(B, C, -1))

    @property
    def rope_kernel_ok(self) -> bool:
        """norm_rope's shapes: it rotates whole vectors (D % 32 on RoPE layers)."""
        return not self.use_rope or self.head_dim % 32 == 0

    @property
    def attend_kernel_ok(self) -> bool:
        """attend_decode's shapes: norm_rope's and a head size its attention takes."""
        return self.rope_kernel_ok and kernel_head_dim_ok(self.head_dim)

    def _fused_ok(self, q: torch.Tensor, store: torch.Tensor) -> bool:
        """attend_decode takes this step: the kernels are built (by whoever needed them first; this
        never builds them), the cache holds q's dtype, and the head size is one it handles."""
        return (self.attend_kernel_ok and RMSNorm._kernel_ok(q, self._modules["q_norm"]._parameters["weight"])
                and store.dtype is q.dtype and store.is_contiguous())

    def _norm_rope(self, y: torch.Tensor, norm: RMSNorm, heads: int, cos, sin) -> torch.Tensor:
        """(B, C, heads * D) projection -> (B, heads, C, D), normalised per head, rotated on RoPE layers."""
        B, C, D = y.shape[0], y.shape[1], self.head_dim
        w = norm._parameters["weight"]
        if self.rope_kernel_ok and norm._kernel_ok(y, w):
            # One C++ call for the norm, the rotation and their roundings, instead of ~8 small ops.
            if self.use_rope:
                cos, sin = cos.reshape(B * C, D), sin.reshape(B * C, D)
            out = kernels.GEMM.module.norm_rope(y.reshape(B * C, -1), heads, w, norm.eps,
                                                *((cos, sin) if self.use_rope else ()))
            return out.view(B, C, heads, D).transpose(1, 2)
        h = norm(y.reshape(B, C, heads, D)).transpose(1, 2)
        return apply_rope(h, cos, sin) if self.use_rope else h


class MLP(nn.Module):
    def __init__(self, config: Exaone4Config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, i, bias=False)
        self.up_proj = Linear(h, i, bias=False)
        self.down_proj = Linear(i, h, bias=False)

    def forward(self, x):
        m = self._modules  # see Attention.forward
        gate, up = project(x, (m["gate_proj"], m["up_proj"]))
        if RMSNorm._kernel_ok(gate, up) and up.stride(-1) == 1:  # (up in w's place: its dtype and grad)
            # One C++ call and no intermediate (F.silu, then the product): same roundings.
            n = gate.shape[-1]
            h = kernels.GEMM.module.silu_mul(gate.reshape(-1, n), up.reshape(-1, n)).view(gate.shape)
        else:
            h = F.silu(gate) * up
        return m["down_proj"](h)


def project(x: torch.Tensor, linears) -> Sequence[torch.Tensor]:
    """Each linear applied to x: one call for all where their class can fuse them (`forward_many`:
    quantized linears quantize x once and split one pass over all their weights), else one each."""
    many = getattr(linears[0], "forward_many", None)
    out = many(x, linears) if many is not None else None
    return out if out is not None else [m(x) for m in linears]


class DecoderLayer(nn.Module):
    def __init__(self, config: Exaone4Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        m = self._modules  # see Attention.forward
        x = m["post_attention_layernorm"](m["self_attn"](x, cos, sin, mask, cache), residual=x)
        return m["post_feedforward_layernorm"](m["mlp"](x), residual=x)


class Exaone4Model(nn.Module):
    def __init__(self, config: Exaone4Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Exaone4ForCausalLM(nn.Module):
    """`model(input_ids)` -> logits (batch, seq, vocab), like transformers' `.logits`.

    Without a cache: full causal attention (sliding window on local layers), optional padding
    `attention_mask` (1 = token, 0 = pad) and `position_ids`. With a `KVCache`: `position_ids`
    (B, C) are required, `rows` says which cache rows the batch uses.
    """

    def __init__(self, config: Exaone4Config):
        super().__init__()
        self.config = config
        self.model = Exaone4Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", llama3_inv_freq(config), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self) -> None:
        """Recompute the RoPE buffer (it is not in the checkpoint; needed after meta-device init)."""
        self.inv_freq = llama3_inv_freq(self.config).to(self.model.norm.weight.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def make_cache(self, rows: int = 1, max_len: int | None = None, dtype=None, block: int = 256) -> KVCache:
        """The model declares its own cache layout: only it knows which layers slide."""
        return KVCache(self.config, rows, max_len, dtype=dtype or self.dtype, device=self.device, block=block)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                rows: slice | None = None, last_only: bool = False) -> torch.Tensor:
        B, C = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if position_ids is None:
            if cache is not None:
                raise ValueError("position_ids are required with a cache")
            position_ids = torch.arange(C, device=input_ids.device)[None].expand(B, C)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        masks = {}
        if cache is not None:
            cache.begin(rows if rows is not None else slice(0, B), position_ids)
        else:
            masks = self._masks(C, attention_mask, input_ids.device)
        for layer, sliding in zip(self.model.layers, self.config.is_sliding):
            x = layer(x, cos, sin, masks.get(sliding), cache)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def _masks(self, C: int, attention_mask, device) -> dict[bool, torch.Tensor]:
        i = torch.arange(C, device=device)
        causal = i[None, :] <= i[:, None]  # (C, C): query row, key column
        masks = {False: causal}
        if self.config.sliding_window is not None:
            masks[True] = causal & (i[:, None] - i[None, :] < self.config.sliding_window)
        for k, m in masks.items():
            m = m[None, None]
            if attention_mask is not None:
                # Pad keys are invisible; a pad query still sees itself so no row is empty (no NaN).
                m = (m & attention_mask.bool()[:, None, None, :]) | torch.eye(C, dtype=torch.bool, device=device)
            masks[k] = m
        return masks
