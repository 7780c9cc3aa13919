"""The shipped demo model: it loads through the public API, and reasoning mode does what it measured.

Thresholds sit a little below what docs/demo-model.md measured on the same held-out problems
(greedy, deterministic), so a broken template, cache, tokenizer or checkpoint fails here. They are
low because the model is weak: see the table in docs/demo-model.md.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import exaone
from exaone.generate import generate
from exaone.train import data

NANO = Path(exaone.__file__).parent / "assets" / "exaone-4.0-nano"
# task -> (problems, minimum reasoning-mode accuracy). Measured on these exact problems (greedy, one
# thread): mul 49/50 (98%), count 47/50 (94%) (docs/demo-model.md).
SAMPLE = {"mul": (50, 0.85), "count": (50, 0.8)}


@pytest.fixture(scope="module")
def nano():
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and robust on a busy machine
    return exaone.load(NANO), exaone.load_tokenizer(NANO)


def test_shipped_files_and_shape():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "README.md"):
        assert (NANO / name).is_file(), name
    size = sum(f.stat().st_size for f in NANO.iterdir())
    assert size < 40e6
    cfg = exaone.Exaone4Config.from_file(NANO)
    assert cfg.sliding_window and cfg.layer_types.count("full_attention") * 4 == cfg.num_hidden_layers
    assert cfg.use_rope == [t == "sliding_attention" for t in cfg.layer_types]  # NoPE on global layers


_RUNS: dict = {}


def _run(nano, task, n, thinking):
    """(accuracy, mean generated tokens) on the first n held-out problems; each computed once per session."""
    if (task, n, thinking) not in _RUNS:
        _RUNS[task, n, thinking] = _generate_and_score(nano, task, n, thinking)
    return _RUNS[task, n, thinking]


def _generate_and_score(nano, task, n, thinking):
    model, tok = nano
    stop = [tok.convert_tokens_to_ids("[|endofturn|]")]
    correct, tokens = 0, 0
    for ex in data.heldout_examples(task, n):
        prompt = tok.apply_chat_template(ex.messages(), add_generation_prompt=True, enable_thinking=thinking)
        out = generate(model, prompt, max_tokens=160 if thinking else 24, stop_ids=stop)
        tokens += len(out)
        correct += data.score(ex, tok.decode(out))
    return correct / n, tokens / n


@pytest.mark.parametrize("task", sorted(SAMPLE))
def test_reasoning_mode_solves_held_out_problems(nano, task):
    n, minimum = SAMPLE[task]
    acc, tokens = _run(nano, task, n, thinking=True)
    assert acc >= minimum, f"{task}: reasoning accuracy {acc:.0%} < {minimum:.0%}"


@pytest.mark.parametrize("task", sorted(SAMPLE))
def test_reasoning_beats_non_reasoning_in_a_fraction_of_the_tokens(nano, task):
    """The hybrid claim in miniature on the multi-step tasks: measured on these 50 problems
    mul 98% vs 32% (71.8 vs 4.8 tokens), count 94% vs 60% (54.2 vs 2.0 tokens)."""
    n = SAMPLE[task][0]
    think_acc, think_tokens = _run(nano, task, n, thinking=True)
    direct_acc, direct_tokens = _run(nano, task, n, thinking=False)
    assert direct_tokens * 4 < think_tokens
    assert think_acc >= direct_acc + 0.2, (think_acc, direct_acc)


def test_identity(nano):
    model, tok = nano
    stop = [tok.convert_tokens_to_ids("[|endofturn|]")]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    text = tok.decode(generate(model, prompt, max_tokens=60, stop_ids=stop))
    assert "EXAONE 4.0 nano" in text
