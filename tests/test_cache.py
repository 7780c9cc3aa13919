"""KVCache decode steps against the no-cache forward: rows at one position (slice write, no mask)
and rows at different positions (per-row write and masks), across the sliding window's wrap."""
from __future__ import annotations

import pytest
import torch

from exaone.model import Exaone4ForCausalLM
from exaone.testing import init_random_, tiny_config


@pytest.fixture(scope="module")
def hybrid():
    model = Exaone4ForCausalLM(tiny_config())  # window 16, 3 sliding : 1 global
    init_random_(model, 0)
    return model.eval()


@pytest.mark.parametrize("lengths", [(9, 9), (3, 20, 11)], ids=["same-position", "different-positions"])
def test_batched_decode_equals_full_forward(hybrid, lengths, single_thread):
    vocab = hybrid.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    B, steps = len(seqs), 24  # rows pass the window (16): ring slots wrap, masks drop away
    with torch.inference_mode():
        cache = hybrid.make_cache(rows=B + 1, max_len=64)
        for r, s in enumerate(seqs):  # row 0 stays empty: the batch is rows 1..B
            hybrid(torch.tensor([s]), position_ids=torch.arange(len(s))[None], cache=cache,
                   rows=slice(r + 1, r + 2), last_only=True)
        gen_toks = torch.randint(3, vocab, (B, steps), generator=gen)
        for i in range(steps):
            pos = torch.tensor([[len(s)] for s in seqs])
            got = hybrid(gen_toks[:, i:i + 1], position_ids=pos, cache=cache, rows=slice(1, B + 1))[:, -1]
            for r, s in enumerate(seqs):
                s.append(int(gen_toks[r, i]))
                want = hybrid(torch.tensor([s]))[0, -1]
                torch.testing.assert_close(got[r], want, rtol=1e-4, atol=1e-4)
        assert cache.k[0][0].abs().sum() == 0  # the row outside the batch was never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries,mask_rows", [(1, 2), (3, 1), (8, 2), (8, None), (40, 2)])
def test_sdpa_few_queries_go_through_matmul_attention(dtype, queries, mask_rows):
    """Decode-sized attention (<= 8 queries) is two GEMMs with the query heads of a kv group
    stacked; it matches the fused kernel in fp32 and is at least as accurate in bf16. Prefill-sized
    attention keeps the fused kernel, bit for bit."""
    import torch.nn.functional as F

    from exaone import cache
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g).to(dtype) for h, n in ((4, queries), (2, 50), (2, 50)))
    mask = None
    if mask_rows:
        mask = torch.rand(mask_rows, 1, queries, 50, generator=g) > 0.3
        mask[..., 0] = True
    out = cache.sdpa(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.25,
                                         enable_gqa=True)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert out.dtype is dtype and out.shape == q.shape
    if queries > cache._FEW_QUERIES:
        assert torch.equal(out, fused)
    elif dtype is torch.float32:
        torch.testing.assert_close(out, fused, rtol=1e-5, atol=1e-5)
    else:
        assert (out.double() - ref).abs().max() <= (fused.double() - ref).abs().max() + 1e-2
