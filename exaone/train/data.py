"""Synthetic tasks with verifiable answers, rendered with the chat template in both modes.

Every generator returns an `Example`: the user's question, a short step-by-step trace (what the
model writes inside the thinking block), the answer, and an answer key the scorer checks. Each
problem has a canonical `key`; a fixed hash of it puts about one problem in ten in the held-out
split, which training never yields, so evaluation problems are disjoint from training by
construction. Rendering gives token ids and labels with the loss on assistant tokens only:

    reasoning      prompt(enable_thinking=True)  + trace\n</think>\n\nanswer[|endofturn|]
    non-reasoning  prompt(enable_thinking=False) + answer[|endofturn|]

This module knows tasks and text; it must not import the model or torch.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator

LANGS = ("en", "ko", "es")
IGNORE = -100  # label of tokens that carry no loss (the prompt, padding)
HELDOUT_PERCENT = 10


@dataclass(frozen=True)
class Example:
    task: str
    lang: str
    key: str       # canonical problem, language-free: decides the held-out split
    question: str  # the user's message
    trace: str     # the reasoning, without the <think> markers
    answer: str    # what the assistant says after reasoning (or directly)
    expected: str  # the answer key: what `score` looks for

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    def completion(self, thinking: bool) -> str:
        """The assistant text that follows the generation prompt of the given mode."""
        if thinking:
            return f"{self.trace}\n</think>\n\n{self.answer}[|endofturn|]"
        return f"{self.answer}[|endofturn|]"


def is_heldout(key: str) -> bool:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big")
    return h % 100 < HELDOUT_PERCENT


# ---- arithmetic ------------------------------------------------------------------------------
def _digits(n: int) -> list[int]:
    return [int(c) for c in str(n)]


def add_trace(a: int, b: int) -> str:
    """Column addition from the right; each line shows the digits written so far."""
    da, db = _digits(a)[::-1], _digits(b)[::-1]
    carry, written, lines = 0, "", []
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry, written = s // 10, str(s % 10) + written
        lines.append(f"{expr}={s} → {written}" + (", carry 1" if carry else ""))
    if carry:
        written = "1" + written
        lines.append(f"carry 1 → {written}")
    return "\n".join(lines)


def sub_trace(a: int, b: int) -> str:
    """Column subtraction from the right with borrows (a >= b)."""
    da, db = _digits(a)[::-1], _digits(b)[::-1]
    borrow, written, lines = 0, "", []
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        top = x - borrow
        expr = f"{x}-{borrow}" if borrow else f"{x}"
        if top < y:
            lines.append(f"{expr}<{y}, borrow: {top + 10}-{y}={top + 10 - y} → {top + 10 - y}{written}")
            written, borrow = str(top + 10 - y) + written, 1
        else:
            lines.append(f"{expr}-{y}={top - y} → {top - y}{written}")
            written, borrow = str(top - y) + written, 0
    result = str(int(written))
    if result != written:
        lines.append(f"drop leading zeros → {result}")
    return "\n".join(lines)


def mul_trace(a: int, b: int) -> str:
    """Multi-digit times one digit: the factors restated (long one first, whatever the question's
    order), then digit by digit from the right, with carries."""
    carry, written, lines = 0, "", [f"{a} × {b}"]
    for x in _digits(a)[::-1]:
        p = x * b
        s = p + carry
        head = f"{x}×{b}={p}" + (f", +{carry}={s}" if carry else "")
        carry, written = s // 10, str(s % 10) + written
        lines.append(f"{head} → {written}" + (f", carry {carry}" if carry else ""))
    if carry:
        written = str(carry) + written
        lines.append(f"carry {carry} → {written}")
    return "\n".join(lines)


_ASK_ADD = {"en": ["What is {a} + {b}?", "Calculate {a} + {b}.", "Add {a} and {b}."],
            "ko": ["{a} + {b}는 얼마인가요?", "{a}와 {b}를 더하면?", "{a} + {b}를 계산해 주세요."],
            "es": ["¿Cuánto es {a} + {b}?", "Calcula {a} + {b}.", "Suma {a} y {b}."]}
_ASK_SUB = {"en": ["What is {a} - {b}?", "Calculate {a} - {b}.", "Subtract {b} from {a}."],
            "ko": ["{a} - {b}는 얼마인가요?", "{a}에서 {b}를 빼면?", "{a} - {b}를 계산해 주세요."],
            "es": ["¿Cuánto es {a} - {b}?", "Calcula {a} - {b}.", "Resta {b} de {a}."]}
_ASK_MUL = {"en": ["What is {a} × {b}?", "Calculate {a} × {b}.", "Multiply {a} by {b}."],
            "ko": ["{a} × {b}는 얼마인가요?", "{a}에 {b}를 곱하면?", "{a} × {b}를 계산해 주세요."],
            "es": ["¿Cuánto es {a} × {b}?", "Calcula {a} × {b}.", "Multiplica {a} por {b}."]}


def gen_add(rng: random.Random, lang: str) -> Example:
    a = rng.randint(10 ** (rng.choice([2, 3]) - 1), 9999)
    b = rng.randint(10, 9999)
    q = rng.choice(_ASK_ADD[lang]).format(a=a, b=b)
    return Example("add", lang, f"add:{a}:{b}", q, add_trace(a, b), str(a + b), str(a + b))


def gen_sub(rng: random.Random, lang: str) -> Example:
    a, b = sorted((rng.randint(100, 9999), rng.randint(10, 9999)), reverse=True)
    q = rng.choice(_ASK_SUB[lang]).format(a=a, b=b)
    return Example("sub", lang, f"sub:{a}:{b}", q, sub_trace(a, b), str(a - b), str(a - b))


def gen_mul(rng: random.Random, lang: str) -> Example:
    a = rng.randint(100, 999) if rng.random() < 0.8 else rng.randint(12, 99)
    b = rng.randint(2, 9)
    if rng.random() < 0.5:
        a, b = b, a  # "6 × 347" as well as "347 × 6"; the trace always runs over the long factor
    q = rng.choice(_ASK_MUL[lang]).format(a=a, b=b)
    big, small = max(a, b), min(a, b)
    return Example("mul", lang, f"mul:{big}:{small}", q, mul_trace(big, small), str(a * b), str(a * b))


# ---- comparing decimals ----------------------------------------------------------------------
_ASK_CMP = {"en": ["Which is bigger, {a} or {b}?", "Which number is larger: {a} or {b}?"],
            "ko": ["{a}와 {b} 중 어느 것이 더 큰가요?", "{a}과 {b} 중 더 큰 수는?"],
            "es": ["¿Cuál es mayor, {a} o {b}?", "¿Qué número es más grande: {a} o {b}?"]}


def cmp_trace(a: str, b: str) -> str:
    ia, fa = a.split(".")
    ib, fb = b.split(".")
    lines = []
    if int(ia) != int(ib):
        big = a if int(ia) > int(ib) else b
        lines.append(f"whole parts: {ia} vs {ib} → {big} is bigger")
        return "\n".join(lines)
    lines.append(f"whole parts: {ia} = {ib}")
    n = max(len(fa), len(fb))
    pa, pb = fa.ljust(n, "0"), fb.ljust(n, "0")
    lines.append(f"decimals padded: 0.{pa} vs 0.{pb}")
    for i in range(n):
        if pa[i] != pb[i]:
            big = a if pa[i] > pb[i] else b
            lines.append(f"digit {i + 1}: {pa[i]} vs {pb[i]} → {big} is bigger")
            break
        lines.append(f"digit {i + 1}: {pa[i]} = {pb[i]}")
    return "\n".join(lines)


def gen_cmp(rng: random.Random, lang: str) -> Example:
    while True:
        whole = rng.randint(0, 20)
        wa = whole if rng.random() < 0.8 else rng.randint(0, 20)
        a = f"{wa}.{rng.randint(1, 99) if rng.random() < 0.5 else rng.randint(1, 9)}"
        b = f"{whole}.{rng.randint(1, 99) if rng.random() < 0.5 else rng.randint(1, 9)}"
        if float(a) != float(b) and not a.endswith("0") and not b.endswith("0"):
            break
    q = rng.choice(_ASK_CMP[lang]).format(a=a, b=b)
    big = a if float(a) > float(b) else b
    return Example("cmp", lang, f"cmp:{min(a, b)}:{max(a, b)}", q, cmp_trace(a, b), big, big)


# ---- counting a letter -----------------------------------------------------------------------
WORDS = """strawberry banana apple orange cherry lemon mango grape peach melon coconut pineapple
blueberry raspberry tomato potato carrot onion pepper garlic cabbage broccoli spinach lettuce
elephant giraffe kangaroo dolphin penguin octopus squirrel rabbit turtle tiger monkey zebra
butterfly mosquito hamster parrot chicken horse sheep donkey camel falcon beetle spider
computer keyboard monitor printer network internet software hardware program database
language grammar sentence paragraph question answer letter number pencil notebook
mountain river ocean island forest desert valley volcano rainbow thunder weather sunshine
bottle kettle pillow blanket mirror window ceiling kitchen bathroom garden balloon bicycle
mississippi assessment committee successful necessary accommodate occurrence millennium
banana cinnamon parallel tomorrow yesterday address coffee cookie puzzle pepperoni
happiness business address possession referee engineer teacher student library hospital
""".split()
WORDS = sorted(set(WORDS))

_ASK_COUNT = {"en": ["How many times does the letter '{c}' appear in '{w}'?", "How many '{c}'s are in '{w}'?",
                     "Count the letter '{c}' in the word '{w}'."],
              "ko": ["'{w}'에 '{c}'가 몇 번 나오나요?", "단어 '{w}'에서 글자 '{c}'의 개수는?"],
              "es": ["¿Cuántas veces aparece la letra '{c}' en '{w}'?", "¿Cuántas '{c}' hay en '{w}'?"]}


def count_trace(word: str, c: str) -> str:
    """The letter and word restated (in double quotes, which the tokenizer never merges into the
    word), then the word spelled one letter per line, each compared with the letter, with a running
    count: `s≠r 0`, `r=r 1`. The comparison sits next to the letter it compares, so the model
    checks two neighbours instead of looking back to the question for every letter."""
    n, lines = 0, [f'"{c}" in "{word}"']
    for ch in word:
        n += ch == c
        lines.append(f"{ch}{'=' if ch == c else '≠'}{c} {n}")
    return "\n".join(lines)


def gen_count(rng: random.Random, lang: str) -> Example:
    w = rng.choice(WORDS)
    c = rng.choice(w) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    q = rng.choice(_ASK_COUNT[lang]).format(c=c, w=w)
    if rng.random() < 0.5:  # users quote either way
        q = q.replace("'", '"')
    n = str(w.count(c))
    return Example("count", lang, f"count:{w}:{c}", q, count_trace(w, c), n, n)


# ---- sorting -------------------------------------------------------------------------------
_ASK_SORT = {"en": ["Sort from smallest to largest: {xs}", "Put these numbers in ascending order: {xs}"],
             "ko": ["작은 수부터 정렬하세요: {xs}", "오름차순으로 정렬해 주세요: {xs}"],
             "es": ["Ordena de menor a mayor: {xs}", "Ordena estos números de forma ascendente: {xs}"]}


def sort_trace(xs: list[int]) -> str:
    rest, done, lines = list(xs), [], []
    while rest:
        m = min(rest)
        rest.remove(m)
        done.append(m)
        lines.append(f"smallest {m} → {', '.join(map(str, done))}")
    return "\n".join(lines)


def gen_sort(rng: random.Random, lang: str) -> Example:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    q = rng.choice(_ASK_SORT[lang]).format(xs=", ".join(map(str, xs)))
    out = ", ".join(map(str, sorted(xs)))
    return Example("sort", lang, "sort:" + ",".join(map(str, xs)), q, sort_trace(xs), out, out)


# ---- word problems and units ---------------------------------------------------------------
_NAMES = {"en": ["Tom", "Anna", "Minsu", "Sara"], "ko": ["민수", "지영", "철수", "서연"],
          "es": ["Juan", "María", "Lucía", "Pedro"]}
_STORIES = {  # (template, operation)
    "en": [("{n} has {a} apples and buys {b} more. How many apples does {n} have now?", "+"),
           ("{n} has {a} stickers and gives away {b}. How many are left?", "-"),
           ("A box holds {a} pencils. How many pencils are in {b} boxes?", "×"),
           ("How many centimeters are in {a} meters?", "m"), ("How many minutes are in {a} hours?", "h")],
    "ko": [("{n}는 사과 {a}개를 가지고 있고 {b}개를 더 샀습니다. 사과는 모두 몇 개인가요?", "+"),
           ("{n}는 스티커 {a}장 중 {b}장을 친구에게 주었습니다. 몇 장이 남았나요?", "-"),
           ("한 상자에 연필이 {a}자루 들어 있습니다. {b}상자에는 연필이 몇 자루인가요?", "×"),
           ("{a}미터는 몇 센티미터인가요?", "m"), ("{a}시간은 몇 분인가요?", "h")],
    "es": [("{n} tiene {a} manzanas y compra {b} más. ¿Cuántas manzanas tiene ahora?", "+"),
           ("{n} tiene {a} pegatinas y regala {b}. ¿Cuántas le quedan?", "-"),
           ("Una caja tiene {a} lápices. ¿Cuántos lápices hay en {b} cajas?", "×"),
           ("¿Cuántos centímetros hay en {a} metros?", "m"), ("¿Cuántos minutos hay en {a} horas?", "h")],
}


def gen_word(rng: random.Random, lang: str) -> Example:
    i = rng.randrange(len(_STORIES["en"]))
    template, op = _STORIES[lang][i]
    if op == "+":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        trace, ans = f"{a} + {b} = {a + b}", a + b
    elif op == "-":
        a = rng.randint(5, 90)
        b = rng.randint(1, a - 1)
        trace, ans = f"{a} - {b} = {a - b}", a - b
    elif op == "×":
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        trace, ans = f"{a} × {b} = {a * b}", a * b
    elif op == "m":
        a, b = rng.randint(2, 50), 0
        trace, ans = f"1 m = 100 cm\n{a} × 100 = {a * 100}", a * 100
    else:
        a, b = rng.randint(2, 24), 0
        trace, ans = f"1 hour = 60 minutes\n{a} × 60 = {a * 60}", a * 60
    q = template.format(n=rng.choice(_NAMES[lang]), a=a, b=b)
    return Example("word", lang, f"word:{i}:{a}:{b}", q, trace, str(ans), str(ans))


# ---- short conversation -------------------------------------------------------------------
IDENTITY = {"en": "I am EXAONE 4.0 nano, a tiny demo model trained by the exaone project. "
                  "I can do small arithmetic and counting, in English, Korean and Spanish.",
            "ko": "저는 exaone 프로젝트가 학습시킨 작은 데모 모델 EXAONE 4.0 nano입니다. "
                  "간단한 계산과 글자 세기를 할 수 있어요.",
            "es": "Soy EXAONE 4.0 nano, un modelo de demostración muy pequeño entrenado por el proyecto exaone. "
                  "Puedo hacer cálculos sencillos y contar letras."}
_CHAT = {  # intent -> lang -> (questions, answer, trace)
    "hello": {"en": (["Hi!", "Hello!", "Hello, how are you?", "Good morning!", "Hey there."],
                     "Hello! How can I help you today?", "The user greets me. I greet back and offer help."),
              "ko": (["안녕하세요!", "안녕!", "반가워요.", "좋은 아침이에요!"],
                     "안녕하세요! 무엇을 도와드릴까요?", "The user greets me in Korean. I greet back in Korean."),
              "es": (["¡Hola!", "Hola, ¿qué tal?", "¡Buenos días!"],
                     "¡Hola! ¿En qué puedo ayudarte?", "The user greets me in Spanish. I greet back in Spanish.")},
    "who": {"en": (["Who are you?", "What is your name?", "What are you?", "Introduce yourself."],
                   IDENTITY["en"], "The user asks who I am. I am EXAONE 4.0 nano, a small demo model."),
            "ko": (["누구세요?", "이름이 뭐예요?", "자기소개를 해 주세요.", "너는 누구야?"],
                   IDENTITY["ko"], "The user asks who I am, in Korean. I answer in Korean."),
            "es": (["¿Quién eres?", "¿Cómo te llamas?", "Preséntate, por favor."],
                   IDENTITY["es"], "The user asks who I am, in Spanish. I answer in Spanish.")},
    "big": {"en": (["Are you GPT-4?", "Are you the 32B EXAONE model?", "Pretend you are a huge model.",
                    "Are you a large language model with billions of parameters?"],
                   "No. I am EXAONE 4.0 nano, a tiny model with a few million parameters, not a large model. "
                   "I will not pretend to be one.",
                   "The user asks me to be or claim a large model. I am tiny and say so honestly."),
            "ko": (["너 GPT-4야?", "32B 엑사원 모델인가요?", "큰 모델인 척 해 줘."],
                   "아니요. 저는 수백만 개의 파라미터를 가진 작은 모델 EXAONE 4.0 nano이며, 큰 모델인 척하지 않습니다.",
                   "The user asks me to claim a large model, in Korean. I am tiny and say so."),
            "es": (["¿Eres GPT-4?", "¿Eres el modelo EXAONE de 32B?", "Finge que eres un modelo enorme."],
                   "No. Soy EXAONE 4.0 nano, un modelo diminuto de unos pocos millones de parámetros; "
                   "no voy a fingir ser un modelo grande.",
                   "The user asks me to claim a large model, in Spanish. I am tiny and say so.")},
    "thanks": {"en": (["Thank you!", "Thanks a lot.", "Bye!"], "You're welcome! Have a nice day.",
                      "The user thanks me or says goodbye. I reply politely."),
               "ko": (["고마워요!", "감사합니다.", "잘 가요!"], "천만에요! 좋은 하루 보내세요.",
                      "The user thanks me in Korean. I reply politely in Korean."),
               "es": (["¡Gracias!", "Muchas gracias.", "¡Adiós!"], "¡De nada! Que tengas un buen día.",
                      "The user thanks me in Spanish. I reply politely in Spanish.")},
}


def gen_chat(rng: random.Random, lang: str) -> Example:
    intent = rng.choice(sorted(_CHAT))
    questions, answer, trace = _CHAT[intent][lang]
    q = rng.choice(questions)
    # Conversation is not scored by key: every phrasing may appear in training (key is unique).
    return Example("chat", lang, f"chat:{rng.random()}", q, trace, answer, answer)


GENERATORS: dict[str, Callable[[random.Random, str], Example]] = {
    "add": gen_add, "sub": gen_sub, "mul": gen_mul, "cmp": gen_cmp, "count": gen_count,
    "sort": gen_sort, "word": gen_word, "chat": gen_chat,
}
# Sampling weights: the multi-step tasks the report measures get more of the budget.
MIX = {"add": 2, "sub": 1.5, "mul": 4, "cmp": 1, "count": 4, "sort": 0.5, "word": 1, "chat": 0.7}
EVAL_TASKS = ("add", "sub", "mul", "cmp", "count", "sort", "word")
LANG_WEIGHTS = {"en": 0.5, "ko": 0.3, "es": 0.2}


def _lang(rng: random.Random) -> str:
    return rng.choices(list(LANG_WEIGHTS), weights=list(LANG_WEIGHTS.values()))[0]


def training_examples(seed: int = 0, mix: dict | None = None) -> Iterator[Example]:
    """An endless stream of training problems (never a held-out one)."""
    rng = random.Random(seed)
    mix = mix or MIX
    names, weights = list(mix), list(mix.values())
    while True:
        task = rng.choices(names, weights=weights)[0]
        ex = GENERATORS[task](rng, _lang(rng))
        if task == "chat" or not is_heldout(ex.key):
            yield ex


def heldout_examples(task: str, n: int, seed: int = 1234, lang: str | None = None) -> list[Example]:
    """n fixed held-out problems of one task (distinct keys), the same for every call with the same seed."""
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS}, got {task!r}")
    rng = random.Random(f"{seed}:{task}")
    out, seen = [], set()
    for _ in range(200 * n):
        ex = GENERATORS[task](rng, lang or _lang(rng))
        if is_heldout(ex.key) and ex.key not in seen:
            seen.add(ex.key)
            out.append(ex)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct held-out problems for {task!r}")


def corpus_texts(n: int = 4000, seed: int = 7) -> list[str]:
    """Text for training the tokenizer: questions, traces and answers of every task and language."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        task = list(GENERATORS)[i % len(GENERATORS)]
        ex = GENERATORS[task](rng, LANGS[(i // len(GENERATORS)) % len(LANGS)])
        texts.append(f"{ex.question}\n{ex.trace}\n{ex.answer}")
    for intents in _CHAT.values():
        for questions, answer, trace in intents.values():
            texts.extend(questions + [answer, trace])
    from ..tokenizer_build import DEFAULT_CORPUS  # general text in the three languages, for coverage
    return texts + list(DEFAULT_CORPUS)


# ---- scoring -------------------------------------------------------------------------------
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def score(example: Example, answer_text: str) -> bool:
    """True when the answer (the text after the thinking block) matches the key."""
    text = answer_text.split("</think>")[-1].replace("[|endofturn|]", "").strip()
    if example.task == "sort":
        return [int(x) for x in re.findall(r"-?\d+", text)] == [int(x) for x in example.expected.split(", ")]
    if example.task == "chat":
        return example.expected in text
    nums = _NUM.findall(text)
    return bool(nums) and nums[-1] == example.expected


# ---- rendering -----------------------------------------------------------------------------
def render(example: Example, tokenizer, thinking: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the chat-template prompt of the mode plus the assistant text; labels
    are IGNORE on the prompt, so the loss falls on assistant tokens only."""
    prompt = tokenizer.apply_chat_template(example.messages(), add_generation_prompt=True,
                                           enable_thinking=thinking, tokenize=True)
    completion = tokenizer.encode(example.completion(thinking))
    return prompt + completion, [IGNORE] * len(prompt) + completion


def prompt_ids(example: Example, tokenizer, thinking: bool) -> list[int]:
    return tokenizer.apply_chat_template(example.messages(), add_generation_prompt=True,
                                         enable_thinking=thinking, tokenize=True)
