"""Checkpoint directory -> one GGUF file that llama.cpp runs as the `exaone4` architecture.

What llama.cpp expects, and so what is written (checked against its exaone4 loader and graph):

* hyperparameters under `exaone4.*`: context/embedding/feed-forward length, block count, head
  counts, key/value length (head_dim), rope dimension count, rope freq base, RMS eps, vocab size;
  for hybrid models `sliding_window` and the per-layer `sliding_window_pattern` (bools, true =
  local). llama.cpp turns on the sliding-window graph only for 64-layer files (the 32B), and then
  uses RoPE on local layers only; any other depth runs every layer global with RoPE. So a hybrid
  checkpoint of another depth would silently compute something else: refused unless `force`.
* llama3 RoPE scaling as a `rope_freqs` tensor of per-frequency divisors (unscaled / scaled).
* RoPE is the NEOX (rotate-half) kind for exaone4 in llama.cpp, as in our model: q/k weights are
  written unpermuted (the LLaMA converter's permutation is for the interleaved kind).
* RMSNorm weights multiply as stored (no 1 + w offset). Tied embeddings: no `output.weight`.
* tokenizer: `gpt2` BPE, pre-tokenizer `exaone4` (llama.cpp maps it to the GPT-2 split regex, the
  one our byte-level tokenizer uses), tokens/types/merges, special ids, chat template.

This module reads the checkpoint and writes the file; it must not run or change the model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .config import Exaone4Config, llama3_inv_freq

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "q8_0")
LLAMA_CPP_HYBRID_LAYERS = 64  # the only depth llama.cpp runs with sliding-window attention
# token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'exaone[gguf]'") from None
    if not hasattr(gguf.MODEL_ARCH, "EXAONE4"):
        raise ImportError(f"gguf {getattr(gguf, '__version__', '?')} has no EXAONE4 architecture: pip install -U gguf")
    return gguf


def tensor_names(config: Exaone4Config) -> dict[str, str]:
    """Our (= Hugging Face) tensor name -> GGUF tensor name, from gguf's own name table."""
    gguf = _gguf()
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    out = {"model.embed_tokens.weight": names[T.TOKEN_EMBD] + ".weight",
           "model.norm.weight": names[T.OUTPUT_NORM] + ".weight"}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = names[T.OUTPUT] + ".weight"
    per_layer = {"self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V,
                 "self_attn.o_proj": T.ATTN_OUT, "self_attn.q_norm": T.ATTN_Q_NORM,
                 "self_attn.k_norm": T.ATTN_K_NORM, "post_attention_layernorm": T.ATTN_POST_NORM,
                 "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN,
                 "post_feedforward_layernorm": T.FFN_POST_NORM}
    for i in range(config.num_hidden_layers):
        for ours, t in per_layer.items():
            out[f"model.layers.{i}.{ours}.weight"] = names[t].format(bid=i) + ".weight"
    return out


def rope_factors(config: Exaone4Config) -> torch.Tensor | None:
    """llama.cpp divides each RoPE frequency by its factor: factor = unscaled / llama3-scaled."""
    if config.rope_scaling is None:
        return None
    return (llama3_inv_freq(dataclasses.replace(config, rope_scaling=None)) / llama3_inv_freq(config)).float()


# ---- tokenizer ---------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_str(v):
    return v.get("content") if isinstance(v, dict) else v


def add_tokenizer(writer, model_dir: Path, config: Exaone4Config) -> None:
    tj = _read_json(model_dir / "tokenizer.json")
    if not tj:
        raise FileNotFoundError(f"{model_dir}/tokenizer.json not found: GGUF needs the tokenizer")
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json model type {model.get('type')!r}: only byte-level BPE is exported")
    tc = _read_json(model_dir / "tokenizer_config.json")
    id_to_tok: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for a in tj.get("added_tokens", []):
        id_to_tok[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    n = max(config.vocab_size, max(id_to_tok) + 1)
    if n != config.vocab_size:
        raise ValueError(f"tokenizer has ids up to {max(id_to_tok)}, config.vocab_size is {config.vocab_size}")
    tokens = [id_to_tok.get(i, f"[PAD{i}]") for i in range(n)]  # padding rows of the embedding
    toktypes = [types.get(i, NORMAL if i in id_to_tok else UNUSED) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("exaone4")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    writer.add_token_merges(merges)

    tok_id = {t: i for i, t in enumerate(tokens)}

    def special(name: str, fallback):
        s = _token_str(tc.get(f"{name}_token"))
        if s is not None and s in tok_id:
            return tok_id[s]
        return fallback

    eos_cfg = config.eos_token_ids[0] if config.eos_token_ids else None
    ids = {"bos": special("bos", config.bos_token_id), "eos": special("eos", eos_cfg),
           "unk": special("unk", None), "pad": special("pad", config.pad_token_id)}
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for k, v in ids.items():
        if v is not None:
            setters[k](int(v))
    if "[|endofturn|]" in tok_id:  # not in llama.cpp's end-of-turn autodetect list: say it
        writer.add_eot_token_id(tok_id["[|endofturn|]"])
    writer.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    template = tc.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        writer.add_chat_template(template)


# ---- the file ----------------------------------------------------------------------------------
def check_llama_cpp_compatible(config: Exaone4Config) -> None:
    hybrid = config.sliding_window is not None
    if hybrid and config.num_hidden_layers != LLAMA_CPP_HYBRID_LAYERS:
        raise ValueError(
            f"llama.cpp runs an exaone4 file with sliding-window (hybrid) attention only when it has "
            f"{LLAMA_CPP_HYBRID_LAYERS} layers; this hybrid model has {config.num_hidden_layers}, so "
            f"llama.cpp would run every layer as a global RoPE layer and give different outputs. "
            f"Pass force=True (--force) to write the file anyway.")


def export_gguf(model_dir, out, outtype: str = "f16", force: bool = False) -> Path:
    """Write `out` (a .gguf file) from the checkpoint directory `model_dir`; returns the path."""
    gguf = _gguf()
    from .loader import load

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    model_dir, out = Path(model_dir), Path(out)
    model = load(model_dir)  # validates names and shapes; stored dtype, converted per tensor below
    if getattr(model, "quantization_config", None):
        raise ValueError(f"{model_dir} is an exaone int8/int4 checkpoint: export GGUF from the float checkpoint")
    config = model.config
    if not force:
        check_llama_cpp_compatible(config)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.EXAONE4])
    writer.add_name(model_dir.name)
    writer.add_file_type(ftype)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern(config.is_sliding)  # our plan, layer by layer
    add_tokenizer(writer, model_dir, config)

    names = tensor_names(config)
    state = model.state_dict()
    factors = rope_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
    for ours, theirs in names.items():
        t = state[ours].detach().float().cpu()
        data = t.numpy()
        if t.ndim == 1 or outtype == "f32":  # norms stay f32, as llama.cpp's converter writes them
            writer.add_tensor(theirs, data.astype(np.float32))
        elif outtype == "f16":
            writer.add_tensor(theirs, data.astype(np.float16))
        elif data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(theirs, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            log.warning("%s: row length %d is not a multiple of 32, written as f16", theirs, data.shape[-1])
            writer.add_tensor(theirs, data.astype(np.float16))
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
