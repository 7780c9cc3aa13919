"""Shared fixtures. Model checkpoints are session-scoped and read-only: a test that edits files
copies the directory first (`shutil.copytree`)."""
from __future__ import annotations

import pytest
import torch

from exaone.testing import make_random_checkpoint, tiny_config

@pytest.fixture
def single_thread():
    """Tiny models run fastest on one thread; on a busy 2-core box intra-op threads thrash (20x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- transformers-written checkpoints (parity tests) -------------------------------------
# Tiny dims; the vocab is random ids only. transformers is a test-only dependency.
HF_TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _hf_checkpoint(tmp_path_factory, name: str, seed: int = 0, **overrides):
    transformers = pytest.importorskip("transformers")
    kw = {**HF_TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **overrides}
    if kw.get("sliding_window") is None:
        # transformers 5 divides by zero on sliding_window null unless layer_types is explicit.
        kw.setdefault("layer_types", ["full_attention"] * kw["num_hidden_layers"])
    config = transformers.Exaone4Config(**kw)
    torch.manual_seed(seed)
    model = transformers.Exaone4ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises norms to 1; noise makes them matter
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_tiny_dense(tmp_path_factory):
    """Like the 1.2B: sliding_window null, every layer global with RoPE, tied embeddings."""
    return _hf_checkpoint(tmp_path_factory, "hf_dense", sliding_window=None, sliding_window_pattern=None,
                          tie_word_embeddings=True)


@pytest.fixture(scope="session")
def hf_tiny_hybrid(tmp_path_factory):
    """Like the 32B: 3 sliding (RoPE) : 1 global (NoPE), untied; window 8 < test sequences."""
    return _hf_checkpoint(tmp_path_factory, "hf_hybrid", sliding_window=8, sliding_window_pattern=4,
                          tie_word_embeddings=False)


@pytest.fixture(scope="session")
def hf_tiny_hybrid_tied(tmp_path_factory):
    return _hf_checkpoint(tmp_path_factory, "hf_hybrid_tied", seed=1, sliding_window=8,
                          sliding_window_pattern=4, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def hf_tiny_llama3(tmp_path_factory):
    """Dense, untied, llama3 RoPE scaling (original context 64 < test sequences)."""
    return _hf_checkpoint(tmp_path_factory, "hf_llama3", seed=2, sliding_window=None,
                          sliding_window_pattern=None, tie_word_embeddings=False, rope_parameters=LLAMA3)


# ---- our own checkpoints (loader tests) --------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Hybrid, untied, float32, written by exaone.save; no tokenizer."""
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config(), tokenizer=False)


@pytest.fixture(scope="session")
def tiny_checkpoint_tied(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny_tied"), tiny_config(tie_word_embeddings=True),
                                  seed=1, tokenizer=False)
