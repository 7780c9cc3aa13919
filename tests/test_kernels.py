"""exaone.kernels.f32_linear / bf16_linear against float64 / fp32 references, their input checks,
their fallbacks, and model.Linear's routing. The extension is built once per machine (cached on disk), loaded once
per session."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from exaone import kernels, model

AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
needs_avx512 = pytest.mark.skipif(
    not AVX512, reason=f"the kernel needs AVX-512; torch reports {torch.backends.cpu.get_cpu_capability()}")


@pytest.fixture
def kern(monkeypatch):
    """The built kernel module; EXAONE_NO_KERNELS from the environment does not apply here."""
    monkeypatch.delenv("EXAONE_NO_KERNELS", raising=False)
    monkeypatch.setattr(model, "_KERNEL_MIN_ELEMENTS", 0)  # route the small test matrices too
    if kernels.GEMM.tried and kernels.GEMM.module is None:
        monkeypatch.setattr(kernels.GEMM, "tried", False)
    assert kernels.available(), kernels.disabled_reason()
    return kernels


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """bf16 bits as integers in value order (-0 and +0 both 0), so |a - b| counts ulps."""
    b = t.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.where(b >= 0x8000, -(b & 0x7FFF), b)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_ordered(a) - _ordered(b)).abs()


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), w.float()).bfloat16()


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    # Bound: the kernel and the reference sum the same exact fp32 products of bf16 values in a
    # different order and round to bf16 once. So an element is off by at most one bf16 step
    # (<= |ref| * 2^-7) plus what reordering an fp32 sum can change (2 K 2^-24 sum|x w|), which
    # only shows where the sum cancels to far below its terms; all others are <= 1 ulp apart.
    ref = _reference(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    k = x.shape[-1]
    bound = ref.double().abs() * 2.0 ** -7 + 2 * k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)
    excess = (out.double() - ref.double()).abs() - bound
    assert excess.max().item() <= 0, f"off by {excess.max().item():.3g} beyond the bound"
    assert (_ulps(out, ref) == 0).float().mean().item() >= 0.99  # truncating instead of rounding misses ~50%


@needs_avx512
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 16, 17, 64, 127])
@pytest.mark.parametrize("n,k", [(64, 256), (37, 129), (5, 1000), (9, 7), (130, 2048 + 17)])
def test_matches_fp32_reference(kern, m, n, k):
    # k not a multiple of 32 exercises the masked tail load; n and m not multiples of the
    # register block exercise the edge tiles.
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    _check(kern.bf16_linear(x, w), x, w)


@needs_avx512
def test_rounds_to_nearest_even_once(kern):
    # fp32 sums that fall exactly between two bf16 values, or just off the middle: torch's
    # .to(bfloat16) (round to nearest, ties to even) decides; truncation or double rounding differs.
    e = 2.0 ** -8  # half a bf16 ulp at 1.0
    w = torch.tensor([[1.0, e], [1.0 + 2 * e, e], [1.0, 1.5 * e], [1.0, 0.5 * e], [-1.0, -e], [-(1 + 2 * e), -e]])
    x = torch.ones(2, 2)
    out = kern.bf16_linear(x.bfloat16(), w.bfloat16())
    exact = (x.double() @ w.double().T).float()  # exactly representable in fp32
    assert torch.equal(out, exact.bfloat16())
    assert out[0].tolist() == [1.0, 1.0 + 4 * e, 1.0 + 2 * e, 1.0, -1.0, -(1.0 + 4 * e)]


@needs_avx512
def test_leading_dims_and_non_contiguous_input(kern):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(33, 65, generator=gen).bfloat16()
    x3 = torch.randn(2, 5, 65, generator=gen).bfloat16()
    out = kern.bf16_linear(x3, w)
    assert out.shape == (2, 5, 33)
    assert torch.equal(out, kern.bf16_linear(x3.reshape(10, 65), w).view(2, 5, 33))
    wide = torch.randn(6, 200, generator=gen).bfloat16()
    for x in (wide[:, 10:75],               # rows with a stride: read in place
              wide[:, ::3][:, :65],         # strided columns: copied
              wide[:, :65].T.contiguous().T):  # column-major
        assert not x.is_contiguous()
        _check(kern.bf16_linear(x, w), x, w)


@needs_avx512
def test_empty_shapes(kern):
    w = torch.randn(4, 8).bfloat16()
    assert kern.bf16_linear(torch.zeros(0, 8, dtype=torch.bfloat16), w).shape == (0, 4)
    out = kern.bf16_linear(torch.ones(3, 0, dtype=torch.bfloat16), torch.ones(4, 0, dtype=torch.bfloat16))
    assert torch.equal(out, torch.zeros(3, 4, dtype=torch.bfloat16))


@needs_avx512
def test_bad_input_is_refused_clearly(kern):
    x, w = torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with pytest.raises(TypeError, match="bfloat16"):
        kern.bf16_linear(x.float(), w)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        kern.bf16_linear(x, torch.randn(4, 9).bfloat16())
    with pytest.raises(ValueError, match="contiguous weight"):
        kern.bf16_linear(x, torch.randn(8, 4).bfloat16().T)
    # The C++ entry point checks too, for callers that skip the Python wrapper.
    with pytest.raises(RuntimeError, match="must be \\(M, K\\)"):
        kern.GEMM.module.bf16_linear(x[None], w)
    with pytest.raises(RuntimeError, match="contiguous"):
        kern.GEMM.module.bf16_linear(x, torch.randn(8, 4).bfloat16().T)


@needs_avx512
def test_concurrent_calls_from_threads(kern):
    # The engine calls the model from its worker thread while others may too.
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(300, 512, generator=gen).bfloat16()
    xs = [torch.randn(m, 512, generator=gen).bfloat16() for m in (2, 5, 16, 33)]
    want = [kern.bf16_linear(x, w) for x in xs]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                got[i] = kern.bf16_linear(xs[i], w)
                assert torch.equal(got[i], want[i])
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == len(xs)


def _check_f32(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    # The same fp32 products summed in another order than MKL's: each sum is within
    # K 2^-24 sum|x w| of the exact one (float64 here), as F.linear's is; where a sum cancels
    # the two differ by more than assert_close's default tolerance, so that bound is the test.
    exact = x.double() @ w.double().T
    assert out.dtype == torch.float32 and out.shape == exact.shape
    bound = x.shape[-1] * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T) + 1e-30
    for got in (out, F.linear(x, w)):
        excess = (got.double() - exact).abs() - bound
        assert excess.max().item() <= 0, f"off by {excess.max().item():.3g} beyond the bound"


@needs_avx512
@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 16, 17, 33, 64, 130])
@pytest.mark.parametrize("n,k", [(64, 256), (37, 129), (5, 1000), (9, 7), (130, 2048 + 17), (261, 1030)])
def test_f32_matches_float64_reference(kern, m, n, k):
    # k not a multiple of 16 (masked tail) and over one K slice; n over one weight panel and
    # not a multiple of the register block; m over one block of rows and not a multiple of 4.
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    _check_f32(kern.f32_linear(x, w), x, w)


@needs_avx512
def test_f32_leading_dims_non_contiguous_input_and_empty_shapes(kern):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(33, 65, generator=gen)
    x3 = torch.randn(2, 5, 65, generator=gen)
    out = kern.f32_linear(x3, w)
    assert out.shape == (2, 5, 33)
    assert torch.equal(out, kern.f32_linear(x3.reshape(10, 65), w).view(2, 5, 33))
    wide = torch.randn(6, 200, generator=gen)
    for x in (wide[:, 10:75], wide[:, ::3][:, :65], wide[:, :65].T.contiguous().T):
        assert not x.is_contiguous()
        _check_f32(kern.f32_linear(x, w), x, w)
    assert kern.f32_linear(torch.zeros(0, 8), torch.ones(4, 8)).shape == (0, 4)
    assert torch.equal(kern.f32_linear(torch.ones(3, 0), torch.ones(4, 0)), torch.zeros(3, 4))


@needs_avx512
def test_f32_bad_input_is_refused_clearly(kern):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(TypeError, match="float32 x and w"):
        kern.f32_linear(x.double(), w)
    with pytest.raises(TypeError, match="float32"):
        kern.f32_linear(x, w.bfloat16())
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        kern.f32_linear(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="contiguous weight"):
        kern.f32_linear(x, torch.randn(8, 4).T)
    with pytest.raises(RuntimeError, match="must be Float"):
        kern.GEMM.module.f32_linear(x.bfloat16(), w.bfloat16())
    with pytest.raises(RuntimeError, match="must be \\(M, K\\)"):
        kern.GEMM.module.f32_linear(x[None], w)


@needs_avx512
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 31, 32, 200])
def test_linear_routes_f32_rows(kern, rows):
    gen = torch.Generator().manual_seed(rows)
    lin = model.Linear(96, 40, bias=False)
    x = torch.randn(1, rows, 96, generator=gen)
    with torch.no_grad():
        out = lin(x)
        if rows <= model._F32_KERNEL_ROWS:
            assert torch.equal(out, kern.f32_linear(x, lin.weight))
        else:
            assert torch.equal(out, F.linear(x, lin.weight))
        _check_f32(out.view(rows, 40), x.view(rows, 96), lin.weight)
    # With gradients (training) the kernel, which has no autograd, is not used.
    out = lin(x)
    assert out.requires_grad and torch.equal(out, F.linear(x, lin.weight))
    out.sum().backward()
    assert lin.weight.grad is not None


@needs_avx512
@pytest.mark.parametrize("slow_bf16", [True, False])
@pytest.mark.parametrize("n,k", [(40, 96), (2048, 2048)])  # under / at model._KERNEL_MIN_WEIGHTS
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 32, 33, 63, 64, 127, 128, 200])
def test_linear_routes_bf16_rows(kern, monkeypatch, slow_bf16, rows, n, k):
    """Without native bf16 (slow_bf16) the kernel takes up to 127 rows, an upcast GEMM the rest;
    with it, the kernel takes 1-32 rows and oneDNN's GEMM the rest."""
    monkeypatch.setattr(model, "_SLOW_BF16_GEMM", slow_bf16)
    gen = torch.Generator().manual_seed(rows)
    lin = model.Linear(k, n, bias=False).to(torch.bfloat16)
    x = torch.randn(1, rows, k, generator=gen).bfloat16()
    w = lin.weight
    if slow_bf16:
        kernel_rows = rows < model._UPCAST_ROWS and (
            rows < model._KERNEL_UPCAST_ROWS or w.numel() >= model._KERNEL_MIN_WEIGHTS)
    else:
        kernel_rows = rows <= model._NATIVE_BF16_KERNEL_ROWS
    with torch.no_grad():
        out = lin(x)
        if kernel_rows:
            assert torch.equal(out, kern.bf16_linear(x, w))
        elif slow_bf16:
            assert torch.equal(out, model.Linear.upcast(x, w))
        else:
            assert torch.equal(out, F.linear(x, w))
        _check(out.view(rows, n), x.view(rows, k), w)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("EXAONE_NO_KERNELS", "1")
    monkeypatch.setattr(kernels.GEMM, "tried", False)
    monkeypatch.setattr(kernels.GEMM, "module", kernels.GEMM.module)
    monkeypatch.setattr(kernels.GEMM, "reason", kernels.GEMM.reason)
    assert not kernels.available()
    assert "EXAONE_NO_KERNELS" in kernels.disabled_reason()
    lin = model.Linear(16, 8, bias=False).to(torch.bfloat16)
    x = torch.randn(4, 16).bfloat16()
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight))  # the torch path
        assert torch.equal(lin.float()(x.float()), F.linear(x.float(), lin.weight))
    with pytest.raises(RuntimeError, match="EXAONE_NO_KERNELS"):
        kernels.bf16_linear(x, lin.weight)


