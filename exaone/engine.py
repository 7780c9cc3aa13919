"""The inference engine: token ids in, a stream of small typed records (`Output`) out.

Continuous batching over one `KVCache` of `max_batch` rows. Live sequences always sit in the
contiguous rows [0, B), so a decode step for all of them is ONE forward pass on `slice(0, B)`.
One scheduling step (`Engine.step`):

    1. apply cancellations (their rows are freed at once)
    2. at most one prefill chunk (`prefill_chunk` tokens) of the request being admitted, in
       row B; when its prompt is done it samples its first token, is forked into n rows
       (`copy_row`) and joins the batch
    3. one batched decode step for every running sequence
    4. compaction: a finished row is filled by moving the last live row into it

So the decode latency of running sequences is bounded by one prefill chunk. Each sequence has
a forced-token queue, emitted before it samples again: the thinking budget uses it to close the
reasoning block (`THINK_END_FORCED`). Forced tokens are fed to the model and counted as output.

Speculative decoding (`draft_model=`): step 3 becomes one draft-propose / target-verify round
(`speculative.speculate`) when the batch holds exactly ONE running sequence (the on-device batch-1
case) and that sequence is plain greedy (temperature 0, no penalties, no logprobs: tokens are the
argmax of the raw logits, so a verify pass decides them). Every other step is the normal batched
decode. The draft has its own one-row cache, tied to one sequence: when another sequence becomes
the single one, the draft starts over and catches up on the tokens it has not seen (prompt,
output, forced tokens), at most one prefill chunk per step while the target decodes normally.
A round never runs past what the normal path would sample: k is capped so that its k + 1 tokens
fit in max_tokens, the context and the remaining thinking budget; a step with queued forced
tokens (or a spent budget) takes the normal path, so forced tokens are fed and counted as there,
and the draft sees them on its next catch-up. The round's tokens go through the same `_accept`
one by one (stop ids, stop strings, counts, records), and the rest of a round is dropped once
the sequence is done. See docs/speculative.md.

Text (stop strings, text deltas, the end-of-thinking ids) needs an optional duck-typed tokenizer
(`encode(text) -> ids`, `decode(ids) -> str`). This module must not import the server or the
tokenizer module; it never formats responses.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from typing import Sequence

import torch

from .decode_plan import DecodePlan
from .detokenizer import StreamingDetokenizer
from .engine_types import ContextLengthError, EngineStats, Output, RequestHandle, SpecStats
from .prefix_cache import BLOCK_SIZE, PREFIX_CACHE_BYTES, PrefixCache
from .model import warm_kernels
from .reasoning import THINK_CLOSE, THINK_END_FORCED
from .sampling import Sampler, SamplingParams, StopMatcher, sample_batch
from .speculative import CacheRow, check_draft, speculate

log = logging.getLogger(__name__)

__all__ = ["Engine", "Output", "RequestHandle", "EngineStats", "SpecStats", "ContextLengthError"]


class _Request:
    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, handle: RequestHandle,
                 stop_ids: frozenset[int]):
        self.id, self.prompt, self.params, self.handle = rid, prompt, params, handle
        self.stop_ids = stop_ids
        self.t0 = time.perf_counter()
        self.row = -1           # cache row while being prefilled
        self.prefilled = 0      # prompt tokens already in the cache
        self.cached = 0         # of which restored from the prefix cache
        self.seqs: list[_Seq] = []


class _Seq:
    """One generated sequence (a request with n > 1 has n of them)."""

    def __init__(self, req: _Request, index: int, decode):
        p = req.params
        if p.n > 1 and p.seed is not None:
            p = dataclasses.replace(p, seed=p.seed + index)  # seeds s, s+1, ...
        self.req, self.index, self.params = req, index, p
        self.sampler = Sampler(p)
        self.output: list[int] = []
        self.forced: deque[int] = deque()
        self.pending: int | None = None     # last emitted token, not yet fed to the model
        self.n_fed = 0                      # cache positions written for this sequence
        self.thinking = p.enable_thinking   # the prompt already ends inside <think>
        self.close_forced = False
        self.reasoning_tokens = 0
        self.detok = StreamingDetokenizer(decode) if decode is not None else None
        self.stop = StopMatcher(p.stop)
        self.t_first: float | None = None
        self.done = False


class Engine:
    def __init__(self, model, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 prefill_chunk: int = 512, think_end_ids: Sequence[int] | None = None,
                 think_end_forced_ids: Sequence[int] | None = None,
                 prefix_cache_bytes: int = PREFIX_CACHE_BYTES, prefix_block_size: int = BLOCK_SIZE,
                 compile: bool = False, draft_model=None, num_speculative_tokens: int = 4,
                 fused_decode: bool = True):
        """`think_end_ids`: the ids of `</think>` (default: encoded by the tokenizer);
        `think_end_forced_ids`: what a spent thinking budget forces (default: THINK_END_FORCED
        encoded, or `think_end_ids` without a tokenizer); `prefix_cache_bytes`: budget of the
        prefix cache (0 disables it), see prefix_cache.py; `compile`: decode steps through
        `torch.compile` with fixed shapes (exaone/compiled.py, docs/compiled-decode.md);
        `draft_model`: a model with the same tokenizer that proposes `num_speculative_tokens`
        tokens a round for a lone greedy sequence (speculative.py, docs/speculative.md);
        `fused_decode`: run decode steps' layers in one C++ call where the kernels cover them
        (decode_plan.py; the same numbers as the eager step)."""
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        if draft_model is not None:
            check_draft(model, draft_model, num_speculative_tokens)
        self.model = model
        cfg = model.config
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.vocab_size = cfg.vocab_size
        self.eos_ids = frozenset(cfg.eos_token_ids)
        self._decode = tokenizer.decode if tokenizer is not None else None
        if think_end_ids is None and tokenizer is not None:
            think_end_ids = tokenizer.encode(THINK_CLOSE)
        self.think_end_ids = list(think_end_ids or [])
        if think_end_forced_ids is None:
            think_end_forced_ids = tokenizer.encode(THINK_END_FORCED) if tokenizer is not None else self.think_end_ids
        self.think_end_forced_ids = list(think_end_forced_ids)
        bad = [t for t in self.think_end_ids + self.think_end_forced_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"end-of-thinking ids must be in [0, {cfg.vocab_size}), got {bad}")
        self.cache = model.make_cache(rows=max_batch, max_len=self.max_len)
        ready = warm_kernels(model)  # decode uses exaone.kernels: build it now, not mid-request
        self._plan = DecodePlan.build(model) if ready and fused_decode else None
        self.prefix_cache = (PrefixCache(self.cache, prefix_cache_bytes, prefix_block_size)
                             if prefix_cache_bytes > 0 else None)
        self.device = model.device
        self._compiled = None
        self.draft_model, self.num_speculative_tokens = draft_model, num_speculative_tokens
        self.spec = SpecStats()
        self._draft: CacheRow | None = None  # the draft's one-row cache, of `_draft_seq`
        self._draft_seq: _Seq | None = None
        if draft_model is not None:
            self._draft = CacheRow(draft_model, draft_model.make_cache(rows=1, max_len=self.max_len),
                                   chunk=prefill_chunk)

        self.running: list[_Seq] = []       # index = cache row
        self.prefilling: _Request | None = None
        self._waiting: deque[_Request] = deque()
        self._live: dict[str, _Request] = {}
        self._cancels: set[str] = set()
        self._mutex = threading.Lock()      # guards _waiting, _live, _cancels, _stopping
        self._work = threading.Condition(self._mutex)
        self._step_lock = threading.RLock()  # one step (or cancel) at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = dict(steps=0, decode_steps=0, prefill_chunks=0, prompt_tokens=0,
                             tokens_generated=0, batch_tokens=0, max_batch_seen=0,
                             requests_finished=0, requests_cancelled=0, cached_tokens=0)
        if compile:
            self.enable_compile()

    # ---- public API ------------------------------------------------------------------------
    def enable_compile(self, **kw) -> None:
        """Decode through `torch.compile` from now on (kw: see exaone.compiled.CompiledDecode)."""
        from .compiled import CompiledDecode
        with self._step_lock:
            self._compiled = CompiledDecode(self.model, self.cache, **kw)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestHandle:
        params = params if params is not None else SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt) + 1 > self.max_len:
            raise ContextLengthError(len(prompt), self.max_len)
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n} exceeds the engine's max_batch={self.max_batch}")
        if params.stop and self._decode is None:
            raise ValueError("stop strings need an engine built with a tokenizer")
        if params.enable_thinking and params.thinking_budget is not None and not self.think_end_forced_ids:
            raise ValueError("thinking_budget needs the end-of-thinking token ids (a tokenizer or think_end_ids)")
        rid = request_id or uuid.uuid4().hex
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        handle = RequestHandle(rid, params.n, len(prompt), self._cancel, self._pump,
                               lambda: self._thread is not None)
        req = _Request(rid, prompt, params, handle, stop_ids)
        req.seqs = [_Seq(req, i, self._decode) for i in range(params.n)]
        with self._mutex:
            if rid in self._live:
                raise ValueError(f"request id {rid!r} is already in use")
            self._live[rid] = req
            self._waiting.append(req)
            self._work.notify()
        return handle

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> list[int]:
        """Generated token ids of one sequence (n == 1); runs the engine inline without a worker."""
        if params is not None and params.n != 1:
            raise ValueError("generate() returns one sequence; use submit() for n > 1")
        ids = []
        for out in self.submit(prompt_ids, params):
            if out.finish_reason == "error":
                raise RuntimeError(f"generation failed: {out.error}")
            if out.token_id is not None:
                ids.append(out.token_id)
        return ids

    def step(self) -> bool:
        """One scheduling step; returns False when there was nothing to do."""
        with self._step_lock, torch.inference_mode():
            try:
                return self._step()
            except Exception as e:
                self._fail_active(e)
                raise

    def start(self) -> "Engine":
        """Run a background worker that steps while there is work (it sleeps otherwise)."""
        with self._mutex:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._worker, name="exaone-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        with self._mutex:
            self._stopping = True
            self._work.notify_all()
            t = self._thread
        if t is not None:
            t.join(timeout)
        with self._mutex:
            self._thread = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> EngineStats:
        with self._mutex:
            waiting = len(self._waiting)
        pre = self.prefilling
        reserved = pre.params.n if pre is not None else 0
        running = len(self.running)
        return EngineStats(running=running, waiting=waiting, prefilling=int(pre is not None),
                           free_slots=self.max_batch - running - reserved, max_batch=self.max_batch,
                           prefix_cache_bytes=self.prefix_cache.nbytes if self.prefix_cache else 0,
                           speculative=dataclasses.replace(self.spec) if self._draft is not None else None,
                           **self.counters)

    # ---- threads ---------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._waiting or self._cancels or self.running or self.prefilling)

    def _worker(self) -> None:
        while True:
            with self._work:
                self._work.wait_for(lambda: self._stopping or self._has_work())
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # the failed requests got "error" records; keep serving the rest
                log.exception("engine step failed")

    def _pump(self, handle: RequestHandle) -> bool:
        """A handle's consumer with no worker running drives the engine itself."""
        if self._thread is not None:
            return False
        # Another consumer's step may have fed this handle's last records meanwhile.
        if not self.step() and not handle._has_items():
            raise RuntimeError("the engine has no work left but the stream has not ended")
        return True

    def _cancel(self, rid: str) -> None:
        with self._mutex:
            self._cancels.add(rid)
            self._work.notify()
        # Between steps the slot is freed right now; mid-step, at the step's end.
        if self._step_lock.acquire(blocking=False):
            try:
                with torch.inference_mode():
                    self._apply_cancels()
            finally:
                self._step_lock.release()

    # ---- scheduling ------------------------------------------------------------------------
    def _step(self) -> bool:
        did = self._apply_cancels()
        req = self._admit()
        if req is not None:
            self._prefill_chunk(req)
            did = True
        if self.running:
            if not (self._draft is not None and len(self.running) == 1 and self._spec_step()):
                self._decode_step()
            did = True
        if did:
            self.counters["steps"] += 1
        return did

    def _apply_cancels(self) -> bool:
        with self._mutex:
            ids, self._cancels = self._cancels, set()
            reqs = [self._live[r] for r in ids if r in self._live]
            for req in reqs:
                if req in self._waiting:
                    self._waiting.remove(req)
        for req in reqs:
            if req is self.prefilling:
                self.prefilling = None
            for seq in req.seqs:
                if not seq.done:
                    seq.done = True
                    self._emit(seq, None, self._final_text(seq), None, None, False, "cancelled")
            self.counters["requests_cancelled"] += 1
        if reqs:
            self._compact()
        return bool(reqs)

    def _admit(self) -> _Request | None:
        if self.prefilling is None:
            with self._mutex:
                if not self._waiting or len(self.running) + self._waiting[0].params.n > self.max_batch:
                    return None
                req = self._waiting.popleft()
            req.row, req.prefilled = len(self.running), 0
            if self.prefix_cache is not None:  # a cached prefix is copied in, not prefilled
                req.cached = req.prefilled = self.prefix_cache.restore(req.row, req.prompt)
                self.counters["cached_tokens"] += req.cached
            self.prefilling = req
        return self.prefilling

    def _prefill_chunk(self, req: _Request) -> None:
        s, pc = req.prefilled, self.prefix_cache
        e = pc.chunk_end(s, len(req.prompt), self.prefill_chunk) if pc else s + self.prefill_chunk
        part = req.prompt[s:e]
        ids = torch.tensor([part], device=self.device)
        pos = torch.arange(s, s + len(part), device=self.device)[None]
        logits = self.model(ids, position_ids=pos, cache=self.cache, rows=slice(req.row, req.row + 1),
                            last_only=True)
        req.prefilled += len(part)
        self.counters["prefill_chunks"] += 1
        if pc is not None:
            pc.store(req.row, req.prompt, s, req.prefilled)
        if req.prefilled < len(req.prompt):
            return
        # Prompt done: fork into n rows, each sequence samples its first token from these logits.
        self.prefilling = None
        self.counters["prompt_tokens"] += len(req.prompt)
        B = len(self.running)
        for i, seq in enumerate(req.seqs):
            if i:
                self.cache.copy_row(B, B + i, len(req.prompt))
            seq.n_fed = len(req.prompt)
            self.running.append(seq)
        self._advance(B, logits[0, -1:].expand(len(req.seqs), -1))
        self._compact()

    def _decode_step(self) -> None:
        seqs = self.running
        B = len(seqs)
        toks = torch.tensor([[s.pending] for s in seqs], device=self.device)
        pos = torch.tensor([[s.n_fed] for s in seqs], device=self.device)
        if self._compiled is not None:
            logits = self._compiled(toks, pos)
        elif self._plan is not None and self._plan.usable(toks, self.cache):
            logits = self._plan(toks, pos, self.cache, slice(0, B))[:, -1]
        else:
            logits = self.model(toks, position_ids=pos, cache=self.cache, rows=slice(0, B))[:, -1]
        pc = self.prefix_cache
        for r, s in enumerate(seqs):
            s.n_fed += 1
            if pc is not None and s.n_fed % pc.block_size == 0:  # generated tokens completed a block
                pc.store(r, s.req.prompt + s.output, s.n_fed - 1, s.n_fed)
        self._count_decode(B)
        self._advance(0, logits)
        self._compact()

    def _count_decode(self, B: int) -> None:
        c = self.counters
        c["decode_steps"] += 1
        c["batch_tokens"] += B
        c["max_batch_seen"] = max(c["max_batch_seen"], B)

    # ---- speculative decoding (one running sequence) ---------------------------------------
    def _spec_tokens(self, s: _Seq) -> int:
        """How many draft tokens a round may propose now (0: take the normal path)."""
        p = s.params
        if not s.sampler.fast_greedy or s.forced:
            return 0
        room = min(p.max_tokens - len(s.output), self.max_len - len(s.req.prompt) - len(s.output))
        if s.thinking and p.thinking_budget is not None and not s.close_forced:
            room = min(room, p.thinking_budget - s.reasoning_tokens)  # every token may be reasoning
        return max(0, min(self.num_speculative_tokens, room - 1))  # a round emits up to k + 1 tokens

    def _spec_step(self) -> bool:
        """A speculative round for the lone running sequence in row 0; False: decode normally."""
        s = self.running[0]
        k = self._spec_tokens(s)
        if k < 1:
            return False
        draft = self._draft
        if self._draft_seq is not s:  # the draft's cache holds another sequence: start over
            self._draft_seq, draft.n = s, 0
        seq = s.req.prompt + s.output
        if len(seq) - 1 - draft.n > self.prefill_chunk:  # catch up one chunk a step, decode normally
            draft.feed(seq[draft.n:draft.n + self.prefill_chunk])
            self.spec.draft_passes += 1
            return False
        target = CacheRow(self.model, self.cache, row=0, n=s.n_fed, chunk=self.prefill_chunk)
        new = speculate(target, draft, seq, k, self.spec)
        self._store_generated(s, seq + new, s.n_fed, target.n)
        s.n_fed = target.n
        self._count_decode(1)
        for tok in new:
            self._accept(s, tok, None, None, forced=False)
            if s.done:  # a stop or the length: the rest of the round is dropped
                break
        self._compact()
        return True

    def _store_generated(self, s: _Seq, tokens: list[int], start: int, end: int) -> None:
        """Prefix-cache the blocks that a round's positions (start, end] completed in row 0.
        A block's tail must still be in the ring, which after a round holds [end - W, end)."""
        pc = self.prefix_cache
        if pc is None:
            return
        if pc.window is not None:
            start = max(start, end - pc.window + pc.tail - 1)  # the smallest block end kept: that + 1
        if start < end:
            pc.store(0, tokens, start, end)

    def _compact(self) -> None:
        """Drop finished rows by moving the last live row into each hole; rows stay [0, B)."""
        dead = [i for i, s in enumerate(self.running) if s.done]
        for i in reversed(dead):  # from the end, so the last row is always live or this one
            last = len(self.running) - 1
            if i != last:
                mover = self.running[last]
                self.cache.copy_row(last, i, mover.n_fed)
                self.running[i] = mover
            self.running.pop()
        pre = self.prefilling
        if pre is not None and pre.row != len(self.running):
            self.cache.copy_row(pre.row, len(self.running), pre.prefilled)
            pre.row = len(self.running)

    # ---- one token for each sequence -------------------------------------------------------
    def _advance(self, first_row: int, logits: torch.Tensor) -> None:
        """Choose the next token of rows first_row.. (logits[k] for row first_row + k)."""
        seqs = self.running[first_row:first_row + logits.shape[0]]
        for s in seqs:
            p = s.params
            if (s.thinking and p.thinking_budget is not None and not s.close_forced
                    and s.reasoning_tokens >= p.thinking_budget):
                s.forced.extend(self.think_end_forced_ids)  # budget spent: close the block
                s.close_forced = True
        sample = [k for k, s in enumerate(seqs) if not s.forced]
        results = {}
        if sample:
            rows = logits if len(sample) == len(seqs) else logits[sample]
            res = sample_batch(rows, [seqs[k].sampler for k in sample], [seqs[k].req.prompt for k in sample],
                               [seqs[k].output for k in sample])
            results = dict(zip(sample, res))
        for k, s in enumerate(seqs):
            r = results.get(k)
            if r is not None:
                self._accept(s, r.token_id, r.logprob, r.top_logprobs, forced=False)
            else:
                tok = s.forced.popleft()
                lp, top = _logprobs(logits[k], tok, s.params)
                self._accept(s, tok, lp, top, forced=True)

    def _accept(self, s: _Seq, tok: int, lp, top, forced: bool) -> None:
        s.output.append(tok)
        s.pending = tok
        self.counters["tokens_generated"] += 1
        if s.thinking:
            s.reasoning_tokens += 1
            te = self.think_end_ids
            if (te and s.output[-len(te):] == te) or (s.close_forced and not s.forced):
                s.thinking = False
        p, reason, text = s.params, None, ""
        if tok in s.req.stop_ids and not forced:
            reason = "stop"  # a stop token's own text is not shown
        elif s.detok is not None:
            text, hit = s.stop.feed(s.detok.add(tok))
            if hit:
                reason = "stop"
        if reason is None and (len(s.output) >= p.max_tokens or len(s.req.prompt) + len(s.output) >= self.max_len):
            reason = "length"
        if reason is not None:
            tail = self._final_text(s)
            if s.stop.stopped:
                reason = "stop"  # the held-back tail completed a stop string
            text += tail
            s.done = True
        self._emit(s, tok, text, lp, top, forced, reason)

    def _final_text(self, s: _Seq) -> str:
        if s.detok is None or s.stop.stopped:
            return ""
        text, _ = s.stop.feed(s.detok.flush())
        return text + s.stop.flush()

    def _emit(self, s: _Seq, tok, text, lp, top, forced, reason, error: str | None = None) -> None:
        now = time.perf_counter()
        req = s.req
        if tok is not None and s.t_first is None:
            s.t_first = now
        ttft = None if s.t_first is None else s.t_first - req.t0
        out = Output(req.id, s.index, tok, text, lp, top, reason, len(req.prompt), len(s.output),
                     s.reasoning_tokens, forced, ttft, now - req.t0, error, req.cached)
        if reason is not None and all(q.done for q in req.seqs):
            with self._mutex:
                self._live.pop(req.id, None)
            self.counters["requests_finished"] += 1
        req.handle._put(out)

    def _fail_active(self, e: Exception) -> None:
        """A step raised: end the requests it touched with "error"; waiting ones still run."""
        reqs = {id(s.req): s.req for s in self.running}
        if self.prefilling is not None:
            reqs[id(self.prefilling)] = self.prefilling
        self.running, self.prefilling = [], None
        for req in reqs.values():
            for s in req.seqs:
                if not s.done:
                    s.done = True
                    self._emit(s, None, "", None, None, False, "error", error=f"{type(e).__name__}: {e}")


def _logprobs(logits: torch.Tensor, tok: int, p: SamplingParams):
    """Logprob (and top logprobs) of a forced token under the model's raw distribution."""
    if not p.logprobs:
        return None, None
    lp = torch.log_softmax(logits.float(), -1)
    top = []
    if p.top_logprobs:
        vals, idx = torch.topk(lp, min(p.top_logprobs, lp.numel()))
        top = list(zip(idx.tolist(), vals.tolist()))
    return float(lp[tok]), top
