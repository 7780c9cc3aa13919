"""Per-key rate limits (requests and tokens per sliding minute) and budgets.

`Limiter.check(key, estimated_tokens)` admits a request or raises `RateLimited` (with the
seconds until the window frees enough) or `BudgetExceeded`. The windows are exact sliding logs
of (time, tokens), kept in memory per process; the budget is read from the ledger, so it holds
across restarts and processes.

Token accounting: `check` reserves the estimate (so a burst of concurrent requests cannot all
slip under the limit); `add_tokens(key_id, n)` after the request releases one reservation of
that key and counts the actual `n`. A request that never reports releases its reservation when
it leaves the window. Call `add_tokens(key_id, 0)` for a request that failed before running.

The budget is checked against what is already billed, so requests in flight when it runs out
can overshoot it by their own cost.

This module never sees HTTP; the server turns the exceptions into 429 / 402 responses.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

WINDOW_S = 60.0


class RateLimited(Exception):
    def __init__(self, retry_after: float, message: str):
        super().__init__(message)
        self.retry_after = retry_after
        self.message = message


class RequestTooLarge(RateLimited):
    """The request alone needs more tokens than the key may use in a window: waiting won't help."""


class BudgetExceeded(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _Window:
    """One key's sliding logs: request times; (time, tokens) counted; (time, tokens) reserved."""
    __slots__ = ("requests", "counted", "reserved")

    def __init__(self):
        self.requests: deque[float] = deque()
        self.counted: deque[tuple[float, int]] = deque()
        self.reserved: deque[tuple[float, int]] = deque()

    def prune(self, cutoff: float) -> None:
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        for log in (self.counted, self.reserved):
            while log and log[0][0] <= cutoff:
                log.popleft()

    def tokens(self) -> int:
        return sum(n for _, n in self.counted) + sum(n for _, n in self.reserved)

    def empty(self) -> bool:
        return not (self.requests or self.counted or self.reserved)


class Limiter:
    """Thread-safe; one per server process. `clock` is injectable for tests."""

    def __init__(self, ledger, clock: Callable[[], float] = time.monotonic, window: float = WINDOW_S):
        self.ledger = ledger
        self.clock = clock
        self.window = float(window)
        self._lock = threading.Lock()
        self._windows: dict[int, _Window] = {}

    def check(self, api_key, estimated_tokens: int) -> None:
        """Admit one request of about `estimated_tokens` (prompt + max completion) for `api_key`
        (an `ApiKey`), or raise RateLimited / BudgetExceeded. Admission reserves the estimate."""
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be >= 0, got {estimated_tokens}")
        rpm, tpm, budget = api_key.rpm_limit, api_key.tpm_limit, api_key.budget_usd
        if budget is not None:  # outside the lock: a database read
            spent = self.ledger.spent(api_key.id)
            if spent >= budget:
                raise BudgetExceeded(f"key {api_key.prefix}... has spent ${spent.normalize():f} of its "
                                     f"${budget.normalize():f} budget")
        if rpm is None and tpm is None:
            return
        if tpm is not None and estimated_tokens > tpm:
            raise RequestTooLarge(self.window, f"request needs about {estimated_tokens} tokens, more than "
                                               f"the key's limit of {tpm} tokens per minute")
        with self._lock:
            now = self.clock()
            w = self._windows.setdefault(api_key.id, _Window())
            w.prune(now - self.window)
            waits, reasons = [], []
            if rpm is not None and len(w.requests) >= rpm:
                # Free once enough of the oldest requests leave the window.
                waits.append(w.requests[len(w.requests) - rpm] + self.window - now)
                reasons.append(f"{rpm} requests per minute")
            if tpm is not None:
                used = w.tokens()
                if used + estimated_tokens > tpm:
                    waits.append(self._token_wait(w, used + estimated_tokens - tpm, now))
                    reasons.append(f"{tpm} tokens per minute ({used} used, {estimated_tokens} asked)")
            if waits:
                retry = max(0.0, max(waits))
                raise RateLimited(retry, f"rate limit of {' and '.join(reasons)} reached; "
                                         f"retry in {retry:.1f} s")
            w.requests.append(now)
            if tpm is not None:
                w.reserved.append((now, estimated_tokens))

    def _token_wait(self, w: _Window, excess: int, now: float) -> float:
        """Seconds until entries holding at least `excess` tokens have left the window."""
        freed = 0
        for t, n in sorted([*w.counted, *w.reserved]):
            freed += n
            if freed >= excess:
                return t + self.window - now
        return self.window  # unreachable while estimate <= tpm

    def add_tokens(self, key_id: int, n: int) -> None:
        """Count a finished request's actual tokens, releasing one reservation of the key."""
        with self._lock:
            now = self.clock()
            w = self._windows.get(key_id)
            if w is None:
                w = self._windows[key_id] = _Window()
            w.prune(now - self.window)
            if w.reserved:
                w.reserved.popleft()
            if n > 0:
                w.counted.append((now, int(n)))
            if w.empty():
                del self._windows[key_id]

    def usage(self, key_id: int) -> tuple[int, int]:
        """(requests, tokens) in the current window, for headers and tests."""
        with self._lock:
            w = self._windows.get(key_id)
            if w is None:
                return 0, 0
            w.prune(self.clock() - self.window)
            return len(w.requests), w.tokens()
