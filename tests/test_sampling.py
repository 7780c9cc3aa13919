import math

import pytest
import torch

from exaone.sampling import (
    Sampler, SamplingError, SamplingParams, StopMatcher, sample_batch,
)

# ---- validation ----

BAD = [
    ("max_tokens", 0, ">= 1"), ("max_tokens", 1.5, ">= 1"), ("max_tokens", True, ">= 1"),
    ("temperature", 3.0, "[0, 2]"), ("temperature", -0.1, "[0, 2]"), ("temperature", float("nan"), "[0, 2]"),
    ("temperature", "0.7", "[0, 2]"), ("temperature", True, "[0, 2]"),
    ("top_k", -2, ">= 1"), ("top_k", 2.0, ">= 1"), ("top_k", "5", ">= 1"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.01, "(0, 1]"), ("top_p", float("inf"), "(0, 1]"),
    ("min_p", -0.1, "[0, 1]"), ("min_p", 1.5, "[0, 1]"),
    ("presence_penalty", 2.5, "[-2, 2]"), ("presence_penalty", -3, "[-2, 2]"),
    ("frequency_penalty", 2.01, "[-2, 2]"), ("frequency_penalty", None, "[-2, 2]"),
    ("repetition_penalty", 0.0, "(0, 2]"), ("repetition_penalty", 2.5, "(0, 2]"),
    ("seed", "42", "integer"), ("seed", 1.0, "integer"),
    ("stop", [""], "non-empty"), ("stop", ["s"] * 17, "16"), ("stop", [1], "strings"),
    ("stop_token_ids", [-1], ">= 0"), ("stop_token_ids", ["a"], ">= 0"),
    ("ignore_eos", 1, "true or false"), ("logprobs", "yes", "true or false"),
    ("enable_thinking", None, "true or false"),
    ("top_logprobs", 21, "[0, 20]"), ("top_logprobs", -1, "[0, 20]"),
    ("n", 0, "[1, 16]"), ("n", 17, "[1, 16]"),
    ("thinking_budget", -1, ">= 0"), ("thinking_budget", 1.5, ">= 0"),
]


@pytest.mark.parametrize("name,value,allowed", BAD)
def test_validation_rejects(name, value, allowed):
    kwargs = {name: value}
    if name == "top_logprobs":
        kwargs["logprobs"] = True
    with pytest.raises(SamplingError) as ei:
        SamplingParams(**kwargs)
    assert ei.value.param == name
    assert allowed in str(ei.value) and name in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_validation_message_exact():
    with pytest.raises(SamplingError, match=r"^temperature must be in \[0, 2\], got 3.0$"):
        SamplingParams(temperature=3.0)


def test_top_logprobs_requires_logprobs():
    with pytest.raises(SamplingError) as ei:
        SamplingParams(top_logprobs=5)
    assert ei.value.param == "top_logprobs"


def test_valid_and_normalised():
    p = SamplingParams(temperature=0, top_k=-1, stop="###", stop_token_ids=[5, 6], seed=0,
                       thinking_budget=0, logprobs=True, top_logprobs=20, n=16)
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6)
    assert isinstance(p.temperature, float) and p.greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    hash(p)  # frozen and hashable


# ---- sampling ----

def _logits(seed=0, vocab=50):
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed))


def _support(params, logits, draws=400):
    s = Sampler(params)
    return {s.sample(logits, [], []).token_id for _ in range(draws)}


def test_greedy_is_argmax_regardless_of_filters():
    for i in range(5):
        x = _logits(i)
        for p in (SamplingParams(temperature=0), SamplingParams(temperature=0, top_p=0.01, top_k=3, min_p=0.9)):
            assert Sampler(p).sample(x, [], []).token_id == int(torch.argmax(x))


def test_top_k_restricts_support():
    x = _logits(1)
    got = _support(SamplingParams(temperature=2.0, top_k=3, seed=1), x)
    assert got <= set(torch.topk(x, 3).indices.tolist()) and len(got) == 3


def test_top_p_restricts_support():
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert _support(SamplingParams(top_p=0.8, seed=2), x) == {0, 1}
    assert _support(SamplingParams(top_p=0.5, seed=2), x) == {0}
    assert _support(SamplingParams(top_p=0.81, seed=2), x) == {0, 1, 2}


def test_min_p_restricts_support():
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert _support(SamplingParams(min_p=0.5, seed=3), x) == {0, 1}    # 0.15 < 0.25
    assert _support(SamplingParams(min_p=0.0, seed=3), x) == {0, 1, 2, 3}


def test_repetition_penalty_hand_example():
    x = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0))
    out = s.process(x, prompt_ids=[0, 1], output_ids=[3, 3])
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0, -2.0, 0.5]))
    torch.testing.assert_close(x, torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5]))  # input untouched


