"""The exact OpenAI CLIP tokenizer: byte-level BPE over a 49,408-token vocabulary.

Reproduces, id for id, ``SimpleTokenizer`` in openai/CLIP ``clip/simple_tokenizer.py`` and the
padding/truncation of ``clip.tokenize`` in ``clip/clip.py`` (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision", sec. 2.4: "lower-cased byte pair
encoding (BPE) representation of the text with a 49,152 vocab size ... bracketed with [SOS] and
[EOS] tokens"). This is an independent implementation; only the data file is OpenAI's:
``bpe_simple_vocab_16e6.txt.gz`` is copied unchanged from the openai-clip 1.0.1 package
(https://github.com/openai/CLIP, MIT License, Copyright (c) 2021 OpenAI; see ``NOTICE`` here).

The pipeline, in the reference's order:

1. Clean (``common.tokenizers.clip_clean``): ``ftfy.fix_text``, ``html.unescape`` twice, strip,
   collapse every ``regex`` ``\\s+`` run to one space, strip, ``str.lower``.
2. Split into pieces with the reference's pattern (the two special-token strings, the contractions
   's 't 're 've 'm 'll 'd, letter runs, single digits, runs of everything else), compiled with the
   ``regex`` package and ``IGNORECASE`` exactly as the reference does (so e.g. ``'ſ`` counts as the
   contraction ``'s``).
3. Map each piece's UTF-8 bytes to the 256 printable stand-in characters (GPT-2's byte table), mark
   the last one with ``</w>``, then repeatedly merge the adjacent pair with the lowest merge rank,
   all non-overlapping occurrences left to right, until no pair has a rank.

Vocabulary layout (ids): 256 byte characters, the same 256 with ``</w>``, the first 48,894 merges
of the file, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.

Speed without changing a single id:
* BPE results are cached per piece in a bounded LRU cache, and pieces are merged as integer ids.
* Cleaning skips the steps that cannot change the text (``common.tokenizers.clip_clean``).
* Pieces of up to 24 bytes merge by the reference's plain rounds (faster there), longer ones through a heap.
* A batch encodes each distinct text once, and all of them in one pass: the cleaned texts are
  joined with `` <|endoftext|> `` (no piece crosses a space, so each text splits as it would
  alone), split by one regex scan (for ASCII text: split on whitespace into words, each distinct
  word split once by an equivalent pattern of the standard ``re`` module, about twice as fast as
  ``regex``), mapped through the cache and laid out in the padded array with numpy. A text that
  itself spells a special token goes through the one-text path, so ids never change.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import importlib.resources
import itertools
import os
import re as std_re
from collections.abc import Iterable, Sequence

import numpy as np
import regex

from common.tokenizers.clip_clean import ASCII_CONTROLS, NEEDS_FTFY, NEEDS_FULL_CLEAN, clean_text

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
DEFAULT_CONTEXT_LENGTH = 77  # every released CLIP model
_NUM_MERGES = 49152 - 256 - 2  # the reference keeps merges[1 : 49152 - 256 - 2 + 1] of the file
_END_OF_WORD = "</w>"

# The reference pattern, verbatim (clip/simple_tokenizer.py, SimpleTokenizer.__init__).
_PIECE_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# _PIECE_PATTERN on lower-case text of that alphabet: letters and digits are ASCII there, and at any
# position at most one alternative of the reference can start a match in this order.
_ASCII_PIECE_PATTERN = std_re.compile(r"[a-z]+|[0-9]|'(?:s|t|re|ve|m|ll|d)|<\|(?:start|end)oftext\|>|[^\sa-z0-9]+")
_BATCH_SEPARATOR = " <|endoftext|> "
_SHORT_PIECE = 24  # pieces of at most this many bytes merge by plain rounds, longer ones through a heap
_BATCH_MAX_CHARS = 2048  # longer texts take the one-text path (which stops early when truncating)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in vocabulary order.

    Bytes that are printable Latin-1 (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 bytes (controls, space, soft hyphen, ...) get U+0100 onwards in byte
    order. Dict order is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _merge_rounds(symbols: list[int], table: dict[tuple[int, int], tuple[int, int]]) -> tuple[int, ...]:
    """The reference's BPE loop as it is written, for short pieces (where it beats the heap): find the
    adjacent pair of lowest rank, merge its non-overlapping occurrences left to right, repeat."""
    while len(symbols) > 1:
        best = None
        for pair in zip(symbols, symbols[1:]):
            entry = table.get(pair)
            if entry is not None and (best is None or entry[0] < best[0]):
                best, first, second = entry, *pair
        if best is None:
            break
        merged, i, n = [], 0, len(symbols)
        while i < n:
            if symbols[i] == first and i + 1 < n and symbols[i + 1] == second:
                merged.append(best[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return tuple(symbols)


def _read_merges(bpe_path: str | os.PathLike | None) -> list[tuple[str, str]]:
    """The merge list the reference uses: lines 1 .. 48,894 of the gzipped file (line 0 is a header)."""
    if bpe_path is None:
        with importlib.resources.files(__package__).joinpath(BPE_FILENAME).open("rb") as f:
            data = gzip.decompress(f.read())
        where = f"package data {__package__}/{BPE_FILENAME}"
    else:
        with gzip.open(bpe_path) as f:
            data = f.read()
        where = os.fspath(bpe_path)
    lines = data.decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if len(merges) != _NUM_MERGES or bad is not None:
        found = f"{len(merges)} lines" if bad is None else f"line {bad + 1}: {lines[bad]!r}"
        raise ValueError(
            f"{where} is not a CLIP merges file: expected a header line and then at least {_NUM_MERGES} "
            f"lines of two space-separated symbols, found {found}. Use the {BPE_FILENAME} shipped with "
            "openai/CLIP (or pass bpe_path=None for the copy bundled with this package)."
        )
    return merges


class ClipTokenizer:
    """OpenAI CLIP's BPE tokenizer; ids identical to ``clip.simple_tokenizer.SimpleTokenizer``.

    Args:
      bpe_path: gzipped merges file; ``None`` loads the copy bundled as package data.
      word_cache_size: bound of the per-piece BPE cache (``None``: unbounded).
    """

    def __init__(self, bpe_path: str | os.PathLike | None = None, word_cache_size: int | None = 1 << 18):
        merges = _read_merges(bpe_path)
        byte_chars = bytes_to_unicode()
        vocab = [*byte_chars.values(), *(c + _END_OF_WORD for c in byte_chars.values())]
        vocab += ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        # Later entries win on duplicates, as with the reference's dict(zip(vocab, range(...))).
        encoder = {token: i for i, token in enumerate(vocab)}
        self._vocab_size = len(encoder)
        # Every vocabulary string is made of byte characters (the specials are ASCII), so each id
        # decodes to a fixed byte string; decode joins them and decodes UTF-8 once, like the reference.
        to_latin1 = str.maketrans({c: chr(b) for b, c in byte_chars.items()})
        self._id_bytes = {i: token.translate(to_latin1).encode("latin-1") for token, i in encoder.items()}
        self._byte_ids = [encoder[byte_chars[b]] for b in range(256)]
        self._byte_end_ids = [encoder[byte_chars[b] + _END_OF_WORD] for b in range(256)]
        # (left id, right id) -> (rank, merged id): min() over these tuples picks the lowest rank.
        self._merge_table = {(encoder[a], encoder[b]): (rank, encoder[a + b]) for rank, (a, b) in enumerate(merges)}
        self._special_ids = {SOT_TOKEN: encoder[SOT_TOKEN], EOT_TOKEN: encoder[EOT_TOKEN]}
        self._word_cache_size = word_cache_size
        self._piece_ids = functools.lru_cache(maxsize=word_cache_size)(self._bpe)

    def __getstate__(self) -> dict:
        # The cache wraps a bound method and does not pickle (e.g. into data-loader worker
        # processes); it is rebuilt, empty, on unpickling.
        return {k: v for k, v in self.__dict__.items() if k != "_piece_ids"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._piece_ids = functools.lru_cache(maxsize=self._word_cache_size)(self._bpe)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def sot_token_id(self) -> int:
        return self._special_ids[SOT_TOKEN]

    @property
    def eot_token_id(self) -> int:
        return self._special_ids[EOT_TOKEN]

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Token ids of one piece (a match of the split pattern), in O(n log n) for n bytes.

        The reference merges, round by round, every non-overlapping occurrence (left to right)
        of the adjacent pair with the lowest rank. Here candidate pairs wait in a heap keyed by
        (rank, position); a round pops every entry of the lowest rank, merges them in position
        order where both symbols are still there and unmerged in this round, and only then pushes
        the pairs the merges created. So the rounds are the reference's, without rescanning the
        whole piece per round (a 50,000-letter word would take O(n^2) there).
        """
        special = self._special_ids.get(piece)
        if special is not None:
            return (special,)
        raw = piece.encode("utf-8")
        n = len(raw)
        symbols = [self._byte_ids[b] for b in raw[:-1]]
        symbols.append(self._byte_end_ids[raw[-1]])
        if n == 1:
            return tuple(symbols)
        table = self._merge_table
        if n <= _SHORT_PIECE:
            return _merge_rounds(symbols, table)
        nxt = list(range(1, n + 1))  # position of the next live symbol (n: none)
        prv = list(range(-1, n - 1))  # position of the previous live symbol (-1: none)
        heap = [(table[pair][0], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in table]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            positions = []
            while heap and heap[0][0] == rank:
                positions.append(heapq.heappop(heap)[1])
            touched = []
            for i in sorted(positions):
                j = nxt[i]
                # Stale entry: i was merged away or absorbed, or its pair changed since it was pushed.
                if symbols[i] < 0 or j >= n or table.get((symbols[i], symbols[j]), (-1,))[0] != rank:
                    continue
                symbols[i] = table[(symbols[i], symbols[j])][1]
                symbols[j] = -1  # absorbed
                nxt[i] = nxt[j]
                if nxt[i] < n:
                    prv[nxt[i]] = i
                touched.append(i)
            # Merged symbols ended this round: only now may their new pairs compete.
            for i in touched:  # never absorbed later in the round: positions ascend, pairs do not overlap
                for left in (prv[i], i):
                    right = nxt[left] if left >= 0 else n
                    if left >= 0 and right < n:
                        entry = table.get((symbols[left], symbols[right]))
                        if entry is not None:
                            heapq.heappush(heap, (entry[0], left))
        return tuple(s for s in symbols if s >= 0)

    def _encode_tuple(self, text: str, max_pieces: int | None = None) -> tuple[int, ...]:
        """Ids of `text`; with `max_pieces`, of its first pieces only (each piece gives >= 1 id)."""
        if not isinstance(text, str):
            raise TypeError(f"ClipTokenizer encodes str, found {type(text).__name__}: {text!r}.")
        piece_ids = self._piece_ids
        pieces = (m.group() for m in _PIECE_PATTERN.finditer(clean_text(text)))
        return tuple(i for piece in itertools.islice(pieces, max_pieces) for i in piece_ids(piece))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start/end tokens (reference ``SimpleTokenizer.encode``)."""
        return list(self._encode_tuple(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: every ``</w>`` becomes a space (reference ``SimpleTokenizer.decode``)."""
        try:
            raw = b"".join(self._id_bytes[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"Token id {e.args[0]} is outside the CLIP vocabulary [0, {self.vocab_size}).") from None
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
    ) -> np.ndarray:
        """``clip.tokenize``: ``<|startoftext|> ids <|endoftext|>``, zero-padded; int32 (B, context_length).

        A text longer than ``context_length`` tokens (with both specials) raises ``ValueError``
        unless ``truncate``, which keeps the first ``context_length`` tokens and overwrites the last
        with ``<|endoftext|>``, as the reference does.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(
                f"context_length must leave room for <|startoftext|> and <|endoftext|> (>= 2), found "
                f"{context_length}; CLIP models use {DEFAULT_CONTEXT_LENGTH}."
            )
        texts = list(texts)
        distinct = list(dict.fromkeys(texts))  # each distinct text once
        for text in distinct:
            if not isinstance(text, str):
                raise TypeError(f"ClipTokenizer encodes str, found {type(text).__name__}: {text!r}.")
        if not distinct:
            return np.zeros((0, context_length), dtype=np.int32)
        short = [t for t in distinct if len(t) <= _BATCH_MAX_CHARS]
        long = [t for t in distinct if len(t) > _BATCH_MAX_CHARS]
        # Three groups, each split in one pass: plain ASCII texts (cleaning only lower-cases them as far
        # as pieces go: pieces never hold whitespace), texts cleaned into plain ASCII, and the rest.
        plain, ascii_cleaned, other = [], [], []  # texts; (text, cleaned) pairs; (text, cleaned) pairs
        joined = _BATCH_SEPARATOR.join(short)
        if NEEDS_FULL_CLEAN.search(joined) is None:
            plain = short
        else:
            # A text is plain when it is ASCII without "&" or controls (other than \t \n \r); str.isascii
            # costs nothing, and the controls are looked for per text only when the batch has any.
            controls = ASCII_CONTROLS.search(joined) is not None
            for text in short:
                if text.isascii() and "&" not in text and not (controls and ASCII_CONTROLS.search(text)):
                    plain.append(text)
                else:
                    cleaned = clean_text(text)
                    (ascii_cleaned if NEEDS_FTFY.search(cleaned) is None else other).append((text, cleaned))
        groups = ((plain, _BATCH_SEPARATOR.join(plain).lower(), _ASCII_PIECE_PATTERN),
                  *(([t for t, _ in pairs], _BATCH_SEPARATOR.join(c for _, c in pairs), pattern)
                    for pairs, pattern in ((ascii_cleaned, _ASCII_PIECE_PATTERN), (other, _PIECE_PATTERN))))
        rows, order = [], []  # (N', L) blocks of rows and the texts they belong to
        for group, joined, pattern in groups:
            if not group:
                continue
            block = self._tokenize_joined(group, joined, pattern, context_length, truncate)
            if block is None:  # a text spells <|endoftext|>: every text of the group alone
                long += group
            else:
                rows.append(block)
                order += group
        if long:
            # When truncating, only as many pieces as can reach the context.
            max_pieces = context_length if truncate else None
            ids = [self._encode_tuple(text, max_pieces) for text in long]
            rows.append(self._pad(ids, long, context_length, truncate))
            order += long
        table = np.concatenate(rows) if len(rows) != 1 else rows[0]  # (N', L), one row per distinct text
        if order == texts:
            return table
        where = {text: i for i, text in enumerate(order)}
        return table[[where[text] for text in texts]]  # (B, L)

    def _tokenize_joined(self, texts: list[str], joined: str, pattern, context_length: int,
                         truncate: bool) -> np.ndarray | None:
        """Padded rows (N, L) of `texts` from `joined`, their cleaned texts joined by the separator, split
        in one pass; None when a text itself contains an ``<|endoftext|>`` piece (not told from a separator)."""
        joined += _BATCH_SEPARATOR
        if pattern is _ASCII_PIECE_PATTERN:
            # No piece holds whitespace, and on this alphabet str.split splits on exactly \s: split into
            # words, each distinct word into ids once, and lay the words' ids end to end with numpy.
            words = joined.split()
            index = dict.fromkeys(words)  # distinct word -> its number
            distinct_ids = []
            for number, word in enumerate(index):
                index[word] = number
                distinct_ids.append([i for piece in pattern.findall(word) for i in self._piece_ids(piece)])
            counts = np.fromiter(map(len, distinct_ids), np.int64, len(distinct_ids))
            firsts = np.cumsum(counts) - counts  # where each distinct word's ids start in `pool`
            pool = np.fromiter(itertools.chain.from_iterable(distinct_ids), np.int32)
            word_numbers = np.fromiter(map(index.__getitem__, words), np.int64, len(words))
            counts = counts[word_numbers]  # ids of each word of the batch
            offsets = np.cumsum(counts) - counts  # where they go in `flat`
            flat = pool[np.arange(offsets[-1] + counts[-1]) + np.repeat(firsts[word_numbers] - offsets, counts)]
        else:
            flat = np.fromiter(itertools.chain.from_iterable(map(self._piece_ids, pattern.findall(joined))), np.int32)
        ends = np.flatnonzero(flat == self.eot_token_id)  # one per text, unless a text spells the token
        if ends.size != len(texts):
            return None
        starts = np.concatenate([[0], ends[:-1] + 1])
        return self._place(flat, starts, ends, texts, context_length, truncate)

    def _pad(self, ids: list[tuple[int, ...]], texts: list[str], context_length: int, truncate: bool) -> np.ndarray:
        """Padded rows (N, L) of per-text ids."""
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable((*t, self.eot_token_id) for t in ids), np.int32)
        ends = np.cumsum(lengths + 1) - 1
        return self._place(flat, ends - lengths, ends, texts, context_length, truncate)

    def _place(self, flat: np.ndarray, starts: np.ndarray, ends: np.ndarray, texts: list[str], context_length: int,
               truncate: bool) -> np.ndarray:
        """``clip.tokenize``'s layout of N texts whose ids lie in `flat`, text i at
        `flat[starts[i]:ends[i]]` followed by an ``<|endoftext|>`` at `ends[i]`: int32 (N, L)."""
        counts = ends - starts  # ids per text, without the specials
        over = np.flatnonzero(counts + 2 > context_length)
        if over.size and not truncate:
            text = texts[over[0]]
            shown = text if len(text) <= 200 else text[:200] + "..."
            raise ValueError(
                f"Text {shown!r} encodes to {counts[over[0]] + 2} tokens (with <|startoftext|> and "
                f"<|endoftext|>), more than context_length={context_length}. Shorten it, or pass "
                f"truncate=True to keep the first {context_length} tokens ending in <|endoftext|>."
            )
        row = np.repeat(np.arange(len(texts)), counts + 1)  # (T,) the text of each id, its end included
        col = np.arange(flat.size) - np.repeat(starts, counts + 1) + 1  # after <|startoftext|>
        is_end = np.zeros(flat.size, bool)
        is_end[ends] = True
        # Truncation keeps the first context_length - 1 tokens and ends with <|endoftext|>.
        keep = is_end | (col < context_length - 1)
        col = np.where(is_end, np.minimum(col, context_length - 1), col)
        result = np.zeros((len(texts), context_length), dtype=np.int32)  # (N, L)
        result[:, 0] = self.sot_token_id
        result[row[keep], col[keep]] = flat[keep]
        return result

    __call__ = tokenize


@functools.cache
def default_tokenizer() -> ClipTokenizer:
    """The shared tokenizer over the bundled merges file, built on first use."""
    return ClipTokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> np.ndarray:
    """Drop-in for ``clip.tokenize`` returning an int32 numpy array (B, context_length)."""
    return default_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)
