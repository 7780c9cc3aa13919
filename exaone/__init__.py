"""exaone: EXAONE 4.0 in plain PyTorch.

Public API (names users know from transformers / vLLM):
    exaone.load(path, dtype=None, device=None, quantize=None) -> Exaone4ForCausalLM (torch.nn.Module)
    exaone.save(model, path, tokenizer=None)        -> writes config.json + model.safetensors
    exaone.load_tokenizer(path)                     -> Tokenizer
"""
from .config import Exaone4Config, ConfigError

__version__ = "0.1.0"


def load(path=None, dtype=None, device=None, quantize=None):
    """quantize: None, "int8" or "int4" (weight-only, see docs/quantization.md)."""
    from .loader import load as _load
    return _load(path, dtype=dtype, device=device, quantize=quantize)


def save(model, path, tokenizer=None, max_shard_bytes=None):
    from .loader import save as _save
    return _save(model, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)


def load_tokenizer(path=None):
    from .tokenizer import load_tokenizer as _load_tokenizer
    return _load_tokenizer(path)


__all__ = ["Exaone4Config", "ConfigError", "load", "save", "load_tokenizer", "__version__"]
