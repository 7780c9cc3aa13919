"""exaone.decode_plan: a decode step's layers in one C++ call give exactly the eager step's logits
and cache, on float32, bfloat16, int8 and int4 models with rows at different positions (sliding
rings that wrapped included); where a part is not covered, no plan; the engine uses it."""
from __future__ import annotations

import pytest
import torch

from exaone import kernels, model
from exaone.decode_plan import DecodePlan
from exaone.engine import Engine, SamplingParams
from exaone.quant import quantize_model
from exaone.testing import init_random_, tiny_config

pytestmark = pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                                reason="the kernels need AVX-512")


@pytest.fixture
def kern(monkeypatch):
    """The kernels built, and routing the tiny test matrices too."""
    monkeypatch.delenv("EXAONE_NO_KERNELS", raising=False)
    monkeypatch.setattr(model, "_KERNEL_MIN_ELEMENTS", 0)
    if kernels.GEMM.tried and kernels.GEMM.module is None:
        monkeypatch.setattr(kernels.GEMM, "tried", False)
    assert kernels.available(), kernels.disabled_reason()


def _model(kind: str, **cfg):
    torch.manual_seed(0)
    m = model.Exaone4ForCausalLM(tiny_config(**{"head_dim": 32, "hidden_size": 128, "intermediate_size": 256, **cfg}))
    init_random_(m)
    if kind in ("int8", "int4"):
        from exaone.kernels import qgemm
        if not qgemm.available():
            pytest.skip(f"the VNNI kernel is unavailable: {qgemm.disabled_reason()}")
        return quantize_model(m.bfloat16(), kind, group_size=32)
    return m.to(getattr(torch, kind))


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8", "int4"])
def test_plan_gives_the_eager_steps_logits_and_cache(kern, kind):
    m = _model(kind)
    plan = DecodePlan.build(m)
    assert plan is not None
    lens = [3, 20, 37]  # window 16: two rows past it
    caches = [m.make_cache(rows=4, max_len=64) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            for r, n in enumerate(lens):
                ids = torch.randint(0, m.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                m(ids, position_ids=torch.arange(n)[None], cache=cache, rows=slice(r + 1, r + 2))
        toks = torch.randint(0, m.config.vocab_size, (3, 1), generator=torch.Generator().manual_seed(1))
        for i in range(6):
            pos = torch.tensor([[n + i] for n in lens])
            assert plan.usable(toks, caches[0])
            got = plan(toks, pos, caches[0], slice(1, 4))
            want = m(toks, position_ids=pos, cache=caches[1], rows=slice(1, 4))
            assert got.shape == want.shape and torch.equal(got, want), (kind, i)
            toks = want[:, -1].argmax(-1, keepdim=True)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        assert torch.equal(a, b)


def test_no_plan_where_a_part_is_not_the_kernels(kern, monkeypatch):
    assert DecodePlan.build(_model("float32", head_dim=48)) is None  # attend_decode's head sizes
    big = 1 << 30
    monkeypatch.setattr(model, "_KERNEL_MIN_ELEMENTS", big)  # float linears stay on torch's GEMMs
    assert DecodePlan.build(_model("float32")) is None
    assert DecodePlan.build(_model("int8")) is not None  # quantized linears are always the kernel's


def test_usable_bounds_the_batch_by_the_kernels_rows(kern):
    m = _model("float32")
    plan = DecodePlan.build(m)
    cache = m.make_cache(rows=40, max_len=64)
    assert plan.max_rows == model._F32_KERNEL_ROWS
    tokens = torch.zeros(plan.max_rows, 1, dtype=torch.long)
    assert not plan.usable(tokens, cache)  # with autograd: the eager path (the kernels have none)
    with torch.no_grad():
        assert plan.usable(tokens, cache)
        assert not plan.usable(torch.zeros(plan.max_rows + 1, 1, dtype=torch.long), cache)
        assert not plan.usable(torch.zeros(1, 2, dtype=torch.long), cache)  # prefill chunks: the eager path


@pytest.mark.parametrize("kind", ["bfloat16", "int4"])
def test_engine_decodes_through_the_plan_with_the_same_tokens(kern, monkeypatch, kind):
    m = _model(kind)
    calls = []
    run = DecodePlan.__call__
    monkeypatch.setattr(DecodePlan, "__call__", lambda self, *a: calls.append(1) or run(self, *a))

    def generate(fused):
        e = Engine(m, max_batch=4, max_len=128, prefix_cache_bytes=0, fused_decode=fused)
        assert (e._plan is not None) == fused
        hs = [e.submit(list(range(5, 5 + n)), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
              for n in (4, 19, 30)]
        while e.step():
            pass
        return [[o.token_id for o in h.outputs() if o.token_id is not None] for h in hs]
    fused = generate(True)
    assert calls  # decode steps went through the plan
    n = len(calls)
    assert generate(False) == fused and len(calls) == n


def test_decode_layers_refuse_malformed_input(kern):
    m = _model("float32")
    plan = DecodePlan.build(m)
    mod = kernels.GEMM.module
    w = m.model.layers[0].self_attn.q_proj.weight.detach()
    n = torch.ones(w.shape[1])
    g1 = mod.Group(0, [w], [], [w.shape[0]])
    with pytest.raises(RuntimeError, match="q|k|v, o, gate|up, down"):
        mod.DecodeLayers(None, [mod.Layer(g1, g1, g1, g1, n, n, n, n, 1e-5, 0, True)])
    with pytest.raises(RuntimeError, match="capsule"):  # packed weights without qgemm's function
        g3 = mod.Group(2, [w] * 3, [n] * 3, [1, 1, 1], 4, 32)
        mod.DecodeLayers(None, [mod.Layer(g3, g1, mod.Group(0, [w, w], [], [1, 1]), g1, n, n, n, n, 1e-5, 0, True)])
    cache = m.make_cache(rows=1, max_len=64)
    x = torch.zeros(1, m.config.hidden_size)
    pos = torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), pytest.raises(RuntimeError, match="one K and V per layer"):
        plan._layers.run(x, None, None, pos, 0, cache.k[:-1], cache.v[:-1])
