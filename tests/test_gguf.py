"""GGUF export: the file read back with gguf.GGUFReader, then (when llama-cpp-python is installed)
run in llama.cpp and compared with our model: greedy tokens and logits.

Checkpoints: dense untied, dense tied with llama3 RoPE scaling (1.2B-like), hybrid LLLG with 64
layers (the only depth llama.cpp runs with sliding windows: the 32B's), an embedding padded past
the tokenizer's vocabulary, and a 4-layer hybrid,
which the exporter refuses unless forced because llama.cpp would run it without windows.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs `pip install 'exaone[gguf]'`")

import exaone  # noqa: E402
from exaone.export_gguf import export_gguf  # noqa: E402
from exaone.testing import make_random_checkpoint, tiny_config  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
CASES = {
    "dense": dict(sliding_window=None, sliding_window_pattern=None),
    "tied_llama3": dict(sliding_window=None, sliding_window_pattern=None, tie_word_embeddings=True,
                        rope_scaling=LLAMA3, rope_theta=1e6),
    "hybrid64": dict(num_hidden_layers=64, sliding_window=4, sliding_window_pattern="LLLG"),
    # embedding rows beyond the tokenizer (real checkpoints pad the vocabulary): "[PADn]", unused
    "padded_vocab": dict(sliding_window=None, sliding_window_pattern=None),
}
PAD_ROWS = 95
TEXT = "The quick brown fox jumps over the lazy dog. 안녕하세요, ¿cómo estás?"


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_random_checkpoint(d / "ckpt", tiny_config(**CASES[request.param]))
    if request.param == "padded_vocab":
        _pad_vocab(d / "ckpt", PAD_ROWS)
    out = export_gguf(d / "ckpt", d / "model.gguf", outtype="f32")
    return request.param, d / "ckpt", out


def _pad_vocab(ckpt, rows):
    from exaone.loader import save

    m = exaone.load(ckpt)
    m.config.vocab_size += rows
    emb = torch.nn.Embedding(m.config.vocab_size, m.config.hidden_size)
    emb.weight.data[: -rows] = m.model.embed_tokens.weight
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=False)
    head.weight.data[: -rows] = m.lm_head.weight
    m.model.embed_tokens, m.lm_head = emb, head
    save(m, ckpt)


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items()}


def test_metadata_and_tensors(exported):
    case, ckpt, path = exported
    cfg = exaone.Exaone4Config.from_file(ckpt)
    r, kv = _fields(path)
    assert kv["general.architecture"] == "exaone4"
    expect = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
              "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
              "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
              "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
              "rope.dimension_count": cfg.head_dim, "vocab_size": cfg.vocab_size}
    for k, v in expect.items():
        assert kv[f"exaone4.{k}"] == v, k
    assert kv["exaone4.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert kv["exaone4.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    if cfg.sliding_window:
        assert kv["exaone4.attention.sliding_window"] == cfg.sliding_window
        assert list(kv["exaone4.attention.sliding_window_pattern"]) == cfg.is_sliding
        assert cfg.is_sliding[:4] == [True, True, True, False]
    else:
        assert "exaone4.attention.sliding_window" not in kv

    tensors = {t.name: t for t in r.tensors}
    h, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)  # tied: none (llama.cpp issue 10737)
    assert list(tensors["token_embd.weight"].shape) == [h, cfg.vocab_size]  # ggml order: fastest dim first
    assert list(tensors[f"blk.{L - 1}.attn_k.weight"].shape) == [h, cfg.num_key_value_heads * hd]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [cfg.intermediate_size, h]
    assert list(tensors["blk.0.attn_q_norm.weight"].shape) == [hd]
    assert "blk.0.post_attention_norm.weight" in tensors and "blk.0.post_ffw_norm.weight" in tensors
    assert len(tensors) == 2 + 11 * L + (0 if cfg.tie_word_embeddings else 1) + (cfg.rope_scaling is not None)
    if cfg.rope_scaling:
        f = np.asarray(tensors["rope_freqs.weight"].data)
        assert f.shape == (hd // 2,) and f[-1] == pytest.approx(LLAMA3["factor"])  # low frequencies: / factor
        assert np.all(np.diff(f) >= 0) and f[0] < f[-1] and f.min() >= 1.0  # smooth band in between
    # weights are written as stored: q/k unpermuted (exaone4 uses NEOX RoPE in llama.cpp)
    ours = exaone.load(ckpt, dtype="float32").state_dict()
    q = np.asarray(tensors["blk.0.attn_q.weight"].data)
    np.testing.assert_array_equal(q, ours["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_tokenizer_fields(exported):
    _, ckpt, path = exported
    tok = exaone.load_tokenizer(ckpt)
    _, kv = _fields(path)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "exaone4"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == exaone.Exaone4Config.from_file(ckpt).vocab_size
    assert tokens[:3] == ["[PAD]", "[BOS]", "[EOS]"]
    types = kv["tokenizer.ggml.token_type"]
    if len(tokens) > len(tok):
        assert tokens[len(tok)] == f"[PAD{len(tok)}]" and set(types[len(tok):]) == {5}
    assert types[tokens.index("[|endofturn|]")] == 3 and types[tokens.index("<think>")] == 4
    assert len(kv["tokenizer.ggml.merges"]) > 100 and " " in kv["tokenizer.ggml.merges"][0]
    ids = dict(zip(("bos", "eos", "pad"), tok.convert_tokens_to_ids(["[BOS]", "[|endofturn|]", "[PAD]"])))
    assert kv["tokenizer.ggml.bos_token_id"] == ids["bos"]
    assert kv["tokenizer.ggml.eos_token_id"] == ids["eos"] == kv["tokenizer.ggml.eot_token_id"]
    assert kv["tokenizer.ggml.padding_token_id"] == ids["pad"]
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert "[|assistant|]" in kv["tokenizer.chat_template"]


@pytest.mark.parametrize("outtype,gtype", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_outtypes(tmp_path, outtype, gtype):
    make_random_checkpoint(tmp_path / "ckpt", tiny_config(sliding_window=None, sliding_window_pattern=None))
    r, _ = _fields(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", outtype=outtype))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == gtype and types["token_embd.weight"] == gtype
    assert types["blk.0.attn_q_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"


def test_hybrid_of_another_depth_is_refused(tmp_path):
    make_random_checkpoint(tmp_path / "ckpt", tiny_config())  # 4 layers, LLLG
    with pytest.raises(ValueError, match="64 layers"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    r, kv = _fields(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", force=True))
    assert list(kv["exaone4.attention.sliding_window_pattern"]) == [True, True, True, False]


# ---- llama.cpp ---------------------------------------------------------------------------------
def test_llama_cpp_greedy_tokens_and_logits_match(exported):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install "
                            "llama-cpp-python); the GGUFReader tests above still ran")
    case, ckpt, path = exported
    model, tok = exaone.load(ckpt, dtype="float32"), exaone.load_tokenizer(ckpt)
    prompt = tok.encode(TEXT)
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    # same pre-tokenizer ("exaone4" -> GPT-2 regex) and merges: same ids for plain text
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == prompt
    ours, ids = [], torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(16):
            nxt = int(model(ids)[0, -1].argmax())
            ours.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        ref = model(ids)[0, :-1].numpy()
    llm.eval(prompt)
    theirs = []
    for _ in range(16):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ours
    got = np.asarray(llm.scores[: len(prompt) + 15])
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 5e-3  # measured 3e-4 .. 1.5e-3
