"""Engine tests on tiny random models (dense and hybrid), held to the slow `generate_reference`."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from exaone.config import Exaone4Config
from exaone.engine import ContextLengthError, Engine
from exaone.generate import generate_reference
from exaone.model import Exaone4ForCausalLM
from exaone.sampling import SamplingParams

VOCAB, EOS = 300, 2


def _model(hybrid: bool, seed: int = 0) -> Exaone4ForCausalLM:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=EOS)
    if hybrid:
        kw.update(sliding_window=8, sliding_window_pattern="LLLG")
    model = Exaone4ForCausalLM(Exaone4Config(**kw)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # std 0.2, not 0.02: greedy output then varies instead of repeating one id
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)
    return model


@pytest.fixture(scope="module", params=["dense", "hybrid"])
def model(request):
    return _model(request.param == "hybrid")


@pytest.fixture(scope="module")
def hybrid():
    return _model(True, seed=1)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _drain(engine: Engine) -> None:
    while engine.step():
        pass


def _tokens(outs) -> list[int]:
    return [o.token_id for o in outs if o.token_id is not None]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


class CharTokenizer:
    """One token per character (ids are code points): enough for stop strings and think markers."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


# ---- continuous batching ------------------------------------------------------------------

def test_mixed_batch_matches_reference(model):
    # Lengths: under and over the window (8) and the prefill chunk (16); different max_tokens so
    # rows finish early and get compacted while others go on; more requests than rows.
    lens = [5, 37, 12, 3, 26, 18, 9]
    max_tokens = [12, 4, 9, 16, 3, 10, 6]
    engine = Engine(model, max_batch=4, max_len=96, prefill_chunk=16)
    handles = []
    for i in range(3):
        handles.append(engine.submit(_prompt(lens[i], i), greedy(max_tokens[i]), request_id=f"r{i}"))
    for _ in range(4):
        engine.step()
    for i in range(3, 5):
        handles.append(engine.submit(_prompt(lens[i], i), greedy(max_tokens[i]), request_id=f"r{i}"))
    for _ in range(3):
        engine.step()
    for i in range(5, 7):
        handles.append(engine.submit(_prompt(lens[i], i), greedy(max_tokens[i]), request_id=f"r{i}"))
    _drain(engine)
    total = 0
    for i, h in enumerate(handles):
        outs = h.outputs()
        total += len(_tokens(outs))
        ref = generate_reference(model, _prompt(lens[i], i), max_tokens[i], stop_ids=[EOS])
        assert _tokens(outs) == ref, f"request {i}"
        last = outs[-1]
        assert last.finish_reason == ("stop" if ref[-1] == EOS else "length")
        assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
        assert (last.prompt_tokens, last.completion_tokens) == (lens[i], len(ref))
        assert last.time_to_first_token is not None and last.elapsed >= last.time_to_first_token
    st = engine.stats()
    assert (st.running, st.waiting, st.prefilling, st.free_slots) == (0, 0, 0, 4)
    assert st.max_batch_seen == 4 and st.tokens_generated == total
    assert st.prefill_chunks > len(lens)  # the long prompts were chunked


def test_n_greedy_forks_match_reference(hybrid):
    prompt = _prompt(21, 5)
    engine = Engine(hybrid, max_batch=4, prefill_chunk=8)
    outs = engine.submit(prompt, greedy(7, n=3, ignore_eos=True)).outputs()
    ref = generate_reference(hybrid, prompt, 7)
    for i in range(3):
        assert _tokens(o for o in outs if o.index == i) == ref


# ---- sampling -------------------------------------------------------------------------------

def test_seeded_sampling_reproducible_and_n_uses_consecutive_seeds(hybrid):
    prompt = _prompt(10, 3)

    def run(seed, n=1, other=False):
        engine = Engine(hybrid, max_batch=4)
        if other:  # a neighbour in the batch must not change this request's tokens
            engine.submit(_prompt(6, 9), SamplingParams(max_tokens=20, temperature=1.0, seed=0))
        h = engine.submit(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=seed, n=n, ignore_eos=True))
        _drain(engine)
        outs = h.outputs()
        return [_tokens(o for o in outs if o.index == i) for i in range(n)]

    a = run(7)[0]
    assert len(a) == 12
    assert run(7, other=True)[0] == a
    b = run(8)[0]
    assert b != a
    assert run(7, n=2) == [a, b]


# ---- reasoning control ----------------------------------------------------------------------

THINK_END = [299]
FORCED = [297, 299, 297, 297]  # shaped like "\n</think>\n\n"


def _split(outs):
    toks = _tokens(outs)
    forced = [o.forced for o in outs if o.token_id is not None]
    return toks, forced


@pytest.mark.parametrize("budget", [5, 0])
def test_thinking_budget_forces_end_of_thinking(hybrid, budget):
    engine = Engine(hybrid, max_batch=4, think_end_ids=THINK_END, think_end_forced_ids=FORCED)
    p = greedy(15, ignore_eos=True, enable_thinking=True, thinking_budget=budget)
    h = engine.submit(_prompt(9, 1), p)
    h2 = engine.submit(_prompt(9, 2), dataclasses.replace(p, n=2))   # the n > 1 path
    free = engine.submit(_prompt(9, 1), dataclasses.replace(p, thinking_budget=None))
    _drain(engine)
    o2 = h2.outputs()
    for outs in (h.outputs(), [o for o in o2 if o.index == 0], [o for o in o2 if o.index == 1]):
        toks, forced = _split(outs)
        assert forced == [False] * budget + [True] * 4 + [False] * (15 - budget - 4)
        assert toks[budget:budget + 4] == FORCED
        assert 299 not in toks[:budget]
        last = outs[-1]
        assert last.reasoning_tokens == budget + 2  # up to and including the forced </think>
        assert last.completion_tokens == 15          # forced tokens are output too
        assert last.finish_reason == "length"
    outs = free.outputs()
    assert not any(o.forced for o in outs) and outs[-1].reasoning_tokens == 15


