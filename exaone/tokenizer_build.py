"""Build a small EXAONE-4.0-shaped byte-level BPE tokenizer for tests and tiny models.

`build_tokenizer()` trains a byte-level BPE with the HF `tokenizers` library (every byte is in the
initial alphabet, so no text is ever unknown), puts the EXAONE 4.0 special tokens at ids 0..16 in the
published order, and can write an HF checkpoint folder (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`) that `transformers.AutoTokenizer` and `exaone.load_tokenizer` both load.

It must not pretend to be the real EXAONE vocabulary (102400 tokens): it exists so that the tokenizer,
chat template, engine and server can be tested offline. It is deterministic for a given corpus.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Order fixes the ids (0..16), as in the published vocabulary.
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]",
                  "[|system|]", "[|user|]", "[|assistant|]", "[|tool|]", "[|endofturn|]"]
# Added but not special: decode(skip_special_tokens=True) keeps them, because the reasoning and
# tool-call parsers read them in the decoded text.
MARKUP_TOKENS = ["<think>", "</think>", "<tool>", "</tool>",
                 "<tool_call>", "</tool_call>", "<tool_result>", "</tool_result>"]
ADDED_TOKENS = SPECIAL_TOKENS + MARKUP_TOKENS

MODEL_MAX_LENGTH = 65536
CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

# A few KB of English, Korean and Spanish, so merges cover all three scripts. Fixed text -> fixed vocab.
_EN = """The quick brown fox jumps over the lazy dog.
EXAONE is a family of large language models that reason step by step before they answer.
What is the weather like in Seoul today? It is sunny and warm, about twenty-one degrees.
Please write a short poem about the sea, the wind and the mountains.
Which number is bigger, 9.11 or 9.9? Let me think about the decimal places carefully.
The function returns a list of integers; each integer is the id of one token.
Tools let the assistant call functions such as get_weather or search the web for recent news.
I would like to book a table for two people at seven o'clock tomorrow evening.
Machine learning models learn patterns from data and make predictions on new inputs.
Thank you very much for your help! Have a wonderful day.
"""
_KO = """안녕하세요. 저는 LG AI연구원에서 만든 엑사원입니다.
오늘 서울의 날씨는 맑음, 기온은 21°C입니다. 내일은 비가 올 수도 있습니다.
한국어와 영어, 스페인어를 모두 이해하고 대답할 수 있습니다.
9.11과 9.9 중에서 어느 것이 더 큰가요? 소수점 자리를 차근차근 비교해 봅시다.
바다와 바람과 산에 대한 짧은 시를 써 주세요.
도구를 사용하면 날씨를 확인하거나 최신 뉴스를 검색할 수 있습니다.
감사합니다! 좋은 하루 보내세요.
대한민국의 수도는 서울이고, 부산은 두 번째로 큰 도시입니다.
"""
_ES = """Hola, ¿cómo estás? Estoy muy bien, gracias por preguntar.
¿Qué tiempo hace hoy en Madrid? Hace sol y la temperatura es de veinte grados.
El modelo piensa paso a paso antes de responder a la pregunta del usuario.
Por favor, escribe un poema corto sobre el mar, el viento y las montañas.
Me gustaría reservar una mesa para dos personas mañana a las siete de la tarde.
España, Señor, niño, corazón, educación, información, pingüino, acción.
"""
_CODE = """def get_weather(city: str) -> dict:
    return {"city": city, "forecast": "sunny", "temperature": 21}

{"name": "get_weather", "arguments": {"city": "Seoul"}}
{"result": "맑음, 21°C"}
for i in range(10):
    print(i * 2 + 1)
"""
DEFAULT_CORPUS = [_EN, _KO, _ES, _CODE]


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 2048,
                    out_dir: str | os.PathLike | None = None, individual_digits: bool = False):
    """Train the tokenizer on `texts` (default: the built-in corpus) and return an `exaone.Tokenizer`.

    With `out_dir`, also write an HF checkpoint folder there. `individual_digits=True` splits every
    digit into its own token (small models learn arithmetic digit by digit).
    """
    from .tokenizer import Tokenizer  # local import: tokenizer.py imports this module's constants

    backend = train_backend(texts, vocab_size, individual_digits=individual_digits)
    chat_template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    if out_dir is not None:
        save_checkpoint(backend, out_dir, chat_template)
    return Tokenizer(backend, special_tokens=default_special_tokens(), chat_template=chat_template,
                     model_max_length=MODEL_MAX_LENGTH)


def train_backend(texts: Iterable[str] | None = None, vocab_size: int = 2048,
                  individual_digits: bool = False) -> Tokenizer:
    """Train and return the raw `tokenizers.Tokenizer` (added tokens at ids 0..16)."""
    texts = list(DEFAULT_CORPUS if texts is None else texts)
    backend = Tokenizer(models.BPE())  # no unk_token: the byte alphabet covers every input
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if individual_digits:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ADDED_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # The trainer marks every token in `special_tokens` special; un-mark the markup tokens by editing
    # the serialized form, the one place where `tokenizers` lets that flag change.
    data = json.loads(backend.to_str())
    for entry in data["added_tokens"]:
        entry["special"] = entry["content"] in SPECIAL_TOKENS
        entry["normalized"] = False
    backend = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for i, token in enumerate(ADDED_TOKENS):
        assert backend.token_to_id(token) == i, (token, backend.token_to_id(token))
    return backend


def default_special_tokens() -> dict:
    """The named special tokens of EXAONE 4.0 (eos is the end-of-turn marker, as in the checkpoints)."""
    return {"bos_token": "[BOS]", "eos_token": "[|endofturn|]", "pad_token": "[PAD]", "unk_token": "[UNK]"}


def save_checkpoint(backend: Tokenizer, out_dir: str | os.PathLike, chat_template: str) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json as a real checkpoint has them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    named = default_special_tokens()
    added_tokens_decoder = {
        str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": tok in SPECIAL_TOKENS}
        for i, tok in enumerate(ADDED_TOKENS)
    }
    # The role markers are special beyond the named four; listing them makes transformers'
    # `all_special_ids` agree with ours.
    additional = [t for t in SPECIAL_TOKENS if t not in named.values()]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": additional,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_tokens_decoder,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    special_map = {**named, "additional_special_tokens": additional}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, ensure_ascii=False, indent=2),
                                                 encoding="utf-8")
    return out