def test_frequency_presence_over_output_only():
    x = torch.zeros(4)
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=1.0))
    out = s.process(x, prompt_ids=[0, 0, 0], output_ids=[1, 1, 1, 2])
    torch.testing.assert_close(out, torch.tensor([0.0, -2.5, -1.5, 0.0]))


def test_penalty_changes_greedy_choice_and_tensor_ids():
    x = torch.tensor([3.0, 2.9, 0.0])
    s = Sampler(SamplingParams(temperature=0, presence_penalty=1.0))
    assert s.sample(x, torch.tensor([1]), torch.tensor([0])).token_id == 1
    assert s.sample(x, [], []).token_id == 0


def test_seeded_reproducibility():
    seq = [_logits(i) for i in range(30)]
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    s1, s2 = Sampler(p), Sampler(p)
    r1 = [s1.sample(x, [], []).token_id for x in seq]
    r2 = [s2.sample(x, [], []).token_id for x in seq]
    assert r1 == r2
    s3 = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=99))
    assert [s3.sample(x, [], []).token_id for x in seq] != r1


def test_unseeded_samplers_differ():
    x = torch.zeros(1000)
    p = SamplingParams()
    assert Sampler(p).seed != Sampler(p).seed
    a = [Sampler(p).sample(x, [], []).token_id for _ in range(5)]
    assert len(set(a)) > 1


def test_logprobs_are_raw_log_softmax():
    x = _logits(5)
    p = SamplingParams(temperature=0.5, top_k=2, presence_penalty=2.0, logprobs=True, top_logprobs=5, seed=0)
    r = Sampler(p).sample(x, [0, 1], [int(torch.argmax(x))])
    lp = torch.log_softmax(x, -1)
    assert math.isclose(r.logprob, float(lp[r.token_id]), rel_tol=1e-6)
    vals, idx = torch.topk(lp, 5)
    assert [t for t, _ in r.top_logprobs] == idx.tolist()
    assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), b in zip(r.top_logprobs, vals.tolist()))
    assert Sampler(SamplingParams(logprobs=True)).sample(x).top_logprobs == []


def test_no_logprobs_by_default():
    r = Sampler(SamplingParams(seed=0)).sample(_logits(0))
    assert r.logprob is None and r.top_logprobs is None


def test_sample_batch_fast_and_slow_paths_agree():
    x = torch.stack([_logits(i) for i in range(4)])
    greedy = [Sampler(SamplingParams(temperature=0)) for _ in range(4)]
    assert all(s.fast_greedy for s in greedy)
    fast = sample_batch(x, greedy, [[]] * 4, [[]] * 4)
    assert [r.token_id for r in fast] == torch.argmax(x, -1).tolist()
    mixed = greedy[:3] + [Sampler(SamplingParams(temperature=0, logprobs=True))]
    slow = sample_batch(x, mixed, [[]] * 4, [[]] * 4)
    assert [r.token_id for r in slow] == [r.token_id for r in fast]
    assert slow[3].logprob is not None and slow[0].logprob is None
    seeded = [Sampler(SamplingParams(seed=7)) for _ in range(4)]
    one = [Sampler(SamplingParams(seed=7)).sample(x[i]).token_id for i in range(4)]
    assert [r.token_id for r in sample_batch(x, seeded, [[]] * 4, [[]] * 4)] == one


def test_sample_batch_shape_check():
    with pytest.raises(ValueError):
        sample_batch(torch.zeros(2, 5), [Sampler(SamplingParams())], [[]], [[]])


# ---- stop strings ----

def _run(stops, deltas):
    m = StopMatcher(stops)
    out, stopped = [], False
    for d in deltas:
        e, stopped = m.feed(d)
        out.append(e)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped, m


def test_stop_matcher_split_across_deltas():
    text, stopped, m = _run(["###"], ["Hello #", "#", "# world"])
    assert (text, stopped, m.matched) == ("Hello ", True, "###")


def test_stop_matcher_char_by_char_and_holdback():
    s = "안녕하세요 END 더"
    text, stopped, _ = _run(["END"], list(s))
    assert (text, stopped) == ("안녕하세요 ", True)
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)   # "E" could start END: held
    assert m.feed("x") == ("Ex", False)         # it did not
    assert m.feed("EN") == ("", False)
    assert m.flush() == "EN"


def test_stop_matcher_no_match_and_earliest_wins():
    text, stopped, _ = _run(["zz"], ["a", "z", "b", "z"])
    assert (text, stopped) == ("azbz", False)
    text, stopped, m = _run(["world", "lo w"], ["hello world"])
    assert (text, stopped, m.matched) == ("hel", True, "lo w")
    assert StopMatcher([]).feed("abc") == ("abc", False)
    m = StopMatcher(["x"])
    assert m.feed("axb") == ("a", True) and m.feed("more") == ("", True) and m.flush() == ""
