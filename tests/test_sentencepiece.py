"""SentencePiece BPE tokenizer: exact round trips, determinism, batching, persistence, errors."""

import pickle
import random

import numpy as np
import pytest

from common.tokenizers.sentencepiece import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SentencePieceTokenizer,
    train_bpe,
)

VOCAB = 500


def _captions(n=3000, seed=0):
    """Caption-like sentences over a fixed lowercase ASCII alphabet (so other characters are unseen)."""
    rng = random.Random(seed)
    nouns = ["cube", "sphere", "cat", "dog", "armchair", "avocado", "teapot", "tree", "house", "robot"]
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    styles = ["a photo of", "a painting of", "an illustration of", "a drawing of", "a render of"]
    places = ["on a table", "in a field", "at night", "under the sea", "in the snow", "next to a window"]
    return [
        f"{rng.choice(styles)} {rng.randint(1, 9)} {rng.choice(colors)} {rng.choice(nouns)}s {rng.choice(places)}"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def corpus():
    return _captions()


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe(iter(corpus), vocab_size=VOCAB)


def _random_unicode(rng, n):
    """Random code points from every plane in use, minus surrogates and SentencePiece's marker U+2581."""
    chars = []
    while len(chars) < n:
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800), rng.randrange(0xE000, 0x110000)])
        if cp != 0x2581:
            chars.append(chr(cp))
    return "".join(chars)


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == VOCAB
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    # BPE actually learned multi-character pieces from the corpus, not just bytes.
    assert len(tok.encode("a photo of 3 red cubes on a table")) < len("a photo of 3 red cubes on a table") / 2


def test_exact_round_trip_of_arbitrary_unicode(tok, corpus):
    seen = set("".join(corpus))
    rng = random.Random(1)
    texts = [
        "a photo of 3 red cubes on a table",
        "an avocado armchair 🥑🪑 with emoji 👩🏽‍🚀 and a ZWJ sequence",
        "Ünïcödé çàfé — naïve façade, 日本語のテキスト, 한국어, العربية, עברית, Ελληνικά",
        "  leading, double  and trailing spaces  ",
        "tabs\tand\nnewlines\r\nand a NUL\x00 and DEL\x7f",
        "ＦＵＬＬＷＩＤＴＨ and ligature ﬁ survive (no NFKC)",
        "",
    ] + [_random_unicode(rng, 40) for _ in range(20)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    unseen = "🥑€ß"
    assert not set(unseen) & seen
    pieces = [tok.id_to_piece(i) for i in tok.encode(unseen)]
    # The dummy-prefix space, then one byte piece per UTF-8 byte of the unseen characters.
    assert pieces == ["\u2581"] + [f"<0x{b:02X}>" for b in unseen.encode("utf-8")]


def test_whitespace_marker_is_the_documented_exception(tok):
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_training_is_deterministic(corpus, tmp_path):
    a = train_bpe((c for c in corpus), tmp_path / "a", vocab_size=VOCAB)
    b = train_bpe(list(corpus), tmp_path / "b", vocab_size=VOCAB)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.model_proto == b.model_proto


def test_subsampling_is_seeded(corpus):
    def train(seed):
        return train_bpe(iter(corpus), vocab_size=400, max_sentences=300, seed=seed).model_proto

    first = train(0)
    assert train(0) == first
    assert train(1) != first, "a different seed should sample different captions"
    assert train_bpe(iter(corpus), vocab_size=400).model_proto != first


def test_encode_batch_pads_and_truncates(tok):
    texts = ["a red cube", "", "a painting of 7 purple avocados under the sea at night " * 4]
    length = 12
    full = [tok.encode(t) for t in texts]
    assert len(full[2]) > length
    for add_bos in (False, True):
        for add_eos in (False, True):
            batch = tok.encode_batch(texts, length, add_bos=add_bos, add_eos=add_eos)
            assert batch.shape == (3, length) and batch.dtype == np.int32
            budget = length - add_bos - add_eos
            for row, ids in zip(batch, full):
                expected = [BOS_ID] * add_bos + ids[:budget] + [EOS_ID] * add_eos
                np.testing.assert_array_equal(row[: len(expected)], expected)
                assert (row[len(expected):] == PAD_ID).all()
    batch = tok.encode_batch(texts[:2], length, add_bos=True, add_eos=True)
    assert tok.decode_batch(batch) == texts[:2]
    assert tok.decode(np.concatenate([tok.encode("a red cube"), [PAD_ID] * 5])) == "a red cube"


def test_encode_batch_errors(tok):
    long = "an illustration of 9 orange teapots in the snow " * 3
    with pytest.raises(ValueError, match="truncate=True or a larger length"):
        tok.encode_batch(["ok", long], 8, truncate=False)
    with pytest.raises(ValueError, match="room for bos/eos"):
        tok.encode_batch(["ok"], 1, add_bos=True, add_eos=True)
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("a red cube", 8)
    with pytest.raises(ValueError, match="different tokenizer"):
        tok.decode([5, VOCAB])
    with pytest.raises(ValueError, match="decode_batch"):
        tok.decode(np.zeros((2, 3), np.int32))


def test_corpus_too_small_for_vocab(corpus):
    with pytest.raises(ValueError, match=r"too small for vocab_size=5000.*allow_smaller_vocab=True"):
        train_bpe(iter(corpus[:50]), vocab_size=5000)
    small = train_bpe(iter(corpus[:50]), vocab_size=5000, allow_smaller_vocab=True)
    assert 260 < small.vocab_size < 5000
    with pytest.raises(ValueError, match="4 special"):
        train_bpe(iter(corpus), vocab_size=260)
    with pytest.raises(ValueError, match="at least one non-empty caption"):
        train_bpe(iter([]), vocab_size=300)
    with pytest.raises(TypeError, match="index 1"):
        train_bpe(iter(["a cat", b"bytes"]), vocab_size=300)


def test_save_load_and_pickle(tok, tmp_path):
    texts = ["a photo of 2 blue robots", "unseen ✓ chars"]
    saved = tok.save(tmp_path)  # a directory receives sentencepiece.model
    assert saved == tmp_path / "sentencepiece.model"
    for loaded in (SentencePieceTokenizer.load(tmp_path), SentencePieceTokenizer.load(saved),
                   pickle.loads(pickle.dumps(tok))):
        assert loaded.model_proto == tok.model_proto
        assert loaded.vocab_size == tok.vocab_size
        np.testing.assert_array_equal(loaded.encode_batch(texts, 16), tok.encode_batch(texts, 16))
    assert tok.save(tmp_path / "named.model") == tmp_path / "named.model"
    with pytest.raises(FileNotFoundError, match="train_bpe"):
        SentencePieceTokenizer.load(tmp_path / "missing.model")
