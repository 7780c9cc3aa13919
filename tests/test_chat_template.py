"""Chat template: exact EXAONE 4.0 strings, and text + id parity with transformers' apply_chat_template."""
import pytest

transformers = pytest.importorskip("transformers")

from exaone.tokenizer import ChatTemplateError, _compile_template, load_tokenizer  # noqa: E402
from exaone.tokenizer_build import build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out_dir=out)
    return load_tokenizer(out), transformers.AutoTokenizer.from_pretrained(str(out))


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "현재 날씨 / current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Hora local",
                                              "parameters": {"type": "object", "properties": {}}}}


def call(name, arguments, call_id="call_0"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# (name, messages, tools, template kwargs)
CASES = [
    ("system_user", [{"role": "system", "content": "You are EXAONE."}, {"role": "user", "content": "Hi"}],
     None, {"add_generation_prompt": True}),
    ("reasoning_prompt", [{"role": "user", "content": "Which is bigger, 9.11 or 9.9?"}],
     None, {"add_generation_prompt": True, "enable_thinking": True}),
    ("multi_turn_reasoning_in_content", [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"}], None, {"add_generation_prompt": True, "enable_thinking": True}),
    ("multi_turn_reasoning_content_field", [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Three plus three."},
        {"role": "user", "content": "thanks"}], None, {"add_generation_prompt": True}),
    ("reasoning_field_alias", [
        {"role": "user", "content": "Hola"},
        {"role": "assistant", "content": "¡Hola!", "reasoning": "Saludar en español."},
        {"role": "user", "content": "¿Qué tal?"}], None, {"add_generation_prompt": True}),
    ("skip_think_false_last", [
        {"role": "user", "content": "Which is bigger, 9.11 or 9.9?"},
        {"role": "assistant", "content": "<think>\nCompare 0.11 and 0.9.\n</think>\n\n9.9 is bigger."}],
     None, {"skip_think": False}),
    ("skip_think_false_not_last", [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "easy"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "also easy"}],
     None, {"skip_think": False}),
    ("tools_with_system_calls_results", [
        {"role": "system", "content": "You are EXAONE."},
        {"role": "user", "content": "서울과 마드리드 날씨 알려줘"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("get_weather", {"city": "Seoul"}), call("get_weather", {"city": "Madrid"}, "call_1")]},
        {"role": "tool", "tool_call_id": "call_0", "content": "맑음, 21°C"},
        {"role": "tool", "tool_call_id": "call_1", "content": "Soleado, 25°C"},
        {"role": "assistant", "content": "서울은 맑음 21°C, 마드리드는 25°C입니다."},
        {"role": "user", "content": "고마워"}], [WEATHER_TOOL, TIME_TOOL], {"add_generation_prompt": True}),
    ("tools_no_system_json_string_args", [
        {"role": "user", "content": "What time is it in Seoul?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            call("get_time", '{"city": "Seoul"}'), {"name": "get_weather", "arguments": {"city": "서울"}}]},
        {"role": "tool", "content": "10:00"},
        {"role": "tool", "content": [{"type": "text", "text": "맑음"}]},
        {"role": "user", "content": "ok"}], [WEATHER_TOOL], {"add_generation_prompt": True, "enable_thinking": True}),
    ("korean_spanish", [
        {"role": "system", "content": "당신은 친절한 도우미입니다. Eres un asistente."},
        {"role": "user", "content": "안녕하세요! ¿Cómo estás? 🙂"},
        {"role": "assistant", "content": "잘 지내요. ¡Muy bien, gracias!"},
        {"role": "user", "content": "España y 대한민국"}], None, {"add_generation_prompt": True}),
    ("text_parts", [
        {"role": "system", "content": [{"type": "text", "text": "You are EXAONE."}]},
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
        {"role": "user", "content": "next"}], None, {"add_generation_prompt": True}),
    ("later_system_and_no_prompt", [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "system", "content": "Answer in Korean."},
        {"role": "user", "content": "How are you?"}], None, {}),
]


@pytest.mark.parametrize("name,messages,tools,kwargs", CASES, ids=[c[0] for c in CASES])
def test_parity_with_transformers(tokenizers, name, messages, tools, kwargs):
    ours, theirs = tokenizers
    text = ours.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
    assert text == theirs.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
    ids = ours.apply_chat_template(messages, tools=tools, **kwargs)
    assert ids == theirs.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False, **kwargs)
    assert ours.decode(ids) == text


