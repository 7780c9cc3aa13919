"""Scorers: model output text + gold -> (extracted answer, score in [0, 1], details).

- multiple choice: the letter from the answer part (after `</think>`), by patterns in order of
  trust ("Answer: C", "정답: C", `\\boxed{C}`, "(C)", the last standalone letter)
- math: `\\boxed{}` (or a final-answer line) graded against the gold by `math-verify`
- code: HumanEval and LiveCodeBench programs run in `sandbox.run_python`
- IFEval: `ifeval.evaluate` (strict score; loose recorded in the details)

Scorers never raise on model output. math-verify's own timeouts use signals, so call the math
scorer from the main thread (the runner does); elsewhere it runs without them.
This module must not import torch or the engine.
"""
from __future__ import annotations

import json
import math
import re
import threading

from . import ifeval
from .sandbox import run_python

THINK_CLOSE = "</think>"


def answer_part(text: str) -> str:
    """The text after the last `</think>` (a leaked reasoning block must not be graded)."""
    i = text.rfind(THINK_CLOSE)
    return text[i + len(THINK_CLOSE):] if i >= 0 else text


# ---- multiple choice ---------------------------------------------------------------------------
def _letters_class(letters: str) -> str:
    return "[" + letters + letters.lower() + "]"


# "Answer: I think ..." is the pronoun, not option I (MMLU-Pro has ten options, A-J).
_PRONOUN_I = re.compile(r"\s*(?:'m|'d|'ll|'ve|\s(?:think|believe|am|would|will|can|cannot|can't|guess|need|should|"
                        r"have|was|do|don't|must|feel|suppose|choose|pick|select|say|go)\b)")


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The chosen option letter, or None. The last match of the most trusted pattern wins."""
    t = answer_part(text).replace("**", "").replace("$", "")
    L = "[" + letters + "]"
    pats = [
        # "Answer: C", "final answer is (C)", "answer: \boxed{C}", "정답: C", "정답은 C", "답: (C)"
        rf"(?i:answer)\s*(?:is|:)?\s*[:：]?\s*(?:option\s*)?[\(\[]?(?:\\boxed\{{)?\s*({L})\b",
        rf"정\s*답\s*(?:은|는|:|：)?\s*[:：]?\s*[\(\[]?\s*({L})(?![A-Za-z])",
        rf"(?<![A-Za-z])답\s*(?:은|는|:|：)\s*[\(\[]?\s*({L})(?![A-Za-z])",
        rf"\\boxed\{{\s*(?:\\text\{{)?\s*\(?({L})\)?\s*\}}",
        rf"(?:^|\n)\s*\(?({L})\)?\s*$",                          # a line that is only the letter
        rf"\(({L})\)",                                            # "(C)"
    ]
    for p in pats:
        found = [m for m in re.finditer(p, t) if not _PRONOUN_I.match(t, m.end(1)) or m.group(1) != "I"]
        if found:
            return found[-1].group(1).upper()
    # Last resort: the last standalone capital letter, but not the words "A ..." and "I ...".
    for m in reversed(list(re.finditer(rf"(?<![A-Za-z'’])({L})(?![A-Za-z'’])", t))):
        if m.group(1) in "AI" and re.match(r"\s+[a-z]", t[m.end():]):
            continue
        return m.group(1)
    return None


def score_choice(text: str, gold: str, letters: str = "ABCD") -> tuple[str | None, float]:
    pred = extract_choice(text, letters)
    return pred, float(pred is not None and pred == gold.strip().upper())


# ---- math --------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        m = re.match(r"\\boxed\s+(\S+)", text[i:])  # "\boxed 5"
        return m.group(1).rstrip("$.") if m else None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k]
    return None


_FINAL_LINE = re.compile(r"(?i)(?:final answer|answer|정답|답)\s*(?:is|은|는)?\s*[:：]?\s*(.+)")


def extract_math(text: str) -> str | None:
    t = answer_part(text)
    boxed = last_boxed(t)
    if boxed is not None:
        return boxed.strip()
    lines = [ln.strip() for ln in t.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _FINAL_LINE.search(ln)
        if m:
            return m.group(1).strip().rstrip(".").strip("$ ")
    return lines[-1].strip("$ .") if lines else None


def math_equal(gold: str, pred: str) -> bool:
    """Answer equivalence by math-verify (LaTeX and plain expressions); exact string otherwise."""
    if pred is None:
        return False
    if gold.strip() == pred.strip():
        return True
    try:
        from math_verify import parse, verify
    except ImportError:  # without the eval extra: normalised string match
        norm = lambda s: re.sub(r"\s+|\\!|\\,|\\left|\\right|^\{|\}$", "", s)
        return norm(gold) == norm(pred)
    main = threading.current_thread() is threading.main_thread()
    kw = {} if main else {"parsing_timeout": None}
    try:
        g = parse(f"${gold}$", **kw) or parse(gold, **kw)
        p = parse(f"${pred}$", **kw) or parse(pred, **kw)
        return bool(g and p and verify(g, p, **({} if main else {"timeout_seconds": None})))
    except Exception:  # noqa: BLE001 - a grader must not crash on odd answers
        return False


def score_math(text: str, gold: str) -> tuple[str | None, float]:
    pred = extract_math(text)
    return pred, float(pred is not None and math_equal(gold, pred))


# ---- code --------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|$)", re.S)


def extract_code(text: str) -> str:
    """The last fenced python block of the answer (any fenced block, else the raw answer)."""
    t = answer_part(text)
    blocks = _FENCE.findall(t)
    py = [b for lang, b in blocks if lang.lower() in ("python", "py", "python3")]
    if py:
        return py[-1]
    if blocks:
        return blocks[-1][1]
    return t


def humaneval_program(problem: dict, completion_text: str) -> str:
    """The program HumanEval runs: the model's function (with the prompt's imports) or
    prompt + completion when the model continued the body, then the tests and `check(...)`."""
    code = extract_code(completion_text)
    entry = problem["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        header = "\n".join(ln for ln in problem["prompt"].splitlines()
                           if re.match(r"\s*(import|from)\s", ln) and not ln.startswith(" "))
        body = header + "\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def score_humaneval(text: str, problem: dict, timeout: float = 10.0, memory_mb: int = 2048) -> tuple[str, float, dict]:
    prog = humaneval_program(problem, text)
    r = run_python(prog, timeout=timeout, memory_mb=memory_mb)
    return extract_code(text), float(r.ok), {"status": r.status, "stderr": r.stderr[-1000:]}


def outputs_match(got: str, expected: str) -> bool:
    """LiveCodeBench-style stdout comparison: per line, stripped; numbers within 1e-6."""
    a = [ln.strip() for ln in got.strip().splitlines()]
    b = [ln.strip() for ln in expected.strip().splitlines()]
    if a == b:
        return True
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        xs, ys = x.split(), y.split()
        if len(xs) != len(ys):
            return False
        try:
            if not all(math.isclose(float(p), float(q), rel_tol=1e-6, abs_tol=1e-6) for p, q in zip(xs, ys)):
                return False
        except ValueError:
            return False
    return True


# LiveCodeBench's harness runs solutions after these imports (its LeetCode starters use List[int]).
LCB_IMPORTS = ("from typing import *\nfrom collections import *\nfrom itertools import *\nfrom functools import *\n"
               "from heapq import *\nfrom bisect import *\nfrom math import *\n"
               "import math, re, string, sys, json, heapq, bisect, itertools, collections, functools\n")

_FUNCTIONAL_HARNESS = """

