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


# ---- speculative decoding: the same records as the normal path ------------------------------

def _record(o):
    """An Output without its timings."""
    return dataclasses.replace(o, request_id="", time_to_first_token=None, elapsed=0.0)


def _spec_pair(model, draft, params, prompt, **kw):
    """Records of the plain engine and of the engine with a draft, and the latter's stats."""
    plain = Engine(model, tokenizer=CharTokenizer(), **kw).submit(prompt, params).outputs()
    engine = Engine(model, tokenizer=CharTokenizer(), draft_model=draft, num_speculative_tokens=4, **kw)
    spec = engine.submit(prompt, params).outputs()
    return [_record(o) for o in plain], [_record(o) for o in spec], engine.stats()


@pytest.mark.parametrize("draft_kind", ["same", "other"])
@pytest.mark.parametrize("case", ["budget", "budget0", "stop_string", "stop_id", "max_tokens", "eos"])
def test_draft_path_gives_the_same_records(hybrid, draft_kind, case):
    draft = hybrid if draft_kind == "same" else _model(True, seed=7)
    prompt = _prompt(19, 3)  # longer than the window (8)
    ref = generate_reference(hybrid, prompt, 40)
    k = next(i for i in range(6, 40) if ref[i] not in ref[:i])
    text = CharTokenizer().decode(ref)
    params = {"budget": greedy(30, ignore_eos=True, enable_thinking=True, thinking_budget=9),
              "budget0": greedy(24, ignore_eos=True, enable_thinking=True, thinking_budget=0),
              "stop_string": greedy(40, ignore_eos=True, stop=(text[k:k + 2],)),
              "stop_id": greedy(40, ignore_eos=True, stop_token_ids=(ref[k],)),
              "max_tokens": greedy(k, ignore_eos=True),
              "eos": greedy(40, stop_token_ids=(ref[k],), ignore_eos=False)}[case]
    plain, spec, st = _spec_pair(hybrid, draft, params, prompt, prefill_chunk=8)
    assert spec == plain
    assert st.speculative.rounds > 0 and st.decode_steps < len(plain) + 1
    if draft_kind == "same":
        assert st.speculative.acceptance_rate == 1.0
    if case == "budget":  # 9 reasoning tokens, then the forced close, then the answer
        assert [o.forced for o in spec[9:9 + 11]] == [True] * 11 and not any(o.forced for o in spec[:9])
        assert spec[-1].reasoning_tokens == 9 + len("\n</think>")
        assert "".join(o.text for o in spec)[9:20] == "\n</think>\n\n"


def test_draft_engine_batches_normally_and_speculates_alone(model):
    draft = _model(model.config.sliding_window is not None, seed=7)
    prompts, max_tokens = [_prompt(23, 1), _prompt(6, 2)], [30, 5]
    engine = Engine(model, draft_model=model, num_speculative_tokens=3, prefill_chunk=8)
    hs = [engine.submit(p, greedy(n, ignore_eos=True)) for p, n in zip(prompts, max_tokens)]
    _drain(engine)
    for p, n, h in zip(prompts, max_tokens, hs):
        assert _tokens(h.outputs()) == generate_reference(model, p, n)
    st = engine.stats()
    assert st.max_batch_seen == 2 and st.speculative.rounds > 0  # the long request ran alone once the short ended
    # a sampled neighbour: no speculation while it runs, the greedy request speculates after
    engine = Engine(model, draft_model=draft, num_speculative_tokens=3, prefill_chunk=8)
    g = engine.submit(prompts[0], greedy(30, ignore_eos=True))
    t = engine.submit(prompts[1], SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True))
    _drain(engine)
    assert _tokens(g.outputs()) == generate_reference(model, prompts[0], 30)
    alone = Engine(model).submit(prompts[1], SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True))
    assert _tokens(t.outputs()) == _tokens(alone.outputs())


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True),
                                    greedy(12, ignore_eos=True, logprobs=True, top_logprobs=2),
                                    greedy(12, ignore_eos=True, presence_penalty=1.5)],
                         ids=["sampled", "logprobs", "penalty"])
def test_ineligible_requests_take_the_normal_path(hybrid, params):
    plain, spec, st = _spec_pair(hybrid, hybrid, params, _prompt(11, 4))
    assert spec == plain and st.speculative.rounds == 0


def test_cancel_on_the_draft_path_frees_the_slot(hybrid):
    engine = Engine(hybrid, draft_model=_model(True, seed=7), num_speculative_tokens=4, max_batch=2)
    h = engine.submit(_prompt(15, 5), greedy(60, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.stats().speculative.rounds == 4  # the first step prefilled, then speculated
    h.cancel()
    assert engine.stats().free_slots == 2
    outs = h.outputs()
    assert outs[-1].finish_reason == "cancelled" and outs[-1].completion_tokens == len(_tokens(outs)) > 4
    prompt = _prompt(30, 6)  # the next request starts the draft over
    assert engine.generate(prompt, greedy(20, ignore_eos=True)) == generate_reference(hybrid, prompt, 20)
    # a consumer cancelling while the worker is inside rounds
    engine.start()
    try:
        h = engine.submit(prompt, greedy(200, ignore_eos=True))
        seen = []
        for o in h:
            seen.append(o)
            if len(seen) == 3:
                h.cancel()
    finally:
        engine.stop()
    assert seen[-1].finish_reason == "cancelled" and len(_tokens(seen)) < 200
    assert _tokens(seen) == generate_reference(hybrid, prompt, len(_tokens(seen)))
    assert engine.stats().free_slots == 2


@pytest.mark.parametrize("block", [4, 8])
def test_draft_path_stores_only_exact_prefix_blocks(hybrid, block):
    # Window 8. Blocks of 4: every block a round completes still has its 4-token tail in the ring.
    # Blocks of 8 (= the window): a block completed before a round's last position lost part of
    # its tail to the round's writes; it must not be stored (its KV would be wrong on a hit).
    prompt = _prompt(13, 8)
    plain = Engine(hybrid, prefix_block_size=block)
    engine = Engine(hybrid, draft_model=hybrid, num_speculative_tokens=4, prefix_block_size=block)
    out = engine.generate(prompt, greedy(25, ignore_eos=True))
    assert plain.generate(prompt, greedy(25, ignore_eos=True)) == out
    stored, ref = engine.prefix_cache.blocks, plain.prefix_cache.blocks
    assert stored.keys() <= ref.keys()
    for key, blk in stored.items():
        for a, b in zip(blk.k + blk.v, ref[key].k + ref[key].v):
            torch.testing.assert_close(a, b)
    assert (len(stored) == len(ref)) == (block == 4)
    turn2 = prompt + out + _prompt(3, 9)  # a next turn reuses the stored answer
    last = engine.submit(turn2, greedy(10, ignore_eos=True)).outputs()
    assert last[-1].cached_tokens > (len(prompt) if block == 4 else 0)
    assert _tokens(last) == generate_reference(hybrid, turn2, 10)
