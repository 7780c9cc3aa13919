"""Split EXAONE 4.0 output text into reasoning, content and tool calls, streaming-safe.

The state machine works on decoded text only. Its start state comes from the request: with
`enable_thinking` the prompt already ends with `<think>\\n`, so output starts inside the reasoning
and only `</think>` ends it; with thinking off every byte of output is content and think tags
are never looked for. The format's newlines are dropped: reasoning is reported stripped of
surrounding whitespace, and the newlines after `</think>` do not start the content.

In content, `<tool_call>{json}</tool_call>` blocks are parsed as units into `ToolCall`s (OpenAI
style: `arguments` is a JSON string); `<think>`/`</think>` inside a block is text, never a marker.
A malformed block stays plain content. Inside reasoning a complete tool-call block is kept as
reasoning text (reasoning is never acted on), but it is still a unit, so a `</think>` in its JSON
does not end the reasoning. A marker split across deltas is held back until it is known.

`parse()` is the one-shot helper and runs the same machine. This module must not import the
model, tokenizer, engine or server, and must never raise on model output.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
THINK_END_FORCED = "\n</think>\n\n"  # what the engine forces when a thinking budget is spent

_WS = " \t\r\n"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as a string, as OpenAI sends it


@dataclass(frozen=True)
class Event:
    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    tool_call: ToolCall | None = None


@dataclass
class ParsedOutput:
    reasoning: str | None           # None when thinking was off
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


def parse_tool_call(body: str) -> ToolCall | None:
    """The JSON between the tool-call markers -> ToolCall, or None when it is not a valid call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if args is None:
        args = {}
    if isinstance(args, str):  # some models send the arguments already encoded
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall("call_" + uuid.uuid4().hex[:24], name, json.dumps(args, ensure_ascii=False))


def _partial_suffix_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some marker."""
    for k in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class ReasoningParser:
    """Streaming splitter: `feed(delta) -> list[Event]`, then `finish() -> list[Event]`."""

    def __init__(self, enable_thinking: bool):
        self.enable_thinking = enable_thinking
        self._state = "reasoning" if enable_thinking else "content"
        self._at_start = enable_thinking  # a leading <think> may still be swallowed
        self._buf = ""                    # text not yet classified
        self._in_block = False            # _buf starts with TOOL_CALL_OPEN of an open block
        self._scan_from = 0               # where to resume looking for TOOL_CALL_CLOSE
        self._lstrip = _WS if enable_thinking else None  # chars to drop at the start of the next text
        self._pending_ws = ""             # trailing whitespace held until we know it is not trailing
        self._finished = False

    @property
    def state(self) -> Literal["reasoning", "content"]:
        return self._state  # type: ignore[return-value]

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        events: list[Event] = []
        self._run(events, final=False)
        return _merge(events)

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        events: list[Event] = []
        self._run(events, final=True)
        # Trailing whitespace of reasoning is dropped (reasoning is stripped); of content, kept.
        if self._state == "content" and self._pending_ws:
            events.append(Event("content", self._pending_ws))
        self._pending_ws = ""
        self._finished = True
        return _merge(events)

    # ---- the machine ----

    def _run(self, events: list[Event], final: bool) -> None:
        while self._buf:
            if self._at_start:
                head = self._buf.lstrip(_WS)
                if not final and (not head or (len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head))):
                    return  # could still be a leading <think>
                self._at_start = False
                if head.startswith(THINK_OPEN):
                    self._buf = head[len(THINK_OPEN):]
                continue

            if self._in_block:
                end = self._buf.find(TOOL_CALL_CLOSE, self._scan_from)
                if end < 0:
                    if not final:
                        self._scan_from = max(len(TOOL_CALL_OPEN), len(self._buf) - len(TOOL_CALL_CLOSE) + 1)
                        return
                    # Never closed: the opener was just text; rescan the rest normally.
                    self._in_block = False
                    self._text(events, TOOL_CALL_OPEN)
                    self._buf = self._buf[len(TOOL_CALL_OPEN):]
                    continue
                end += len(TOOL_CALL_CLOSE)
                block, self._buf = self._buf[:end], self._buf[end:]
                self._in_block = False
                self._block(events, block)
                continue

            markers = (TOOL_CALL_OPEN, THINK_CLOSE) if self._state == "reasoning" else (TOOL_CALL_OPEN,)
            hits = [(i, m) for m in markers if (i := self._buf.find(m)) >= 0]
            if not hits:
                keep = 0 if final else _partial_suffix_len(self._buf, markers)
                cut = len(self._buf) - keep
                self._text(events, self._buf[:cut])
                self._buf = self._buf[cut:]
                return
            i, marker = min(hits)
            self._text(events, self._buf[:i])
            if marker == THINK_CLOSE:
                self._buf = self._buf[i + len(THINK_CLOSE):]
                self._pending_ws = ""           # reasoning is stripped at its end
                self._state = "content"
                self._lstrip = "\r\n"           # the format's "\n\n" after </think>
            else:
                self._buf = self._buf[i:]
                self._in_block = True
                self._scan_from = len(TOOL_CALL_OPEN)

    def _block(self, events: list[Event], block: str) -> None:
        if self._state == "content":
            call = parse_tool_call(block[len(TOOL_CALL_OPEN):-len(TOOL_CALL_CLOSE)])
            if call is not None:
                self._pending_ws = ""           # whitespace around tool calls is layout, not content
                self._lstrip = _WS
                events.append(Event("tool_call", tool_call=call))
                return
        self._text(events, block)

    def _text(self, events: list[Event], text: str) -> None:
        """Emit classified text in the current state, holding trailing whitespace back."""
        if self._lstrip is not None:
            text = text.lstrip(self._lstrip)
            if not text:
                return
            self._lstrip = None
        body = text.rstrip(_WS)
        if not body:
            self._pending_ws += text
            return
        events.append(Event(self._state, self._pending_ws + body))  # type: ignore[arg-type]
        self._pending_ws = text[len(body):]


def _merge(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for e in events:
        if out and e.kind != "tool_call" and out[-1].kind == e.kind:
            out[-1] = Event(e.kind, out[-1].text + e.text)
        else:
            out.append(e)
    return out


def parse(text: str, enable_thinking: bool) -> ParsedOutput:
    """One-shot split of a whole output, through the streaming machine."""
    p = ReasoningParser(enable_thinking)
    return collect(p.feed(text) + p.finish(), enable_thinking)


def collect(events: list[Event], enable_thinking: bool) -> ParsedOutput:
    """Fold a stream of events into a ParsedOutput."""
    reasoning, content, calls = [], [], []
    for e in events:
        if e.kind == "reasoning":
            reasoning.append(e.text)
        elif e.kind == "content":
            content.append(e.text)
        elif e.tool_call is not None:
            calls.append(e.tool_call)
    return ParsedOutput("".join(reasoning) if enable_thinking else None, "".join(content), calls)
