import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from exaone.detokenizer import StreamingDetokenizer

CORPUS = [
    "안녕하세요, 저는 EXAONE입니다. 오늘 서울의 날씨는 맑습니다.",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "한국어와 English를 섞어서 씁니다 😀 👍🏽 🇰🇷",
    "대한민국의 수도는 서울이고, 부산은 두 번째로 큰 도시입니다.",
]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator(CORPUS, trainer)
    return t


def run(tok, ids, prompt_tail=()):
    decode = lambda xs: tok.decode(xs)  # noqa: E731
    d = StreamingDetokenizer(decode, prompt_tail)
    deltas = [d.add(i) for i in ids]
    deltas.append(d.flush())
    return deltas, d


TEXTS = [
    "안녕하세요 서울",
    "이모지 😀👍🏽🇰🇷 끝",
    "Mixed 한국어 and English, 숫자 123 그리고 😀!",
    "처음 보는 글자: 뷁 똠방각하 🦄",  # syllables the tiny vocab never merged
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_decode_and_never_break_chars(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    # the point of the test: single tokens are partial characters
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, d = run(tok, ids)
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    assert d.output_ids == ids


def test_window_stays_small(tok):
    text = " ".join(TEXTS) * 10
    ids = tok.encode(text).ids
    calls = []

    def decode(xs):
        calls.append(len(xs))
        return tok.decode(xs)

    d = StreamingDetokenizer(decode)
    out = "".join(d.add(i) for i in ids) + d.flush()
    assert out == text
    assert max(calls) <= 8  # decodes a small window, never the whole output


def test_prompt_tail_is_context_only(tok):
    prompt = tok.encode("프롬프트 끝 ").ids
    ids = tok.encode("답변 😀 end").ids
    deltas, _ = run(tok, ids, prompt_tail=prompt[-4:])
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in x for x in deltas)


def test_cut_mid_character_flushes_remainder(tok):
    ids = tok.encode("가😀").ids
    cut = ids[:-1]  # the emoji's last byte token is missing
    deltas, _ = run(tok, cut)
    assert "".join(deltas) == tok.decode(cut)
    assert all("\ufffd" not in x for x in deltas[:-1]) and deltas[-1].endswith("\ufffd")
    _, d = run(tok, [])
    assert d.flush() == ""
