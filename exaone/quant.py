"""Weight-only quantization for CPU decode: int8 per output channel, int4 group-wise.

`quantize_model(model, "int8" | "int4")` swaps each decoder `nn.Linear` (q/k/v/o, gate/up/down)
and, by default, `lm_head` (as int8) for a `QuantLinear` that keeps packed integer weights, so no
float copy of a weight is ever rebuilt during decode. Three backends run them (`default_backend`):

    vnni     exaone.kernels.qgemm: activations quantized per call to int8 blocks, integer dot
             products (AVX-512 VNNI); int8 w = q * s[n], int4 w = (q - 8) * s + z per group
    torch    aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu: weights widened to float,
             activations cast to `act_dtype` (bfloat16 by default) at the boundary
    dequant  a float weight rebuilt on every call (slow; no kernel at all)

EXAONE_NO_KERNELS=1 (or a CPU without AVX-512 VNNI) gives torch. Files hold one portable layout
(int8 (N, K); int4 two nibbles a byte, even column in the low nibble; scales in `act_dtype`),
repacked on load for whichever backend runs here. `save_quantized` / `load_quantized` write and
read that format with a `quantization_config` in config.json. This module must not know about
tokenizers, generation or GGUF.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import hugepages
from .kernels import qgemm

METHODS = ("int8", "int4")
BACKENDS = ("vnni", "torch", "dequant")
INT4_GROUPS = (32, 64, 128, 256)  # what the int4 CPU kernel accepts
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _op(name: str):
    return getattr(torch.ops.aten, name, None)


def kernels_available() -> dict[str, bool]:
    """Which fused kernels this torch build has; a method without one runs the slow dequantize path."""
    return {"int8": _op("_weight_int8pack_mm") is not None,
            "int4": _op("_weight_int4pack_mm_for_cpu") is not None
            and _op("_convert_weight_to_int4pack_for_cpu") is not None}


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A 64-byte-aligned contiguous copy when needed: `_weight_int8pack_mm` segfaults (torch 2.13,
    AVX512, several rows) on a weight at an unaligned address, which is what safetensors returns."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _group_for(in_features: int, group_size: int) -> int:
    """The largest kernel group size <= group_size that divides in_features."""
    for g in sorted(INT4_GROUPS, reverse=True):
        if g <= group_size and in_features % g == 0:
            return g
    raise ValueError(f"int4 needs in_features divisible by a group size in {INT4_GROUPS} that is "
                     f"<= group_size={group_size}; got in_features={in_features}")


# ---- int4 layouts -----------------------------------------------------------------------------
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) ints in 0..15 -> (N, K/2) uint8, column 2j in the low nibble, 2j+1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: (N, K/2) uint8 -> (N, K) int32."""
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1).to(torch.int32)


_KERNEL_ORDER: dict[tuple[int, int], torch.Tensor] = {}


def _kernel_order(n: int, k: int) -> torch.Tensor:
    """For the CPU kernel's packed (N, K/2) layout: which flat (N, K) index each nibble came from.

    The layout depends on the ISA the kernel was built for, so it is measured, not assumed: pack
    the flat index of every element four bits at a time and read the nibbles back.
    """
    key = (n, k)
    if key not in _KERNEL_ORDER:
        idx = torch.arange(n * k, dtype=torch.int64).reshape(n, k)
        src = torch.zeros(n * k, dtype=torch.int64)
        for j in range((max(n * k - 1, 1).bit_length() + 3) // 4):
            plane = ((idx >> (4 * j)) & 15).to(torch.int32)
            src |= unpack_nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(plane, 2)).flatten().long() << (4 * j)
        if not torch.equal(torch.sort(src).values, torch.arange(n * k)):
            raise RuntimeError("the int4 CPU packing is not a permutation of nibbles; cannot save it portably")
        _KERNEL_ORDER[key] = src
    return _KERNEL_ORDER[key]


