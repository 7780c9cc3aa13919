"""Training recipe: task data (verifiable, both modes, loss masks, held-out split) and a smoke run."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import exaone
from exaone.train import data
from exaone.train.trainer import TrainConfig, batches, loss_fn, lr_at, rendered_stream, train


@pytest.fixture(scope="module")
def tokenizer():
    from exaone.tokenizer_build import build_tokenizer

    return build_tokenizer(data.corpus_texts(600), vocab_size=1024, individual_digits=True)


def test_every_task_in_every_language_has_a_checkable_answer():
    rng = random.Random(0)
    for task, gen in data.GENERATORS.items():
        for lang in data.LANGS:
            for _ in range(30):
                ex = gen(rng, lang)
                assert ex.task == task and ex.lang == lang and ex.question and ex.trace and ex.answer
                assert data.score(ex, ex.answer), (task, ex)
                if task != "chat":
                    assert not data.score(ex, ex.answer + "1"), (task, ex)


def test_answers_are_right_and_traces_end_at_them():
    rng = random.Random(1)
    for _ in range(300):
        ex = data.gen_add(rng, "en")
        _, a, b = ex.key.split(":")
        assert int(ex.expected) == int(a) + int(b)
        assert ex.trace.splitlines()[-1].split("→ ")[1].split(",")[0] == ex.expected
        ex = data.gen_sub(rng, "ko")
        _, a, b = ex.key.split(":")
        assert int(ex.expected) == int(a) - int(b) >= 0
        assert ex.trace.splitlines()[-1].split("→ ")[1] == ex.expected
        ex = data.gen_mul(rng, "es")
        _, a, b = ex.key.split(":")
        assert int(ex.expected) == int(a) * int(b)
        assert ex.trace.splitlines()[-1].split("→ ")[1].split(",")[0] == ex.expected
        ex = data.gen_count(rng, "en")
        _, w, c = ex.key.split(":")
        assert int(ex.expected) == w.count(c) and ex.trace.splitlines()[-1].endswith(f"{c} {w.count(c)}")
        ex = data.gen_cmp(rng, "en")
        assert float(ex.expected) == max(float(x) for x in ex.key.split(":")[1:])
    assert data.mul_trace(347, 6).splitlines()[::4] == ["347 × 6", "carry 2 → 2082"]  # restated, then solved
    assert data.count_trace("strawberry", "r").splitlines()[:4] == ['"r" in "strawberry"', "s≠r 0", "t≠r 0", "r=r 1"]
    assert data.count_trace("strawberry", "r").splitlines()[-1] == "y≠r 3"


def test_heldout_is_disjoint_from_training_and_fixed():
    train_keys = {ex.key for ex in itertools.islice(data.training_examples(seed=3), 3000)}
    for task in data.EVAL_TASKS:
        held = data.heldout_examples(task, 20)
        assert held == data.heldout_examples(task, 20)  # the same problems every time
        assert len({ex.key for ex in held}) == 20
        assert all(data.is_heldout(ex.key) for ex in held)
        assert not train_keys & {ex.key for ex in held}
    assert not any(data.is_heldout(k) for k in train_keys if not k.startswith("chat:"))


def test_render_masks_everything_but_the_assistant_tokens(tokenizer):
    ex = data.Example("mul", "en", "mul:347:6", "What is 347 × 6?", data.mul_trace(347, 6), "2082", "2082")
    for thinking in (True, False):
        ids, labels = data.render(ex, tokenizer, thinking)
        prompt = tokenizer.apply_chat_template(ex.messages(), add_generation_prompt=True, enable_thinking=thinking)
        assert ids[:len(prompt)] == prompt
        assert labels[:len(prompt)] == [data.IGNORE] * len(prompt)
        assert labels[len(prompt):] == ids[len(prompt):] and data.IGNORE not in labels[len(prompt):]
        text = tokenizer.decode(ids[len(prompt):])
        assert text == ex.completion(thinking)
        prompt_text = tokenizer.decode(prompt)
        if thinking:
            assert prompt_text.endswith("[|assistant|]\n<think>\n")
            assert text.startswith("347 × 6\n7×6=42") and "\n</think>\n\n2082[|endofturn|]" in text
        else:
            assert prompt_text.endswith("<think>\n\n</think>\n\n")
            assert text == "2082[|endofturn|]"
    # The end of turn is the special id, so generation can stop on it.
    assert ids[-1] == tokenizer.convert_tokens_to_ids("[|endofturn|]")


def test_stream_renders_each_problem_in_both_modes_and_batches_pad_right(tokenizer):
    stream = rendered_stream(tokenizer, seed=0)
    pairs = list(itertools.islice(stream, 20))
    endthink = tokenizer.convert_tokens_to_ids("</think>")
    for (a, la), (b, lb) in zip(pairs[0::2], pairs[1::2]):
        # same question, reasoning first: the reasoning answer carries a trace, the direct one none
        assert len(a) > len(b)
        assert endthink in [t for t, lab in zip(a, la) if lab != data.IGNORE]
        assert endthink not in [t for t, lab in zip(b, lb) if lab != data.IGNORE]
    batch = next(batches(iter(pairs), 4, pad_id=0, pool_batches=5, seed=0))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape and ids.shape[0] == 4
    lengths = (labels != data.IGNORE).sum(1)
    assert (lengths > 0).all()
    pad = ids == 0
    assert (labels[pad] == data.IGNORE).all()


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(out="", steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=0.05)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_loss_ignores_masked_positions():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[data.IGNORE, 3, data.IGNORE, 5]])
    want = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([3, 5]))
    torch.testing.assert_close(loss_fn(logits, labels), want)


TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            intermediate_size=64, sliding_window=16, sliding_window_pattern="LLLG")


def test_smoke_training_lowers_the_loss_saves_and_resumes(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out), steps=40, batch_size=8, lr=3e-3, warmup=5, seed=0, eval_every=0,
                      save_every=20, log_every=1, vocab_size=512, max_len=160, model=TINY)
    result = train(cfg, progress=False, log=lambda *a: None)
    losses = [h["loss_step"] for h in result["history"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    # The final model is a normal checkpoint folder: the public loader and tokenizer read it.
    model = exaone.load(out)
    tok = exaone.load_tokenizer(out)
    assert model.config.sliding_window_pattern == "LLLG" and model.config.tie_word_embeddings
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("[|endofturn|]")
    # Resume: continue the same run to 50 steps from its checkpoint.
    st = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert st["step"] == 40
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 50, "resume": True})
    result2 = train(cfg2, progress=False, log=lambda *a: None)
    assert [h["step"] for h in result2["history"]] == list(range(41, 51))
    assert result2["history"][-1]["loss_step"] < losses[0]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 50
