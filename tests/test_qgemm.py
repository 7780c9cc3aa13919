"""The VNNI int8/int4 kernel (exaone/kernels/qgemm) against its float reference, and its layouts.

The kernel quantizes activations to int8 per block (32 for int8 weights, the group for int4) and
sums exactly in int32, so against `reference_linear` (float64 on the same quantized activations)
it differs only by float32 rounding: relative 1e-5 (float32 out), 4e-3 (bfloat16 out, one
rounding of 2^-9). Against unquantized activations each input element moves by at most half a
step, amax(block) / 254, so |y - x W^T| <= sum_k |W[n, k]| amax(block of k) / 254, asserted per
element.
"""
from __future__ import annotations

import pytest
import torch

from exaone.kernels import _ext, qgemm

needs_kernel = pytest.mark.skipif(not qgemm.available(), reason=f"VNNI kernel unavailable: {qgemm.disabled_reason()}")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _int8(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.01 + 1e-3
    return q, s, q.float() * s[:, None]


def _int4(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.01).bfloat16()
    zero = (torch.randn(n, k // group, generator=g) * 0.01).bfloat16()
    w = ((c.float() - 8).view(n, -1, group) * scale.float()[..., None] + zero.float()[..., None]).view(n, k)
    return c, scale, zero, w


@pytest.mark.parametrize("n,k", [(1, 4), (17, 100), (64, 64), (130, 256)])
def test_int8_layout_round_trip(n, k):
    q, _, _ = _int8(n, k)
    w = qgemm.pack_int8(q)
    assert w.shape == (-(-n // 64), -(-k // 32) * 32 * 64) and w.dtype == torch.uint8  # a byte per weight
    assert torch.equal(qgemm.unpack_int8(w, n, k), q)


@pytest.mark.parametrize("n,k,group", [(16, 32, 32), (100, 256, 128), (200, 512, 256)])
def test_int4_layout_round_trip(n, k, group):
    c, scale, zero, _ = _int4(n, k, group)
    w = qgemm.pack_int4(c)
    assert w.shape == (-(-n // 64), k * 32)  # half a byte per weight, 64 channels per tile
    assert torch.equal(qgemm.unpack_int4(w, n, k), c)
    s2, z2 = qgemm.unpack_int4_scales(qgemm.pack_int4_scales(scale, zero), n)
    assert torch.equal(s2, scale) and torch.equal(z2, zero)


def test_int4_nibble_order_is_the_documented_one():
    # tile 0, step 0: byte n*4+kk of half h holds channel 32h+n (low nibble) and 32h+16+n (high)
    c = torch.zeros(64, 4, dtype=torch.uint8)
    c[3, 2], c[19, 2], c[35, 1] = 5, 9, 7
    w = qgemm.pack_int4(c)[0]
    assert w[3 * 4 + 2] == 5 | (9 << 4) and w[64 + 3 * 4 + 1] == 7


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 40])
@pytest.mark.parametrize("n,k", [(1, 32), (17, 100), (130, 256)])
def test_int8_kernel_equals_reference(m, n, k):
    q, s, w = _int8(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 4e-3)):
        xi = x.to(dtype)
        y = qgemm.int8_linear(xi, qgemm.pack_int8(q), qgemm.pack_int8_scales(s), n)
        assert y.dtype == dtype and y.shape == (m, n)
        assert _rel(y, qgemm.reference_linear(xi.float(), w, qgemm.INT8_BLOCK)) < tol


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 4, 6, 40])
@pytest.mark.parametrize("n,k,group", [(16, 32, 32), (100, 256, 128), (200, 512, 256), (64, 2048, 128)])
def test_int4_kernel_equals_reference(m, n, k, group):
    c, scale, zero, w = _int4(n, k, group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 4e-3)):
        xi = x.to(dtype)
        y = qgemm.int4_linear(xi, qgemm.pack_int4(c), qgemm.pack_int4_scales(scale, zero), n, group)
        assert y.dtype == dtype and y.shape == (m, n)
        assert _rel(y, qgemm.reference_linear(xi.float(), w, group)) < tol


@needs_kernel
def test_activation_quantization_error_within_half_a_step():
    n, k, block = 48, 320, qgemm.INT8_BLOCK
    q, s, w = _int8(n, k)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    x[:, 7] = 40.0  # an outlier channel: its block is coarse, the others are not
    y = qgemm.int8_linear(x, qgemm.pack_int8(q), qgemm.pack_int8_scales(s), n).double()
    exact = x.double() @ w.double().T
    amax = x.abs().view(5, k // block, block).amax(-1).repeat_interleave(block, 1)  # (M, K)
    bound = (amax.double() / 254) @ w.abs().double().T
    assert ((y - exact).abs() <= bound * 1.0001 + 1e-5).all()
    assert (y - exact).abs().max() > 0  # the activations really were quantized


@needs_kernel
def test_zero_rows_and_leading_dims():
    c, scale, zero, w = _int4(64, 128, 32)
    x = torch.zeros(2, 3, 128)
    x[1, 2] = torch.randn(128)
    y = qgemm.int4_linear(x, qgemm.pack_int4(c), qgemm.pack_int4_scales(scale, zero), 64, 32)
    assert y.shape == (2, 3, 64) and torch.equal(y[0], torch.zeros(3, 64))
    assert _rel(y[1, 2], qgemm.reference_linear(x[1, 2:3], w, 32)[0]) < 1e-5


@needs_kernel
def test_bad_inputs_raise_clear_errors():
    q, s, _ = _int8(64, 64)
    w, sc = qgemm.pack_int8(q), qgemm.pack_int8_scales(s)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        qgemm.int8_linear(torch.randn(1, 64).half(), w, sc, 64)
    with pytest.raises(RuntimeError, match="does not match"):
        qgemm.int8_linear(torch.randn(1, 96), w, sc, 64)
    with pytest.raises(RuntimeError, match="int8 scales"):
        qgemm.int8_linear(torch.randn(1, 64), w, sc.double(), 64)
    with pytest.raises(ValueError, match="divisible by 4"):
        qgemm.pack_int4(torch.zeros(16, 6, dtype=torch.uint8))


def test_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("EXAONE_NO_KERNELS", "1")
    ext = _ext.Extension("exaone_qgemm", "qgemm.cpp", qgemm.QGEMM.flags)
    assert not ext.available() and "EXAONE_NO_KERNELS" in ext.reason
    monkeypatch.setattr(qgemm, "QGEMM", ext)
    with pytest.raises(RuntimeError, match="unavailable: EXAONE_NO_KERNELS"):
        qgemm.int8_linear(torch.randn(1, 32), *(lambda q, s: (qgemm.pack_int8(q), qgemm.pack_int8_scales(s)))(
            *_int8(16, 32)[:2]), 16)


@needs_kernel
def test_threads_split_the_work_without_changing_a_bit():
    # Regression: rows were quantized into each worker's own thread-local buffer (a crash at 2 threads).
    c, scale, zero, _ = _int4(320, 256, 128)
    w, sz = qgemm.pack_int4(c), qgemm.pack_int4_scales(scale, zero)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = qgemm.int4_linear(x, w, sz, 320, 128)
        torch.set_num_threads(2)
        assert torch.equal(qgemm.int4_linear(x, w, sz, 320, 128), one)
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 5])
def test_many_weights_in_one_call_equal_one_call_each(bits, m):
    """qlinear_many: x quantized once, the parts' tiles split among threads as one sequence, each
    part's output in its columns; bit for bit the separate calls (also for N not a multiple of 64)."""
    g = torch.Generator().manual_seed(bits * 10 + m)
    x = torch.randn(m, 256, generator=g).bfloat16()
    ns = [192, 64, 100]
    if bits == 8:
        packed = [(qgemm.pack_int8(q), qgemm.pack_int8_scales(s)) for q, s, _ in (_int8(n, 256, i) for i, n in enumerate(ns))]
        block = qgemm.INT8_BLOCK
    else:
        packed = [(qgemm.pack_int4(c), qgemm.pack_int4_scales(s, z)) for c, s, z, _ in
                  (_int4(n + (-n) % 16, 256, 64, i) for i, n in enumerate(ns))]
        ns = [n + (-n) % 16 for n in ns]
        block = 64
    mod = qgemm.QGEMM.module
    y = mod.qlinear_many(x, [w for w, _ in packed], [s for _, s in packed], ns, bits, block)
    assert y.shape == (m, sum(ns)) and y.dtype is torch.bfloat16
    for (w, s), n, part in zip(packed, ns, y.split(ns, -1)):
        assert torch.equal(part, mod.qlinear(x, w, s, n, bits, block))
    with pytest.raises(RuntimeError, match="one scales tensor and one N per weight"):
        mod.qlinear_many(x, [packed[0][0]], [], ns[:1], bits, block)
    with pytest.raises(RuntimeError, match="does not match"):
        mod.qlinear_many(x, [w for w, _ in packed], [s for _, s in packed], [ns[0], ns[1], ns[2] + 64], bits, block)
