"""Speculative decoding, greedy: a small draft model proposes k tokens, the target checks them all
in one forward pass, and the output is token for token what the target alone would produce.

One round (`speculate`), with `last` the newest token (fed to neither model yet) at position L-1:

    draft    feeds the tokens it has not seen, then proposes d1..dk one decode step at a time
    target   one forward of [last, d1..dk] at positions L-1..L-1+k -> k+1 logits, g_i = argmax
    accept   the longest prefix with d_i == g_{i-1}; then g_a (the target's own token at the first
             disagreement, or a bonus token when all k agree): a+1 new tokens per target pass

Rollback. A global layer needs none: slots beyond the accepted length hold stale keys that the
position-based masks ignore until they are overwritten. A sliding layer's ring is the catch: the
write of a rejected position p went to slot p % W, which held position p - W, still inside the
window. Before each model writes draft positions we save exactly those ring slots (k of them,
distinct when k < W) and put back the ones of rejected positions afterwards: k slots per sliding
layer per round, never the whole ring.

`speculate` is the one implementation of propose / verify / rollback. The engine (engine.py)
calls it on a row of its batch cache, with the thinking budget, forced tokens, stops and
max_tokens around it; `speculative_stream` is a minimal single-sequence driver (no requests, no
tokenizer) for tests and for comparing against the engine. This module must not know about
requests, sampling parameters or tokenizers.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .cache import KVCache
from .engine_types import SpecStats
from .model import Exaone4ForCausalLM


class CacheRow:
    """One model writing one row of a `KVCache`: chunked feeding and ring-slot save/restore."""

    def __init__(self, model: Exaone4ForCausalLM, cache: KVCache, row: int = 0, n: int = 0, chunk: int = 512):
        self.model, self.cache, self.row, self.chunk = model, cache, row, chunk
        self.n = n  # positions written and valid: [0, n)

    def feed(self, tokens: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Write tokens at positions n.. ; returns the logits (C, V) of the last chunk (or its last row)."""
        logits = None
        rows = slice(self.row, self.row + 1)
        for s in range(0, len(tokens), self.chunk):
            part = tokens[s:s + self.chunk]
            ids = torch.tensor([part], device=self.model.device)
            pos = torch.arange(self.n, self.n + len(part), device=self.model.device)[None]
            logits = self.model(ids, position_ids=pos, cache=self.cache, rows=rows, last_only=not all_logits)[0]
            self.n += len(part)
        return logits

    def save_ring(self, lo: int, hi: int) -> list:
        """Copies of the ring slots that positions [lo, hi) are about to overwrite."""
        c = self.cache
        if hi <= lo or not any(c.sliding):
            return []
        slots = torch.arange(lo, hi, device=c.device) % c.window
        return [(i, slots, c.k[i][self.row][:, slots].clone(), c.v[i][self.row][:, slots].clone())
                for i, s in enumerate(c.sliding) if s]

    def rollback(self, saved: list, lo: int, valid: int) -> None:
        """Positions >= valid were rejected: put back their slots (saved from position lo) and forget them."""
        self.n = valid
        skip = valid - lo
        for i, slots, k, v in saved:
            if skip < len(slots):
                self.cache.k[i][self.row][:, slots[skip:]] = k[:, skip:]
                self.cache.v[i][self.row][:, slots[skip:]] = v[:, skip:]


def check_draft(target: Exaone4ForCausalLM, draft: Exaone4ForCausalLM, k: int) -> None:
    """Refuse a draft that cannot speculate for `target` with k tokens a round."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of speculative tokens must be an integer >= 1, got {k!r}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocab_size {draft.config.vocab_size} != the target's "
                         f"{target.config.vocab_size}: the draft must share the target's tokenizer")
    for name, m in (("target", target), ("draft", draft)):
        w = m.config.sliding_window
        if w is not None and any(m.config.is_sliding) and k >= w:
            # k + 1 verify tokens must fit in the ring, or rollback would need slots the chunk never wrote
            raise ValueError(f"the number of speculative tokens must be < the {name}'s sliding window {w}, got {k}")


def speculate(target: CacheRow, draft: CacheRow, seq: Sequence[int], k: int, stats: SpecStats) -> list[int]:
    """One round: `seq` is the whole sequence so far, its last token fed to neither model
    (target.n == len(seq) - 1, draft.n <= len(seq) - 1). Returns the 1..k+1 new greedy tokens of
    the target; afterwards target.n == len(seq) + len(new) - 1 and both caches hold only accepted
    positions. The caller caps k so that every returned token may be emitted (budget, length)."""
    L = len(seq)
    if target.n != L - 1 or draft.n > L - 1 or k < 1:
        raise ValueError(f"speculate: target at {target.n}, draft at {draft.n}, sequence {L}, k {k}")
    d_logits = draft.feed(seq[draft.n:])  # catch up on the tokens it has not seen, then propose
    d_saved = draft.save_ring(L, L + k - 1)
    drafts = [int(d_logits[-1].argmax())]
    for _ in range(k - 1):
        drafts.append(int(draft.feed(drafts[-1:])[-1].argmax()))
    t_saved = target.save_ring(L, L + k)
    g = target.feed([seq[-1]] + drafts, all_logits=True).argmax(-1).tolist()
    a = 0
    while a < k and drafts[a] == g[a]:
        a += 1
    target.rollback(t_saved, L, L + a)
    draft.rollback(d_saved, L, min(L + a, draft.n))
    stats.rounds += 1
    stats.draft_passes += k
    stats.proposed += k
    stats.accepted += a
    stats.tokens += a + 1
    return drafts[:a] + [g[a]]


@torch.inference_mode()
def speculative_stream(target: Exaone4ForCausalLM, draft: Exaone4ForCausalLM, prompt_ids: Sequence[int],
                       max_tokens: int, k: int = 4, stop_ids: Sequence[int] = (), chunk: int = 512,
                       stats: SpecStats | None = None) -> Iterator[int]:
    """Yield the target's greedy tokens (a stop id is yielded, then the stream ends)."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    check_draft(target, draft, k)
    stats = stats if stats is not None else SpecStats()
    stops = frozenset(stop_ids)
    max_len = min(len(prompt_ids) + max_tokens + k + 1, target.config.max_position_embeddings)
    max_tokens = min(max_tokens, max_len - len(prompt_ids))
    if max_tokens <= 0:
        return
    tgt = CacheRow(target, target.make_cache(rows=1, max_len=max_len), chunk=chunk)
    drf = CacheRow(draft, draft.make_cache(rows=1, max_len=max_len), chunk=chunk)
    seq = list(prompt_ids)
    seq.append(int(tgt.feed(seq)[-1].argmax()))
    yield seq[-1]
    out = 1
    while out < max_tokens and seq[-1] not in stops:
        kk = min(k, max_tokens - out - 1)  # a round emits at most kk + 1 tokens
        new = speculate(tgt, drf, seq, kk, stats) if kk > 0 else [int(tgt.feed(seq[-1:])[-1].argmax())]
        for tok in new:
            seq.append(tok)
            out += 1
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
