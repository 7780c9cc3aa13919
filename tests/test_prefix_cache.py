"""Prefix caching: the engine with the cache gives the tokens of `generate_reference`, and
`cached_tokens` says how much of the prompt it did not prefill. Tiny random models: dense, hybrid
with a window under the block size, hybrid with a window over it."""
from __future__ import annotations

import pytest
import torch

from exaone.config import Exaone4Config
from exaone.engine import Engine
from exaone.generate import generate_reference
from exaone.model import Exaone4ForCausalLM
from exaone.prefix_cache import PrefixCache
from exaone.sampling import SamplingParams

VOCAB, EOS, BS = 300, 2, 16


def _model(window: int | None, seed: int = 0) -> Exaone4ForCausalLM:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=EOS)
    if window:
        kw.update(sliding_window=window, sliding_window_pattern="LLLG")
    model = Exaone4ForCausalLM(Exaone4Config(**kw)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # std 0.2: greedy output varies instead of repeating one id
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)
    return model


@pytest.fixture(scope="module", params=[None, 8, 24], ids=["dense", "hybrid-w8", "hybrid-w24"])
def model(request):
    return _model(request.param)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def _tokens(outs) -> list[int]:
    return [o.token_id for o in outs if o.token_id is not None]


def _drain(engine: Engine) -> None:
    while engine.step():
        pass


def _engine(model, **kw) -> Engine:
    kw = {"max_batch": 4, "max_len": 400, "prefill_chunk": 40, "prefix_block_size": BS, **kw}
    return Engine(model, **kw)


def _check(model, prompt, outs, max_tokens, cached):
    assert _tokens(outs) == generate_reference(model, prompt, max_tokens, stop_ids=[EOS])
    assert {o.cached_tokens for o in outs} == {cached}


@pytest.mark.parametrize("chunk", [7, 40, 512])
def test_shared_system_prompt(model, chunk):
    system = _prompt(150, 0)  # > the windows, 9 whole blocks and a partial one
    users = [_prompt(n, 10 + n) for n in (5, 23, 1)]
    engine = _engine(model, prefill_chunk=chunk)
    first = engine.submit(system + users[0], greedy(8)).outputs()
    _check(model, system + users[0], first, 8, 0)
    hs = [engine.submit(system + u, greedy(8)) for u in users]  # concurrent, all hit
    _drain(engine)
    for u, h in zip(users, hs):
        _check(model, system + u, h.outputs(), 8, 144)
    st = engine.stats()
    assert st.cached_tokens == 3 * 144
    assert 0 < st.prefix_cache_bytes == engine.prefix_cache.nbytes
    assert st.prefix_cache_bytes == len(engine.prefix_cache.blocks) * engine.prefix_cache.block_bytes()


def test_multi_turn_reuses_the_previous_answer(model):
    engine = _engine(model)
    p1 = _prompt(45, 1)
    a1 = _tokens(engine.submit(p1, greedy(30, ignore_eos=True)).outputs())
    p2 = p1 + a1 + _prompt(12, 2)
    outs = engine.submit(p2, greedy(10, ignore_eos=True)).outputs()
    assert _tokens(outs) == generate_reference(model, p2, 10)
    fed = len(p1) + len(a1) - 1  # the last answer token was sampled, never fed to the model
    assert outs[-1].cached_tokens == fed // BS * BS == 64
    p3 = p2 + _tokens(outs) + _prompt(3, 3)
    outs = engine.submit(p3, greedy(6, ignore_eos=True)).outputs()
    assert _tokens(outs) == generate_reference(model, p3, 6)
    assert outs[-1].cached_tokens == (len(p2) + 10 - 1) // BS * BS


def test_whole_prompt_cached_leaves_one_token_to_prefill(model):
    engine = _engine(model)
    prompt = _prompt(64, 4)  # exactly 4 blocks
    for cached in (0, 48, 48):
        _check(model, prompt, engine.submit(prompt, greedy(5)).outputs(), 5, cached)