@needs_avx512
def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("Error building extension: no compiler here")

    monkeypatch.delenv("EXAONE_NO_KERNELS", raising=False)
    monkeypatch.setattr(kernels.GEMM, "tried", False)
    monkeypatch.setattr(kernels.GEMM, "module", kernels.GEMM.module)
    monkeypatch.setattr(kernels.GEMM, "reason", kernels.GEMM.reason)
    monkeypatch.setattr(kernels.GEMM, "build", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kernels.available() and not kernels.available()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no compiler here" in msgs[0] and "EXAONE_NO_KERNELS=1" in msgs[0]
    assert "no compiler here" in kernels.disabled_reason()
    lin = model.Linear(16, 8, bias=False).to(torch.bfloat16)
    x = torch.randn(4, 16).bfloat16()
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight))  # the torch path


def test_import_does_not_build():
    code = ("import exaone, exaone.model, exaone.engine, exaone.kernels as k; "
            "assert not k.GEMM.tried and k.GEMM.module is None; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_compiled_graph_keeps_the_torch_path():
    # Dynamo cannot trace into the extension; under torch.compile Linear keeps F.linear / mv.
    for dtype in (torch.bfloat16, torch.float32):
        lin = model.Linear(32, 8, bias=False).to(dtype)
        x = torch.randn(4, 32).to(dtype)
        with torch.no_grad():
            out = torch.compile(lin, backend="eager", fullgraph=True)(x)
        assert torch.equal(out, F.linear(x, lin.weight))


def test_stale_build_lock_is_cleared(monkeypatch, tmp_path):
    # torch waits forever on the lock file of a build that was killed; ours is cleared when old.
    import os
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for name, age, kept in (("old", 3600, False), ("fresh", 5, True)):
        d = tmp_path / name
        d.mkdir()
        (d / "lock").touch()
        os.utime(d / "lock", (time.time() - age,) * 2)
        kernels.clear_stale_lock(name)
        assert (d / "lock").exists() == kept
    kernels.clear_stale_lock("never-built")  # no lock: nothing to do


def test_engine_builds_the_kernel_at_construction(monkeypatch):
    """An engine asks for the kernel when it is built, not in its first step, and only when a
    weight is large enough to use it."""
    from exaone.engine import Engine
    from exaone.testing import init_random_, tiny_config

    calls = []
    monkeypatch.setattr(model.kernels, "available", lambda: calls.append(1) or True)
    fp32 = model.Exaone4ForCausalLM(tiny_config())
    init_random_(fp32)
    Engine(fp32, max_batch=4)  # every weight is too small for the kernel: nothing to build
    assert calls == []
    monkeypatch.setattr(model, "_KERNEL_MIN_ELEMENTS", 0)
    Engine(fp32, max_batch=1)
    assert calls == [1]
    Engine(fp32.to(torch.bfloat16), max_batch=4)
    assert calls == [1, 1]
    Engine(fp32.to(torch.float16), max_batch=4)  # no kernel for float16
    assert calls == [1, 1]


def test_small_weights_keep_torch_paths(monkeypatch):
    """Matrices under _KERNEL_MIN_ELEMENTS never ask for the kernel (so the demo model never builds it)."""
    monkeypatch.setattr(model.kernels, "available", lambda: pytest.fail("asked for the kernel"))
    monkeypatch.setattr(model, "_SLOW_BF16_GEMM", True)
    lin = model.Linear(192, 512, bias=False)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            lin = lin.to(dtype)
            for rows in (1, 4, 16):
                x = torch.randn(rows, 192).to(dtype)
                out = lin(x)
                ref = torch.mv(lin.weight, x[0])[None] if rows == 1 and dtype is torch.bfloat16 else F.linear(x, lin.weight)
                assert torch.equal(out, ref)


def _torch_norm(norm: model.RMSNorm, x, residual=None):
    """RMSNorm's torch path (the reference's ops), whatever is built."""
    module, kernels.GEMM.module = kernels.GEMM.module, None
    try:
        return norm(x, residual=residual)
    finally:
        kernels.GEMM.module = module


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (2, 3, 8, 64), (5, 100), (1, 7)])
def test_rms_norm_kernel_matches_the_torch_ops(kern, dtype, shape):
    """The fused norm (+ residual add) rounds as the torch ops do: bf16 identical here, fp32
    within the reordering of the sum of squares."""
    gen = torch.Generator().manual_seed(shape[-1])
    norm = model.RMSNorm(shape[-1], 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
        x = (3 * torch.randn(*shape, generator=gen)).to(dtype)
        res = torch.randn(*shape, generator=gen).to(dtype)
        for r in (None, res):
            got = norm(x, residual=r)
            assert torch.equal(got, kern.GEMM.module.rms_norm(x, norm.weight, 1e-5, r))  # the route
            want = _torch_norm(norm, x, r)
            assert got.dtype is dtype and got.shape == x.shape
            if dtype is torch.bfloat16:
                assert _ulps(got, want).max() <= 1 and (_ulps(got, want) == 0).float().mean() >= 0.99
            else:
                torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    # Gradients (training) and non-contiguous inputs keep the torch ops.
    xg = x.float().requires_grad_() if dtype is torch.float32 else None
    if xg is not None:
        out = norm(xg)
        assert out.requires_grad and torch.equal(out, _torch_norm(norm, xg))
    xs = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    xs.copy_(x)
    assert not xs.is_contiguous()
    with torch.no_grad():
        assert torch.equal(norm(xs), _torch_norm(norm, xs))


@needs_avx512
def test_rms_norm_kernel_refuses_bad_input(kern):
    f = kern.GEMM.module.rms_norm
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        f(torch.ones(2, 4).double(), torch.ones(4).double(), 1e-5, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        f(torch.ones(4, 2).T, torch.ones(4), 1e-5, None)
    with pytest.raises(RuntimeError, match="residual"):
        f(torch.ones(2, 4), torch.ones(4), 1e-5, torch.ones(3, 4))


def test_norms_never_build_the_kernel(monkeypatch):
    """A norm uses the kernel only once something else built it (a small model never builds it)."""
    monkeypatch.setattr(kernels.GEMM, "module", None)
    monkeypatch.setattr(kernels.GEMM, "available", lambda *a: pytest.fail("a norm asked for the build"))
    norm = model.RMSNorm(8, 1e-5)
    with torch.no_grad():
        x = torch.randn(3, 8)
        assert torch.equal(norm(x), norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)))


