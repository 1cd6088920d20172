"""Parity of common.tokenizers.clip_bpe with OpenAI's CLIP tokenizer and Hugging Face's CLIPTokenizer.

References, run in the same test on the same strings:
* openai/CLIP ``clip/simple_tokenizer.py`` (``SimpleTokenizer``), loaded by file path from the
  openai-clip package, and ``clip.tokenize``'s padding/truncation mirrored in numpy
  (``experiments.bench.tokenizer_bench.openai_reference_tokenize``). Every string is compared.
* ``transformers.CLIPTokenizer`` built from vocab.json/merges.txt written here from the same merges
  file. It is a re-implementation with known, legitimate differences (see ``_hf_difference``), so
  that comparison is restricted, per string, with the reason recorded.
"""

from __future__ import annotations

import gzip
import html
import json
import pickle
import random
import unicodedata

import ftfy
import numpy as np
import pytest
import regex

from common.tokenizers import clip_bpe, clip_clean
from common.tokenizers.clip_bpe import ClipTokenizer
from experiments.bench.tokenizer_bench import load_openai_simple_tokenizer, make_captions, openai_reference_tokenize

OPENAI = load_openai_simple_tokenizer()  # the module clip/simple_tokenizer.py
SPECIALS = ("<|startoftext|>", "<|endoftext|>")

