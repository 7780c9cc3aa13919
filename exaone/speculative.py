"""Speculative decoding, greedy: a small draft model proposes k tokens, the target checks them all
in one forward pass, and the output is token for token what the target alone would produce.

One round, with `last` the newest token (fed to neither model yet) at position L-1:

    draft    feeds its pending tokens, then proposes d1..dk one decode step at a time
    target   one forward of [last, d1..dk] at positions L-1..L-1+k -> k+1 logits, g_i = argmax
    accept   the longest prefix with d_i == g_{i-1}; then g_a (the target's own token at the first
             disagreement, or a bonus token when all k agree): a+1 new tokens per target pass

Rollback. A global layer needs none: slots beyond the accepted length hold stale keys that the
position-based masks ignore until they are overwritten. A sliding layer's ring is the catch: the
write of a rejected position p went to slot p % W, which held position p - W, still inside the
window. Before each model writes draft positions we save exactly those ring slots (k of them,
distinct when k < W) and put back the ones of rejected positions afterwards: k slots per sliding
layer per round, never the whole ring. Greedy only; the engine does not use this path (so the
thinking budget and the forced-token queue do not apply here). This module must not know about
requests, sampling parameters or tokenizers.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .model import Exaone4ForCausalLM


@dataclass
class SpecStats:
    proposed: int = 0        # draft tokens offered to the target
    accepted: int = 0        # of which the target agreed with
    target_passes: int = 0   # target forward passes after the prompt's (one per round)
    draft_passes: int = 0    # draft forward passes after the prompt
    tokens: int = 0          # tokens emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Emitted tokens per target forward, the prompt's pass included (plain decoding: 1)."""
        return self.tokens / (self.target_passes + 1) if self.tokens else 0.0


class _Runner:
    """One model with its one-row cache: chunked feeding and ring-slot save/restore."""

    def __init__(self, model: Exaone4ForCausalLM, max_len: int, chunk: int):
        self.model, self.chunk = model, chunk
        self.cache = model.make_cache(rows=1, max_len=max_len)
        self.n = 0  # positions written and valid: [0, n)

    def feed(self, tokens: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Write tokens at positions n.. ; returns the logits (C, V) of the last chunk (or its last row)."""
        logits = None
        for s in range(0, len(tokens), self.chunk):
            part = tokens[s:s + self.chunk]
            ids = torch.tensor([part], device=self.model.device)
            pos = torch.arange(self.n, self.n + len(part), device=self.model.device)[None]
            logits = self.model(ids, position_ids=pos, cache=self.cache, last_only=not all_logits)[0]
            self.n += len(part)
        return logits

    def save_ring(self, lo: int, hi: int) -> list:
        """Copies of the ring slots that positions [lo, hi) are about to overwrite."""
        c = self.cache
        if hi <= lo or not any(c.sliding):
            return []
        slots = torch.arange(lo, hi, device=c.device) % c.window
        return [(i, slots, c.k[i][0][:, slots].clone(), c.v[i][0][:, slots].clone())
                for i, s in enumerate(c.sliding) if s]

    def rollback(self, saved: list, lo: int, valid: int) -> None:
        """Positions >= valid were rejected: put back their slots (saved from position lo) and forget them."""
        self.n = valid
        skip = valid - lo
        for i, slots, k, v in saved:
            if skip < len(slots):
                self.cache.k[i][0][:, slots[skip:]] = k[:, skip:]
                self.cache.v[i][0][:, slots[skip:]] = v[:, skip:]


def _check(target, draft, k: int, max_tokens: int, prompt_ids) -> None:
    if not prompt_ids:
        raise ValueError("prompt is empty")
    if k < 1 or max_tokens < 0:
        raise ValueError(f"k must be >= 1 and max_tokens >= 0, got {k}, {max_tokens}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab {draft.config.vocab_size} != target vocab {target.config.vocab_size}")
    for name, m in (("target", target), ("draft", draft)):
        w = m.config.sliding_window
        if w is not None and any(m.config.is_sliding) and k >= w:
            # k + 1 chunk tokens must fit in the ring, or rollback would need slots the chunk never wrote
            raise ValueError(f"k must be < the {name}'s sliding window {w}, got {k}")


@torch.inference_mode()
def speculative_stream(target: Exaone4ForCausalLM, draft: Exaone4ForCausalLM, prompt_ids: Sequence[int],
                       max_tokens: int, k: int = 4, stop_ids: Sequence[int] = (), chunk: int = 512,
                       stats: SpecStats | None = None) -> Iterator[int]:
    """Yield the target's greedy tokens (a stop id is yielded, then the stream ends)."""
    _check(target, draft, k, max_tokens, prompt_ids)
    stats = stats if stats is not None else SpecStats()
    stops = frozenset(stop_ids)
    max_len = min(len(prompt_ids) + max_tokens + k + 1, target.config.max_position_embeddings)
    max_tokens = min(max_tokens, max_len - len(prompt_ids))
    if max_tokens <= 0:
        return
    tgt, drf = _Runner(target, max_len, chunk), _Runner(draft, max_len, chunk)
    seq = list(prompt_ids)
    seq.append(int(tgt.feed(seq)[-1].argmax()))
    stats.tokens += 1
    yield seq[-1]
    out = 1
    while out < max_tokens and seq[-1] not in stops:
        L = len(seq)  # seq[-1] at position L-1 is in neither cache; tgt.n == L-1, drf.n <= L-1
        kk = min(k, max_tokens - out - 1)  # a round emits at most kk + 1 tokens
        drafts: list[int] = []
        d_saved = []
        if kk > 0:
            d_logits = drf.feed(seq[drf.n:])  # catch up on accepted tokens, then propose
            d_saved = drf.save_ring(L, L + kk - 1)
            drafts.append(int(d_logits[-1].argmax()))
            for _ in range(kk - 1):
                drafts.append(int(drf.feed(drafts[-1:])[-1].argmax()))
            stats.draft_passes += kk
        t_saved = tgt.save_ring(L, L + kk)
        g = tgt.feed([seq[-1]] + drafts, all_logits=True).argmax(-1).tolist()
        stats.target_passes += 1
        a = 0
        while a < kk and drafts[a] == g[a]:
            a += 1
        stats.proposed += kk
        stats.accepted += a
        tgt.rollback(t_saved, L, L + a)
        if kk > 0:
            drf.rollback(d_saved, L, min(L + a, drf.n))
        for tok in drafts[:a] + [g[a]]:
            seq.append(tok)
            out += 1
            stats.tokens += 1
            yield tok
            if tok in stops:
                return


def speculative_generate(target: Exaone4ForCausalLM, draft: Exaone4ForCausalLM, prompt_ids: Sequence[int],
                         max_tokens: int, k: int = 4, stop_ids: Sequence[int] = (),
                         chunk: int = 512) -> tuple[list[int], SpecStats]:
    """Greedy tokens of `target` (identical to `generate_reference(target, ...)`) and the round stats."""
    stats = SpecStats()
    tokens = list(speculative_stream(target, draft, prompt_ids, max_tokens, k, stop_ids, chunk, stats))
    return tokens, stats
