"""Checkpoint directory <-> model: config.json + model.safetensors (or shards + index).

The model is built on the meta device and each tensor is read from the file straight into its
parameter (into 2 MB pages where the OS offers them, else as a view of the file's mapping), so
weights are never held twice. Every mismatch fails loudly with
file and tensor names. This module must not know about tokenizers' internals or generation.
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch

from . import hugepages
from .config import Exaone4Config
from .model import Exaone4ForCausalLM

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Buffers some exporters write that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint whose files do not match the model; the message names the file and tensor."""


_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))} or 'auto', got {dtype!r}") from None


def default_model_path() -> Path:
    """The embedded demo model when it ships, else $EXAONE_MODEL."""
    env = os.environ.get("EXAONE_MODEL")
    if env:
        return Path(env)
    return Path(__file__).parent / "assets" / "exaone-4.0-nano"


def _shard_map(path: Path) -> dict[str, Path]:
    """tensor name -> file that holds it."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        out = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(out.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return out
    single = path / SINGLE
    if not single.is_file():
        raise FileNotFoundError(f"no weights in {path}: expected {SINGLE} or {INDEX}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


# safetensors' dtype names -> torch, for the tensors read straight into 2 MB pages.
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


class _open:
    """safe_open with errors that name the file (corrupt header, truncated data...), and
    `tensor(name)`: the tensor as stored, read into 2 MB pages where `hugepages` offers them."""

    def __init__(self, file: Path):
        from safetensors import safe_open

        self.file = file
        self._header: dict | None = None
        self._base = 0
        self._fh = None  # the file, opened for the header the first time a tensor needs it
        try:
            self.handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return False

    def keys(self):
        return self.handle.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(name).get_shape())

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, as stored or converted to `dtype`, on the CPU.

        As stored, in 2 MB pages (`hugepages.empty`) when they are on and it spans one: its bytes
        are read from the file into them, so the weights are in memory once (the page cache is
        not the process's) and a decode step streams them with fewer TLB misses. Otherwise (small
        tensors, EXAONE_HUGEPAGES=0) a view of the file's mapping: no copy, pages shared with
        other processes. Converted: a new tensor anyway, in 2 MB pages where they are on."""
        info = self._info(name)
        stored = _ST_DTYPES.get(info.get("dtype")) if info else None
        if dtype is not None and dtype is not stored:
            t = self.handle.get_tensor(name)
            return hugepages.copy(t, dtype) if dtype is not t.dtype else t
        dtype = stored
        if dtype is None or not hugepages.enabled():
            return self.handle.get_tensor(name)
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != torch.Size(shape).numel() * dtype.itemsize or end - begin < hugepages.HUGE:
            return self.handle.get_tensor(name)  # small, or let safetensors report the inconsistency
        out = hugepages.empty(shape, dtype)
        view = memoryview((ctypes.c_char * (end - begin)).from_address(out.data_ptr())).cast("B")
        self._fh.seek(self._base + begin)  # opened by _info
        done = 0
        while done < len(view):
            n = self._fh.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{self.file}: tensor {name} is truncated ({done} of {len(view)} bytes)")
            done += n
        return out

    def _info(self, name: str) -> dict | None:
        """The header entry of `name` (dtype, shape, data_offsets); the header is read once."""
        if self._header is None:
            try:
                self._fh = open(self.file, "rb")
                size = int.from_bytes(self._fh.read(8), "little")
                self._header = json.loads(self._fh.read(size))
                self._base = 8 + size
            except (OSError, ValueError):
                self._header = {}  # safe_open read it; whatever this misses, get_tensor handles
        info = self._header.get(name)
        return info if isinstance(info, dict) and "data_offsets" in info else None


def load(path=None, dtype=None, device=None, quantize=None) -> Exaone4ForCausalLM:
    """Load an EXAONE 4.0 checkpoint directory.

    dtype None or "auto": the dtype the tensors are stored in; device None: CPU.
    quantize "int8" / "int4": weight-only quantize the decoder linears after loading (exaone.quant,
    CPU); a directory written by exaone.quant.save_quantized loads quantized as it is.
    """
    path = Path(path) if path is not None else default_model_path()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    config = Exaone4Config.from_file(path / "config.json")
    if "quantization_config" in config.extra:
        from .quant import load_quantized
        return load_quantized(path, dtype)
    dtype = parse_dtype(dtype)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Exaone4ForCausalLM(config)
    expected = dict(model.state_dict())
    tied = config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    files = _shard_map(path)
    names = [n for n in files if not n.endswith(_IGNORED_SUFFIXES) and not (tied and n == "lm_head.weight")]
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        msg = [f"checkpoint {path} does not match the config"]
        if missing:
            msg.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            msg.append(f"unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
        raise CheckpointError("; ".join(msg))
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for file, tensor_names in by_file.items():
        with _open(file) as f:
            for n in tensor_names:
                want = tuple(expected[n].shape)
                try:
                    got = f.shape(n)
                    if got != want:
                        raise CheckpointError(f"{file}: tensor {n} has shape {list(got)}, the config needs {list(want)}")
                    t = f.tensor(n, dtype if device.type == "cpu" else None)
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read tensor {n} ({e})") from None
                if not t.is_floating_point():
                    raise CheckpointError(f"{file}: tensor {n} has dtype {t.dtype}, expected a float type")
                state[n] = t.to(device=device, dtype=dtype or t.dtype)  # no-op on the CPU
                del t
    model.load_state_dict(state, strict=not tied, assign=True)
    model.tie_weights()
    model.reset_rope()
    model.eval()
    model.requires_grad_(False)
    model.name_or_path = str(path)
    if quantize:
        from .quant import quantize_model
        quantize_model(model, quantize)
    return model


def save(model: Exaone4ForCausalLM, path, tokenizer=None, max_shard_bytes: int | None = None) -> Path:
    """Write config.json and safetensors (sharded with an index when max_shard_bytes is set)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.torch_dtype = str(model.dtype).replace("torch.", "")
    config.save(path / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    meta = {"format": "pt"}
    if not max_shard_bytes:
        save_file(state, str(path / SINGLE), metadata=meta)
    else:
        shards: list[dict] = [{}]
        size = 0
        for k, v in state.items():
            nb = v.numel() * v.element_size()
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nb
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
