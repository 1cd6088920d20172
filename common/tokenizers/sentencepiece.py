"""SentencePiece BPE tokenizer for the DALL·E text stream: train, save, load, encode, decode.

DALL·E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", sec. 2.2) lowercases captions and
BPE-encodes them with a 16,384-token vocabulary into at most 256 text tokens. OpenAI never released
that BPE model, so we train our own with SentencePiece (Kudo & Richardson 2018) on the training
captions. Choices and why:

* ``model_type="bpe"`` as in the paper, ``vocab_size=16384`` by default.
* ``byte_fallback=True`` with ``character_coverage=1.0`` and the ``identity`` normalization (no NFKC,
  no whitespace squashing): any string, including characters never seen in training, encodes to
  pieces or UTF-8 byte pieces and decodes back *exactly*. The one exception is U+2581 ("▁"),
  SentencePiece's own whitespace marker, which decodes as a space.
* Fixed special ids: pad=0, unk=1, bos=2, eos=3, so padded batches are zero-filled.
* Determinism: SentencePiece's BPE trainer is deterministic on one thread for a fixed sentence list.
  When a corpus is subsampled (``max_sentences``) we sample here with ``random.Random(seed)``,
  because SentencePiece's own sampler seeds a thread-local generator once per process and ignores
  later seeds.
"""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_FILENAME = "sentencepiece.model"
_NUM_BYTE_PIECES = 256
_NUM_SPECIAL_PIECES = 4


class SentencePieceTokenizer:
    """A trained SentencePiece model plus the batching rules the DALL·E data pipeline needs.

    Picklable (it pickles the serialized model), so it can be sent to grain worker processes.
    """

    def __init__(self, model_proto: bytes):
        self._model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
        found = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"expected a SentencePiece model with pad/unk/bos/eos ids {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}, "
                f"found {found}; train it with common.tokenizers.sentencepiece.train_bpe"
            )

    # --- persistence -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """Loads a ``.model`` file, or ``<dir>/sentencepiece.model`` when given a directory."""
        file = Path(path)
        if file.is_dir():
            file = file / MODEL_FILENAME
        if not file.is_file():
            raise FileNotFoundError(
                f"expected a SentencePiece model file at {file}, found nothing; train one with "
                "common.tokenizers.sentencepiece.train_bpe(captions, path) or point to an existing .model file"
            )
        proto = file.read_bytes()
        if not proto:  # which SentencePiece would parse as a model without pieces
            raise ValueError(f"{file} is empty (0 bytes): restore it, or train one with "
                             "common.tokenizers.sentencepiece.train_bpe.")
        try:
            return cls(proto)
        except RuntimeError as err:  # SentencePiece's parser
            raise ValueError(
                f"{file} ({len(proto)} bytes) is not a SentencePiece model: it does not parse ({err}), so it "
                "is truncated, damaged or of another format. Restore it, or train one with "
                "common.tokenizers.sentencepiece.train_bpe."
            ) from err
        except ValueError as err:  # parsed, but not a model train_bpe made
            raise ValueError(f"{file}: {err}") from err

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the serialized model to ``path`` (or ``<dir>/sentencepiece.model``); returns the file."""
        file = _model_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(self._model_proto)
        return file

    @property
    def model_proto(self) -> bytes:
        """The serialized ModelProto: byte-identical across deterministic trainings."""
        return self._model_proto

    def __getstate__(self) -> dict[str, Any]:
        return {"model_proto": self._model_proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"])

    # --- vocabulary --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    pad_id = property(lambda self: PAD_ID)
    unk_id = property(lambda self: UNK_ID)
    bos_id = property(lambda self: BOS_ID)
    eos_id = property(lambda self: EOS_ID)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    # --- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str to encode, found {type(text).__name__}")
        _check_unicode(text)
        return self._sp.encode(text)

    def encode_batch(
        self,
        texts: Sequence[str],
        length: int,
        *,
        truncate: bool = True,
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> np.ndarray:
        """Encodes ``texts`` into a right-padded ``(B, length)`` int32 array filled with ``pad_id``.

        With ``truncate`` the text tokens are cut so that the requested bos/eos still fit (the eos of a
        truncated caption is kept, matching how DALL·E pads and truncates to 256 text tokens);
        without it an over-long text raises ``ValueError``.
        """
        if isinstance(texts, str):
            raise TypeError("expected a sequence of str, found a single str; wrap it in a list")
        for row, text in enumerate(texts):
            _check_unicode(text, f"text {row}")
        n_special = int(add_bos) + int(add_eos)
        if length < max(n_special, 1):
            raise ValueError(f"expected length >= {max(n_special, 1)} (room for bos/eos), found {length}")
        budget = length - n_special
        out = np.full((len(texts), length), PAD_ID, dtype=np.int32)  # (B, length)
        for row, ids in enumerate(self._sp.encode(list(texts))):
            if len(ids) > budget:
                if not truncate:
                    raise ValueError(
                        f"text {row} has {len(ids)} tokens, more than the {budget} that fit in length={length}"
                        f"{' with bos/eos' if n_special else ''}; pass truncate=True or a larger length "
                        f"(text starts: {texts[row][:60]!r})"
                    )
                ids = ids[:budget]
            ids = [BOS_ID] * add_bos + ids + [EOS_ID] * add_eos
            out[row, : len(ids)] = ids
        return out

    # --- decoding ----------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a 1-D id sequence; pad, bos and eos are dropped."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"expected a 1-D id sequence, found shape {ids.shape}; use decode_batch for (B, L)")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"expected ids in [0, {self.vocab_size}), found range [{ids.min()}, {ids.max()}]; "
                "were these ids made by a different tokenizer?"
            )
        keep = ids[(ids != PAD_ID) & (ids != BOS_ID) & (ids != EOS_ID)]
        return self._sp.decode(keep.astype(np.int64).tolist())

    def decode_batch(self, ids: np.ndarray) -> list[str]:
        """Texts of a ``(B, L)`` id array, e.g. the output of ``encode_batch`` or a sampler."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"expected a (B, L) id array, found shape {ids.shape}")
        return [self.decode(row) for row in ids]