def test_system_user_prompt_exact(tokenizers):
    ours, _ = tokenizers
    msgs = [{"role": "system", "content": "You are EXAONE."}, {"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
        "[|system|]\nYou are EXAONE.[|endofturn|]\n[|user|]\nHi[|endofturn|]\n[|assistant|]\n<think>\n\n</think>\n\n")


def test_reasoning_prompt_exact(tokenizers):
    ours, _ = tokenizers
    msgs = [{"role": "user", "content": "Which is bigger, 9.11 or 9.9?"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True, tokenize=False) == (
        "[|user|]\nWhich is bigger, 9.11 or 9.9?[|endofturn|]\n[|assistant|]\n<think>\n")


@pytest.mark.parametrize("assistant", [
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
    {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
    {"role": "assistant", "content": "4", "reasoning": "Add them."},
])
def test_multi_turn_drops_reasoning_exact(tokenizers, assistant):
    ours, _ = tokenizers
    msgs = [{"role": "user", "content": "2+2?"}, assistant, {"role": "user", "content": "and 3+3?"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True, tokenize=False) == (
        "[|user|]\n2+2?[|endofturn|]\n[|assistant|]\n<think>\n\n</think>\n\n4[|endofturn|]\n"
        "[|user|]\nand 3+3?[|endofturn|]\n[|assistant|]\n<think>\n")


def test_skip_think_false_keeps_last_reasoning(tokenizers):
    ours, _ = tokenizers
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add."}]
    assert ours.apply_chat_template(msgs, skip_think=False, tokenize=False) == (
        "[|user|]\n2+2?[|endofturn|]\n[|assistant|]\n<think>\nAdd.\n</think>\n\n4[|endofturn|]\n")
    assert ours.apply_chat_template(msgs, tokenize=False).endswith("<think>\n\n</think>\n\n4[|endofturn|]\n")


def test_tool_call_and_result_exact(tokenizers):
    ours, _ = tokenizers
    msgs = [{"role": "user", "content": "서울 날씨?"},
            {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Seoul"})]},
            {"role": "tool", "content": "맑음, 21°C"},
            {"role": "tool", "content": "바람 약함"}]
    text = ours.apply_chat_template(msgs, tools=[WEATHER_TOOL], tokenize=False)
    assert ('[|assistant|]\n<think>\n\n</think>\n\n<tool_call>{"name": "get_weather", "arguments": '
            '{"city": "Seoul"}}</tool_call>[|endofturn|]\n') in text
    assert text.endswith('[|tool|]\n<tool_result>{"result": "맑음, 21°C"}</tool_result>\n'
                         '<tool_result>{"result": "바람 약함"}</tool_result>[|endofturn|]\n')
    # Tools form a system turn of their own; each declaration on its own line, non-ASCII kept.
    assert text.startswith("[|system|]\n# Available Tools\n")
    assert '\n<tool>{"type": "function", "function": {"name": "get_weather", "description": "현재 날씨' in text
    assert text.count("[|system|]") == 1


def test_tools_appended_to_system_message(tokenizers):
    ours, _ = tokenizers
    msgs = [{"role": "system", "content": "You are EXAONE."}, {"role": "user", "content": "Hi"}]
    text = ours.apply_chat_template(msgs, tools=[WEATHER_TOOL], tokenize=False)
    assert text.startswith("[|system|]\nYou are EXAONE.\n\n# Available Tools\n")
    assert text.count("[|system|]") == 1 and text.count("You are EXAONE.") == 1
    assert "<tool_call>" in text.split("[|endofturn|]")[0]  # the call-format instruction


def test_unknown_role_raises(tokenizers):
    ours, theirs = tokenizers
    msgs = [{"role": "robot", "content": "beep"}]
    with pytest.raises(ChatTemplateError, match="Unknown role: robot"):
        ours.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(Exception, match="Unknown role: robot"):
        theirs.apply_chat_template(msgs, tokenize=False)


def test_return_dict_and_template_cache(tokenizers):
    ours, _ = tokenizers
    msgs = [{"role": "user", "content": "Hi"}]
    out = ours.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
    assert out["input_ids"] == ours.apply_chat_template(msgs, add_generation_prompt=True)
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    hits = _compile_template.cache_info().hits
    ours.apply_chat_template(msgs, tokenize=False)
    assert _compile_template.cache_info().hits > hits


def test_empty_conversation_rejected(tokenizers):
    ours, _ = tokenizers
    with pytest.raises(ValueError):
        ours.apply_chat_template([], tokenize=False)
