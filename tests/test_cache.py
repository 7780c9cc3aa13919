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


@pytest.mark.parametrize("queries", [1, 3, 40])
def test_sdpa_runs_few_bf16_queries_in_fp32_on_cpus_without_bf16(queries):
    """Decode-sized bf16 attention goes through fp32 where bf16 is slow (and is then at least as
    accurate); prefill-sized attention and CPUs with bf16 instructions keep bf16 SDPA."""
    import torch.nn.functional as F

    from exaone import cache
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g).bfloat16() for h, n in ((4, queries), (2, 50), (2, 50)))
    mask = torch.rand(2, 1, queries, 50, generator=g) > 0.3
    mask[..., 0] = True
    out = cache.sdpa(q, k, v, mask)
    fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.25, enable_gqa=True)
    bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert out.dtype is torch.bfloat16
    if cache.SLOW_BF16 and queries <= cache._FP32_ATTENTION_QUERIES:
        assert torch.equal(out, fp32.bfloat16())
    else:
        assert torch.equal(out, bf16)
    assert (out.float() - fp32).abs().max() <= (bf16.float() - fp32).abs().max() + 1e-2