def kernel_to_portable(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Kernel-layout int4 weights -> pack_nibbles layout (for saving)."""
    q = torch.empty(n * k, dtype=torch.int32)
    q[_kernel_order(n, k)] = unpack_nibbles(packed).flatten()
    return pack_nibbles(q.reshape(n, k))


# ---- the module -------------------------------------------------------------------------------
def default_backend(method: str) -> str:
    """"vnni" (exaone/kernels/qgemm: int8 activations, integer dot products) when it builds here,
    else "torch" (PyTorch's weight-only kernels), else "dequant" (a float weight rebuilt per call)."""
    if qgemm.available():
        return "vnni"
    return "torch" if kernels_available()[method] else "dequant"


class QuantLinear(nn.Module):
    """A bias-free Linear with int8 (per output channel) or int4 (group-wise) weights.

    Buffers `qweight` and `scales` (int8) or `scales_and_zeros` (int4) hold the layout of the
    backend that runs them (`backend`, see default_backend): "vnni" packs them with
    exaone.kernels.qgemm (int4 scales and zeros in bfloat16); "torch" keeps int8 (N, K) / torch's
    int4 pack with scales in `act_dtype`; "dequant" keeps the file layout. `portable_state()` gives
    the file layout whatever the backend: int8 (N, K) and (N,), or pack_nibbles (N, K/2) and
    (K/group, N, 2), scales in `act_dtype`.
    """

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int = 128,
                 act_dtype: torch.dtype = torch.bfloat16, device=None, backend: str | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
        if act_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"act_dtype must be float32, bfloat16 or float16, got {act_dtype}")
        if backend not in (None, *BACKENDS):
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features, self.out_features, self.method, self.act_dtype = in_features, out_features, method, act_dtype
        self.backend = backend or default_backend(method)
        if self.backend == "vnni" and not qgemm.available():
            raise ValueError(f"backend 'vnni' is unavailable here: {qgemm.disabled_reason()}")
        if self.backend == "torch" and not kernels_available()[method]:
            raise ValueError(f"this torch has no weight-only {method} kernel; use backend 'vnni' or 'dequant'")
        n, k = out_features, in_features
        if method == "int8":
            self.group_size = in_features
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(n, dtype=act_dtype, device=device))
        else:
            if out_features % 16:
                raise ValueError(f"int4 needs out_features divisible by 16, got {out_features}")
            self.group_size = _group_for(in_features, group_size)
            self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales_and_zeros", torch.empty(k // self.group_size, n, 2, dtype=act_dtype, device=device))

    @property
    def fused(self) -> bool:
        return self.backend != "dequant"

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, group_size: int = 128,
                    act_dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> "QuantLinear":
        if linear.bias is not None:
            raise ValueError("QuantLinear has no bias (EXAONE 4.0 linears have none)")
        m = cls(linear.in_features, linear.out_features, method, group_size, act_dtype, backend=backend)
        w = linear.weight.detach().float()
        with torch.no_grad():
            if method == "int8":
                # Symmetric, per output channel: [-127, 127] so that -q is representable too.
                s = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
                m.set_int8(torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s)
            else:
                q, scale, zero = quantize_int4(w, m.group_size)
                m.set_int4(q, scale, zero)
        return m

    def set_int8(self, q: torch.Tensor, s: torch.Tensor) -> None:
        """q int8 (N, K), s (N,): w = q * s."""
        s = s.to(self.act_dtype)  # the file's precision, whatever the backend computes in
        if self.backend == "vnni":
            self.qweight, self.scales = qgemm.pack_int8(q.cpu()), qgemm.pack_int8_scales(s)
        else:
            self.qweight, self.scales = _aligned(q.to(torch.int8)), _aligned(s)

    def set_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """q (N, K) in 0..15; scale, zero (N, K/group) with w = (q - 8) * scale + zero."""
        if self.backend == "vnni":
            self.qweight = qgemm.pack_int4(q)
            self.scales_and_zeros = qgemm.pack_int4_scales(scale, zero)  # bfloat16, whatever act_dtype
            return
        q = q.to(torch.int32).contiguous()
        self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2) if self.backend == "torch" else pack_nibbles(q)
        self.scales_and_zeros = torch.stack([scale.T, zero.T], dim=-1).to(self.act_dtype).contiguous()

    def set_portable(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        """Fill from the file layout (see portable_state)."""
        if self.method == "int8":
            self.set_int8(qweight, scales)
        else:
            self.set_int4(unpack_nibbles(qweight), scales[..., 0].T, scales[..., 1].T)

    def _logical(self):
        """int8: (q (N, K) int8, s (N,) float32); int4: (codes (N, K), scale, zero (N, K/group) float32)."""
        n, k = self.out_features, self.in_features
        if self.method == "int8":
            if self.backend == "vnni":
                return qgemm.unpack_int8(self.qweight, n, k), self.scales[:n].float()
            return self.qweight, self.scales.float()
        if self.backend == "vnni":
            scale, zero = qgemm.unpack_int4_scales(self.scales_and_zeros, n)
            return qgemm.unpack_int4(self.qweight, n, k), scale.float(), zero.float()
        packed = self.qweight if self.backend == "dequant" else kernel_to_portable(self.qweight, n, k)
        sz = self.scales_and_zeros.float()
        return unpack_nibbles(packed), sz[..., 0].T, sz[..., 1].T

    def portable_state(self) -> dict[str, torch.Tensor]:
        """The file layout: {"qweight", "scales" | "scales_and_zeros"} (see save_quantized)."""
        if self.method == "int8":
            q, s = self._logical()
            return {"qweight": q, "scales": s.to(self.act_dtype)}
        q, scale, zero = self._logical()
        return {"qweight": pack_nibbles(q),
                "scales_and_zeros": torch.stack([scale.T, zero.T], dim=-1).to(self.act_dtype).contiguous()}

    def portable_shapes(self) -> dict[str, tuple[int, ...]]:
        n, k = self.out_features, self.in_features
        if self.method == "int8":
            return {"qweight": (n, k), "scales": (n,)}
        return {"qweight": (n, k // 2), "scales_and_zeros": (k // self.group_size, n, 2)}

    def dequantize(self) -> torch.Tensor:
        """The float32 weight this module represents (reference path and tests)."""
        if self.method == "int8":
            q, s = self._logical()
            return q.float() * s[:, None]
        q, scale, zero = self._logical()
        g = self.group_size
        w = (q.float().view(self.out_features, -1, g) - 8) * scale[..., None] + zero[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "vnni":  # int8 activations, float32 or bfloat16 in and out
            # The extension directly: its inputs were checked when packed, and this runs 211 times a token.
            x2 = (x if x.dtype in (torch.float32, torch.bfloat16) else x.float()).reshape(-1, self.in_features)
            w, scales, bits, block = self._vnni_args()
            y = qgemm.QGEMM.module.qlinear(x2.contiguous(), w, scales, self.out_features, bits, block)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if y.dtype is x.dtype else y.to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.act_dtype).contiguous()
        if self.backend == "dequant":
            y = F.linear(x2, self.dequantize().to(self.act_dtype))  # slow fallback: no kernel in this build
        elif self.method == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def forward_many(self, x: torch.Tensor, linears) -> tuple[torch.Tensor, ...] | None:
        """[m(x) for m in linears] as one kernel call (x quantized once, one pass over all the
        weights, outputs as column slices of one tensor) when they are all VNNI QuantLinears of one
        kind (method, group, in_features); None otherwise (model.project then calls each)."""
        kind = self._kind()
        if kind is None or x.dtype not in (torch.float32, torch.bfloat16) or \
                not all(type(m) is QuantLinear and m._kind() == kind for m in linears):
            return None
        args = [m._vnni_args() for m in linears]
        sizes = [m.out_features for m in linears]
        y = qgemm.QGEMM.module.qlinear_many(x.reshape(-1, self.in_features).contiguous(), [a[0] for a in args],
                                            [a[1] for a in args], sizes, args[0][2], args[0][3])
        return y.view(*x.shape[:-1], y.shape[-1]).split_with_sizes(sizes, -1)

    def _kind(self):
        """What forward_many needs alike in the linears it fuses (None: not the VNNI kernel)."""
        return (self.method, self.group_size, self.in_features) if self.backend == "vnni" else None

    def _vnni_args(self):
        """(packed weights, scales buffer, weight bits, activation block) that the VNNI kernel takes.
        From `_buffers` directly: nn.Module's attribute lookup costs ~0.8 us, ~6 times a layer a token."""
        b = self._buffers
        if self.method == "int8":
            return b["qweight"], b["scales"], 8, qgemm.INT8_BLOCK
        return b["qweight"], b["scales_and_zeros"], 4, self.group_size

    def weight_bytes(self) -> int:
        """Bytes a forward pass reads: the packed weights and their scales."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        kind = {"vnni": "VNNI kernel, int8 activations", "torch": "torch weight-only kernel",
                "dequant": "DEQUANTIZE FALLBACK (no kernel in this torch)"}[self.backend]
        return (f"in={self.in_features}, out={self.out_features}, {self.method}, group={self.group_size}, "
                f"act={str(self.act_dtype).replace('torch.', '')}, {kind}")


def quantize_int4(w: torch.Tensor, group: int):
    """Asymmetric min/max int4 per group of `group` input columns.

    Returns q (N, K) int32 in 0..15 and scale, zero (N, K/group) in the kernel's convention
    w ~ (q - 8) * scale + zero (zero is the value at the mid code 8, not an integer offset).
    """
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo + 8 * scale


# ---- whole models -----------------------------------------------------------------------------
def _targets(model: nn.Module, lm_head: bool):
    """(parent module, attribute name) of every linear that quantize_model replaces."""
    for layer in model.model.layers:
        for name in LINEAR_NAMES[:4]:
            yield layer.self_attn, name
        for name in LINEAR_NAMES[4:]:
            yield layer.mlp, name
    if lm_head:
        yield model, "lm_head"


def lm_head_method(method: str, lm_head) -> str | None:
    """What lm_head becomes: None/False float, True the body's method, or "int8" / "int4"."""
    if lm_head is None or lm_head is False:
        return None
    if lm_head is True:
        return method
    if lm_head not in METHODS:
        raise ValueError(f"lm_head must be a bool or one of {METHODS}, got {lm_head!r}")
    return lm_head


def quantize_model(model: nn.Module, method: str, group_size: int = 128, lm_head: bool | str | None = "int8",
                   act_dtype: torch.dtype | str = torch.bfloat16, backend: str | None = None) -> nn.Module:
    """Replace the decoder linears with QuantLinear, in place; returns model.

    `lm_head`: "int8" (default: a quarter of a bfloat16 lm_head's bytes for a tiny logit error,
    measured in docs/quantization.md; llama.cpp's Q4_K_M likewise keeps its output matrix at
    higher precision than the body), "int4", True (the body's method) or False (stay float).
    `backend`: None picks the fastest here (default_backend); "torch" / "dequant" force one.
    With tied embeddings a quantized lm_head is an int copy of the embedding table (the embedding
    lookup stays float): more memory, fewer bytes read per step.
    """
    if method not in METHODS:
        raise ValueError(f"quantize must be one of {METHODS}, got {method!r}")
    if method == "int4" and group_size not in INT4_GROUPS:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUPS}, got {group_size}")
    head = lm_head_method(method, lm_head)
    if isinstance(act_dtype, str):
        act_dtype = getattr(torch, act_dtype)
    if getattr(model, "quantization_config", None):
        raise ValueError(f"model is already quantized ({model.quantization_config['quant_method']})")
    if model.device.type != "cpu":
        raise ValueError(f"quantize_model targets CPU kernels; the model is on {model.device}")
    for parent, name in list(_targets(model, head is not None)):
        lin = getattr(parent, name)
        if isinstance(lin, nn.Linear):
            m = head if name == "lm_head" else method
            setattr(parent, name, QuantLinear.from_linear(lin, m, group_size, act_dtype, backend))
            hugepages.trim()  # the float weight and the temporaries: back to the OS, not kept in the heap
    model.quantization_config = {"quant_method": f"exaone-{method}", "group_size": group_size if method == "int4" else None,
                                 "lm_head": head or False, "act_dtype": str(act_dtype).replace("torch.", "")}
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights read per decode step: every parameter and QuantLinear buffer, the embedding
    table excluded (a step reads one row of it) unless it doubles as the float lm_head."""
    emb = model.model.embed_tokens.weight
    read_emb = isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is emb
    tensors = {id(t): t for m in model.modules()
               for t in (m.buffers(recurse=False) if isinstance(m, QuantLinear) else m.parameters(recurse=False))
               if t is not emb or read_emb}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---- files ------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, path) -> Path:
    """Write config.json (with quantization_config) and model.safetensors of a quantized model.

    Per QuantLinear: `<name>.qweight` (int8 (N, K), or uint8 (N, K/2) in pack_nibbles layout) and
    `<name>.scales` (N,) or `<name>.scales_and_zeros` (K/group, N, 2), whatever the backend; every
    other tensor as is. quantization_config["lm_head"]: False, or the lm_head's method (old files: True,
    the body's method).
    """
    from safetensors.torch import save_file

    qc = getattr(model, "quantization_config", None)
    if qc is None:
        raise ValueError("model is not quantized: call quantize_model first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = dict(qc)
    config["torch_dtype"] = str(model.dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    state = dict(model.state_dict())
    for mname, m in model.named_modules():
        if isinstance(m, QuantLinear):
            state.update({f"{mname}.{k}": v for k, v in m.portable_state().items()})
    if model.config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        state.pop("lm_head.weight", None)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt", "quantization": qc["quant_method"]})
    return path


def load_quantized(path, dtype=None) -> nn.Module:
    """Load a directory written by save_quantized; `dtype` applies to the float tensors (norms,
    embedding, an unquantized lm_head). Mismatched tensor names fail loudly."""
    from .config import Exaone4Config
    from .loader import CheckpointError, _open, parse_dtype
    from .model import Exaone4ForCausalLM

    path = Path(path)
    config = Exaone4Config.from_file(path / "config.json")
    qc = config.extra.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") not in ("exaone-int8", "exaone-int4"):
        raise CheckpointError(f"{path}: config.json has no exaone-int8/exaone-int4 quantization_config")
    method = qc["quant_method"].split("-", 1)[1]
    act_dtype = getattr(torch, qc.get("act_dtype", "bfloat16"))
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = Exaone4ForCausalLM(config)
    head = lm_head_method(method, qc.get("lm_head"))
    for parent, name in list(_targets(model, head is not None)):
        lin = getattr(parent, name)
        setattr(parent, name, QuantLinear(lin.in_features, lin.out_features, head if name == "lm_head" else method,
                                          qc.get("group_size") or 128, act_dtype, device="meta"))
    file = path / "model.safetensors"
    quant = {m: n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    with _open(file) as f:
        names = set(f.keys())
        expected = set(model.state_dict())
        if config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
            expected.discard("lm_head.weight")
        if names != expected:
            raise CheckpointError(f"{file}: tensors do not match the config; missing "
                                  f"{sorted(expected - names)[:10]}, unexpected {sorted(names - expected)[:10]}")
        packed = {n for n in names if any(n.startswith(f"{q}.") for q in quant.values())}
        # packed weights: views of the file (repacked below); float ones read as the loader does
        state = {n: f.handle.get_tensor(n) if n in packed else f.tensor(n, dtype) for n in names}
    float_state = {k: v for k, v in state.items() if k not in packed}
    model.load_state_dict(float_state, strict=False, assign=True)
    for m, n in quant.items():
        for key, want in m.portable_shapes().items():
            if tuple(state[f"{n}.{key}"].shape) != want:
                raise CheckpointError(f"{file}: tensor {n}.{key} has shape {list(state[f'{n}.{key}'].shape)}, "
                                      f"expected {list(want)}")
        q, sz = (state[f"{n}.{key}"] for key in m.portable_shapes())
        m.set_portable(q, sz.to(act_dtype))
    if isinstance(model.lm_head, nn.Linear):  # a quantized lm_head is its own copy, never tied
        model.tie_weights()
    model.reset_rope()
    model.eval()
    model.requires_grad_(False)
    model.quantization_config = qc
    model.name_or_path = str(path)
    return model
