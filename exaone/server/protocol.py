"""The OpenAI wire format: request models, reasoning-control fields, and the one renderer.

Requests are pydantic models in strict mode (a string where a number belongs is a 400, not a
silent cast); unknown fields are ignored, as vLLM does, because clients send many extras.
`reasoning_control()` reads every form clients use to switch thinking on and to cap it.
`render()` is the ONE function that writes OpenAI-shaped objects: chat and text completions,
whole responses and stream chunks, with usage. `Accumulator` folds backend pieces into the
per-choice state `render()` reads.

This module must not import the engine, the tokenizer or torch: it only shapes JSON.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# reasoning_effort -> thinking budget in tokens ("none" switches thinking off)
REASONING_EFFORT_BUDGETS = {"minimal": 128, "low": 256, "medium": 1024, "high": 4096}
# Names a client may not pass through chat_template_kwargs: they are ours to set.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt", "tokenize",
                                      "return_dict", "chat_template", "continue_final_message"})


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---- chat messages ---------------------------------------------------------------------------
class ContentPart(_Strict):
    type: str = "text"
    text: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # earlier turns' reasoning, either name (multi-turn)
    reasoning: str | None = None


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class AnthropicThinking(_Strict):
    type: Literal["enabled", "disabled"] = "enabled"
    budget_tokens: int | None = None


# ---- requests --------------------------------------------------------------------------------
class _SamplingFields(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    logit_bias: dict[str, float] | None = None  # not supported: refused unless empty


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None  # only {"type": "text"}: no constrained decoding yet
    include_reasoning: bool = True  # vLLM: false leaves the reasoning out of the response (still billed)
    # reasoning control, every form clients send
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    thinking: bool | AnthropicThinking | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    thinking_token_budget: int | None = None
    max_thinking_tokens: int | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None     # the legacy API: how many top logprobs (0..5)
    echo: bool | None = None
    suffix: str | None = None


@dataclass(frozen=True)
class ReasoningControl:
    enable_thinking: bool
    budget: int | None      # thinking tokens before the end of thinking is forced
    budget_param: str | None  # the request field the budget came from (for error messages)


def reasoning_control(req: ChatCompletionRequest) -> ReasoningControl:
    """Thinking on/off and budget. On/off precedence: chat_template_kwargs.enable_thinking
    (vLLM), top-level enable_thinking, thinking (bool, or Anthropic's {"type"}), reasoning_effort;
    EXAONE's default is off. Budget: thinking_token_budget (vLLM), max_thinking_tokens
    (transformers), thinking.budget_tokens (Anthropic), then reasoning_effort's constant."""
    kwargs = req.chat_template_kwargs or {}
    thinking = req.thinking
    effort = req.reasoning_effort
    if isinstance(kwargs.get("enable_thinking"), bool):
        enable = kwargs["enable_thinking"]
    elif req.enable_thinking is not None:
        enable = req.enable_thinking
    elif isinstance(thinking, bool):
        enable = thinking
    elif isinstance(thinking, AnthropicThinking):
        enable = thinking.type == "enabled"
    elif effort is not None:
        enable = effort != "none"
    else:
        enable = False
    for name, value in (("thinking_token_budget", req.thinking_token_budget),
                        ("max_thinking_tokens", req.max_thinking_tokens),
                        ("thinking.budget_tokens", getattr(thinking, "budget_tokens", None))):
        if value is not None:
            return ReasoningControl(enable, value, name)
    if effort in REASONING_EFFORT_BUDGETS:
        return ReasoningControl(enable, REASONING_EFFORT_BUDGETS[effort], "reasoning_effort")
    return ReasoningControl(enable, None, None)


# ---- responses -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ToolCallOut:
    id: str
    name: str
    arguments: str


@dataclass
class Piece:
    """What one engine step added to one choice (backend -> renderer)."""
    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float | None = None


@dataclass
class Choice:
    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    thinking: bool = False  # reasoning fields are null (not "") when thinking was off


class Accumulator:
    """Per-choice totals for a non-streamed response."""

    def __init__(self, n: int, thinking: bool):
        self.choices = [Choice(i, thinking=thinking) for i in range(n)]

    def add(self, p: Piece) -> None:
        c = self.choices[p.index]
        c.reasoning += p.reasoning
        c.content += p.content
        c.tool_calls.extend(p.tool_calls)
        c.logprobs.extend(p.logprobs)
        if p.finish_reason is not None:
            c.finish_reason = p.finish_reason


def _usage(u: Usage) -> dict:
    out = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
           "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}
    if u.cost_usd is not None:
        out["cost_usd"] = round(u.cost_usd, 10)  # our extension: what this request was billed
    return out


def _chat_logprobs(lps: list[TokenLogprob]) -> dict:
    def entry(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}
    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, v) for s, v in t.top]}
                        for t in lps], "refusal": None}


def _text_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
    offsets, pos = [], offset
    for t in lps:
        offsets.append(pos)
        pos += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [dict(t.top) for t in lps], "text_offset": offsets}


def _tool_calls(calls: list[ToolCallOut], stream: bool, first_index: int = 0) -> list[dict]:
    out = []
    for k, tc in enumerate(calls):
        d = {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}
        out.append({"index": first_index + k, **d} if stream else d)
    return out


def render(kind: Literal["chat", "text"], *, id: str, model: str, created: int, choices: list[Choice],
           usage: Usage | None, stream: bool, role: bool = False, text_offsets: dict[int, int] | None = None,
           tool_call_index: dict[int, int] | None = None, logprobs: bool = False) -> dict:
    """One OpenAI object: `chat.completion`, `chat.completion.chunk`, `text_completion`.

    For a chunk, `choices` hold only what this chunk adds (`role=True` on the first one),
    `usage` is set on the final usage chunk only (with no choices). `text_offsets` /
    `tool_call_index` give the running positions a chunk's logprobs and tool calls start at.
    """
    rendered = []
    for c in choices:
        if kind == "chat":
            msg: dict[str, Any] = {}
            if not stream or role:
                msg["role"] = "assistant"
            if stream:
                if c.content or role:
                    msg["content"] = c.content
                if c.reasoning:
                    msg["reasoning_content"] = msg["reasoning"] = c.reasoning
                if c.tool_calls:
                    msg["tool_calls"] = _tool_calls(c.tool_calls, True, (tool_call_index or {}).get(c.index, 0))
            else:
                msg["content"] = c.content if (c.content or not c.tool_calls) else None
                r = c.reasoning if c.thinking else None
                msg["reasoning_content"] = msg["reasoning"] = r
                if c.tool_calls:
                    msg["tool_calls"] = _tool_calls(c.tool_calls, False)
            item = {"index": c.index, ("delta" if stream else "message"): msg,
                    "logprobs": _chat_logprobs(c.logprobs) if logprobs and (c.logprobs or not stream) else None,
                    "finish_reason": c.finish_reason}
        else:
            off = (text_offsets or {}).get(c.index, 0)
            item = {"index": c.index, "text": c.content,
                    "logprobs": _text_logprobs(c.logprobs, off) if logprobs and (c.logprobs or not stream) else None,
                    "finish_reason": c.finish_reason}
        rendered.append(item)
    obj = {"id": id,
           "object": {"chat": "chat.completion", "text": "text_completion"}[kind] + (".chunk" if stream and kind == "chat" else ""),
           "created": created, "model": model, "choices": rendered}
    if kind == "chat":
        obj["system_fingerprint"] = None
    if usage is not None or stream:
        obj["usage"] = _usage(usage) if usage is not None else None
    return obj


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
