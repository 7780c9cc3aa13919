import json
import random

import pytest

from exaone.reasoning import (
    THINK_END_FORCED, TOOL_CALL_CLOSE, TOOL_CALL_OPEN,
    Event, ReasoningParser, collect, parse, parse_tool_call,
)


def stream(text, thinking, chunks):
    p = ReasoningParser(thinking)
    events = []
    for c in chunks:
        events += p.feed(c)
    events += p.finish()
    return collect(events, thinking)


def random_chunks(text, rng):
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i:i + n])
        i += n
    return out


def assert_stream_equals_parse(text, thinking):
    one = parse(text, thinking)
    chars = stream(text, thinking, list(text))
    assert (chars.reasoning, chars.content) == (one.reasoning, one.content)
    assert [(c.name, c.arguments) for c in chars.tool_calls] == [(c.name, c.arguments) for c in one.tool_calls]
    rng = random.Random(hash(text) & 0xFFFF)
    for _ in range(20):
        r = stream(text, thinking, random_chunks(text, rng))
        assert (r.reasoning, r.content) == (one.reasoning, one.content)
        assert [(c.name, c.arguments) for c in r.tool_calls] == [(c.name, c.arguments) for c in one.tool_calls]
    return one


CASES = [
    # (output text, enable_thinking, reasoning, content, tool call names)
    ("Let me think.\n9.9 is bigger.\n</think>\n\n9.9 is bigger.", True,
     "Let me think.\n9.9 is bigger.", "9.9 is bigger.", []),
    ("<think>\nswallowed opener\n</think>\n\nanswer", True, "swallowed opener", "answer", []),
    ("Hello, world!\nLine two.", False, None, "Hello, world!\nLine two.", []),
    ("no close tag, cut by max_tokens  ", True, "no close tag, cut by max_tokens", "", []),
    ("</think>\n\nimmediate", True, "", "immediate", []),
    ("안녕하세요? 생각 중…\n</think>\n\n서울은 맑음, 21°C 입니다. 😀", True,
     "안녕하세요? 생각 중…", "서울은 맑음, 21°C 입니다. 😀", []),
    ("content with </think> and <think> tags stays content", False, None,
     "content with </think> and <think> tags stays content", []),
    ("budget ran out" + THINK_END_FORCED + "The answer is 4.", True, "budget ran out", "The answer is 4.", []),
    ("x < y and a <b> tag, </thin not a marker\n</think>\n\n<tool not a call", True,
     "x < y and a <b> tag, </thin not a marker", "<tool not a call", []),
    ("    indented code\n", False, None, "    indented code\n", []),
]


@pytest.mark.parametrize("text,thinking,reasoning,content,calls", CASES)
def test_split(text, thinking, reasoning, content, calls):
    out = assert_stream_equals_parse(text, thinking)
    assert out.reasoning == reasoning
    assert out.content == content
    assert [c.name for c in out.tool_calls] == calls


def test_one_tool_call():
    text = ('I need the weather.\n</think>\n\n<tool_call>{"name": "get_weather", '
            '"arguments": {"city": "서울"}}</tool_call>')
    out = assert_stream_equals_parse(text, True)
    assert out.reasoning == "I need the weather." and out.content == ""
    (call,) = out.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "서울"}
    assert "서울" in call.arguments  # non-ASCII kept
    assert call.id.startswith("call_") and len(call.id) > 10


def test_two_tool_calls_and_surrounding_text():
    text = ('Checking both.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
            '<tool_call>{"name": "b", "parameters": {"y": [1, 2]}}</tool_call>\n')
    out = assert_stream_equals_parse(text, False)
    assert out.content == "Checking both."
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("a", {"x": 1}), ("b", {"y": [1, 2]})]
    assert out.tool_calls[0].id != out.tool_calls[1].id


def test_arguments_as_json_string():
    call = parse_tool_call('{"name": "f", "arguments": "{\\"q\\": \\"hi\\"}"}')
    assert call.name == "f" and json.loads(call.arguments) == {"q": "hi"}
    assert json.loads(parse_tool_call('{"name": "g"}').arguments) == {}


@pytest.mark.parametrize("block", [
    '<tool_call>{"name": "f", "arguments": {bad json}}</tool_call>',
    '<tool_call>{"arguments": {"x": 1}}</tool_call>',
    '<tool_call>["f"]</tool_call>',
    '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
])
def test_malformed_tool_call_stays_content(block):
    text = "Before " + block + " after"
    out = assert_stream_equals_parse(text, False)
    assert out.tool_calls == [] and out.content == text


