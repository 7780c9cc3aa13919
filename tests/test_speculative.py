"""Speculative decoding is exact: token for token `generate_reference(target)`, whatever the draft,
through the standalone driver, the engine (`Engine(draft_model=...)`) and the CLI."""
from __future__ import annotations

import pytest
import torch

import exaone
from exaone.cli import main
from exaone.config import Exaone4Config
from exaone.engine import Engine
from exaone.generate import generate_reference
from exaone.model import Exaone4ForCausalLM
from exaone.sampling import SamplingParams
from exaone.speculative import speculative_generate
from exaone.testing import make_random_checkpoint, tiny_config

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
    assert st.acceptance_rate == 1.0 and st.tokens == 24  # the first token comes from the prompt pass
    assert st.rounds == -(-24 // (k + 1))


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
    assert st.tokens_per_round > 1


def test_bad_arguments(target):
    with pytest.raises(ValueError, match="empty"):
        speculative_generate(target, target, [], 5)
    other_vocab = Exaone4ForCausalLM(Exaone4Config(vocab_size=100, hidden_size=8, intermediate_size=8,
                                                   num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
    for run in (lambda d, k: speculative_generate(target, d, [5], 5, k=k),
                lambda d, k: Engine(target, draft_model=d, num_speculative_tokens=k)):
        with pytest.raises(ValueError, match="vocab_size 100 != the target's 300: the draft must share"):
            run(other_vocab, 4)
        with pytest.raises(ValueError, match="integer >= 1, got 0"):
            run(target, 0)
        if target.config.sliding_window:
            with pytest.raises(ValueError, match="< the target's sliding window 8, got 8"):
                run(target, 8)


# ---- the engine's speculative path --------------------------------------------------------

def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("draft_kind", ["same", "other", "noisy"])
def test_engine_with_draft_equals_engine_without(target, draft_kind):
    draft = {"same": target, "other": _model(target.config.sliding_window, seed=3),
             "noisy": _noisy_copy(target, 0.005)}[draft_kind]
    plain = Engine(target, prefill_chunk=16)
    engine = Engine(target, draft_model=draft, num_speculative_tokens=4, prefill_chunk=16)
    for seed, n in ((2, 37), (5, 9), (6, 70)):  # prompts shorter and longer than the window (8) and the chunk
        prompt = _prompt(n, seed)
        toks = engine.generate(prompt, _greedy(40))
        assert toks == plain.generate(prompt, _greedy(40)) == generate_reference(target, prompt, 40), (seed, n)
    st = engine.stats()
    assert st.speculative.rounds > 0 and st.speculative.tokens_per_round >= 1
    assert plain.stats().speculative is None
    # every token not made by a round took one plain decode step, as in the plain engine
    assert st.decode_steps == st.speculative.rounds + (plain.stats().decode_steps - st.speculative.tokens)
    if draft_kind == "same":
        assert st.speculative.acceptance_rate == 1.0 and st.speculative.tokens_per_round > 4
    else:
        assert st.speculative.accepted < st.speculative.proposed


def test_engine_thinking_budget_holds_with_a_draft(target):
    think_end, forced = [299], [297, 299, 297, 297]
    engine = Engine(target, draft_model=target, num_speculative_tokens=6, think_end_ids=think_end,
                    think_end_forced_ids=forced)
    prompt = _prompt(12, 4)
    for budget in (0, 1, 5, 7, 13):
        outs = engine.submit(prompt, _greedy(30, enable_thinking=True, thinking_budget=budget)).outputs()
        toks = [o.token_id for o in outs]
        assert [o.forced for o in outs] == [False] * budget + [True] * 4 + [False] * (26 - budget)
        assert toks[budget:budget + 4] == forced and 299 not in toks[:budget]
        assert outs[-1].reasoning_tokens == budget + 2 and outs[-1].completion_tokens == 30
        # the answer after the forced close is the target's own greedy continuation
        assert toks[budget + 4:] == generate_reference(target, prompt + toks[:budget + 4], 26 - budget)
    assert engine.stats().speculative.acceptance_rate == 1.0


# ---- the CLI --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target = make_random_checkpoint(root / "target", tiny_config(sliding_window=8), seed=0)
    other = make_random_checkpoint(root / "other", tiny_config(vocab_size=100), seed=1, tokenizer=False)
    return target, other


def test_cli_generate_with_a_draft_model(checkpoints, capsys):
    target, other = checkpoints
    args = ["generate", "--model", str(target), "--raw", "--max-tokens", "20", "Hello there"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--draft-model", str(target), "--num-speculative-tokens", "3",
                        "--draft-quantize", "int8"]) == 0
    assert capsys.readouterr().out == plain
    model, tok = exaone.load(target), exaone.load_tokenizer(target)
    assert plain.rstrip("\n") == tok.decode(generate_reference(model, tok.encode("Hello there"), 20)).rstrip("\n")
    assert main(args + ["--draft-model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "the draft must share the target's tokenizer" in err and "Traceback" not in err
    assert main(args + ["--draft-model", str(target), "--num-speculative-tokens", "8"]) == 2
    assert "sliding window 8" in capsys.readouterr().err


def test_cli_chat_and_serve_take_the_draft(checkpoints, capsys, monkeypatch):
    import io
    import sys

    import argparse

    from exaone.server import cli as serve_cli
    target, _ = checkpoints
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", "--model", str(target), "--max-tokens", "6", "--draft-model", str(target)]) == 0
    assert capsys.readouterr().out.count("tokens/s") == 1
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    backend = serve_cli.local_backend(p.parse_args(["--model", str(target), "--draft-model", str(target),
                                                    "--num-speculative-tokens", "2"]))
    assert backend.engine.draft_model is not None and backend.engine.num_speculative_tokens == 2
    ids = backend.tokenizer.encode("abc")
    assert backend.engine.generate(ids, _greedy(12)) == generate_reference(backend.model, ids, 12)
    assert backend.engine.stats().speculative.rounds > 0
    assert main(["serve", "--upstream", "http://localhost:1/v1", "--draft-model", str(target), "--no-auth"]) == 2
    assert "cannot be used with --upstream" in capsys.readouterr().err


def test_bench_measures_the_engine_path(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "bench_speculative.py"
    spec = importlib.util.spec_from_file_location("bench_speculative", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--hidden", "128", "--layers", "4", "--vocab", "500", "--window", "16", "--tokens", "12",
                       "--prompt", "20", "--repeats", "1", "--k", "3", "--drafts", "trunc,bf16"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| trunc", "| bf16"))]
    assert len(rows) == 2 and all(r.endswith("| yes |") for r in rows)
    assert rows[1].split("|")[4].strip() == "1.00"  # a bf16 copy agrees on every token here
