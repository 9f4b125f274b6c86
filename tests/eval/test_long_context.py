"""lcjax.eval.long_context: determinism, token-length fit, needle depth, answers in the input, scoring, bad inputs."""

import collections
import re

import pytest

from lcjax.data import ByteTokenizer
from lcjax.eval import long_context as lc

TOK = ByteTokenizer()
CWE = dict(freq_cw=4, freq_ucw=1)  # the RULER default (30 repeats of 10 words) does not fit in 1-2K bytes
# (task, kwargs, lengths the task fits at in byte tokens)
CASES = [
    ("niah_single", {}, (500, 1000, 2000)),
    ("niah_single_1", {}, (500, 1000, 2000)),
    ("niah_single_3", {}, (500, 1000, 2000)),
    ("niah_multikey", {}, (1000, 2000)),
    ("niah_multivalue", dict(value_type="word"), (1000, 2000)),
    ("niah_multiquery", dict(value_type="uuid"), (1000, 2000)),
    ("passkey", {}, (500, 1000, 2000)),
    ("variable_tracking", {}, (500, 1000, 2000)),
    ("common_words", CWE, (1000, 2000)),
    ("frequent_words", {}, (500, 1000, 2000)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("task, kw, lengths", CASES, ids=IDS)
def test_same_seed_same_bytes(task, kw, lengths):
    a = lc.make_sample(task, tokenizer=TOK, target_length=lengths[0], depth=0.4, seed=3, **kw)
    b = lc.make_sample(task, tokenizer=TOK, target_length=lengths[0], depth=0.4, seed=3, **kw)
    c = lc.make_sample(task, tokenizer=TOK, target_length=lengths[0], depth=0.4, seed=4, **kw)
    assert a.input.encode() == b.input.encode() and a == b
    assert c.input != a.input and c.answers != a.answers


@pytest.mark.parametrize("task, kw, lengths", CASES, ids=IDS)
def test_length_within_one_percent(task, kw, lengths):
    for length in lengths:
        s = lc.make_sample(task, tokenizer=TOK, target_length=length, depth=0.5, seed=0, **kw)
        assert s.n_tokens == len(TOK.encode(s.input, add_bos=False, add_eos=False))
        assert abs(s.n_tokens - length) <= 0.01 * length, (length, s.n_tokens)
        assert s.task == task and s.target_length == length


class WordTokenizer:
    """A tokenizer with only ``encode(text)`` (no add_bos/add_eos): whitespace-separated words."""

    def encode(self, text):
        return text.split()


@pytest.mark.parametrize("task", ["niah_single", "variable_tracking", "frequent_words"])
def test_any_tokenizer_with_encode(task):
    s = lc.make_sample(task, tokenizer=WordTokenizer(), target_length=1000, seed=1)
    assert abs(len(s.input.split()) - 1000) <= 10


@pytest.mark.parametrize("task", ["niah_single", "niah_single_1", "passkey"])
@pytest.mark.parametrize("length", [1000, 2000])
def test_needle_at_depth(task, length):
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        s = lc.make_sample(task, tokenizer=TOK, target_length=length, depth=depth, seed=2)
        n0, n1 = s.needle_token_span
        needle = TOK.decode(TOK.encode(s.input, add_bos=False, add_eos=False)[n0:n1])
        assert s.answers[0] in needle and needle.endswith(".")
        assert abs(s.measured_depth - depth) <= 0.03, (depth, s.measured_depth)


def test_needles_and_answers_in_input():
    for task, kw in [("niah_single", dict(value_type="word")), ("niah_multikey", dict(key_type="uuid")),
                     ("niah_multivalue", {}), ("niah_multiquery", dict(value_type="word"))]:  # fmt: skip
        for seed in range(3):
            s = lc.make_sample(task, tokenizer=TOK, target_length=1500, seed=seed, **kw)
            assert all(s.input.count(a) == 1 for a in s.answers), (task, s.answers)
            assert s.input.count("One of the special magic") == 4 if task != "niah_single" else 1
            assert len(s.answers) == (4 if task in ("niah_multivalue", "niah_multiquery") else 1)
    s = lc.make_sample("passkey", tokenizer=TOK, target_length=800, seed=5)
    assert s.input.count(s.answers[0]) == 2 and re.fullmatch(r"\d{5}", s.answers[0])  # the needle says it twice
    s = lc.make_sample("variable_tracking", tokenizer=TOK, target_length=800, seed=5)
    assert len(s.answers) == 5 and all(f"VAR {v} = " in s.input for v in s.answers)
    chain = re.findall(r"VAR ([A-Z]{5}) = ([A-Z]{5}|\d{5})\.", s.input)
    assert [c[0] for c in chain] == list(s.answers) and chain[0][1] + " in the text above" in s.input


def test_word_lists_have_the_said_frequencies():
    s = lc.make_sample("common_words", tokenizer=TOK, target_length=1500, seed=1, **CWE)
    counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", s.input))
    assert all(counts[w] == 4 for w in s.answers) and len(s.answers) == 10
    assert max(c for w, c in counts.items() if w not in s.answers) < 4
    s = lc.make_sample("frequent_words", tokenizer=TOK, target_length=1500, seed=1)
    counts = collections.Counter(s.input.split("coded words. ")[1].split("\nQuestion")[0].split())
    top = [w for w, _ in counts.most_common() if w != "..."][:4]
    assert tuple(top[:3]) == s.answers and counts[top[2]] > counts[top[3]]


def test_make_samples_grid():
    grid = lc.make_samples("niah_single", tokenizer=TOK, lengths=(600, 900), depths=(0.0, 1.0), n_per_cell=2)
    assert [(s.target_length, s.depth) for s in grid] == [(600, 0.0)] * 2 + [(600, 1.0)] * 2 + [(900, 0.0)] * 2 + [
        (900, 1.0)] * 2  # fmt: skip
    assert len({s.seed for s in grid}) == 8


def test_scoring():
    assert lc.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert lc.string_match_all("Only 123 here", ["123", "456"]) == 0.5
    assert lc.string_match_all("none", ["123", "456"]) == 0.0
    assert lc.string_match_all("APPLE-pie", ["apple-PIE"]) == 1.0  # case-insensitive
    assert lc.string_match_part("Only 123 here", ["123", "456"]) == 1.0
    assert lc.string_match_part("nothing", ["123", "456"]) == 0.0
    s = lc.make_sample("niah_multivalue", tokenizer=TOK, target_length=1200, seed=0)
    assert lc.score(s, " ".join(s.answers[:3])) == 0.75
    with pytest.raises(ValueError, match="answers"):
        lc.string_match_all("x", [])


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=-0.1), "depth"),
    (dict(depth=1.5), "depth"),
    (dict(target_length=40), "target_length=40 is too small"),
    (dict(target_length=0), "target_length"),
    (dict(task="needle_in_a_barn"), "task"),
    (dict(value_type="color"), "value_type"),
    (dict(haystack="novel"), "haystack"),
    (dict(num_keys=2, num_queries=3), "num_queries"),
    (dict(seed=-1), "seed"),
])  # fmt: skip
def test_bad_inputs_raise_value_error(kwargs, match):
    kw = dict(task="niah_single", tokenizer=TOK, target_length=1000, depth=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        lc.make_sample(kw.pop("task"), **kw)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="depth"):
        lc.make_sample("passkey", tokenizer=TOK, target_length=500, depth="half")
    with pytest.raises(TypeError, match="target_length"):
        lc.make_sample("passkey", tokenizer=TOK, target_length=500.0)
    with pytest.raises(ValueError, match="tokenizer"):
        lc.make_sample("passkey", tokenizer=object(), target_length=500)
    with pytest.raises(ValueError, match="target_length=500 is too small for task 'common_words'"):
        lc.make_sample("common_words", tokenizer=TOK, target_length=500)  # 300 RULER entries do not fit


@pytest.mark.parametrize("preset", sorted(lc.RULER_PRESETS))
def test_ruler_presets_build(preset):
    length = 6000 if preset == "cwe" else 1500
    s = lc.make_sample(preset, tokenizer=TOK, target_length=length, depth=0.5, seed=0)
    assert abs(s.n_tokens - length) <= 0.01 * length and s.task == preset and s.answers


def test_offline_word_list_without_wonderwords(monkeypatch):
    lc.word_list.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "wonderwords", None)  # import fails -> essay words
    try:
        words = lc.word_list()
        assert len(words) > 500 and all(re.fullmatch(r"[a-z]{3,12}", w) for w in words)
        s = lc.make_sample("niah_single", tokenizer=TOK, target_length=800, value_type="word", seed=0)
        assert s.input.count(s.answers[0]) == 1
    finally:
        lc.word_list.cache_clear()