import json as _json, sys as _sys
_args = [_json.loads(_l) for _l in _sys.stdin.read().split("\\n") if _l.strip()]
_obj = Solution() if "Solution" in globals() else None
_fn = getattr(_obj, {name!r}) if _obj is not None else globals()[{name!r}]
print(_json.dumps(_fn(*_args)))
"""


def score_livecodebench(text: str, tests: list[dict], func_name: str | None = None, timeout: float = 6.0,
                        memory_mb: int = 2048) -> tuple[str, float, dict]:
    """All tests must pass. Tests: {"input", "output", "testtype": "stdin" | "functional"}."""
    code = extract_code(text)
    if not tests:
        return code, 0.0, {"status": "no tests"}
    for k, t in enumerate(tests):
        functional = t.get("testtype") == "functional"
        prog = LCB_IMPORTS + code + (_FUNCTIONAL_HARNESS.format(name=func_name) if functional and func_name else "")
        r = run_python(prog, stdin=t["input"], timeout=timeout, memory_mb=memory_mb)
        if not r.ok:
            return code, 0.0, {"status": r.status, "failed_test": k, "stderr": r.stderr[-1000:]}
        if functional:
            try:
                ok = json.loads(r.stdout.strip().splitlines()[-1]) == json.loads(t["output"])
            except (ValueError, IndexError):
                ok = False
        else:
            ok = outputs_match(r.stdout, t["output"])
        if not ok:
            return code, 0.0, {"status": "wrong answer", "failed_test": k, "stdout": r.stdout[-500:]}
    return code, 1.0, {"status": "ok", "tests": len(tests)}


# ---- instruction following ---------------------------------------------------------------------
def score_ifeval(text: str, instruction_ids: list[str], kwargs: list[dict]) -> tuple[None, float, dict]:
    r = ifeval.evaluate(answer_part(text), instruction_ids, kwargs)
    return None, float(r["prompt_strict"]), r