@pytest.mark.parametrize("onednn", [True, False])
def test_linear_routes_f32_prefill_rows(monkeypatch, onednn):
    """From 32 rows fp32 goes to oneDNN's GEMM where MKL is slow (non-Intel CPUs), else MKL's;
    small weights stay on MKL (oneDNN builds a primitive per shape)."""
    if onednn and not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(model, "_ONEDNN_F32", onednn)
    monkeypatch.setattr(model, "_KERNEL_MIN_ELEMENTS", 1 << 12)
    gen = torch.Generator().manual_seed(0)
    for n, k in ((64, 128), (16, 64)):  # at / under _KERNEL_MIN_ELEMENTS
        lin = model.Linear(k, n, bias=False)
        x = torch.randn(2, 40, k, generator=gen)
        with torch.no_grad():
            out = lin(x)
            if onednn and n * k >= model._KERNEL_MIN_ELEMENTS:
                assert torch.equal(out, torch.ops.mkldnn._linear_pointwise(x, lin.weight, None, "none", [], ""))
            else:
                assert torch.equal(out, F.linear(x, lin.weight))
            torch.testing.assert_close(out, F.linear(x.double(), lin.weight.double()).float(), rtol=1e-5, atol=1e-5)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_decode_attention_matches_float64(kern, dtype, D):
    """One query per row over the first lengths[b] slots of strided cache slices, grouped heads."""
    g = torch.Generator().manual_seed(D)
    for B, L, cap, H, KVH in ((1, 5, 8, 4, 2), (3, 50, 64, 8, 2), (2, 300, 512, 5, 1), (1, 33, 40, 6, 2)):
        q = torch.randn(B, H, 1, D, generator=g).to(dtype)
        K, V = (torch.randn(B + 1, KVH, cap, D, generator=g).to(dtype) for _ in range(2))
        k, v = K[1:, :, :L], V[1:, :, :L]  # rows 1.. of the cache, L of cap slots: strided
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        lengths[0] = L
        out = kern.GEMM.module.decode_attention(q[:, :, 0], k, v, lengths, D ** -0.5)
        mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :]
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert out.dtype is dtype and out.shape == (B, H, D)
        err = (out.double() - ref[:, :, 0]).abs().max().item()
        assert err <= (1e-6 if dtype is torch.float32 else (fused.double() - ref).abs().max().item() + 1e-3), err


