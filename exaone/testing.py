"""Tiny random EXAONE 4.0 checkpoints for tests and for `exaone init-tiny`.

`tiny_config()` is a 4-layer hybrid (LLLG) config small enough to run in milliseconds on a CPU;
`make_random_checkpoint()` builds our own model with random weights and writes it with
`exaone.save`, plus a small tokenizer when `exaone.tokenizer_build` is available. The weights mean
nothing: this module must stay dependency-light (torch only) and must not pretend to be a real model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import Exaone4Config

_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
             rope_theta=10000.0, sliding_window=16, sliding_window_pattern="LLLG",
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(**overrides) -> Exaone4Config:
    """A tiny hybrid config (3 sliding : 1 global, window 16); any field can be overridden."""
    return Exaone4Config(**{**_TINY, **overrides})


def init_random_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights ~ N(0, 0.02); norm weights 1 + N(0, 0.1), so that a missing norm shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights are listed once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)


def make_random_checkpoint(path, config: Exaone4Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                           tokenizer: bool = True) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) for a randomly initialised model.

    With `tokenizer=True` and the tokenizer builder available, the config's vocab_size and its
    bos/eos/pad ids are set from the tokenizer (eos = `[|endofturn|]`, as in the published models).
    """
    from .loader import save
    from .model import Exaone4ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        try:
            from .tokenizer_build import build_tokenizer
        except ImportError:
            build_tokenizer = None
        if build_tokenizer is not None:
            tok = build_tokenizer(out_dir=path)
            ids = tok.convert_tokens_to_ids(["[BOS]", "[|endofturn|]", "[PAD]"])
            config = dataclasses.replace(config, vocab_size=len(tok), bos_token_id=ids[0],
                                         eos_token_id=ids[1], pad_token_id=ids[2])
    model = Exaone4ForCausalLM(config)
    init_random_(model, seed)
    model.to(dtype)
    save(model, path)
    return path
