"""A decode step's layers in one C++ call: `DecodePlan(model)(tokens, positions, cache, rows)`.

The eager decode step runs each layer as ~20 Python-level calls around 8 kernel calls (q|k|v,
the fused attention, o, two norms, gate|up, silu * up, down). A `DecodePlan` hands the same
kernels, in the same order, to exaone.kernels' `DecodeLayers`, which runs every layer in C++
(and without the GIL): the same numbers, without ~1 ms of Python a 30-layer step, and with less
of the interpreter's state to fetch again after each layer's weights have flushed the caches.

It applies where every linear of the model would be one of our kernels at that batch size (float
`Linear` through `f32_linear` / `bf16_linear`, up to `model.kernel_rows`; quantized linears
through the VNNI kernel) and the attention through `attend_decode`; `DecodePlan.build` returns
None otherwise, and `max_rows` bounds the batch. The plan holds the model's tensors as they are
when it is built (like `CompiledDecode`): build it again after replacing modules or parameters.
The embedding, the final norm and the lm_head stay in Python (one call each).
"""
from __future__ import annotations

import torch

from . import kernels
from .model import Exaone4ForCausalLM, Linear, kernel_rows, rope_cos_sin
from .quant import QuantLinear
from .kernels import qgemm

__all__ = ["DecodePlan"]


class DecodePlan:
    def __init__(self, model: Exaone4ForCausalLM, layers, max_rows: int, needs_qgemm: bool):
        self.model, self.max_rows = model, max_rows
        mod = kernels.GEMM.module
        capsule = qgemm.QGEMM.module.qlinear_many_capsule() if needs_qgemm else None
        self._layers = mod.DecodeLayers(capsule, [mod.Layer(*spec) for spec in layers])

    @classmethod
    def build(cls, model) -> DecodePlan | None:
        """The plan for `model`, or None where some part of its decode step is not our kernels'.
        It never builds the kernels (`model.warm_kernels` does, when the model would use them)."""
        if not isinstance(model, Exaone4ForCausalLM) or model.device.type != "cpu" or \
                model.dtype not in (torch.float32, torch.bfloat16) or kernels.GEMM.module is None:
            return None
        cfg, dtype = model.config, model.dtype
        if not all(layer.self_attn.attend_kernel_ok for layer in model.model.layers):
            return None
        limits, layers, quant = [], [], False
        for layer, sliding in zip(model.model.layers, cfg.is_sliding):
            a, f = layer.self_attn, layer.mlp
            groups = []
            for linears in ((a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (f.gate_proj, f.up_proj), (f.down_proj,)):
                g = _group(linears, dtype)
                if g is None:
                    return None
                spec, limit = g
                groups.append(spec)
                limits.append(limit)
                quant |= type(linears[0]) is QuantLinear
            norms = (a.q_norm, a.k_norm, layer.post_attention_layernorm, layer.post_feedforward_layernorm)
            if any(n.weight.dtype is not dtype or not n.weight.is_contiguous() or n.eps != a.q_norm.eps for n in norms):
                return None
            layers.append((*groups, *(n.weight.detach() for n in norms), a.q_norm.eps,
                           cfg.sliding_window if sliding and cfg.sliding_window else 0, bool(a.use_rope)))
        return cls(model, layers, min(limits), quant)

    def usable(self, tokens: torch.Tensor, cache) -> bool:
        """This step can run here: one token per row, few enough rows, a cache of the model's dtype."""
        B, C = tokens.shape
        return C == 1 and B <= self.max_rows and cache.dtype is self.model.dtype and not torch.is_grad_enabled()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, rows: slice) -> torch.Tensor:
        """The eager `model(tokens, position_ids=positions, cache=cache, rows=rows)` for a
        one-token step (check `usable` first): logits (B, 1, vocab)."""
        m = self.model
        x = m.model.embed_tokens(tokens)[:, 0]
        cos, sin = rope_cos_sin(m.inv_freq, positions, x.dtype)
        B = x.shape[0]
        cache.begin(rows, positions)
        pos = positions[:, 0].long().contiguous()
        x = self._layers.run(x.contiguous(), cos.view(B, -1), sin.view(B, -1), pos, rows.start or 0, cache.k, cache.v)
        return m.lm_head(m.model.norm(x[:, None]))


def _group(linears, dtype):
    """(kernels' Group for these linears that share an input, the most rows it takes), or None."""
    mod = kernels.GEMM.module
    first = linears[0]
    if all(type(m) is QuantLinear for m in linears):
        kind = first._kind()
        if kind is None or any(m._kind() != kind for m in linears) or qgemm.QGEMM.module is None:
            return None
        args = [m._vnni_args() for m in linears]
        return mod.Group(2, [x[0] for x in args], [x[1] for x in args], [m.out_features for m in linears],
                         args[0][2], args[0][3]), 1 << 30
    if not all(type(m) is Linear and m.bias is None and m.weight.dtype is dtype for m in linears):
        return None
    ws = [m.weight.detach() for m in linears]
    if not all(Linear._kernel_ok(w) for w in ws):
        return None
    return (mod.Group(0 if dtype is torch.float32 else 1, ws, [], [m.out_features for m in linears]),
            min(kernel_rows(w) for w in ws))
