"""Exaone4Config: every spelling of the layer plan, both RoPE spellings, the published configs,
clear errors; and the hybrid KV cache's size for the 32B."""
from __future__ import annotations

import json

import pytest

from exaone.cache import cache_bytes
from exaone.config import ConfigError, Exaone4Config

S, F = "sliding_attention", "full_attention"
BASE = dict(model_type="exaone4", vocab_size=300, hidden_size=64, intermediate_size=128,
            num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

# config.json of the published models, field for field (values from the model cards/configs;
# the 1.2B publishes both window fields as null, the 32B the pattern string "LLLG").
CONFIG_1_2B = {
    "architectures": ["Exaone4ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 361, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 4096, "max_position_embeddings": 65536,
    "model_type": "exaone4", "num_attention_heads": 32, "num_hidden_layers": 30,
    "num_key_value_heads": 8, "pad_token_id": 0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 1000000, "sliding_window": None, "sliding_window_pattern": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.54.0",
    "use_cache": True, "vocab_size": 102400,
}
CONFIG_32B = {
    **CONFIG_1_2B, "head_dim": 128, "hidden_size": 5120, "intermediate_size": 27392,
    "max_position_embeddings": 131072, "num_attention_heads": 40, "num_hidden_layers": 64,
    "num_key_value_heads": 8, "sliding_window": 4096, "sliding_window_pattern": "LLLG",
    "tie_word_embeddings": False,
}


def cfg(**kw) -> Exaone4Config:
    return Exaone4Config.from_dict({**BASE, **kw})


# ---- the layer plan ----------------------------------------------------------------------
def test_layer_types_list_is_taken_as_is():
    types = [S, F, S, S, F, F, S, F]
    c = cfg(sliding_window=8, layer_types=types)
    assert c.layer_types == types
    assert c.use_rope == [t == S for t in types]


def test_pattern_string_repeats_and_last_layer_is_global():
    c = cfg(sliding_window=8, sliding_window_pattern="LLLG")
    assert c.layer_types == [S, S, S, F] * 2
    # A pattern that would end on L: the reference implementation makes the last layer global.
    c = cfg(num_hidden_layers=6, sliding_window=8, sliding_window_pattern="LLLG")
    assert c.layer_types == [S, S, S, F, S, F]
    c = cfg(num_hidden_layers=5, sliding_window=8, sliding_window_pattern="LG")
    assert c.layer_types == [S, F, S, F, F]


def test_integer_period():
    c = cfg(sliding_window=8, sliding_window_pattern=4)
    assert c.layer_types == [S, S, S, F] * 2
    assert cfg(sliding_window=8, sliding_window_pattern=2).layer_types == [S, F] * 4


def test_null_window_and_pattern_is_all_global_with_rope():
    c = cfg(sliding_window=None, sliding_window_pattern=None)
    assert c.layer_types == [F] * 8
    assert c.is_sliding == [False] * 8
    assert c.use_rope == [True] * 8
    # transformers 5 writes layer_types explicitly for such a model: same plan.
    assert cfg(sliding_window=None, layer_types=[F] * 8).use_rope == [True] * 8


def test_hybrid_rope_exactly_on_sliding_layers():
    c = cfg(sliding_window=8, sliding_window_pattern="LLLG")
    assert c.use_rope == c.is_sliding == [True, True, True, False] * 2


def test_rope_parameters_new_spelling():
    rp = {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    c = cfg(rope_parameters=rp)
    assert c.rope_theta == 1e6
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 8.0
    c = cfg(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert c.rope_theta == 5e5 and c.rope_scaling is None


def test_rope_theta_and_rope_scaling_old_spelling():
    c = cfg(rope_theta=1e6, rope_scaling={"type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert c.rope_theta == 1e6 and c.rope_scaling["factor"] == 16.0
    assert cfg(rope_theta=1e6).rope_scaling is None


def test_unknown_keys_kept_and_roundtrip(tmp_path):
    c = cfg(sliding_window=8, sliding_window_pattern="LLLG", some_future_key=[1, 2])
    c.save(tmp_path / "config.json")
    d = Exaone4Config.from_file(tmp_path)
    assert d.extra["some_future_key"] == [1, 2]
    assert d.layer_types == c.layer_types and d.head_dim == 16


# ---- the published configs ---------------------------------------------------------------
def test_published_1_2b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_1_2B))
    c = Exaone4Config.from_file(tmp_path / "config.json")
    assert c.layer_types == [F] * 30 and c.use_rope == [True] * 30
    assert c.head_dim == 64 and c.tie_word_embeddings
    assert c.rope_theta == 1e6 and c.rope_scaling["rope_type"] == "llama3"
    assert 1.0e9 < c.num_parameters() < 1.4e9


def test_published_32b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_32B))
    c = Exaone4Config.from_file(tmp_path)
    assert c.is_sliding.count(True) == 48 and c.is_sliding.count(False) == 16
    assert c.layer_types == [S, S, S, F] * 16
    assert c.use_rope == c.is_sliding
    assert c.sliding_window == 4096 and not c.tie_word_embeddings
    assert 30e9 < c.num_parameters() < 34e9


# ---- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    (dict(model_type="llama"), ["model_type", "llama"]),
    (dict(num_attention_heads=4, num_key_value_heads=3), ["num_attention_heads", "num_key_value_heads"]),
    (dict(sliding_window=8), ["sliding_window", "sliding_window_pattern"]),
    (dict(sliding_window=8, sliding_window_pattern="LLXG"), ["sliding_window_pattern", "LLXG"]),
    (dict(sliding_window=8, layer_types=[S, F]), ["layer_types", "2", "8"]),
    (dict(sliding_window=8, layer_types=[S] * 7 + ["chunked_attention"]), ["layer_types", "chunked_attention"]),
    (dict(sliding_window=None, layer_types=[S] * 8), ["sliding_window", "null"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["yarn", "not supported"]),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), ["dynamic"]),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["low_freq_factor"]),
])
def test_errors_name_the_field(kw, words):
    with pytest.raises(ConfigError) as e:
        cfg(**kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_invalid_json_names_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "exaone4", "hidden_size": 64,')
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        Exaone4Config.from_file(p)
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json"):
        Exaone4Config.from_file(p)


def test_error_from_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG_32B, "num_key_value_heads": 7}))
    with pytest.raises(ConfigError, match=r"config\.json.*num_key_value_heads"):
        Exaone4Config.from_file(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Exaone4Config.from_file(tmp_path)


# ---- KV cache size -----------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [32 * 1024, 128 * 1024])
def test_hybrid_cache_is_near_the_minimum_for_32b(tokens):
    c = Exaone4Config.from_dict(CONFIG_32B)
    per_token_layer = 2 * 8 * 128 * 2  # K and V, 8 kv heads, head_dim 128, bf16
    # Minimum: 16 global layers hold every token, 48 sliding layers hold the last 4096.
    minimum = per_token_layer * (16 * tokens + 48 * min(tokens, 4096))
    full = per_token_layer * 64 * tokens
    got = cache_bytes(c, tokens)
    print(f"\n32B KV cache @ {tokens // 1024}K tokens: allocated {got['allocated'] / 2**30:.2f} GiB, "
          f"minimum {minimum / 2**30:.2f} GiB, full (no window) {full / 2**30:.2f} GiB")
    assert got["minimum"] == minimum and got["full_cache"] == full
    assert minimum <= got["allocated"] <= 1.05 * minimum
    assert got["allocated"] < 0.35 * full


def test_dense_cache_is_full_for_1_2b():
    c = Exaone4Config.from_dict(CONFIG_1_2B)
    got = cache_bytes(c, 32 * 1024)
    assert got["allocated"] == got["minimum"] == got["full_cache"] == 2 * 8 * 64 * 2 * 30 * 32 * 1024