def test_unclosed_tool_call_is_content():
    text = 'answer <tool_call>{"name": "f", "arguments": {'
    out = assert_stream_equals_parse(text, False)
    assert out.content == text and out.tool_calls == []


def test_think_markers_inside_tool_call_arguments():
    args = {"text": "the model wrote </think> and <think> here", "n": 1}
    body = json.dumps({"name": "echo", "arguments": args}, ensure_ascii=False)
    text = "plan\n</think>\n\n" + TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE
    out = assert_stream_equals_parse(text, True)
    assert out.reasoning == "plan" and out.content == ""
    assert json.loads(out.tool_calls[0].arguments) == args
    # thinking off: the same block is a tool call, and no reasoning appears
    out = assert_stream_equals_parse(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE, False)
    assert out.reasoning is None and json.loads(out.tool_calls[0].arguments) == args


def test_tool_call_block_in_reasoning_is_a_unit():
    # A </think> inside a tool-call block written during reasoning does not end the reasoning.
    block = TOOL_CALL_OPEN + '{"name": "f", "arguments": {"s": "</think>"}}' + TOOL_CALL_CLOSE
    text = "maybe " + block + " hmm\n</think>\n\nfinal"
    out = assert_stream_equals_parse(text, True)
    assert out.reasoning == "maybe " + block + " hmm"
    assert out.content == "final" and out.tool_calls == []


def test_unclosed_tool_call_in_reasoning_does_not_swallow_close():
    text = "I could use <tool_call> tags\n</think>\n\nanswer"
    out = assert_stream_equals_parse(text, True)
    assert out.reasoning == "I could use <tool_call> tags" and out.content == "answer"


def test_markers_split_across_deltas():
    p = ReasoningParser(True)
    assert p.feed("step one\n</thi") == [Event("reasoning", "step one")]
    assert p.state == "reasoning"
    assert p.feed("nk>\n") == []
    assert p.state == "content"
    assert p.feed("\nAns") == [Event("content", "Ans")]
    assert p.feed("wer <tool_") == [Event("content", "wer")]
    ev = p.feed('call>{"name": "f", "arguments": {}}</tool_')
    assert ev == []
    ev = p.feed("call>")
    assert len(ev) == 1 and ev[0].kind == "tool_call" and ev[0].tool_call.name == "f"
    assert p.finish() == []


def test_leading_think_swallowed_only_at_start():
    p = ReasoningParser(True)
    assert p.feed("<thi") == []
    assert p.feed("nk>\nabc") == [Event("reasoning", "abc")]
    out = parse("abc <think> def</think>\n\nx", True)
    assert out.reasoning == "abc <think> def" and out.content == "x"
    assert parse("<thi", True).reasoning == "<thi"


def test_state_property():
    p = ReasoningParser(False)
    assert p.state == "content"
    p = ReasoningParser(True)
    assert p.state == "reasoning"
    p.feed("thinking" + THINK_END_FORCED)
    assert p.state == "content"


def test_long_korean_random_chunkings():
    text = ("사용자가 날씨를 묻는다. 도구를 호출하자. 😀👍🏽\n" * 5 + "</think>\n\n"
            "먼저 확인하겠습니다.\n" + TOOL_CALL_OPEN
            + json.dumps({"name": "날씨", "arguments": {"도시": "부산"}}, ensure_ascii=False)
            + TOOL_CALL_CLOSE + "\n결과를 기다립니다.")
    out = assert_stream_equals_parse(text, True)
    assert out.reasoning.startswith("사용자가") and out.reasoning.endswith("👍🏽")
    assert out.content == "먼저 확인하겠습니다.결과를 기다립니다."
    assert out.tool_calls[0].name == "날씨"


def test_fuzz_streaming_equals_one_shot():
    pieces = ["<think>", "</think>", "<tool_call>", "</tool_call>", '{"name": "f", "arguments": {"a": "</think>"}}',
              "\n", " ", "가", "a", "<", "</", "😀", "\n\n"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        for thinking in (True, False):
            one = parse(text, thinking)
            r = stream(text, thinking, random_chunks(text, rng))
            assert (r.reasoning, r.content) == (one.reasoning, one.content), text
            assert [c.arguments for c in r.tool_calls] == [c.arguments for c in one.tool_calls]
