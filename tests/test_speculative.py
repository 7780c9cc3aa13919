"""Speculative decoding is exact: token for token `generate_reference(target)`, whatever the draft."""
from __future__ import annotations

import pytest
import torch

from exaone.config import Exaone4Config
from exaone.generate import generate_reference
from exaone.model import Exaone4ForCausalLM
from exaone.speculative import speculative_generate

VOCAB = 300


def _model(window: int | None, seed: int = 0, layers: int = 4) -> Exaone4ForCausalLM:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2)
    if window:
        kw.update(sliding_window=window, sliding_window_pattern="LLLG")
    model = Exaone4ForCausalLM(Exaone4Config(**kw)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)
    return model


def _noisy_copy(model: Exaone4ForCausalLM, scale: float, seed: int = 9) -> Exaone4ForCausalLM:
    """A draft that agrees with the target often, not always."""
    draft = Exaone4ForCausalLM(model.config).eval()
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return draft


@pytest.fixture(scope="module", params=[None, 8], ids=["dense", "hybrid"])
def target(request):
    return _model(request.param)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@pytest.mark.parametrize("k", [1, 4, 7])
def test_same_model_draft_accepts_everything(target, k):
    prompt = _prompt(30, 1)  # longer than the window (8)
    toks, st = speculative_generate(target, target, prompt, 25, k=k)
    assert toks == generate_reference(target, prompt, 25)
    assert st.acceptance_rate == 1.0 and st.tokens == 25
    assert st.target_passes == -(-24 // (k + 1))  # the first token comes from the prompt pass


@pytest.mark.parametrize("draft_kind", ["other", "noisy", "other-shape"])
@pytest.mark.parametrize("k", [2, 5])
def test_disagreeing_draft_is_still_exact(target, draft_kind, k):
    if draft_kind == "other":
        draft = _model(target.config.sliding_window, seed=3)
    elif draft_kind == "noisy":
        draft = _noisy_copy(target, 0.005)
    else:  # another shape and attention plan: a hybrid draft with a wider window, 2 layers
        draft = _model(12, seed=4, layers=2)
    for seed, n in ((2, 37), (5, 9)):
        prompt = _prompt(n, seed)
        toks, st = speculative_generate(target, draft, prompt, 30, k=k)
        assert toks == generate_reference(target, prompt, 30), (draft_kind, seed)
        assert st.accepted < st.proposed  # rejections happened: the rollback was exercised
    if draft_kind == "other":
        assert st.acceptance_rate < 0.2
    if draft_kind == "noisy":  # random weights amplify noise: partial agreement, rejections at every depth
        assert st.acceptance_rate > 0.3


def test_stop_ids_and_max_tokens(target):
    prompt = _prompt(20, 6)
    ref = generate_reference(target, prompt, 30)
    i = next(i for i in range(5, 30) if ref[i] not in ref[:i])
    draft = _noisy_copy(target, 0.005)
    toks, _ = speculative_generate(target, draft, prompt, 30, k=4, stop_ids=[ref[i]])
    assert toks == ref[:i + 1]
    for n in (0, 1, 2, 6):
        assert speculative_generate(target, draft, prompt, n, k=4)[0] == ref[:n]


def test_chunked_prompt_and_long_generation(target):
    prompt = _prompt(70, 7)
    draft = _noisy_copy(target, 0.005)
    toks, st = speculative_generate(target, draft, prompt, 60, k=3, chunk=16)
    assert toks == generate_reference(target, prompt, 60)
    assert st.tokens_per_pass > 1


def test_bad_arguments(target):
    with pytest.raises(ValueError, match="empty"):
        speculative_generate(target, target, [], 5)
    with pytest.raises(ValueError, match="vocab"):
        speculative_generate(target, _model(None).__class__(
            Exaone4Config(vocab_size=100, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1)), [5], 5)
    if target.config.sliding_window:
        with pytest.raises(ValueError, match="window 8"):
            speculative_generate(target, target, [5], 5, k=8)