_WORDS = (
    "a photo of the dog cat running over lazy brown fox jumps tokenizer byte pair encoding "
    "Hello WORLD MiXeD CaSe McDonald iPhone NASA xX_gamer_Xx"
).split()
_SCRIPTS = {
    "cjk": "中文字符測試日本語のテキストです漢字ひらがなカタカナ한국어텍스트서울",
    "cyrillic": "Привет мир Съешь же ещё этих мягких французских булок ЁЖИК Ёлка",
    "arabic": "مرحبا بالعالم النص العربي جميل ٠١٢٣٤٥٦٧٨٩",
    "devanagari": "नमस्ते दुनिया हिन्दी पाठ क्षत्रिय ०१२३४",
    "greek": "ΟΔΟΣ Σοφία καλημέρα ΑΒΓΔ ΣΟΦΟΣ λόγος",
    "other_scripts": "שלום עולם สวัสดีชาวโลก Ծաղիկ ქართული ᎠᏍᎦᏯ ⲁⲛⲟⲕ",
}
_EMOJI = (
    "😀", "🎉", "❤️", "✨", "👍🏻", "👍🏽", "👍🏿", "👋🏼", "👨‍👩‍👧‍👦", "👩‍💻", "🧑🏾‍🚀", "🏳️‍🌈", "🏴‍☠️",
    "🇺🇸", "🇯🇵", "🇩🇪🇫🇷", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "1️⃣", "#️⃣", "☕", "🐱‍👤", "©️", "🫠",
)
_ACCENTS = (
    "café", "naïve", "Zürich", "señor", "façade", "Øresund", "Tiếng Việt", "Ångström", "crème brûlée",
    "e\u0301", "cafe\u0301", "a\u0308b", "n\u0303", "Z\u0334a\u0337l\u0338g\u0335o\u0336", "q\u0307\u0323",
    "\u0301alone", "İstanbul", "ǅemal", "ß STRASSE ẞ", "ﬁnancial ﬂow", "Ǆ",
)
_HTML = (
    "&amp;", "&lt;", "&gt;", "&#39;", "&quot;", "&nbsp;", "&amp;amp;", "&amp;amp;amp;", "&#x27;", "&eacute;",
    "&copy; 2024", "&#8217;", "&amp;lt;b&amp;gt;", "AT&T", "&", "&unknown;", "Tom &amp; Jerry", "<b>bold</b>",
    "a < b &amp; c", "&#128512;", "&#0;", "&#x110000;",
)
_NUMBERS = (
    "3.14159", "1,000,000", "2024-01-01", "１２３", "x²", "H₂O", "½", "⅔", "Ⅻ", "٣٤", "४२", "0x1F", "1e-9", "007",
)
_PUNCT_CHARS = "!?.,;:-_()[]{}<>/\\|@#$%^*+=~`\"'"
_UNICODE_PUNCT = ("…", "—", "–", "“quoted”", "‘single’", "«guillemets»", "¿qué?", "¡sí!", "・", "。", "、", "‼", "⁉")
_CONTRACTIONS = (
    "it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "DON'T", "THEY'RE", "'S", "'LL",
    "it’s", "don’t", "it'ſ", "y'all", "rock'n'roll", "''s", "'''", "o'clock", "'d'm're",
)
_WHITESPACE = (
    " ", "  ", "     ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\u2029",
    "\u200b", "\x0b", "\x0c", "\x85", "\u2003", "\u180e", "\ufeff",
)
_FTFY_FIXABLE = (
    "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "ＬＯＵＤ ＮＯＩＳＥＳ", "\x1b[31mred\x1b[0m", "bell\x07", "nul\x00x",
    "\ufeffbom", "\ud83d\ude00", "lone\ud800", "ﬀ", "Ã\xa0 la", "sÃ³",
)
_SPECIAL_TEXT = (
    "<|startoftext|>", "<|endoftext|>", "<|EndOfText|>", "<|STARTOFTEXT|>", "x<|endoftext|>y",
    "!<|endoftext|>", "<|endoftext", "<|startoftext|><|endoftext|>",
)


def _random_codepoint(rng: random.Random, assigned: bool) -> str:
    while True:
        c = chr(rng.choice((rng.randint(0x20, 0x7F), rng.randint(0xA0, 0xFFFD), rng.randint(0x10000, 0x1FAFF))))
        if not assigned or unicodedata.category(c) != "Cn":
            return c


def _fragment(rng: random.Random, category: str) -> str:
    if category == "ascii_words":
        word = rng.choice(_WORDS)
        return rng.choice((word, word.upper(), word.lower(), word.title(), "".join(
            c.upper() if rng.random() < 0.5 else c for c in word)))
    if category in _SCRIPTS:
        chars = _SCRIPTS[category]
        start = rng.randrange(len(chars))
        return chars[start : start + rng.randint(1, 12)]
    if category == "numbers":
        return rng.choice((str(rng.randint(0, 10**rng.randint(1, 12))), rng.choice(_NUMBERS)))
    if category == "punctuation":
        if rng.random() < 0.3:
            return rng.choice(_UNICODE_PUNCT)
        return "".join(rng.choice(_PUNCT_CHARS) for _ in range(rng.randint(1, 8)))
    if category == "random_codepoints":  # mostly assigned ones; unassigned ones too, sometimes
        return "".join(_random_codepoint(rng, assigned=rng.random() < 0.9) for _ in range(rng.randint(1, 6)))
    table = {"emoji": _EMOJI, "accents": _ACCENTS, "html": _HTML, "contractions": _CONTRACTIONS,
             "whitespace": _WHITESPACE, "ftfy_fixable": _FTFY_FIXABLE, "special_tokens": _SPECIAL_TEXT}
    return rng.choice(table[category])


CATEGORIES = (
    "ascii_words", *_SCRIPTS, "numbers", "punctuation", "random_codepoints", "emoji", "accents", "html",
    "contractions", "whitespace", "ftfy_fixable", "special_tokens",
)


def make_test_strings(seed: int = 1234) -> list[tuple[str, str]]:
    """(category, text) pairs: ~120 per category, a few empty/blank strings, and long texts."""
    rng = random.Random(seed)
    separators = (" ", " ", " ", "", "\n", "\t", "  ", ", ")
    cases = [("empty", ""), ("empty", " "), ("empty", "\n\t \r\n"), ("empty", "\u00a0"), ("empty", "   ")]
    for category in CATEGORIES:
        for _ in range(120):
            # Mostly this category, mixed with others so the boundaries between kinds are exercised.
            parts = [_fragment(rng, category if rng.random() < 0.6 else rng.choice(CATEGORIES))
                     for _ in range(rng.randint(1, 8))]
            text = "".join(p + rng.choice(separators) for p in parts)
            cases.append((category, text if rng.random() < 0.8 else rng.choice(separators) + text))
    for _ in range(40):  # far over 77 tokens
        parts = [_fragment(rng, rng.choice(CATEGORIES)) for _ in range(rng.randint(80, 300))]
        cases.append(("long", " ".join(parts)))
    return cases


CASES = make_test_strings()
TEXTS = [text for _, text in CASES]


@pytest.fixture(scope="module")
def reference():
    return OPENAI.SimpleTokenizer()


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def reference_ids(reference):
    return [reference.encode(text) for text in TEXTS]


def reference_clean(text: str) -> str:
    """The reference's text cleaning, as ``SimpleTokenizer.encode`` applies it."""
    return OPENAI.whitespace_clean(OPENAI.basic_clean(text)).lower()


def _first_mismatch(got, want, texts) -> str:
    for text, g, w in zip(texts, got, want):
        if g != w:
            return f"first mismatch on {text!r}:\n ours {g}\n  ref {w}"
    return ""


def test_strings_cover_every_category(reference_ids):
    assert len(CASES) >= 2000
    counts = {c: sum(1 for cat, _ in CASES if cat == c) for c in (*CATEGORIES, "empty", "long")}
    assert min(counts.values()) >= 5, counts
    long_lengths = [len(ids) + 2 for (cat, _), ids in zip(CASES, reference_ids) if cat == "long"]
    assert min(long_lengths) > 2 * 77, "long texts must be far over the context length"


def test_vocabulary_matches_reference(reference, ours):
    assert clip_bpe.bytes_to_unicode() == OPENAI.bytes_to_unicode()
    assert ours.vocab_size == len(reference.encoder) == 49408
    assert ours.sot_token_id == reference.encoder["<|startoftext|>"] == 49406
    assert ours.eot_token_id == reference.encoder["<|endoftext|>"] == 49407
    # Every id decodes to the reference's string for it.
    for i in range(ours.vocab_size):
        assert ours.decode([i]) == reference.decode([i]), i


def test_clean_text_matches_reference():
    rng = random.Random(7)
    fast_alphabet = "\t\n\r" + "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")
    slow_extras = "&\x0b\x0c\x1b\x00\x7f\x1c"
    fuzz = ["".join(rng.choice(fast_alphabet) for _ in range(rng.randint(0, 40))) for _ in range(1000)]
    fuzz += ["".join(rng.choice(fast_alphabet + slow_extras) for _ in range(rng.randint(0, 40))) for _ in range(500)]
    for text in TEXTS + fuzz:
        want = reference_clean(text)
        assert clip_clean.clean_text(text) == want, repr(text)


def test_ascii_entity_path_equals_ftfy():
    """ASCII text with HTML entities skips ftfy.fix_text: the shortcut must give ftfy's output, string for
    string, on entity-laden text with newlines, carriage returns and '<' (which turns unescaping off)."""
    rng = random.Random(5)
    snippets = ("&amp;", "&amp;amp;", "&AMP;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&#X41;", "&amp",
                "&#39", "&eacute;", "&EACUTE;", "&nbsp;", "&rsquo;", "&hellip;", "&#0;", "&#127;", "&#128512;",
                "&#x110000;", "&unknown;", "&not", "&copy;", "&lt;b&gt;", "&#60;", "&#10;", "&#13;", "&#9;",
                "&#38;", "&#38;amp;", "&", "&;", "&#;", "<", ">", "<b>", "\n", "\r", "\r\n", "\t", " ")
    alphabet = "ab;#x09 &<\n"
    texts = ["".join(rng.choice(snippets) if rng.random() < 0.5 else rng.choice(alphabet)
                     for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    shortcut = 0
    for text in texts:
        fixed = clip_clean._fix_ascii_text(text)
        if fixed is not None:
            assert fixed == ftfy.fix_text(text), repr(text)
            shortcut += 1
        assert clip_clean.clean_text(text) == reference_clean(text), repr(text)
    assert shortcut > 1500  # most of them take it; the rest decode to non-ASCII and go to ftfy


def test_ascii_fast_path_skips_ftfy(reference, monkeypatch):
    rng = random.Random(11)
    alphabet = "\t\n\r" + "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    want = [reference.encode(text) for text in texts]

    def no_ftfy(text, *args, **kwargs):
        raise AssertionError(f"ftfy.fix_text called on {text!r}")

    monkeypatch.setattr(ftfy, "fix_text", no_ftfy)
    tokenizer = ClipTokenizer()
    assert [tokenizer.encode(text) for text in texts] == want
    with pytest.raises(AssertionError, match="ftfy.fix_text called"):
        clip_clean.clean_text("caf\u00c3\u00a9")  # mojibake: ftfy decides


def test_encode_matches_openai_on_every_string(ours, reference_ids):
    got = [ours.encode(text) for text in TEXTS]
    assert got == reference_ids, _first_mismatch(got, reference_ids, TEXTS)


def test_encode_exact_with_tiny_word_cache(reference_ids):
    tokenizer = ClipTokenizer(word_cache_size=4)  # constant eviction must not change any id
    got = [tokenizer.encode(text) for text in TEXTS[::4]]
    assert got == reference_ids[::4], _first_mismatch(got, reference_ids[::4], TEXTS[::4])


def test_decode_matches_openai(ours, reference, reference_ids):
    for text, ids in zip(TEXTS, reference_ids):
        assert ours.decode(ours.encode(text)) == reference.decode(ids), repr(text)
    rng = random.Random(3)  # arbitrary id sequences, including split UTF-8 byte sequences
    for _ in range(300):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 20))]
        assert ours.decode(np.asarray(ids)) == reference.decode(ids), ids
    with pytest.raises(ValueError, match="outside the CLIP vocabulary"):
        ours.decode([ours.vocab_size])


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokenize_truncate_matches_clip_tokenize(ours, reference, context_length):
    want = openai_reference_tokenize(reference, TEXTS, context_length=context_length, truncate=True)
    got = ours.tokenize(TEXTS, context_length=context_length, truncate=True)
    assert got.dtype == np.int32 and got.shape == (len(TEXTS), context_length)
    np.testing.assert_array_equal(got, want)
    assert (got[:, -1][got[:, -1] != 0] == ours.eot_token_id).all()  # truncated rows end in <|endoftext|>


