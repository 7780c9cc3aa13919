"""The model behind the server: checkpoint + tokenizer + one `Engine`, and the turn of a request
into prompt ids + `SamplingParams`, and of engine records into typed pieces.

`LocalBackend.prepare_chat/prepare_completion` are synchronous (templating and tokenizing a long
prompt takes time: the app calls them in a worker thread). `submit` enqueues on the engine, whose
own worker thread steps the shared batch; the returned `Generation` is iterated with `async for`
and yields `Piece`s (reasoning / content / tool calls / logprobs / finish) per choice, split by a
`ReasoningParser` whose start state is the request's enable_thinking. `Generation.usage()` has
the counts to bill, also after a cancel.

This module must not know HTTP, auth or billing, and must not touch tensors beyond loading.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import AsyncIterator, Callable

import anyio

from ..engine_types import ContextLengthError, EngineStats, Output, RequestHandle
from ..reasoning import ReasoningParser, ToolCall
from ..sampling import SamplingError, SamplingParams
from .protocol import (RESERVED_TEMPLATE_KWARGS, ChatCompletionRequest, CompletionRequest, Piece,
                       TokenLogprob, ToolCallOut, Usage, reasoning_control)

__all__ = ["LocalBackend", "Prepared", "Generation", "ContextLengthError", "SamplingError"]

SETTLE_TIMEOUT_S = 5.0  # after a cancel, how long to wait for the engine's final counts
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1 - 16)  # torch's generator takes int64; n > 1 uses seed + index


class RequestError(ValueError):
    """A request the backend cannot serve as asked; `.param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def template_kwargs(req: ChatCompletionRequest, rc) -> dict:
    """The client's chat_template_kwargs, minus the names the server sets, with the decided enable_thinking."""
    kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in RESERVED_TEMPLATE_KWARGS}
    if not isinstance(kwargs.get("enable_thinking", False), bool):
        raise RequestError("chat_template_kwargs.enable_thinking must be true or false",
                           "chat_template_kwargs.enable_thinking")
    kwargs["enable_thinking"] = rc.enable_thinking
    return kwargs


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    chat: bool              # split reasoning / tool calls (chat) or plain text (completions)
    tools: bool             # parse tool calls into `tool_calls`
    param_names: dict       # SamplingParams field -> the request field it came from
    max_len: int            # the context length: no sequence grows past it
    include_reasoning: bool = True

    @property
    def estimated_tokens(self) -> int:
        """Prompt + the most this request can generate (what a rate limit reserves)."""
        room = max(0, self.max_len - len(self.prompt_ids))
        return len(self.prompt_ids) + min(self.params.max_tokens, room) * self.params.n


def _messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":  # OpenAI's newer name for the system role
            d["role"] = "system"
        if isinstance(m.content, list):
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise RequestError(f"messages[{i}].content: only text parts are supported, got type "
                                       f"{part.type!r}", f"messages.{i}.content")
        for tc in d.get("tool_calls", []):
            args = tc["function"].get("arguments")
            if isinstance(args, str):  # OpenAI sends a JSON string; the template wants the object
                try:
                    tc["function"]["arguments"] = json.loads(args) if args.strip() else {}
                except ValueError:
                    pass  # rendered as given
        out.append(d)
    return out


def _tools(req: ChatCompletionRequest) -> list[dict] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):  # a named function: offer only that one
        tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not tools:
            raise RequestError(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
    return tools


def _refuse_unsupported(req) -> None:
    """Fields we cannot honour are refused, not silently ignored: the answer would not be what was asked."""
    if req.logit_bias:
        raise RequestError("logit_bias is not supported", "logit_bias")
    fmt = getattr(req, "response_format", None)
    if fmt and fmt.get("type", "text") != "text":
        raise RequestError(f"response_format {fmt.get('type')!r} is not supported (only 'text')", "response_format")


def _common_params(req, **extra) -> dict:
    _refuse_unsupported(req)
    kw = dict(temperature=req.temperature, top_p=req.top_p, n=req.n, stop=req.stop, seed=req.seed,
              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
              top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
              ignore_eos=req.ignore_eos, **extra)
    return {k: v for k, v in kw.items() if v is not None}


def _params(kw: dict, prompt_len: int, max_len: int, names: dict) -> SamplingParams:
    if kw.get("max_tokens") is None:  # unset: the rest of the context
        kw["max_tokens"] = max(1, max_len - prompt_len)
    seed = kw.get("seed")
    if isinstance(seed, int) and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError(f"seed must be a 64-bit integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed}", "seed")
    try:
        return SamplingParams(**kw)
    except SamplingError as e:
        raise RequestError(str(e), names.get(e.param, e.param)) from None


class Generation:
    """One request's stream: engine `Output`s in, `Piece`s out; the counts to bill."""

    def __init__(self, handle: RequestHandle, token_text: Callable[[int], str], *, chat: bool,
                 enable_thinking: bool, tools: bool, include_reasoning: bool = True):
        self.handle, self.token_text = handle, token_text
        self.chat, self.enable_thinking, self.tools = chat, enable_thinking, tools
        self.include_reasoning = include_reasoning
        self.n = handle.n
        self.parsers = [ReasoningParser(enable_thinking) for _ in range(self.n)] if chat else None
        self.last: dict[int, Output] = {}
        self.made_calls = [False] * self.n
        self.error: str | None = None

    @property
    def request_id(self) -> str:
        return self.handle.request_id

    @property
    def finished(self) -> bool:
        return self.handle.finished

    async def __aiter__(self) -> AsyncIterator[Piece]:
        async for out in self.handle:
            yield self.piece(out)

    def piece(self, out: Output) -> Piece:
        self.last[out.index] = out
        p = Piece(out.index)
        if self.parsers is not None:
            parser = self.parsers[out.index]
            events = parser.feed(out.text) if out.text else []
            if out.finished:
                events += parser.finish()
            for ev in events:
                if ev.kind == "reasoning":
                    if self.include_reasoning:
                        p.reasoning += ev.text
                elif ev.kind == "content":
                    p.content += ev.text
                elif self.tools:
                    tc: ToolCall = ev.tool_call
                    p.tool_calls.append(ToolCallOut(tc.id, tc.name, tc.arguments))
                else:  # no tools offered: a tool-call block is just text
                    tc = ev.tool_call
                    p.content += f'<tool_call>{{"name": {json.dumps(tc.name)}, "arguments": {tc.arguments}}}</tool_call>'
        else:
            p.content = out.text
        if out.token_id is not None and out.logprob is not None:
            top = tuple((self.token_text(t), lp) for t, lp in (out.top_logprobs or ()))
            p.logprobs.append(TokenLogprob(self.token_text(out.token_id), out.logprob, top))
        if p.tool_calls:
            self.made_calls[out.index] = True
        if out.finished:
            reason = out.finish_reason
            if reason == "error":
                self.error = out.error or "generation failed"
            if reason == "stop" and self.made_calls[out.index]:
                reason = "tool_calls"
            p.finish_reason = reason
        return p

    def cancel(self) -> None:
        self.handle.cancel()

    async def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Cancel if still running and read the remaining records, so usage has the final counts."""
        if not self.handle.finished:
            self.handle.cancel()
        with anyio.move_on_after(timeout):
            async for out in self.handle:
                self.last[out.index] = out

    @property
    def status(self) -> str:
        reasons = set(self.handle.finish_reasons)
        if "error" in reasons:
            return "error"
        if "cancelled" in reasons or None in reasons:
            return "cancelled"
        return "ok"

    def usage(self) -> Usage:
        outs = self.last.values()
        return Usage(prompt_tokens=self.handle.prompt_tokens,
                     completion_tokens=sum(o.completion_tokens for o in outs),
                     reasoning_tokens=sum(o.reasoning_tokens for o in outs),
                     # the prompt is prefilled once for all n sequences: one count, as prompt_tokens
                     cached_tokens=max((getattr(o, "cached_tokens", 0) for o in outs), default=0))

    def ttft(self) -> float | None:
        times = [o.time_to_first_token for o in self.last.values() if o.time_to_first_token is not None]
        return min(times) if times else None


class LocalBackend:
    """A checkpoint served in this process by one engine (one worker thread)."""

    def __init__(self, model_dir=None, dtype: str = "auto", max_batch: int = 16, device: str | None = None,
                 max_len: int | None = None, prefill_chunk: int = 512, name: str | None = None,
                 prefix_cache_bytes: int | None = None, quantize: str | None = None,
                 draft_model=None, num_speculative_tokens: int = 4, draft_quantize: str | None = None):
        """`draft_model`: a checkpoint directory with the same tokenizer, loaded with the same dtype
        and device, that drafts for greedy requests decoded alone (speculative decoding)."""
        import exaone
        from ..engine import Engine
        from ..loader import default_model_path

        path = Path(model_dir) if model_dir is not None else default_model_path()
        self.model = exaone.load(path, dtype=dtype, device=device, quantize=quantize)
        self.tokenizer = exaone.load_tokenizer(path)
        extra = {} if prefix_cache_bytes is None else {"prefix_cache_bytes": prefix_cache_bytes}
        if draft_model is not None:
            extra.update(draft_model=exaone.load(draft_model, dtype=dtype, device=device, quantize=draft_quantize),
                         num_speculative_tokens=num_speculative_tokens)
        self.engine = Engine(self.model, tokenizer=self.tokenizer, max_batch=max_batch, max_len=max_len,
                             prefill_chunk=prefill_chunk, **extra)
        self.model_name = name or path.resolve().name
        self.max_len = self.engine.max_len
        self.token_text = lru_cache(maxsize=65536)(lambda i: self.tokenizer.decode([i]))

    def start(self) -> "LocalBackend":
        self.engine.start()
        return self

    def stop(self) -> None:
        self.engine.stop()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- requests -> prompt + params (call in a worker thread) -----------------------------
    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        rc = reasoning_control(req)
        kwargs = template_kwargs(req, rc)
        tools, messages = _tools(req), _messages(req)
        try:
            ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                     **kwargs)
        except (ValueError, TypeError) as e:  # e.g. a template's raise_exception
            raise RequestError(f"messages could not be rendered: {e}", "messages") from None
        names = {"max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
                 "thinking_budget": rc.budget_param or "thinking_token_budget", "logprobs": "logprobs",
                 "top_logprobs": "top_logprobs"}
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        kw = _common_params(req, max_tokens=max_tokens, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
                            enable_thinking=rc.enable_thinking,
                            thinking_budget=rc.budget if rc.enable_thinking else None)
        return Prepared(ids, _params(kw, len(ids), self.max_len, names), chat=True, tools=tools is not None,
                        param_names=names, max_len=self.max_len, include_reasoning=req.include_reasoning)

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        prompt = req.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)  # raw text: written special tokens are meant
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise RequestError("prompt must be a string or a list of token ids (batches of several prompts "
                               "are not supported; send one request each)", "prompt")
        if not ids:
            raise RequestError("prompt is empty", "prompt")
        if req.echo:
            raise RequestError("echo is not supported", "echo")
        if req.suffix:
            raise RequestError("suffix is not supported", "suffix")
        lp = req.logprobs
        if lp is not None and not 0 <= lp <= 5:
            raise RequestError(f"logprobs must be in [0, 5], got {lp}", "logprobs")
        names = {"top_logprobs": "logprobs", "logprobs": "logprobs"}
        kw = _common_params(req, max_tokens=16 if req.max_tokens is None else req.max_tokens,
                            logprobs=lp is not None, top_logprobs=lp or 0)
        return Prepared(ids, _params(kw, len(ids), self.max_len, names), chat=False, tools=False,
                        param_names=names, max_len=self.max_len)

    # ---- the engine ---------------------------------------------------------------------------
    def submit(self, prep: Prepared, request_id: str | None = None) -> Generation:
        """Enqueue; raises ContextLengthError (prompt too long) or ValueError (e.g. n > max_batch)."""
        handle = self.engine.submit(prep.prompt_ids, prep.params, request_id=request_id)
        return Generation(handle, self.token_text, chat=prep.chat, enable_thinking=prep.params.enable_thinking,
                          tools=prep.tools, include_reasoning=prep.include_reasoning)