def test_concurrent_hits_misses_and_forks(model):
    base = _prompt(70, 5)
    engine = _engine(model, max_batch=3, prefill_chunk=16)
    engine.submit(base, greedy(3)).outputs()
    prompts = [base + _prompt(9, 6), _prompt(40, 7), base[:50] + _prompt(30, 8), base + _prompt(2, 9)]
    hs = [engine.submit(p, greedy(7 + i, ignore_eos=True)) for i, p in enumerate(prompts)]
    fork = engine.submit(base + _prompt(4, 10), greedy(6, n=2, ignore_eos=True))
    _drain(engine)
    for i, (p, h) in enumerate(zip(prompts, hs)):
        outs = h.outputs()
        assert _tokens(outs) == generate_reference(model, p, 7 + i), i
        assert outs[-1].cached_tokens == [64, 0, 48, 64][i]
    ref = generate_reference(model, base + _prompt(4, 10), 6)
    outs = fork.outputs()
    for i in range(2):
        assert _tokens(o for o in outs if o.index == i) == ref
    assert {o.cached_tokens for o in outs} == {64}


def test_eviction_under_a_small_budget_stays_exact(model):
    budget = 6 * _engine(model).prefix_cache.block_bytes()  # room for three 2-block prompts
    engine = _engine(model, max_batch=2, prefix_cache_bytes=budget)
    pc = engine.prefix_cache
    stems = [_prompt(40, 20 + i) for i in range(4)]  # 2 whole blocks each
    order = [0, 1, 0, 2, 0, 3, 0, 1]  # stem 0 stays hot (LRU keeps it); stem 1 is evicted by 3
    cached = []
    for r, i in enumerate(order):
        p = stems[i] + _prompt(5, 30 + r)
        outs = engine.submit(p, greedy(3)).outputs()  # 45 + 2 fed tokens: no third block
        assert _tokens(outs) == generate_reference(model, p, 3, stop_ids=[EOS])
        assert pc.nbytes <= budget
        cached.append(outs[-1].cached_tokens)
    assert cached == [0, 0, 32, 0, 32, 0, 32, 0]
    assert pc.counters["evicted_blocks"] == 4


def test_disabled_cache(model):
    engine = _engine(model, prefix_cache_bytes=0)
    assert engine.prefix_cache is None
    prompt = _prompt(80, 11)
    for _ in range(2):
        _check(model, prompt, engine.submit(prompt, greedy(5)).outputs(), 5, 0)
    assert engine.stats().prefix_cache_bytes == 0


@torch.inference_mode()
def test_restored_row_equals_a_prefilled_row(model):
    """The cache contents themselves: global slots [0, P) and the ring's [P-W, P)."""
    cache = model.make_cache(rows=3, max_len=200)
    pc = PrefixCache(cache, 2**30, block_size=BS)
    tokens = _prompt(120, 12)
    s = 0
    while s < len(tokens):  # row 0: prefill in capture-friendly chunks, storing blocks
        e = pc.chunk_end(s, len(tokens), 50)
        model(torch.tensor([tokens[s:e]]), position_ids=torch.arange(s, e)[None], cache=cache, rows=slice(0, 1))
        pc.store(0, tokens, s, e)
        s = e
    assert len(pc.blocks) == 7
    P = pc.restore(1, tokens[:100])
    assert P == 96
    model(torch.tensor([tokens[:P]]), position_ids=torch.arange(P)[None], cache=cache, rows=slice(2, 3))
    for i, sliding in enumerate(cache.sliding):
        if sliding:
            slots = torch.arange(max(0, P - cache.window), P) % cache.window
            got, want = cache.k[i][1][:, slots], cache.k[i][2][:, slots]
        else:
            got, want = cache.k[i][1, :, :P], cache.k[i][2, :, :P]
        torch.testing.assert_close(got, want)


def test_chunk_end_lets_every_block_tail_survive():
    cache = _model(24).make_cache(rows=1)
    pc = PrefixCache(cache, 1, block_size=16)  # W 24 > block 16: a chunk may pass one boundary by 8
    assert [pc.chunk_end(s, 1000, 512) for s in (0, 10, 16, 40)] == [24, 24, 40, 56]
    pc = PrefixCache(_model(8).make_cache(rows=1), 1, block_size=16)  # W <= block: stop at each boundary
    assert [pc.chunk_end(s, 1000, 512) for s in (0, 10, 16, 40)] == [16, 16, 32, 48]
    pc = PrefixCache(_model(None).make_cache(rows=1), 1, block_size=16)  # dense: no limit
    assert pc.chunk_end(3, 1000, 512) == 515