@pytest.mark.parametrize("truncate", [True, False])
def test_batch_path_matches_clip_tokenize(reference, monkeypatch, truncate):
    """A batch without texts that spell a special token is split in one pass over the joined texts
    (no per-text encoding at all), in any order and with repeats, with ids identical to OpenAI's."""
    rng = random.Random(0)
    texts = [t for (cat, t) in CASES if cat != "special_tokens" and "<|" not in t.lower()]
    if not truncate:
        texts = [t for t in texts if len(reference.encode(t)) + 2 <= 77]
    texts = texts + rng.sample(texts, 200) + make_captions(500, seed=3)
    rng.shuffle(texts)
    want = openai_reference_tokenize(reference, texts, truncate=truncate)
    fresh = ClipTokenizer()
    monkeypatch.setattr(fresh, "_encode_tuple", lambda *a: pytest.fail("per-text path taken"))
    np.testing.assert_array_equal(fresh.tokenize(texts, truncate=truncate), want)


def test_batch_with_special_text_falls_back_exactly(ours, reference):
    """A text spelling <|endoftext|> (in any case) cannot be told from the batch separator: its group is
    encoded text by text; the other group keeps the one-pass path. Over-long texts fail as alone."""
    texts = ["a dog", "x<|endoftext|>y", "café <|EndOfText|>", "naïve", "", "a dog", "<|startoftext|> hi",
             "word " * 600]  # the last is over the one-pass length bound
    np.testing.assert_array_equal(ours.tokenize(texts, truncate=True),
                                  openai_reference_tokenize(reference, texts, truncate=True))
    with pytest.raises(ValueError, match="602 tokens"):
        ours.tokenize(texts)
    assert ours.tokenize([]).shape == (0, 77)


