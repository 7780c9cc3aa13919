"""The engine's small typed records and the per-request handle that streams them.

`Output` is one record per generated token (plus, for cancellation or errors, one record with no
token); `EngineStats` (with `SpecStats` for speculative decoding) the engine's counts. `RequestHandle` is what `Engine.submit` returns: iterate it in a thread (`for out in h`)
or in asyncio (`async for out in h`); `cancel()` it. The handle is fed by the engine's thread
through a lock-protected deque; asyncio consumers are woken with `loop.call_soon_threadsafe`.
This module must not import torch, the model or the tokenizer.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


class ContextLengthError(ValueError):
    """A prompt that leaves no room for one generated token within the context length."""

    def __init__(self, prompt_tokens: int, max_len: int):
        super().__init__(f"prompt has {prompt_tokens} tokens; with at least 1 token to generate it needs "
                         f"{prompt_tokens + 1}, but the context length is {max_len}")
        self.prompt_tokens, self.max_len = prompt_tokens, max_len


@dataclass(frozen=True)
class Output:
    request_id: str
    index: int                          # which of the n sequences (0 for n == 1)
    token_id: int | None                # None only on a final record with no token (cancel, error)
    text: str                           # text delta ("" without a tokenizer or while held back)
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int              # so far, forced tokens included
    reasoning_tokens: int               # so far: tokens up to and including </think>
    forced: bool                        # the engine forced this token (thinking budget)
    time_to_first_token: float | None   # seconds from submit to this sequence's first token
    elapsed: float                      # seconds from submit to this record
    error: str | None = None
    cached_tokens: int = 0              # prompt tokens restored from the prefix cache, not prefilled

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpecStats:
    """Counts of speculative rounds (draft proposes, target verifies once): speculative.py."""
    rounds: int = 0          # target verify passes (one per round; each is one engine decode step)
    proposed: int = 0        # draft tokens offered to the target
    accepted: int = 0        # of which the target agreed with
    tokens: int = 0          # tokens the rounds produced (accepted + the target's own one per round)
    draft_passes: int = 0    # draft forward passes (proposals; in the engine also catch-up chunks)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens per target verify pass (plain decoding: 1)."""
        return self.tokens / self.rounds if self.rounds else 0.0


@dataclass(frozen=True)
class EngineStats:
    running: int                # sequences in the decode batch
    waiting: int                # requests not yet admitted
    prefilling: int             # requests being prefilled (0 or 1)
    free_slots: int             # cache rows neither running nor reserved by the prefill
    max_batch: int
    steps: int                  # engine-wide counters, for metrics
    decode_steps: int
    prefill_chunks: int
    prompt_tokens: int
    tokens_generated: int
    batch_tokens: int           # sum of decode batch sizes (mean batch = batch_tokens / decode_steps)
    max_batch_seen: int
    requests_finished: int
    requests_cancelled: int
    cached_tokens: int = 0      # prompt tokens served from the prefix cache
    prefix_cache_bytes: int = 0  # bytes the prefix cache holds now
    speculative: "SpecStats | None" = None  # speculative decoding's counts (an engine with a draft)


_END = object()


class RequestHandle:
    """The stream of one request's `Output`s (all n sequences, told apart by `index`)."""

    def __init__(self, request_id: str, n: int, prompt_tokens: int,
                 cancel_fn: Callable[[str], None], pump_fn: Callable[["RequestHandle"], bool],
                 threaded_fn: Callable[[], bool]):
        self.request_id, self.n, self.prompt_tokens = request_id, n, prompt_tokens
        self._cancel_fn, self._pump, self._threaded = cancel_fn, pump_fn, threaded_fn
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._open = n                  # sequences not finished yet
        self.finish_reasons: list[FinishReason | None] = [None] * n

    # ---- fed by the engine ----
    def _put(self, out: Output) -> None:
        with self._cond:
            self._items.append(out)
            if out.finish_reason is not None:
                self.finish_reasons[out.index] = out.finish_reason
                self._open -= 1
                if self._open == 0:
                    self._items.append(_END)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # the consumer's loop is closed: nobody to wake
                pass

    # ---- consumers ----
    @property
    def finished(self) -> bool:
        return self._open == 0

    def cancel(self) -> None:
        """Stop generating; the stream ends with a record whose finish_reason is "cancelled"."""
        if not self.finished:
            self._cancel_fn(self.request_id)

    def get_nowait(self) -> Output | None:
        """The next record if one is ready, else None (also None once the stream has ended)."""
        with self._cond:
            while self._items:
                item = self._items.popleft()
                if item is not _END:
                    return item
                self._items.appendleft(_END)  # keep the end marker for other readers
                return None
            return None

    def __iter__(self):
        while True:
            with self._cond:
                item = self._items.popleft() if self._items else None
                if item is _END:
                    self._items.appendleft(_END)
                    return
            if item is not None:
                yield item
                continue
            # No worker thread: drive the engine ourselves (outside our lock, so another
            # consumer's handle can be fed meanwhile); with a worker, wait for it.
            if not self._pump(self):
                with self._cond:
                    self._cond.wait_for(lambda: bool(self._items))

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                item = self._items.popleft() if self._items else None
                if item is None:
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if item is _END:
                with self._cond:
                    self._items.appendleft(_END)
                return
            if item is not None:
                yield item
                continue
            if self._threaded():
                await fut
            else:  # no worker: step the engine in an executor thread, never in the event loop
                await loop.run_in_executor(None, self._pump, self)

    def _has_items(self) -> bool:
        with self._cond:
            return bool(self._items)

    def outputs(self) -> list[Output]:
        """Every record to the end of the stream (drives the engine when no worker runs)."""
        return list(self)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
