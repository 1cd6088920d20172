"""Throughput of our CLIP tokenizer against OpenAI's ``SimpleTokenizer`` on the same captions.

Both tokenizers start cold (fresh instances, empty caches) in every timed call and tokenize the
same deterministic caption list into (N, 77) ids, checked identical. The reference is openai/CLIP
``clip/simple_tokenizer.py`` with ``clip.tokenize``'s padding and truncation (``clip/clip.py``)
mirrored in numpy by :func:`openai_reference_tokenize`; ``tests/test_clip_bpe.py`` uses the same
two helpers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.tokenizers.clip_bpe import DEFAULT_CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN, ClipTokenizer
from experiments.bench.harness import Section, Settings, compare
from experiments.bench.references import load_openai_simple_tokenizer


def openai_reference_tokenize(
    tokenizer: Any, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> np.ndarray:
    """``clip.tokenize`` (clip/clip.py) over a reference ``SimpleTokenizer``, as int32 numpy."""
    if isinstance(texts, str):
        texts = [texts]
    sot, eot = tokenizer.encoder[SOT_TOKEN], tokenizer.encoder[EOT_TOKEN]
    all_tokens = [[sot] + tokenizer.encode(text) + [eot] for text in texts]
    result = np.zeros((len(all_tokens), context_length), dtype=np.int32)
    for i, tokens in enumerate(all_tokens):
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {texts[i]} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, : len(tokens)] = tokens
    return result


_ADJECTIVES = (
    "red old small large wooden bright dark happy fluffy modern rusty snowy vintage golden empty busy "
    "tiny colorful abandoned cozy wet ancient shiny sleepy wild elegant"
).split()
_NOUNS = (
    "dog cat car house tree bicycle woman man child bird boat mountain street kitchen guitar horse "
    "train bridge flower cake laptop beach river castle airplane sandwich umbrella clock elephant "
    "pizza giraffe church lighthouse chair window bus sofa teapot owl skateboard tractor"
).split()
_PLACES = "park beach city street forest table field lake room garden market station desert snow".split()
_TEMPLATES = (
    "a photo of a {a} {n}.",
    "A {a} {n} sitting on a {p}",
    "Two {n}s and a {a} {n2} near the {p}.",
    "{N} in the {p} at sunset, {y}",
    "close-up of the {n}'s {a} {n2}",
    "Stock Photo - {a} {n} isolated on white background",
    "IMG_{d}.JPG",
    "{N} & {N2} | {P} {y} | Free Download",
    "there's a {n} and it's {a}!!",
    "Vintage {n} poster ({y}) &amp; frame, 24x36\"",
    "{a} {n} -- {p} #travel #{n2}",
)
_SUFFIXES = ("", "", "", " in the {p}", ", shot on 35mm", " - {y}", " with a {a} {n2}", " (HD wallpaper)")
# Web alt text is mostly ASCII; a minority needs ftfy (accents, scripts, emoji, curly quotes).
_NON_ASCII = (
    "Café au lait in Paris ☕",
    "東京の夜景 night view of Tokyo",
    "Москва зимой: Red Square in winter",
    "São Paulo skyline 🌆",
    "“Best day ever” 😂👍🏽",
    "naïve façade, Zürich",
    "مدينة at dusk",
    "बाज़ार market stall",
    "Crème brûlée – recipe",
    "Family 👨‍👩‍👧 at the beach 🇬🇷",
)


def make_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions drawn with Zipf-like repetition from a pool of ``n // 2`` templated ones."""
    rng = random.Random(seed)

    def one() -> str:
        if rng.random() < 0.08:
            return rng.choice(_NON_ASCII) + rng.choice(("", f" {rng.randint(1, 99)}", " #" + rng.choice(_NOUNS)))
        n, n2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
        return (rng.choice(_TEMPLATES) + rng.choice(_SUFFIXES)).format(
            a=rng.choice(_ADJECTIVES), n=n, n2=n2, N=n.capitalize(), N2=n2.capitalize(), p=rng.choice(_PLACES),
            P=rng.choice(_PLACES).upper(), y=rng.randint(1950, 2024), d=rng.randint(1000, 9999),
        )

    pool = [one() for _ in range(max(1, n // 2))]
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(pool))]
    return rng.choices(pool, weights=weights, k=n)


def run(settings: Settings) -> Section:
    """Two workloads: captions with repeats (the tokenizers' caches help), and the same de-duplicated."""
    n = 200 if settings.toy else 20_000
    captions = make_captions(n, seed=0)
    reference = load_openai_simple_tokenizer()
    results = []
    for workload, texts in (("with_repeats", captions), ("distinct", list(dict.fromkeys(captions)))):
        results.append(compare(
            f"tokenizer, {workload}", "captions/s", len(texts),
            ours=(ClipTokenizer, lambda t, texts=texts: t.tokenize(texts)),
            reference=(reference.SimpleTokenizer, lambda t, texts=texts: openai_reference_tokenize(t, texts)),
            check=_identical_ids, target=10.0, repeats=settings.repeats, captions=len(texts)))
    return Section("CLIP tokenizer", f"{n:,} web-style captions (seed 0), {len(set(captions)):,} distinct; each timed "
                   "call builds a fresh tokenizer (cold caches; building not timed); ids checked identical to "
                   "OpenAI's `clip.tokenize`.", results)


def _identical_ids(ours: np.ndarray, reference: np.ndarray) -> float:
    if not np.array_equal(ours, reference):
        rows = np.flatnonzero((ours != reference).any(axis=1))
        raise AssertionError(f"token ids differ from the reference on {rows.size} captions, first row {rows[0]}")
    return 0.0