def test_model_closing_thinking_itself_is_not_forced(hybrid):
    prompt = _prompt(9, 4)
    ref = generate_reference(hybrid, prompt, 8)
    k = next(i for i in range(2, 8) if ref[i] not in ref[:i])
    engine = Engine(hybrid, think_end_ids=[ref[k]], think_end_forced_ids=FORCED)
    outs = engine.submit(prompt, greedy(8, ignore_eos=True, enable_thinking=True, thinking_budget=k + 2)).outputs()
    assert _tokens(outs) == ref and not any(o.forced for o in outs)
    assert outs[-1].reasoning_tokens == k + 1


def test_thinking_budget_with_tokenizer_forces_the_text(hybrid):
    engine = Engine(hybrid, tokenizer=CharTokenizer())
    outs = engine.submit(_prompt(9, 1), greedy(20, ignore_eos=True, enable_thinking=True, thinking_budget=3)).outputs()
    text = "".join(o.text for o in outs)
    assert text[3:3 + len("\n</think>\n\n")] == "\n</think>\n\n"
    assert outs[-1].reasoning_tokens == 3 + len("\n</think>")


# ---- cancellation ---------------------------------------------------------------------------

def test_cancel_frees_the_slot_at_once(model):
    engine = Engine(model, max_batch=3, prefill_chunk=16)
    prompts = [_prompt(n, 10 + n) for n in (7, 19, 11)]
    hs = [engine.submit(p, greedy(14, ignore_eos=True)) for p in prompts]
    waiting = engine.submit(_prompt(5, 0), greedy(5))
    for _ in range(8):
        engine.step()
    assert engine.stats().free_slots == 0
    hs[0].cancel()  # row 0: the last row moves into it
    waiting.cancel()
    st = engine.stats()
    assert (st.running, st.free_slots, st.waiting) == (2, 1, 0)
    _drain(engine)
    outs = hs[0].outputs()
    assert outs[-1].finish_reason == "cancelled" and outs[-1].token_id is None
    assert outs[-1].completion_tokens == len(_tokens(outs)) > 0
    w = waiting.outputs()
    assert [(o.finish_reason, o.completion_tokens) for o in w] == [("cancelled", 0)]
    for p, h in zip(prompts[1:], hs[1:]):
        assert _tokens(h.outputs()) == generate_reference(model, p, 14)
    assert engine.stats().free_slots == 3


# ---- limits and stops -----------------------------------------------------------------------

def test_prompt_over_context_is_refused(hybrid):
    engine = Engine(hybrid, max_len=32)
    with pytest.raises(ContextLengthError, match=r"32 tokens.*33.*context length is 32"):
        engine.submit(list(range(3, 35)), greedy(4))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], greedy(4))
    outs = engine.submit(list(range(3, 34)), greedy(4)).outputs()  # 31 + 1 fits: one token
    assert len(outs) == 1 and outs[0].finish_reason == "length"


def test_stop_token_id_and_stop_string(hybrid):
    prompt = _prompt(12, 6)
    ref = generate_reference(hybrid, prompt, 20)
    k = next(i for i in range(3, 20) if ref[i] not in ref[:i])
    engine = Engine(hybrid, tokenizer=CharTokenizer())
    outs = engine.submit(prompt, greedy(20, ignore_eos=True, stop_token_ids=(ref[k],))).outputs()
    assert _tokens(outs) == ref[:k + 1] and outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == CharTokenizer().decode(ref[:k])  # the stop token's text is not shown

    text = CharTokenizer().decode(ref)
    stop = text[k:k + 2]
    outs = engine.submit(prompt, greedy(20, ignore_eos=True, stop=(stop,))).outputs()
    assert outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == text[:text.find(stop)]


# ---- threads and asyncio --------------------------------------------------------------------

def test_background_worker_threads_and_asyncio(hybrid):
    prompts = [_prompt(n, n) for n in (4, 17, 9)]
    refs = [generate_reference(hybrid, p, 10, stop_ids=[EOS]) for p in prompts]
    engine = Engine(hybrid, max_batch=2, prefill_chunk=8).start()
    try:
        async def consume(p):
            return [o async for o in engine.submit(p, greedy(10))]

        async def main():
            return await asyncio.gather(*(consume(p) for p in prompts))

        results = asyncio.run(main())
        assert [_tokens(r) for r in results] == refs

        got = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, engine.generate(prompts[i], greedy(10))))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [got[i] for i in range(3)] == refs

        time.sleep(0.1)  # the step that fed the last record may still be finishing
        steps = engine.stats().steps
        time.sleep(0.2)  # idle: the worker sleeps on its condition, it does not spin
        assert engine.stats().steps == steps
    finally:
        engine.stop()


def test_async_iteration_without_worker_steps_in_executor(hybrid):
    prompt = _prompt(6, 8)
    engine = Engine(hybrid)

    async def main():
        return [o async for o in engine.submit(prompt, greedy(5, ignore_eos=True))]

    assert _tokens(asyncio.run(main())) == generate_reference(hybrid, prompt, 5)


def test_failed_step_ends_requests_with_error(hybrid):
    engine = Engine(hybrid)
    h = engine.submit(_prompt(6, 8), greedy(5))

    def boom(*a, **k):
        raise RuntimeError("boom")

    engine.model = boom
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    outs = h.outputs()
    assert [(o.finish_reason, o.error) for o in outs] == [("error", "RuntimeError: boom")]
    assert engine.stats().free_slots == engine.max_batch
