"""Compiled decode (exaone/compiled.py) against the eager decode step, the reference.

Fast tests use `compile=False` (the padded static step, eagerly) and dynamo's "eager" backend
(tracing, guards and recompiles without inductor's compile time). The one inductor test,
`test_inductor_compiled_decode_slow`, compiles the real graph on the tiniest hybrid config; it
took 237 s on 2 busy cores, so it runs only with EXAONE_TEST_COMPILE=1.
"""
from __future__ import annotations

import os

import pytest
import torch

from exaone.compiled import CompiledDecode, batch_buckets
from exaone.engine import Engine
from exaone.model import Exaone4ForCausalLM
from exaone.sampling import SamplingParams
from exaone.testing import init_random_, tiny_config

STEPS = 32


def _model(**overrides):
    torch.manual_seed(0)
    m = Exaone4ForCausalLM(tiny_config(**overrides)).eval()
    init_random_(m)
    return m.requires_grad_(False)


def _decode(model, step_fn, B=3, rows=4, prompt=40, steps=STEPS, block=256, after_first=None):
    """Prefill B rows (prompt longer than the window), then greedy-decode `steps` tokens with
    `step_fn(cache, tokens, positions) -> logits`. Returns tokens (B, steps), logits (steps, B, V)."""
    cache = model.make_cache(rows=rows, max_len=1024, block=block)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (B, prompt), generator=g)
    toks, logits = [], []
    with torch.inference_mode():
        for b in range(B):
            lg = model(ids[b:b + 1], position_ids=torch.arange(prompt)[None], cache=cache,
                       rows=slice(b, b + 1), last_only=True)
        tok = torch.randint(3, model.config.vocab_size, (B, 1), generator=g)
        pos = torch.full((B, 1), prompt)
        for s in range(steps):
            lg = step_fn(cache, tok, pos)
            if s == 0 and after_first is not None:
                after_first()
            logits.append(lg.clone())
            tok = lg.argmax(-1, keepdim=True)
            toks.append(tok)
            pos = pos + 1
    return torch.cat(toks, 1), torch.stack(logits)


def _eager(model):
    return lambda cache, t, p: model(t, position_ids=p, cache=cache, rows=slice(0, t.shape[0]))[:, -1]


def _static(model, **kw):
    holder = {}

    def step(cache, t, p):
        if "cd" not in holder:
            holder["cd"] = CompiledDecode(model, cache, **kw)
        return holder["cd"](t, p)
    return step, holder


def test_batch_buckets():
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(1) == (1,)


@pytest.mark.parametrize("B", [1, 3, 4])
def test_static_decode_matches_eager(B):
    """The padded fixed-shape step (capacity-wide keys, padded batch), run eagerly."""
    model = _model()
    ref_t, ref_l = _decode(model, _eager(model), B=B)
    step, _ = _static(model, compile=False)
    t, lg = _decode(model, step, B=B)
    assert torch.equal(t, ref_t)
    torch.testing.assert_close(lg, ref_l, atol=1e-5, rtol=0)


def test_padding_rows_leave_cache_untouched():
    """Rows [B, bucket) belong to others (a request being prefilled): a padded step keeps them."""
    model = _model()
    cache = model.make_cache(rows=4, max_len=1024)
    with torch.inference_mode():
        for b in range(4):
            model(torch.randint(3, 500, (1, 20)), position_ids=torch.arange(20)[None], cache=cache,
                  rows=slice(b, b + 1))
        before = [(k[3].clone(), v[3].clone()) for k, v in zip(cache.k, cache.v)]
        CompiledDecode(model, cache, compile=False)(torch.tensor([[5], [6], [7]]), torch.full((3, 1), 20))
    for (k0, v0), k, v in zip(before, cache.k, cache.v):
        assert torch.equal(k0, k[3]) and torch.equal(v0, v[3])


def test_dynamo_no_recompiles_within_a_block():
    """dynamo (eager backend): one graph per (bucket, capacity); steady decoding never recompiles.
    block=64: capacity grows 64 -> 128 during the run, which is the one allowed recompile."""
    import torch._dynamo

    model = _model()
    torch._dynamo.reset()
    ref_t, ref_l = _decode(model, _eager(model), B=3, prompt=40, block=64)
    step, holder = _static(model, backend="eager")
    frames = torch._dynamo.utils.counters["stats"]

    def warm():
        warm.graphs = frames["unique_graphs"]
    t, lg = _decode(model, step, B=3, prompt=40, block=64, after_first=warm)
    assert holder["cd"].graphs == {(4, 64), (4, 128)}
    assert frames["unique_graphs"] - warm.graphs == 1  # the capacity growth at position 64, only
    assert torch.equal(t, ref_t)
    torch.testing.assert_close(lg, ref_l, atol=1e-5, rtol=0)
    # Within one capacity block: recompiling is an error.
    with torch._dynamo.config.patch(error_on_recompile=True):
        _decode(model, step, B=3, prompt=70, steps=8, block=64)
    torch._dynamo.reset()


def test_engine_compile_flag_same_tokens():
    """Engine(compile=True) (dynamo eager backend, so the test stays fast) = Engine() greedy,
    with requests joining and leaving (batch buckets change) and a prompt longer than the window."""
    import torch._dynamo

    model = _model()
    prompts = [list(range(3, 43)), list(range(50, 55)), list(range(100, 130))]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (24, 8, 16)]

    def run(**kw):
        eng = Engine(model, max_batch=4, prefill_chunk=16, **kw)
        hs = [eng.submit(p, q) for p, q in zip(prompts, params)]
        return [[o.token_id for o in h if o.token_id is not None] for h in hs]
    ref = run()
    torch._dynamo.reset()
    import exaone.compiled as compiled
    orig = compiled.CompiledDecode.__init__
    compiled.CompiledDecode.__init__ = lambda self, m, c, **kw: orig(self, m, c, backend="eager")
    try:
        got = run(compile=True)
    finally:
        compiled.CompiledDecode.__init__ = orig
        torch._dynamo.reset()
    assert got == ref
    assert Engine(model, max_batch=2)._compiled is None  # off by default


@pytest.mark.skipif(os.environ.get("EXAONE_TEST_COMPILE") != "1",
                    reason="inductor compile takes minutes on a busy CPU: set EXAONE_TEST_COMPILE=1")
def test_inductor_compiled_decode_slow():
    """The real thing: inductor on the tiniest hybrid (2 layers, L then G; prompt 40 > window 8),
    batch 3 padded to 4. Identical greedy tokens over 32 steps, logits within 1e-4, and after
    the first (compiling) step no recompile at all. Slow: inductor compiles C++ kernels."""
    import torch._dynamo

    model = _model(num_hidden_layers=2, sliding_window=8, sliding_window_pattern="LG", vocab_size=256,
                   hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    torch._dynamo.reset()
    ref_t, ref_l = _decode(model, _eager(model), B=3)
    step, _ = _static(model)
    patch = torch._dynamo.config.patch(error_on_recompile=True)

    def warm():
        patch.__enter__()
    try:
        t, lg = _decode(model, step, B=3, after_first=warm)
    finally:
        patch.__exit__(None, None, None)
        torch._dynamo.reset()
    assert torch.equal(t, ref_t)
    torch.testing.assert_close(lg, ref_l, atol=1e-4, rtol=0)