def test_too_long_raises_exactly_where_clip_tokenize_does(ours, reference, reference_ids):
    n_raised = 0
    for text, ids in zip(TEXTS, reference_ids):
        if len(ids) + 2 <= 77:
            np.testing.assert_array_equal(ours(text), openai_reference_tokenize(reference, text))
            continue
        with pytest.raises(RuntimeError):
            openai_reference_tokenize(reference, text)
        with pytest.raises(ValueError) as error:
            ours.tokenize([text])
        message = str(error.value)
        assert f"{len(ids) + 2} tokens" in message
        assert "context_length=77" in message and "truncate=True" in message
        n_raised += 1
    assert n_raised >= 40


def test_module_tokenize_mirrors_clip_tokenize(ours, reference):
    single = clip_bpe.tokenize("a diagram")
    assert single.shape == (1, 77) and single.dtype == np.int32
    np.testing.assert_array_equal(single, openai_reference_tokenize(reference, "a diagram"))
    batch = ["a dog", "", "a dog", "A DOG!!"]
    np.testing.assert_array_equal(clip_bpe.tokenize(batch), openai_reference_tokenize(reference, batch))
    np.testing.assert_array_equal(clip_bpe.tokenize(batch), ours(batch))
    empty = clip_bpe.tokenize("")[0]
    assert empty[:2].tolist() == [49406, 49407] and not empty[2:].any()
    with pytest.raises(ValueError, match=r"Text 'word word .* 102 tokens .* context_length=77.* truncate=True"):
        clip_bpe.tokenize("word " * 100)
    assert clip_bpe.tokenize("word " * 100, truncate=True)[0, -1] == 49407


