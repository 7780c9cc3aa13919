"""Per-request sampling: validated parameters, the sampler, and stop-string matching.

`SamplingParams` holds what an OpenAI-style request asks for and rejects out-of-range values with
the allowed interval in the message. `Sampler` is built once per request and turns one row of
logits into one token with small pure steps in this order:

    penalties (repetition, then frequency/presence) -> temperature -> top-k -> top-p -> min-p -> draw

Temperature 0 is argmax of the penalised logits. The draw uses a per-request `torch.Generator`
(seeded from `seed`, else from os.urandom), so the same seed and logits give the same tokens.
Reported logprobs are those of the raw model distribution (log_softmax of the unpenalised
logits), as OpenAI and vLLM report them. `StopMatcher` cuts the decoded text at stop strings.

This module must not import the model, tokenizer, server or engine: it sees logits and ids only.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from . import kernels

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_N = 16


class SamplingError(ValueError):
    """An invalid sampling parameter; `.param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name, v, lo=None, hi=None, allowed: str = "") -> None:
    if not _is_int(v):
        raise SamplingError(name, f"{name} must be an integer {allowed}, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SamplingError(name, f"{name} must be {allowed}, got {v}")


def _check_float(obj, name, lo, hi, lo_open=False, allowed: str = "") -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SamplingError(name, f"{name} must be a finite number in {allowed}, got {v!r}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise SamplingError(name, f"{name} must be in {allowed}, got {v}")
    object.__setattr__(obj, name, float(v))


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0                      # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    enable_thinking: bool = False
    thinking_budget: int | None = None  # None: unlimited

    def __post_init__(self):
        _check_int("max_tokens", self.max_tokens, 1, None, ">= 1")
        _check_float(self, "temperature", 0.0, 2.0, allowed="[0, 2]")
        if not _is_int(self.top_k) or not (self.top_k in (-1, 0) or self.top_k >= 1):
            raise SamplingError("top_k", f"top_k must be 0 or -1 (off) or an integer >= 1, got {self.top_k!r}")
        _check_float(self, "top_p", 0.0, 1.0, lo_open=True, allowed="(0, 1]")
        _check_float(self, "min_p", 0.0, 1.0, allowed="[0, 1]")
        _check_float(self, "presence_penalty", -2.0, 2.0, allowed="[-2, 2]")
        _check_float(self, "frequency_penalty", -2.0, 2.0, allowed="[-2, 2]")
        _check_float(self, "repetition_penalty", 0.0, 2.0, lo_open=True, allowed="(0, 2]")
        if self.seed is not None:
            _check_int("seed", self.seed, None, None, "or null")

        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise SamplingError("stop", f"stop must be a string or a list of at most {MAX_STOP_STRINGS} "
                                        f"non-empty strings, got {self.stop!r}")
        if len(stop) > MAX_STOP_STRINGS or any(s == "" for s in stop):
            raise SamplingError("stop", f"stop must hold 0 to {MAX_STOP_STRINGS} non-empty strings, "
                                        f"got {len(stop)} (empty: {sum(s == '' for s in stop)})")
        object.__setattr__(self, "stop", tuple(stop))

        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise SamplingError("stop_token_ids", f"stop_token_ids must be a list of integers >= 0, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))

        for name in ("ignore_eos", "logprobs", "enable_thinking"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS, f"in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            raise SamplingError("top_logprobs", "top_logprobs in [1, 20] requires logprobs=true")
        _check_int("n", self.n, 1, MAX_N, f"in [1, {MAX_N}]")
        if self.thinking_budget is not None:
            _check_int("thinking_budget", self.thinking_budget, 0, None, ">= 0 or null")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float | None = None                          # None unless params.logprobs
    top_logprobs: list[tuple[int, float]] | None = None   # [] when logprobs and top_logprobs == 0


# ---- pure steps: each takes and returns a 1-D float32 logits row ----

def _ids(ids, vocab: int, device) -> torch.Tensor:
    t = torch.as_tensor(ids if len(ids) else [], dtype=torch.long).to(device).flatten()
    return t[(t >= 0) & (t < vocab)]  # ids the logits do not cover cannot be penalised


def apply_repetition_penalty(logits, prompt_ids, output_ids, penalty: float):
    """transformers/vLLM: seen tokens (prompt + output) have positive logits divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    seen = torch.cat([_ids(prompt_ids, logits.numel(), logits.device),
                      _ids(output_ids, logits.numel(), logits.device)]).unique()
    if seen.numel() == 0:
        return logits
    vals = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def apply_frequency_presence(logits, output_ids, frequency: float, presence: float):
    """OpenAI: logit -= count * frequency + (count > 0) * presence, over output tokens only."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    out = _ids(output_ids, logits.numel(), logits.device)
    if out.numel() == 0:
        return logits
    counts = torch.bincount(out, minlength=logits.numel()).to(logits.dtype)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_top_k(logits, k: int):
    if k <= 0 or k >= logits.numel():
        return logits
    keep = torch.topk(logits, k).indices
    out = torch.full_like(logits, -math.inf)
    out[keep] = logits[keep]
    return out


def apply_top_p(logits, p: float):
    """Keep the smallest set of most likely tokens whose mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    probs, order = torch.softmax(logits, -1).sort(descending=True)
    mass_before = probs.cumsum(-1) - probs
    drop = order[mass_before >= p]
    if drop.numel() == 0:
        return logits
    logits = logits.clone()
    logits[drop] = -math.inf
    return logits


def apply_min_p(logits, min_p: float):
    """Drop tokens whose probability is below min_p times that of the most likely token."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, -1)
    return logits.masked_fill(probs < min_p * probs.max(), -math.inf)


class Sampler:
    """One request's sampler: `sample(logits, prompt_ids, output_ids) -> SampleResult`."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    @property
    def fast_greedy(self) -> bool:
        """Argmax of the raw logits is the whole answer (no penalties, no logprobs)."""
        return self.params.greedy and not self.params.has_penalties and not self.params.logprobs

    def _generator(self, device: torch.device) -> torch.Generator:
        # One stream per device, seeded alike, so CPU runs are reproducible and CUDA works too.
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    def process(self, logits: torch.Tensor, prompt_ids=(), output_ids=()) -> torch.Tensor:
        """Penalties and temperature/filters, in order; returns the logits the draw uses."""
        p = self.params
        x = logits.float()
        x = apply_repetition_penalty(x, prompt_ids, output_ids, p.repetition_penalty)
        x = apply_frequency_presence(x, output_ids, p.frequency_penalty, p.presence_penalty)
        if p.greedy:
            return x
        x = x / p.temperature
        x = apply_top_k(x, p.top_k)
        x = apply_top_p(x, p.top_p)
        x = apply_min_p(x, p.min_p)
        return x

    def sample(self, logits: torch.Tensor, prompt_ids=(), output_ids=()) -> SampleResult:
        if logits.dim() != 1:
            raise ValueError(f"logits must be 1-D [vocab], got shape {tuple(logits.shape)}")
        x = self.process(logits, prompt_ids, output_ids)
        if self.params.greedy:
            token = int(kernels.argmax(x))
        else:
            probs = torch.softmax(x, -1)
            token = int(torch.multinomial(probs, 1, generator=self._generator(probs.device)))
        return self._result(logits, token)

    def _result(self, raw_logits: torch.Tensor, token: int) -> SampleResult:
        p = self.params
        if not p.logprobs:
            return SampleResult(token)
        lp = torch.log_softmax(raw_logits.float(), -1)
        top: list[tuple[int, float]] = []
        if p.top_logprobs:
            vals, idx = torch.topk(lp, min(p.top_logprobs, lp.numel()))
            top = list(zip(idx.tolist(), vals.tolist()))
        return SampleResult(token, float(lp[token]), top)


def sample_batch(logits: torch.Tensor, samplers: Sequence[Sampler],
                 prompt_ids_list: Sequence, output_ids_list: Sequence) -> list[SampleResult]:
    """Sample one token per row of `logits` [B, vocab]; one argmax when every row is plain greedy."""
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits must be [B={len(samplers)}, vocab], got {tuple(logits.shape)}")
    if all(s.fast_greedy for s in samplers):
        return [SampleResult(t) for t in kernels.argmax(logits).tolist()]
    return [s.sample(logits[i], prompt_ids_list[i], output_ids_list[i]) for i, s in enumerate(samplers)]


class StopMatcher:
    """Cut a streamed text at the first stop string, holding back what could start one.

    `feed(delta) -> (emit, stopped)`: `emit` is safe to show now; on a match it is the text before
    the stop string (which is never emitted, as in OpenAI) and `stopped` is True from then on.
    `flush()` returns the held-back text at the end of the stream.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + delta
        if not self.stops:
            self._held = ""
            return text, False
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            i, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            self.stopped, self.matched, self._held = True, s, ""
            return text[:i], True
        keep = _partial_suffix_len(text, self.stops)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _partial_suffix_len(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some pattern."""
    longest = max((len(p) for p in patterns), default=0)
    for k in range(min(len(text), longest - 1), 0, -1):
        tail = text[-k:]
        if any(p.startswith(tail) for p in patterns):
            return k
    return 0
