"""RULER-style synthetic long-context tasks, built offline and deterministically to a target length in tokens.

Written from the task definitions of "RULER: What's the Real Context Size of Your Long-Context Language Models?"
(Hsieh et al. 2024, arXiv 2404.06654, §3 and App. B; templates as in NVIDIA/RULER ``scripts/data/synthetic/*.py``
and ``constants.py``), plus the text-level passkey of "Landmark Attention" (Mohtashami & Jaggi 2023, §4.2).

Tasks (``TASKS``): ``niah_single``, ``niah_multikey`` (distractor needles with other keys), ``niah_multivalue`` (one
key, several values, all to be returned), ``niah_multiquery`` (several keys asked at once), ``passkey``,
``variable_tracking`` (a chain ``VAR A = 12345 ... VAR B = A``; return every name bound to the value),
``common_words`` (a numbered word list; return the ``num_cw`` words repeated most) and ``frequent_words`` (Zipf
coded words; return the three most frequent, rank 0 being the ``...`` noise). ``RULER_PRESETS`` maps RULER's
configuration names (``niah_single_1`` ...) to a task and its arguments.

Every sample is built to ``target_length`` tokens of the given tokenizer (anything with ``encode(text) -> ids``;
special tokens are not counted when ``encode`` takes ``add_bos``/``add_eos``) by a bisection over the amount of
filler (haystack characters, list entries), then checked to be within 1% of the target (``ValueError`` if it cannot
be: the target is too small for the prompt and needles). A needle goes at the haystack's sentence boundary nearest its
depth fraction when one lies within 2% of the haystack, else at the nearest word boundary; the first (asked) needle at
``depth``, the others at depths drawn from the seeded generator. Everything random comes from
``numpy.random.default_rng(seed)``: same seed, same bytes (for one CPython version: ``essay`` text comes with it).

Haystacks: ``"essay"`` is prose paragraphs of CPython's own documentation (``pydoc_data.topics``, shipped with every
CPython; RULER uses Paul Graham essays, not available offline), ``"repeat"`` is the Landmark/RULER noise
"The grass is green. The sky is blue. ..." (both repeated cyclically as far as a length needs). Word lists come
from ``wonderwords`` (RULER's own source of words) when it is installed, else from the words of the essay text.
RULER's "needle haystack" (MK-NIAH 2/3) is not built here.

Scoring is RULER's: ``string_match_all`` (fraction of answers contained in the prediction, case-insensitive) for all
synthetic tasks, ``string_match_part`` (1 if any answer is contained) for its QA tasks.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lcjax.checks import require, require_choice, require_float, require_int

REPEAT_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("essay", "repeat")
VALUE_TYPES = ("number", "word", "uuid")
FIT_TOLERANCE = 0.01  # relative token-length tolerance of every sample
SENTENCE_SNAP = 0.02  # a needle moves to the nearest sentence boundary within this fraction of the haystack


@dataclass(frozen=True)
class Sample:
    """One prompt: ``input`` (ending with RULER's answer prefix) and the ``answers`` a prediction must contain.

    ``n_tokens`` is the input's length in tokens (within 1% of ``target_length``). ``needle_token_span`` is the
    ``[start, end)`` token range of the first (asked) needle in ``input``, ``context_token_span`` that of the haystack
    with its needles; ``None`` for the list tasks. ``max_new_tokens`` is RULER's generation budget.
    """

    task: str
    input: str
    answers: tuple[str, ...]
    target_length: int
    depth: float | None
    n_tokens: int
    seed: int
    needle_token_span: tuple[int, int] | None = None
    context_token_span: tuple[int, int] | None = None
    max_new_tokens: int = 128

    @property
    def measured_depth(self) -> float | None:
        """Fraction of the context's tokens (less the asked needle's) that precede the asked needle."""
        if self.needle_token_span is None or self.context_token_span is None:
            return None
        (n0, n1), (c0, c1) = self.needle_token_span, self.context_token_span
        return (n0 - c0) / max(1, (c1 - c0) - (n1 - n0))


# ---- scoring (RULER scripts/eval/synthetic/constants.py) -------------------------------------------------------


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` contained in ``prediction`` (case-insensitive): RULER's metric for synthetic tasks."""
    require(len(answers) > 0, "string_match_all: answers must not be empty")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` is contained in ``prediction`` (case-insensitive), else 0.0: RULER's QA metric."""
    require(len(answers) > 0, "string_match_part: answers must not be empty")
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


def score(sample: Sample, prediction: str) -> float:
    """The sample's score under RULER's metric for its task (``string_match_all`` for every task here)."""
    return string_match_all(prediction, sample.answers)


# ---- offline text -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def essay_text() -> str:
    """Prose paragraphs of CPython's ``pydoc_data.topics`` (headings, code and indented blocks dropped), one string."""
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if not para or para[0].isspace() or re.search(r"^[*=\-]{3,}$|>>>|::$", para, re.M):
                continue
            text = " ".join(para.split())
            if text.endswith(".") and len(text) > 80:
                paras.append(text)
    return " ".join(paras)


@functools.lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Sorted unique lowercase words: wonderwords' nouns, adjectives and verbs (as RULER), else the essay's words."""
    try:
        from wonderwords import random_word

        words = [w for f in ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
                 for w in random_word._get_words_from_text_file(f)]  # fmt: skip
    except ImportError:  # offline fallback
        words = re.findall(r"\b[a-z]{3,12}\b", essay_text())
    return tuple(sorted({w.lower() for w in words if re.fullmatch(r"[a-z]{3,12}", w.lower())}))


def _haystack(kind: str, n_chars: int) -> str:
    base = essay_text() if kind == "essay" else REPEAT_TEXT
    reps = n_chars // (len(base) + 1) + 1
    return " ".join([base] * reps)[:n_chars]


# ---- tokens and fitting ---------------------------------------------------------------------------------------------


def _count(tokenizer: Any, text: str) -> int:
    try:
        return len(tokenizer.encode(text, add_bos=False, add_eos=False))
    except TypeError:
        return len(tokenizer.encode(text))


def _fit(build: Callable[[int], str], tokenizer: Any, target: int, what: str,
         n_max: int | None = None) -> tuple[int, str, int]:  # fmt: skip
    """The ``n`` in ``[0, n_max]`` (amount of filler) whose ``build(n)`` has the token count closest to ``target``."""
    n0 = _count(tokenizer, build(0))
    require(n0 <= target * (1 + FIT_TOLERANCE),
            f"target_length={target} is too small for {what}: the prompt and needles alone take {n0} "
            "tokens")  # fmt: skip
    hi = max(8, target) if n_max is None else min(max(8, target), n_max)
    while _count(tokenizer, build(hi)) < target and (n_max is None or hi < n_max):  # then: not enough filler
        hi = hi * 2 if n_max is None else min(hi * 2, n_max)
        require(hi < 1 << 26, f"target_length={target}: the filler does not grow the prompt ({what})")
    lo = 0  # invariant: count(build(lo)) < target <= count(build(hi)) (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _count(tokenizer, build(mid)) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda n: abs(_count(tokenizer, build(n)) - target))
    text = build(best)
    count = _count(tokenizer, text)
    require(abs(count - target) <= FIT_TOLERANCE * target,
            f"target_length={target}: could not fit {what} within 1% (closest: {count} tokens)")  # fmt: skip
    return best, text, count


def _insert(hay: str, needles: Sequence[str], depths: Sequence[float]) -> tuple[str, list[int]]:
    """``hay`` with each needle inserted at a sentence (else word) boundary near its depth; the needles' char starts."""
    n = len(hay)
    sentence = np.array([0] + [m.end() for m in re.finditer(r"[.!?] ", hay)] + [n])
    word = np.array([0] + [m.end() for m in re.finditer(r" ", hay)] + [n])
    cuts = []
    for d in depths:
        t = d * n
        s = sentence[np.argmin(np.abs(sentence - t))]
        cuts.append(int(s if abs(s - t) <= SENTENCE_SNAP * n else word[np.argmin(np.abs(word - t))]))
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    out, starts, prev = [], [0] * len(needles), 0
    pos = 0
    for i in order:
        piece = hay[prev:cuts[i]].strip()
        if piece:
            out.append(piece)
            pos += len(piece) + 1
        starts[i] = pos
        out.append(needles[i])
        pos += len(needles[i]) + 1
        prev = cuts[i]
    tail = hay[prev:].strip()
    if tail:
        out.append(tail)
    return " ".join(out), starts


def _context_sample(task, tokenizer, target, depth, seed, *, prefix, suffix, needles, depths, haystack, answers,
                    max_new_tokens) -> Sample:  # fmt: skip
    """Fit a haystack of ``haystack`` text holding ``needles`` between ``prefix`` and ``suffix`` to ``target``."""

    def build(n):
        return prefix + _insert(_haystack(haystack, n), needles, depths)[0] + suffix

    n, text, count = _fit(build, tokenizer, target, f"task {task!r}")
    context, starts = _insert(_haystack(haystack, n), needles, depths)
    start = _count(tokenizer, prefix)
    return Sample(task=task, input=text, answers=tuple(answers), target_length=target, depth=depth, n_tokens=count,
                  seed=seed, needle_token_span=(_count(tokenizer, prefix + context[:starts[0]]),
                                                _count(tokenizer, prefix + context[:starts[0] + len(needles[0])])),
                  context_token_span=(start, _count(tokenizer, prefix + context)), max_new_tokens=max_new_tokens)


# ---- needles --------------------------------------------------------------------------------------------------------


def _draw(rng: np.random.Generator, kind: str) -> str:
    if kind == "number":
        return str(int(rng.integers(1_000_000, 10_000_000)))  # RULER: 7-digit numbers
    if kind == "word":
        words = word_list()
        return f"{words[rng.integers(len(words))]}-{words[rng.integers(len(words))]}"
    h = rng.bytes(16).hex()  # a version-4-shaped UUID from the seeded generator (never uuid.uuid4)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:32]}"


def _draw_distinct(rng: np.random.Generator, kind: str, k: int, avoid: Sequence[str], haystack: str) -> list[str]:
    """``k`` values of ``kind``, none a substring of another, of ``avoid`` or of the haystack source text."""
    hay = essay_text() if haystack == "essay" else REPEAT_TEXT
    out: list[str] = []
    while len(out) < k:
        v = _draw(rng, kind)
        if v not in hay and not any(v in o or o in v for o in [*out, *avoid]):
            out.append(v)
    return out


def _niah(task, tokenizer, target, depth, seed, *, haystack="essay", key_type="word", value_type="number",
          num_keys=1, num_values=1, num_queries=1) -> Sample:  # fmt: skip
    require_choice("haystack", haystack, HAYSTACKS)
    require_choice("key_type", key_type, VALUE_TYPES)
    require_choice("value_type", value_type, VALUE_TYPES)
    num_keys = require_int("num_keys", num_keys, min=1)
    num_values = require_int("num_values", num_values, min=1)
    num_queries = require_int("num_queries", num_queries, min=1, max=num_keys)
    rng = np.random.default_rng(seed)
    keys = _draw_distinct(rng, key_type, num_keys, (), haystack)
    flat = _draw_distinct(rng, value_type, num_keys * num_values, keys, haystack)
    values = [flat[i * num_values:(i + 1) * num_values] for i in range(num_keys)]
    vname = {"number": "numbers", "word": "words", "uuid": "uuids"}[value_type]
    needles = [f"One of the special magic {vname} for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    depths = [depth] + list(rng.uniform(0.0, 1.0, size=len(needles) - 1))
    perm = rng.permutation(len(needles) - 1) + 1  # shuffle the other needles' depths, keep the asked one first
    depths = [depths[0]] + [depths[i] for i in perm]
    asked = keys[:num_queries]
    query = ", ".join(asked[:-1]) + (", and " if len(asked) > 1 else "") + asked[-1]
    prefix = (f"Some special magic {vname} are hidden within the following text. Make sure to memorize it. "
              f"I will quiz you about the {vname} afterwards.\n")  # fmt: skip
    suffix = (f"\nWhat are all the special magic {vname} for {query} mentioned in the provided text? "
              f"The special magic {vname} for {query} mentioned in the provided text are")  # fmt: skip
    answers = [v for vs in values[:num_queries] for v in vs]
    return _context_sample(task, tokenizer, target, depth, seed, prefix=prefix, suffix=suffix, needles=needles,
                           depths=depths, haystack=haystack, answers=answers, max_new_tokens=128)


def _passkey(task, tokenizer, target, depth, seed, *, haystack="repeat") -> Sample:
    require_choice("haystack", haystack, HAYSTACKS)
    key = str(int(np.random.default_rng(seed).integers(10_000, 100_000)))  # 5 digits, as Stuffed Mamba
    prefix = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _context_sample(task, tokenizer, target, depth, seed, prefix=prefix, suffix="\nWhat is the pass key? "
                           "The pass key is", needles=[needle], depths=[depth], haystack=haystack, answers=[key],
                           max_new_tokens=16)  # fmt: skip


def _variable_tracking(task, tokenizer, target, depth, seed, *, num_chains=1, num_hops=4, haystack="repeat"):
    require_choice("haystack", haystack, HAYSTACKS)
    num_chains = require_int("num_chains", num_chains, min=1)
    num_hops = require_int("num_hops", num_hops, min=1)
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        v = "".join(rng.choice(list(string.ascii_uppercase), 5))
        if v not in names and v not in essay_text():
            names.append(v)
    hay = essay_text() if haystack == "essay" else REPEAT_TEXT
    values: list[str] = []
    while len(values) < num_chains:  # RULER: 5-digit values
        v = str(int(rng.integers(10_000, 100_000)))
        if v not in values and v not in hay:
            values.append(v)
    needles, chain0 = [], None
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        chain0 = chain0 or chain
        needles += [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = {a}." for a, b in zip(chain, chain[1:])]
    hops = num_hops + 1
    depths = []
    for c in range(num_chains):  # each chain in order; the first chain's first statement at `depth`
        d0 = depth if c == 0 else rng.uniform(0, 1)
        depths += [d0] + sorted(rng.uniform(d0, 1.0, size=hops - 1))
    prefix = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    suffix = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. Answer: "
              f"According to the chain(s) of variable assignment in the text above, {hops} variables are assigned "
              f"the value {values[0]}, they are:")  # fmt: skip
    return _context_sample(task, tokenizer, target, depth, seed, prefix=prefix, suffix=suffix, needles=needles,
                           depths=depths, haystack=haystack, answers=chain0, max_new_tokens=30)


def _common_words(task, tokenizer, target, depth, seed, *, num_cw=10, freq_cw=30, freq_ucw=3) -> Sample:
    num_cw = require_int("num_cw", num_cw, min=1)
    freq_cw = require_int("freq_cw", freq_cw, min=2)
    freq_ucw = require_int("freq_ucw", freq_ucw, min=1, max=freq_cw - 1)
    rng = np.random.default_rng(seed)
    pool = [word_list()[i] for i in rng.permutation(len(word_list()))]
    common, rest = pool[:num_cw], pool[num_cw:]
    order_seed = int(rng.integers(2**31))
    prefix = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n")  # fmt: skip
    suffix = (f"\nQuestion: What are the {num_cw} most common words in the above list? Answer: The top {num_cw} "
              f"words that appear most often in the list are:")  # fmt: skip

    def build(n):  # n <= len(rest) * freq_ucw uncommon entries: rest[0] x freq_ucw, rest[1] x freq_ucw, ...
        words = common * freq_cw + [rest[i // freq_ucw] for i in range(n)]
        words = [words[i] for i in np.random.default_rng(order_seed).permutation(len(words))]
        return prefix + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)) + suffix

    _, text, count = _fit(build, tokenizer, target, f"task {task!r} (num_cw={num_cw}, freq_cw={freq_cw})",
                          n_max=len(rest) * freq_ucw)  # fmt: skip
    return Sample(task=task, input=text, answers=tuple(common), target_length=target, depth=None, n_tokens=count,
                  seed=seed, max_new_tokens=120)


def _frequent_words(task, tokenizer, target, depth, seed, *, alpha=2.0, vocab_size=2000, coded_wordlen=6) -> Sample:
    alpha = require_float("alpha", alpha, min=1.0, min_open=True)
    vocab_size = require_int("vocab_size", vocab_size, min=5)
    coded_wordlen = require_int("coded_wordlen", coded_wordlen, min=2)
    rng = np.random.default_rng(seed)
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        w = "".join(rng.choice(list(string.ascii_lowercase), coded_wordlen))
        if w not in vocab:
            vocab.append(w)
    vocab[0] = "..."  # RULER: the top-ranked word is noise
    zeta = float(np.sum(np.arange(1, 100_000, dtype=np.float64) ** -alpha))
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    order_seed = int(rng.integers(2**31))
    prefix = ("Read the following coded text and track the frequency of each coded word. Find the three most "
              "frequently appeared coded words. ")  # fmt: skip
    suffix = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
              "frequently appeared words in the above coded text? Answer: According to the coded text above, the "
              "three most frequently appeared words are:")  # fmt: skip

    def text_for(num_words, extra):  # Zipf counts for num_words, plus `extra` singletons of unused ranks
        counts = (num_words * ranks**-alpha / zeta).astype(int)
        counts[np.flatnonzero(counts == 0)[:extra]] = 1
        words = [vocab[i] for i in range(vocab_size) for _ in range(counts[i])]
        words = [words[i] for i in np.random.default_rng(order_seed).permutation(len(words))]
        return prefix + " ".join(words) + suffix

    def core_fits(n):  # the top 3 must be strictly ordered above rank 4
        c = (n * ranks[:5] ** -alpha / zeta).astype(int)
        return bool(c[3] > c[4])

    lo, hi = 1, 2
    while _count(tokenizer, text_for(hi, 0)) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the largest Zipf core that fits, then singletons fill the gap
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _count(tokenizer, text_for(mid, 0)) <= target else (lo, mid)
    require(core_fits(lo), f"target_length={target} is too small for task {task!r}: the top words are not distinct")
    n_unused = int(np.sum((lo * ranks**-alpha / zeta).astype(int) == 0))
    _, text, count = _fit(lambda k: text_for(lo, k), tokenizer, target, f"task {task!r} (vocab_size={vocab_size})",
                          n_max=n_unused)  # fmt: skip
    return Sample(task=task, input=text, answers=tuple(vocab[1:4]), target_length=target, depth=None,
                  n_tokens=count, seed=seed, max_new_tokens=50)


_BUILDERS = {
    "niah_single": _niah,
    "niah_multikey": functools.partial(_niah, num_keys=4),
    "niah_multivalue": functools.partial(_niah, num_values=4),
    "niah_multiquery": functools.partial(_niah, num_keys=4, num_queries=4),
    "passkey": _passkey,
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "frequent_words": _frequent_words,
}
TASKS = tuple(_BUILDERS)

# RULER's synthetic configurations (App. B; names as in NVIDIA/RULER synthetic.yaml and lm-eval's ruler tasks) less
# MK-NIAH 2/3 (needle haystack), plus the Landmark passkey.
RULER_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "niah_single_1": ("niah_single", dict(haystack="repeat", value_type="number")),
    "niah_single_2": ("niah_single", dict(haystack="essay", value_type="number")),
    "niah_single_3": ("niah_single", dict(haystack="essay", value_type="uuid")),
    "niah_multikey_1": ("niah_multikey", dict(haystack="essay", value_type="number")),
    "niah_multivalue": ("niah_multivalue", dict(haystack="essay", value_type="number")),
    "niah_multiquery": ("niah_multiquery", dict(haystack="essay", value_type="number")),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4)),
    "cwe": ("common_words", dict(num_cw=10, freq_cw=30, freq_ucw=3)),
    "fwe": ("frequent_words", dict(alpha=2.0)),
    "passkey": ("passkey", {}),
}


def make_sample(task: str, *, tokenizer: Any, target_length: int, depth: float = 0.5, seed: int = 0,
                **task_kwargs: Any) -> Sample:  # fmt: skip
    """One sample of ``task`` (a name in ``TASKS`` or ``RULER_PRESETS``) of ``target_length`` tokens (±1%).

    ``depth`` in [0, 1] places the asked needle (ignored by the list tasks); ``task_kwargs`` override the task's
    arguments (``haystack``, ``key_type``, ``value_type``, ``num_keys``, ``num_values``, ``num_queries``,
    ``num_chains``, ``num_hops``, ``num_cw``, ``freq_cw``, ``freq_ucw``, ``alpha``, ``vocab_size``).
    """
    require_choice("task", task, TASKS + tuple(k for k in RULER_PRESETS if k not in TASKS))
    if task in RULER_PRESETS:
        base, preset = RULER_PRESETS[task]
        task_kwargs = preset | task_kwargs
    else:
        base = task
    target_length = require_int("target_length", target_length, min=1)
    depth = require_float("depth", depth, min=0.0, max=1.0)
    seed = require_int("seed", seed, min=0)
    require(callable(getattr(tokenizer, "encode", None)), "tokenizer must have an encode(text) -> ids method")
    return _BUILDERS[base](task, tokenizer, target_length, depth, seed, **task_kwargs)


def make_samples(task: str, *, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float] = (0.5,),
                 n_per_cell: int = 1, seed: int = 0, **task_kwargs: Any) -> list[Sample]:  # fmt: skip
    """A length x depth grid of samples, ``n_per_cell`` each; sample ``i`` of the grid uses seed ``seed + i``."""
    n_per_cell = require_int("n_per_cell", n_per_cell, min=1)
    out = []
    for length in lengths:
        for d in depths:
            for _ in range(n_per_cell):
                out.append(make_sample(task, tokenizer=tokenizer, target_length=length, depth=d,
                                       seed=seed + len(out), **task_kwargs))  # fmt: skip
    return out
