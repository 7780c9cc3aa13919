"""Exaone4Config: config.json as the checkpoint has it, plus one derived per-layer plan.

Field names are Hugging Face's. Every published spelling of the layer plan is accepted
(`layer_types`, `sliding_window_pattern` as "LLLG" or as an integer period, `sliding_window: null`)
and turned into one plan: `layer_types[i]` in {"sliding_attention", "full_attention"} and
`use_rope[i]`. This module must not import torch modules beyond nothing: it is plain data.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"


class ConfigError(ValueError):
    """A config.json that cannot describe an EXAONE 4.0 model; the message names the field."""


@dataclass
class Exaone4Config:
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    sliding_window_pattern: str | int | None = None
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    model_type: str = "exaone4"
    # Keys we do not model are kept so that save() writes the file back as it was.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_type != "exaone4":
            raise ConfigError(f"model_type must be 'exaone4', got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is not divisible by "
                                  f"num_attention_heads ({self.num_attention_heads}) and head_dim is not set")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        self._check_rope_scaling()
        self.layer_types = self._layer_plan()

    # ---- the per-layer plan -------------------------------------------------------------
    def _layer_plan(self) -> list[str]:
        n, window, pattern, types = (self.num_hidden_layers, self.sliding_window,
                                     self.sliding_window_pattern, self.layer_types)
        if window is None:
            # The released 1.2B: sliding_window null -> every layer global, every layer RoPE.
            if types and SLIDING in types:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is null")
            return [FULL] * n
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ConfigError(f"sliding_window must be a positive integer or null, got {window!r}")
        if types is not None:
            if len(types) != n:
                raise ConfigError(f"layer_types has {len(types)} entries, num_hidden_layers is {n}")
            bad = sorted({t for t in types if t not in (SLIDING, FULL)})
            if bad:
                raise ConfigError(f"layer_types entries must be {SLIDING!r} or {FULL!r}, got {bad}")
            return list(types)
        if isinstance(pattern, str) and pattern:
            if set(pattern) - {"L", "G"}:
                raise ConfigError(f"sliding_window_pattern must use only 'L' and 'G', got {pattern!r}")
            # As the reference implementation: the pattern repeats and the last layer is global.
            return [SLIDING if pattern[i % len(pattern)] == "L" and i != n - 1 else FULL for i in range(n)]
        if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
            return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
        raise ConfigError(f"sliding_window is {window} but neither layer_types nor a valid "
                          f"sliding_window_pattern (a string like 'LLLG' or a period > 0) is given "
                          f"(sliding_window_pattern={pattern!r})")

    def _check_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        kind = rs.get("rope_type", rs.get("type"))
        if kind in (None, "default"):
            self.rope_scaling = None
            return
        if kind != "llama3":
            raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: 'llama3', none)")
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if not isinstance(rs.get(key), (int, float)) or rs[key] <= 0:
                raise ConfigError(f"rope_scaling.{key} must be a positive number, got {rs.get(key)!r}")
        if rs["high_freq_factor"] <= rs["low_freq_factor"]:
            raise ConfigError("rope_scaling.high_freq_factor must be greater than low_freq_factor")

    @property
    def is_sliding(self) -> list[bool]:
        return [t == SLIDING for t in self.layer_types]

    @property
    def use_rope(self) -> list[bool]:
        # Hybrid models: RoPE on local layers only (global layers are NoPE). Without a window
        # (the 1.2B) every layer uses RoPE. Same rule as the reference implementation.
        return [self.sliding_window is None or s for s in self.is_sliding]

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    # ---- reading and writing ------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Exaone4Config":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # Newer transformers writes `rope_parameters` (theta inside) instead of rope_theta/rope_scaling.
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict):
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known}
        kwargs.setdefault("model_type", d.get("model_type", "exaone4"))
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "Exaone4Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        d["architectures"] = d.get("architectures") or ["Exaone4ForCausalLM"]
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # ---- sizes ---------------------------------------------------------------------------
    def num_parameters(self) -> int:
        h, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * hd
        layer = attn + 3 * h * i + 2 * h
        return self.num_hidden_layers * layer + v * h * (1 if self.tie_word_embeddings else 2) + h


def llama3_inv_freq(config: Exaone4Config):
    """RoPE inverse frequencies, with llama3 frequency scaling when the config asks for it."""
    import torch

    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