def test_bad_inputs_fail_clearly(ours, tmp_path):
    with pytest.raises(ValueError, match="context_length"):
        ours.tokenize("x", context_length=1)
    with pytest.raises(TypeError, match="encodes str"):
        ours.tokenize([b"bytes"])
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"#version: 0.2\ni n\nthree symbols here\n"))
    with pytest.raises(ValueError, match="not a CLIP merges file"):
        ClipTokenizer(bad)


def test_pickled_tokenizer_gives_same_ids(ours, reference_ids):
    ours.encode("warm the cache")
    copy = pickle.loads(pickle.dumps(ours))  # as data-loader worker processes receive it
    assert [copy.encode(t) for t in TEXTS[::10]] == reference_ids[::10]


def test_explicit_bpe_path_matches_package_data(reference_ids):
    tokenizer = ClipTokenizer(OPENAI.default_bpe())
    assert [tokenizer.encode(t) for t in TEXTS[::10]] == reference_ids[::10]


# --------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers.CLIPTokenizer from vocab.json + merges.txt built like HF's CLIP conversion."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_clip")
    lines = gzip.open(OPENAI.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(OPENAI.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + list(SPECIALS)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def _hf_difference(hf, reference, text: str, raw: bool) -> str | None:
    """Why HF may legitimately tokenize ``text`` differently from OpenAI's CLIP, or None if it must not.

    ``raw``: HF is given ``text`` itself; otherwise the reference's cleaned text.
    """
    clean = reference_clean(text)
    hf_input = text if raw else clean
    try:
        normalized = hf.backend_tokenizer.normalizer.normalize_str(hf_input)
    except (UnicodeEncodeError, TypeError):
        return "lone surrogates: HF accepts only Unicode scalar values (ftfy turns them into U+FFFD)"
    if normalized.strip(" ") != clean:
        if ftfy.fix_text(hf_input) != hf_input:
            return "HF does not run ftfy.fix_text (mojibake, full width, ligatures, curly quotes, controls)"
        if html.unescape(hf_input) != hf_input:
            return "HF does not unescape HTML entities"
        if "ς" in clean and normalized.strip(" ").replace("ς", "σ") == clean.replace("ς", "σ"):
            return "HF lowercases per character; str.lower applies the Greek final-sigma rule (Σ -> ς at word ends)"
        return None  # an unexplained difference: let the comparison fail on it
    if any(unicodedata.category(c) == "Cn" for c in clean):
        return (f"code points unassigned in Unicode {unicodedata.unidata_version}: the regex package's and HF's "
                "(Oniguruma) Unicode tables disagree on which recently assigned ones are \\p{L} / \\p{N}")
    pieces = reference.pat.findall(clean)
    if any(pieces.count(s) != clean.count(s) or hf_input.count(s) != clean.count(s) for s in SPECIALS):
        return ("HF cuts out special-token strings from the raw text, case-sensitively, before splitting; the "
                "reference finds them in the lowercased text only where a regex match starts")
    if regex.findall(reference.pat.pattern, clean) != pieces:
        return "HF's pre-tokenizer regex is case-sensitive; the reference compiles it with IGNORECASE (e.g. 'ſ = 's)"
    return None


@pytest.mark.parametrize("raw", [False, True], ids=["cleaned_text", "raw_text"])
def test_hf_clip_tokenizer_matches(hf_tokenizer, reference, ours, reference_ids, raw):
    """HF ids equal ours (and the reference's) wherever HF is not known to differ, and that is most strings.

    cleaned_text: HF gets the reference's cleaned text, which isolates BPE, the split regex and the
    byte table. raw_text: HF gets the original string, so its own normalization is exercised too.
    """
    compared = {category: 0 for category, _ in CASES}
    excluded: dict[str, int] = {}
    for (category, text), want in zip(CASES, reference_ids):
        reason = _hf_difference(hf_tokenizer, reference, text, raw)
        if reason is not None:
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        hf_ids = hf_tokenizer(text if raw else reference_clean(text), add_special_tokens=False)["input_ids"]
        assert hf_ids == want == ours.encode(text), f"HF differs on {category} string {text!r}"
        compared[category] += 1
    totals = {category: sum(1 for c, _ in CASES if c == category) for category in compared}
    report = f"compared per category {compared} of {totals}; excluded {excluded}"
    assert sum(compared.values()) >= (0.85 if not raw else 0.45) * len(CASES), report
    # Only the kinds of text that are about cleaning may be mostly excluded.
    cleaning = {"html", "ftfy_fixable", "special_tokens", "long"}
    assert all(compared[c] >= 0.35 * totals[c] for c in compared if c not in cleaning), report


def test_long_words_and_long_captions_match_openai(ours, reference):
    """Words of thousands of letters (BPE is O(n log n) here) and captions of many pieces, truncated."""
    for text in ("abcdefghij" * 500, "aaab" * 400, "the" * 2000, "a " * 5000 + "cat", "ünïcødé" * 300):
        assert ours.encode(text) == reference.encode(text)
        for context_length in (5, 77):
            np.testing.assert_array_equal(ours.tokenize(text, context_length, truncate=True)[0],
                                          openai_reference_tokenize(reference, [text], context_length, truncate=True)[0])


_FTFY_FIXERS = (ftfy.fixes.fix_c1_controls, ftfy.fixes.fix_latin_ligatures, ftfy.fixes.fix_character_width,
                ftfy.fixes.uncurl_quotes, ftfy.fixes.fix_line_breaks, ftfy.fixes.fix_surrogates,
                ftfy.fixes.remove_terminal_escapes, ftfy.fixes.remove_control_chars)


def test_ftfy_fixers_leave_every_character_outside_the_touched_class_alone():
    """The non-ASCII fast path skips ftfy's per-character fixers on text with no character of _FTFY_TOUCHED:
    over every code point outside it (all of Unicode), each of those fixers is the identity; and each
    changes some character inside it (the class is not vacuous)."""
    touched = clip_clean._FTFY_TOUCHED
    outside = "".join(chr(c) for c in range(0x110000) if not touched.match(chr(c)))
    inside = [chr(c) for c in range(0x110000) if touched.match(chr(c))]
    assert 0.99 * 0x110000 < len(outside) < 0x110000
    for fixer in _FTFY_FIXERS:
        assert fixer(outside) == outside, fixer.__name__
    changed = {f.__name__ for f in _FTFY_FIXERS for c in inside if f(c + "[0m") != c + "[0m"}
    assert changed == {fixer.__name__ for fixer in _FTFY_FIXERS}


def test_mojibake_prefilter_is_read_off_ftfys_detector(monkeypatch):
    """Every match of ftfy's BADNESS_RE holds a character of _MOJIBAKE_CODEPOINTS: text without one is never
    bad (fuzzed with every other non-ASCII character of the BMP and ASCII around it), text with them often
    is; an added alternative of ASCII only makes the derivation give up (None: every text goes to is_bad)."""
    codepoints = clip_clean._MOJIBAKE_CODEPOINTS
    assert codepoints is not None and 300 < len(codepoints) < 2000 and min(codepoints) >= 0x80
    rng = random.Random(3)
    others = [chr(c) for c in range(0x80, 0x10000) if c not in codepoints and not 0xD800 <= c < 0xE000]
    ascii_chars = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t"]
    for _ in range(20_000):
        text = "".join(rng.choice(others) if rng.random() < 0.5 else rng.choice(ascii_chars) for _ in range(6))
        assert not ftfy.badness.is_bad(text), repr(text)
    suspects = [chr(c) for c in codepoints]
    bad = sum(ftfy.badness.is_bad("".join(rng.choice(suspects + ascii_chars[:60]) for _ in range(4)))
              for _ in range(2000))
    assert bad > 200
    monkeypatch.setattr(ftfy.badness, "BADNESS_RE", regex.compile(ftfy.badness.BADNESS_RE.pattern + "|x y",
                                                                  ftfy.badness.BADNESS_RE.flags))
    assert clip_clean._mojibake_codepoints() is None


def test_text_ftfy_leaves_alone_is_told_without_running_it():
    """_ftfy_leaves_unchanged(text) only when ftfy.fix_text(text) == text, on the test strings, on mojibake,
    decomposed accents, entities and controls mixed into scripts and emoji; and it is true for most
    ordinary non-ASCII text (the point of it)."""
    rng = random.Random(21)
    snippets = (*_FTFY_FIXABLE, *_ACCENTS, *_EMOJI, *_UNICODE_PUNCT, *_WHITESPACE, "&amp;", "&eacute;", "<b>",
                "Ã©", "â€™", "Â ", "Ã ", "ÃƒÂ©", "вЂ", "Ð¿Ñ€", "×²", "√±", "\u0301", "é", "ё", "Ё", "ǅ", "ﬁ")
    words = (*_SCRIPTS.values(), *_WORDS)
    texts = list(TEXTS)
    for _ in range(4000):
        parts = [rng.choice(snippets) if rng.random() < 0.3 else rng.choice(words)[:rng.randint(1, 9)]
                 for _ in range(rng.randint(1, 6))]
        texts.append(rng.choice((" ", "", "-")).join(parts))
    taken = 0
    for text in texts:
        if clip_clean._ftfy_leaves_unchanged(text):
            assert ftfy.fix_text(text) == text, repr(text)
            taken += 1
        assert clip_clean.clean_text(text) == reference_clean(text), repr(text)
    ordinary = [t for t in texts if not clip_clean.NEEDS_FULL_CLEAN.search(t.encode("ascii", "ignore").decode())
                and t == unicodedata.normalize("NFC", t) and "\n" not in t and ftfy.fix_text(t) == t]
    assert taken >= 0.9 * len(ordinary) > 1000


@pytest.mark.parametrize("short_piece", [1, 10**6])
def test_merge_rounds_and_heap_give_the_same_ids(reference_ids, monkeypatch, short_piece):
    """Short pieces merge by the reference's plain rounds, long ones through the heap: either one alone for
    every piece gives the reference's ids."""
    monkeypatch.setattr(clip_bpe, "_SHORT_PIECE", short_piece)
    tokenizer = ClipTokenizer()
    got = [tokenizer.encode(text) for text in TEXTS]
    assert got == reference_ids, _first_mismatch(got, reference_ids, TEXTS)