@needs_avx512
def test_decode_attention_refuses_bad_input(kern):
    f = kern.GEMM.module.decode_attention
    q, k = torch.randn(1, 4, 64), torch.randn(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match="lengths must be in"):
        f(q, k, k, torch.tensor([9]), 0.1)
    with pytest.raises(RuntimeError, match="lengths must be in"):
        f(q, k, k, torch.tensor([0]), 0.1)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        f(torch.randn(1, 3, 64), k, k, torch.tensor([8]), 0.1)
    with pytest.raises(RuntimeError, match="head_dim"):
        f(torch.randn(1, 4, 48), torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48), torch.tensor([8]), 0.1)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        f(q.double(), k.double(), k.double(), torch.tensor([8]), 0.1)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_decode_with_the_kernels_matches_torch(kern, dtype, monkeypatch):
    """A hybrid model's batched decode (rows at different positions, past the window) with the
    fused norms and decode attention against the same steps on torch's ops."""
    from exaone.testing import init_random_, tiny_config

    m = model.Exaone4ForCausalLM(tiny_config(head_dim=32))
    init_random_(m)
    m = m.to(dtype)
    lens = [3, 20, 37]  # window 16: two rows past it

    def run():
        gen = torch.Generator().manual_seed(1)
        cache = m.make_cache(rows=3, max_len=64)
        out = []
        with torch.no_grad():
            for r, n in enumerate(lens):
                ids = torch.randint(0, m.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                m(ids, position_ids=torch.arange(n)[None], cache=cache, rows=slice(r, r + 1))
            toks = torch.randint(0, m.config.vocab_size, (3, 1), generator=gen)
            for i in range(6):
                pos = torch.tensor([[n + i] for n in lens])
                logits = m(toks, position_ids=pos, cache=cache, rows=slice(0, 3))[:, -1]
                out.append(logits.float())
                toks = logits.argmax(-1, keepdim=True)
        return torch.stack(out)
    calls = {"attend_decode": 0, "silu_mul": 0}
    for name in calls:
        def counted(*a, _f=getattr(kern.GEMM.module, name), _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(kern.GEMM.module, name, counted)
    fast = run()
    # every decode step's layers took the fused attention; every layer the fused MLP product
    assert calls["attend_decode"] == 6 * m.config.num_hidden_layers
    assert calls["silu_mul"] == (6 + len(lens)) * m.config.num_hidden_layers
    module, kern.GEMM.module = kern.GEMM.module, None
    try:
        slow = run()
    finally:
        kern.GEMM.module = module
    tol = 1e-4 if dtype is torch.float32 else 0.05 * slow.abs().max().item()
    assert (fast - slow).abs().max().item() <= tol
    assert not torch.equal(fast, slow)  # the kernels did run (their sums are ordered differently)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("window", [0, 16])
def test_attend_decode_is_norm_rope_write_and_decode_attention(kern, dtype, D, window):
    """The fused decode step (q/k norm + RoPE, k/v into the cache at each row's slot, attention)
    gives exactly what the separate kernels and a plain cache write give: rows at different
    positions (a ring that wrapped included), q/k/v strided slices of one projection, batch rows
    in the middle of the cache."""
    g = torch.Generator().manual_seed(D + window)
    H, KVH, R, S, row0 = 4, 2, 5, (window or 48), 1
    pos = torch.tensor([0, 7, 15, 40] if window else [0, 7, 15, 47])
    B = len(pos)
    fused = (2 * torch.randn(B, (H + 2 * KVH) * D, generator=g)).to(dtype)
    q, k, v = fused.split([H * D, KVH * D, KVH * D], dim=1)
    qw, kw = (torch.randn(D, generator=g).to(dtype) for _ in range(2))
    cos, sin = model.rope_cos_sin(torch.rand(D // 2, generator=g), pos[:, None], dtype)
    cos, sin = cos.reshape(B, D), sin.reshape(B, D)
    K, V = (torch.randn(R, KVH, S, D, generator=g).to(dtype) for _ in range(2))
    K2, V2 = K.clone(), V.clone()
    out = kern.GEMM.module.attend_decode(q, k, v, qw, kw, 1e-5, cos, sin, K, V, row0, pos, window, D ** -0.5)

    slot = pos % window if window else pos
    lengths = (pos + 1).clamp(max=window) if window else pos + 1
    qn = kern.GEMM.module.norm_rope(q, H, qw, 1e-5, cos, sin).view(B, H, D)
    kn = kern.GEMM.module.norm_rope(k, KVH, kw, 1e-5, cos, sin).view(B, KVH, D)
    rows = torch.arange(row0, row0 + B)
    K2[rows, :, slot], V2[rows, :, slot] = kn, v.reshape(B, KVH, D)
    want = kern.GEMM.module.decode_attention(qn, K2[row0:row0 + B], V2[row0:row0 + B], lengths, D ** -0.5)
    assert torch.equal(K, K2) and torch.equal(V, V2)  # the new k/v at their slots, nothing else touched
    assert out.shape == (B, H * D) and torch.equal(out, want.reshape(B, H * D))


@needs_avx512
def test_attend_decode_refuses_bad_input(kern):
    f = kern.GEMM.module.attend_decode
    D, H, KVH = 32, 4, 2
    q, k = torch.randn(1, H * D), torch.randn(1, KVH * D)
    w = torch.ones(D)
    K = torch.zeros(2, KVH, 8, D)
    ok = dict(row0=0, pos=torch.tensor([3]), window=0)

    def call(**kw):
        a = {**ok, **kw}
        return f(q, k, k, w, w, 1e-5, None, None, K, K.clone(), a["row0"], a["pos"], a["window"], 0.1)
    call()
    with pytest.raises(RuntimeError, match="position 8 outside"):
        call(pos=torch.tensor([8]))  # a global store of 8 slots
    with pytest.raises(RuntimeError, match="rows"):
        call(row0=2)
    with pytest.raises(RuntimeError, match="window"):
        call(window=4)  # the ring has 8 slots
    with pytest.raises(RuntimeError, match="int64"):
        call(pos=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="one dtype"):
        f(q, k, k, w, w, 1e-5, None, None, K.bfloat16(), K.bfloat16(), 0, ok["pos"], 0, 0.1)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_matches_the_torch_ops(kern, dtype):
    """silu(gate) * up on strided rows (halves of one gate|up projection), with F.silu's and the
    product's roundings: bf16 within 1 ulp, nearly all identical; fp32 within a few ulps."""
    g = torch.Generator().manual_seed(0)
    gu = (4 * torch.randn(7, 2 * 200, generator=g)).to(dtype)
    gu[0, :4] = torch.tensor([0.0, -0.0, 90.0, -90.0])
    gate, up = gu[:, :200], gu[:, 200:]
    got = kern.GEMM.module.silu_mul(gate, up)
    want = F.silu(gate) * up
    assert got.dtype is dtype and got.shape == (7, 200) and got.is_contiguous()
    # silu(-90) underflows: torch's exp(90) overflows to inf (-0), the kernel's e^-90 does not (~1e-37)
    assert (got - want).abs()[want == 0].max() < 1e-30
    got, want = got[want != 0], want[want != 0]
    if dtype is torch.bfloat16:
        assert _ulps(got, want).max() <= 1 and (_ulps(got, want) == 0).float().mean() >= 0.99
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert kern.GEMM.module.silu_mul(gate[:0], up[:0]).shape == (0, 200)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kern.GEMM.module.silu_mul(gate.double(), up.double())
    with pytest.raises(RuntimeError, match="contiguous rows"):
        kern.GEMM.module.silu_mul(gate.t(), up.t())


def _torch_norm_rope(norm, y, heads, cos, sin):
    """The reference ops: RMSNorm per head, then x * cos + roll(x, D/2) * sin (model.apply_rope)."""
    T, D = y.shape[0], norm.weight.shape[0]
    module, kernels.GEMM.module = kernels.GEMM.module, None
    try:
        h = norm(y.reshape(T, heads, D))
    finally:
        kernels.GEMM.module = module
    return (h if cos is None else model.apply_rope(h, cos[:, None], sin[:, None])).reshape(T, heads * D)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_norm_rope_kernel_matches_the_torch_ops(kern, dtype, D):
    """q/k norm + RoPE in one call, on a strided slice of a fused projection: bf16 rounds as the
    torch ops (<= 1 ulp, nearly all identical), fp32 within the reordered sum of squares."""
    g = torch.Generator().manual_seed(D)
    T, heads = 5, 3
    fused = (3 * torch.randn(T, (heads + 2) * D, generator=g)).to(dtype)
    y = fused[:, D:(heads + 1) * D]  # rows with a stride: not contiguous
    norm = model.RMSNorm(D, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g))
    cos, sin = model.rope_cos_sin(torch.rand(D // 2, generator=g), torch.arange(T)[None] + 7, dtype)
    cos, sin = cos.reshape(T, D), sin.reshape(T, D)
    for c, s in ((cos, sin), (None, None)):
        got = kern.GEMM.module.norm_rope(y, heads, norm.weight, 1e-5, c, s)
        want = _torch_norm_rope(norm, y, heads, c, s)
        assert got.dtype is dtype and got.shape == (T, heads * D)
        if dtype is torch.bfloat16:
            assert _ulps(got, want).max() <= 2 and (_ulps(got, want) == 0).float().mean() >= 0.98
        else:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kern.GEMM.module.norm_rope(torch.ones(2, 48).to(dtype), 1, torch.ones(48).to(dtype), 1e-5,
                                   torch.ones(2, 48).to(dtype), torch.ones(2, 48).to(dtype))
    with pytest.raises(RuntimeError, match="heads"):
        kern.GEMM.module.norm_rope(y, heads + 1, norm.weight, 1e-5, cos, sin)
    with pytest.raises(RuntimeError, match="together"):
        kern.GEMM.module.norm_rope(y, heads, norm.weight, 1e-5, cos, None)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_kernel_gives_torch_argmax(kern, dtype):
    """First index of the maximum, ties and NaN (the first NaN wins) as torch.argmax; 1-D and 2-D."""
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 102400), (16, 1000), (3, 17), (2, 64), (5, 1)):
        x = torch.randn(*shape, generator=g).to(dtype)
        assert torch.equal(kern.argmax(x), torch.argmax(x, -1))
        assert torch.equal(kern.argmax(x[0]), torch.argmax(x[0]))
    x = torch.randn(5, 1000, generator=g).to(dtype)
    x[1, 5] = x[1, 9] = float("nan")
    x[2] = float("-inf")
    x[3, 7] = x[3, 900] = 100  # a tie: the first
    x[4, 999] = float("inf")
    assert torch.equal(kern.argmax(x), torch.argmax(x, -1))
    assert torch.equal(kern.argmax(x), kern.GEMM.module.argmax(x))  # the route
    # Other dims, dtypes and strided rows keep torch.argmax.
    assert torch.equal(kern.argmax(x, 0), torch.argmax(x, 0))
    assert torch.equal(kern.argmax(x.double()), torch.argmax(x.double(), -1))
    assert torch.equal(kern.argmax(x.T), torch.argmax(x.T, -1))