def train_bpe(
    captions: Iterable[str],
    model_prefix_or_dir: str | os.PathLike | None = None,
    vocab_size: int = 16384,
    seed: int = 0,
    *,
    max_sentences: int | None = None,
    allow_smaller_vocab: bool = False,
    **trainer_options: Any,
) -> SentencePieceTokenizer:
    """Trains a byte-fallback SentencePiece BPE model on ``captions`` and returns its tokenizer.

    Args:
      captions: any iterable of caption strings (a list, a generator over a dataset, ...); consumed once.
      model_prefix_or_dir: where to save the model. An existing directory (or a path ending in a
        separator) receives ``sentencepiece.model``; a path ending in ``.model`` is used as is; any
        other path is a prefix and gets ``.model`` appended. ``None`` keeps the model in memory.
      vocab_size: total vocabulary including the 4 special and 256 byte pieces (DALL·E: 16384).
      seed: seeds the subsampling of ``max_sentences`` captions (reservoir sampling). Training on the
        full corpus is deterministic and does not depend on it.
      max_sentences: train on a uniform random sample of this many captions (SentencePiece keeps the
        whole training set in memory); ``None`` uses every caption.
      allow_smaller_vocab: when the corpus cannot support ``vocab_size`` pieces, return a smaller
        vocabulary instead of raising (``tokenizer.vocab_size`` then tells the real size).
      **trainer_options: extra ``SentencePieceTrainer`` options, overriding the defaults below.
    """
    minimum = _NUM_SPECIAL_PIECES + _NUM_BYTE_PIECES
    if vocab_size <= minimum:
        raise ValueError(
            f"expected vocab_size > {minimum} (4 special + 256 byte-fallback pieces), found {vocab_size}"
        )
    sentences: Iterable[str] = _reservoir_sample(captions, max_sentences, seed) if max_sentences else captions
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=not allow_smaller_vocab,
        minloglevel=2,
    )
    options.update(trainer_options)
    buffer = io.BytesIO()
    stream = _CaptionStream(sentences)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(stream), model_writer=buffer, **options)
    except RuntimeError as error:
        if stream.error is not None:  # SentencePiece wraps errors raised by the iterator; re-raise the original.
            raise stream.error from None
        raise _explain(error, vocab_size) from error
    tokenizer = SentencePieceTokenizer(buffer.getvalue())
    if model_prefix_or_dir is not None:
        tokenizer.save(model_prefix_or_dir)
    return tokenizer


def _check_unicode(text: str, what: str = "text") -> None:
    """Raises ValueError when `text` cannot be UTF-8 encoded (a lone surrogate such as "\\ud800")."""
    if not isinstance(text, str):
        raise TypeError(f"expected {what} to be a str, found {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} holds {err.object[err.start:err.end]!r} at position {err.start}, which is not valid Unicode "
            f"(a lone surrogate, {err.reason}), so SentencePiece cannot encode it; clean the text "
            f"(e.g. text.encode('utf-8', 'replace').decode()). Text starts: {text[:60]!r}"
        ) from None


def _model_file(path: str | os.PathLike) -> Path:
    text = os.fspath(path)
    file = Path(text)
    if file.is_dir() or text.endswith(("/", os.sep)):
        return file / MODEL_FILENAME
    if file.suffix == ".model":
        return file
    return Path(text + ".model")


class _CaptionStream:
    """Feeds captions to the trainer, type-checked, remembering any error raised while iterating."""

    def __init__(self, captions: Iterable[str]):
        self._captions = captions
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for i, caption in enumerate(self._captions):
                if not isinstance(caption, str):
                    raise TypeError(f"expected captions to be str, found {type(caption).__name__} at index {i}")
                yield caption
        except Exception as error:
            self.error = error
            raise


def _reservoir_sample(captions: Iterable[str], k: int, seed: int) -> list[str]:
    """Uniform sample of ``k`` items in one pass (Vitter's algorithm R), deterministic for ``seed``."""
    rng = random.Random(seed)
    sample: list[str] = []
    for i, caption in enumerate(captions):
        if i < k:
            sample.append(caption)
        else:
            j = rng.randrange(i + 1)
            if j < k:
                sample[j] = caption
    return sample


def _explain(error: RuntimeError, vocab_size: int) -> Exception:
    """Turns SentencePiece's CHECK failures into errors that say what to do."""
    message = str(error)
    if "Vocabulary size too high" in message:
        limit = re.search(r"<= (\d+)", message)
        most = limit.group(1) if limit else "fewer"
        return ValueError(
            f"the caption corpus is too small for vocab_size={vocab_size}: it supports at most {most} pieces. "
            f"Train on more captions, pass vocab_size<={most}, or pass allow_smaller_vocab=True "
            "to accept a smaller vocabulary"
        )
    if "Vocabulary size is smaller than required_chars" in message:
        needed = re.search(r"vs (\d+)", message)
        return ValueError(
            f"vocab_size={vocab_size} cannot hold every distinct character of the corpus plus the special "
            f"and byte pieces ({needed.group(1) if needed else 'more'} needed); increase vocab_size, or lower "
            "character_coverage (rare characters then fall back to bytes)"
        )
    if "sentences_.empty()" in message:
        return ValueError("expected at least one non-empty caption to train on, found none")
    return error
