"""Caption tokenizer for stage 2: sentencepiece BPE, BPE-dropout and the text-slot layout.

This module owns training the caption BPE model (`train_bpe`, `train_bpe_from_source`),
loading it (`TextTokenizer`), and turning a caption into the ``text_len`` text slots of the
stage-2 sequence. The paper BPE-encodes the lowercased caption with a 16,384-token vocabulary,
uses at most 256 text tokens, applies 10% BPE-dropout during training, and learns "a special
padding token separately for each of the 256 text positions" (DALL·E §2.2, fn. 5, §B.2).

Id layout. Model ids ``0 .. vocab_size - 1`` come from the sentencepiece model:

====================  =====================================================================
``0`` ``<pad>``       reserved; never written into text slots (slot pads are below)
``1`` ``<unk>``       a run of characters outside the vocabulary (models without byte fallback)
``2`` ``<s>``         BOS: always text slot 0
``3`` ``</s>``        EOS: reserved, never emitted (the first pad already marks the end)
``4 .. 259``          ``<0x00> .. <0xFF>`` byte-fallback pieces (models with byte fallback):
                      a character outside the vocabulary becomes its UTF-8 bytes
then                  merged pieces in merge order (score = -rank), then single characters
====================  =====================================================================

Slot ids extend the model ids: the pad in text slot ``p`` is ``vocab_size + p``, so every
position has its own pad token, learned through its own embedding row (paper §2.2). The
text embedding table therefore has ``text_vocab_size(text_len) = vocab_size + text_len``
rows. Pads are ordinary tokens: they are not masked in attention.

Normalisation (`normalize`) is done here rather than by sentencepiece (the model is trained
with the ``identity`` rule): NFKC, lowercase, whitespace runs collapsed to one space, ends
stripped. Decoding returns exactly this normalised text.

BPE-dropout is implemented here on the model's merge table rather than with sentencepiece's
``enable_sampling``, whose random generator is process-global: its draws would depend on
which other captions the same worker or thread encoded before. Each call takes its own seed
(e.g. derived from ``(seed, epoch, example index)``), so a caption's segmentation is a pure
function of the caption and its seed, independent of worker count, thread count and order.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import sentencepiece as spm
from absl import logging
from sentencepiece import sentencepiece_model_pb2

# Paper fn. 5 and §B.2: "We also apply 10% BPE dropout" (10%, not the 20% some
# re-implementations use).
PAPER_DROPOUT = 0.1
# Paper §2.2: vocabulary of 16,384 and at most 256 text tokens.
PAPER_VOCAB_SIZE = 16384
PAPER_TEXT_LEN = 256

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
NUM_BYTES = 256
# Bumped whenever `normalize` changes, because old models then see different input.
NORMALIZER = "nfkc-lower-collapse-v1"
WORD_BOUNDARY = "\u2581"  # sentencepiece's visible space, "▁"

# A seed for BPE-dropout: an int, a sequence of ints such as (seed, epoch, index), or a
# numpy SeedSequence; anything `np.random.PCG64` accepts.
Seed = Union[int, Sequence[int], np.random.SeedSequence]

# sentencepiece keeps its random seed in process-global state; training takes this lock so
# that concurrent trainings in one process cannot reseed each other.
_TRAIN_LOCK = threading.Lock()


def normalize(text: str | bytes) -> str:
    """Returns the normalised caption: NFKC, lowercase, single spaces, no outer spaces.

    NFKC runs again after lowercasing because lowercasing can leave a string that is not
    NFKC-normal. "▁" counts as a space, as it does for sentencepiece.
    """
    if isinstance(text, (bytes, np.bytes_)):
        text = bytes(text).decode("utf-8", errors="replace")
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", str(text)).lower())
    return " ".join(text.replace(WORD_BOUNDARY, " ").split())


def _check_text_len(text_len: int) -> int:
    text_len = int(text_len)
    if text_len < 2:
        raise ValueError(f"text_len={text_len}: the text slots need room for BOS and at least "
                         "one token (the paper uses 256)")
    return text_len


def _check_dropout(dropout: float) -> float:
    dropout = float(dropout)
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout={dropout} is not a probability in [0, 1] "
                         f"(the paper uses {PAPER_DROPOUT})")
    return dropout


# --------------------------------------------------------------------------- training


def _model_path(out_prefix: str) -> str:
    prefix = os.fspath(out_prefix)
    if prefix.endswith(".model"):
        prefix = prefix[: -len(".model")]
    if not prefix or prefix.endswith(os.sep):
        raise ValueError(f"out_prefix={out_prefix!r} does not name a file")
    return prefix + ".model"


def train_bpe(
    captions: Iterable[str | bytes],
    out_prefix: str,
    *,
    vocab_size: int,
    max_sentence_chars: int = 2048,
    seed: int = 0,
    byte_fallback: bool = True,
    strict_vocab_size: bool = True,
    num_threads: int = 1,
) -> str:
    """Trains a sentencepiece BPE model on normalised captions; returns ``<out_prefix>.model``.

    Args:
      captions: caption strings (or UTF-8 bytes); normalised with `normalize`, empty ones skipped.
      out_prefix: where to write; the model goes to ``<out_prefix>.model``.
      vocab_size: model vocabulary including the 4 special ids and, with ``byte_fallback``,
        the 256 byte pieces (the paper uses 16,384).
      max_sentence_chars: captions are cut to this many characters for training only.
      seed: seed of sentencepiece's (process-global) random generator during training.
      byte_fallback: encode characters outside the vocabulary as UTF-8 byte pieces instead of
        ``<unk>``, so any caption round-trips.
      strict_vocab_size: if the corpus cannot support ``vocab_size`` pieces, raise; if False,
        write the smaller model the corpus supports (check `TextTokenizer.vocab_size`).
      num_threads: trainer threads. The trained model depends on it, so keep it fixed (the
        default, 1, is reproducible everywhere).

    Raises:
      ValueError: empty corpus, or ``vocab_size`` too small or too large for the corpus.
      FileExistsError: a different model already exists at ``<out_prefix>.model``; an
        identical one is left alone.
    """
    path = _model_path(out_prefix)
    vocab_size = int(vocab_size)
    reserved = NUM_SPECIAL + (NUM_BYTES if byte_fallback else 0)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for text pieces: {reserved} ids "
                         f"are reserved ({NUM_SPECIAL} special"
                         + (f" + {NUM_BYTES} byte-fallback)" if byte_fallback else ")"))
    if max_sentence_chars < 1:
        raise ValueError(f"max_sentence_chars={max_sentence_chars} must be positive")

    lines: list[str] = []
    num_cut = 0
    for caption in captions:
        text = normalize(caption)
        if len(text) > max_sentence_chars:
            text, num_cut = text[:max_sentence_chars].rstrip(), num_cut + 1
        if text:
            lines.append(text)
    if not lines:
        raise ValueError("no non-empty captions to train the BPE model on")

    buf = io.BytesIO()
    with _TRAIN_LOCK:
        spm.set_random_generator_seed(int(seed))
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=buf,
                model_type="bpe",
                vocab_size=vocab_size,
                hard_vocab_limit=bool(strict_vocab_size),
                character_coverage=1.0,
                byte_fallback=bool(byte_fallback),
                normalization_rule_name="identity",
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                # sentencepiece counts bytes and skips longer lines; a char is at most 4 bytes.
                max_sentence_length=4 * int(max_sentence_chars) + 4,
                num_threads=int(num_threads),
                minloglevel=2,
            )
        except RuntimeError as e:
            raise _training_error(e, vocab_size, len(lines)) from None
    model = buf.getvalue()

    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == model:
                return path
        raise FileExistsError(f"{path!r} holds a different BPE model; delete it or choose "
                              "another prefix (models are never overwritten)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(model)
    os.replace(tmp, path)
    actual = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    logging.info("trained BPE model %s: %d pieces (asked %d) from %d captions (%d cut to %d "
                 "chars)", path, actual, vocab_size, len(lines), num_cut, max_sentence_chars)
    return path


def _training_error(e: RuntimeError, vocab_size: int, num_lines: int) -> ValueError:
    msg = str(e)
    high = re.search(r"Vocabulary size too high.*?<=\s*(\d+)", msg)
    if high:
        return ValueError(
            f"vocab_size={vocab_size} is too large for this corpus ({num_lines} captions): it "
            f"supports at most {high.group(1)} pieces. Use more captions, a smaller vocab_size, "
            "or strict_vocab_size=False to accept a smaller model.")
    low = re.search(r"smaller than required_chars\.\s*(\d+)\s*vs\.?\s*(\d+)", msg)
    if low:
        return ValueError(
            f"vocab_size={vocab_size} is too small for this corpus: its distinct characters "
            f"plus reserved ids need {low.group(2)}.")
    return ValueError(f"sentencepiece BPE training failed: {msg}")


def _caption_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def train_bpe_from_source(
    source: Any,
    out_prefix: str,
    *,
    vocab_size: int,
    max_examples: int | None = None,
    field: str = "caption",
    seed: int = 0,
    **train_kwargs: Any,
) -> str:
    """Trains `train_bpe` on the ``field`` of a random-access source's records.

    ``source`` supports ``len`` and ``source[i] -> dict`` (e.g.
    ``builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})["train"]``;
    skipping image decoding makes reading captions much faster). Captions may be bytes or str.
    With ``max_examples``, a random subset of that size (chosen by ``seed``) is used instead
    of every record, so an ordered dataset is still sampled evenly.
    """
    n = len(source)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples} must be positive (or None for all)")
    if max_examples is not None and max_examples < n:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xB9E]))
        indices: Iterable[int] = np.sort(rng.choice(n, size=max_examples, replace=False)).tolist()
    else:
        indices = range(n)

    def captions() -> Iterator[str]:
        for i in indices:
            record = source[i]
            if field not in record:
                raise KeyError(f"record {i} has no {field!r} field (fields: {sorted(record)})")
            yield _caption_text(record[field])

    return train_bpe(captions(), out_prefix, vocab_size=vocab_size, seed=seed, **train_kwargs)


# --------------------------------------------------------------------------- tokenizer


class _Uniforms:
    """Uniform [0, 1) draws from one example's own generator, fetched in blocks for speed."""

    def __init__(self, seed: Seed):
        if isinstance(seed, np.ndarray):
            seed = seed.tolist()
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._buf: list[float] = []
        self._i = 0

    def __call__(self) -> float:
        if self._i == len(self._buf):
            self._buf, self._i = self._rng.random(64).tolist(), 0
        self._i += 1
        return self._buf[self._i - 1]


class TextTokenizer:
    """A trained caption BPE model: encode/decode, BPE-dropout and the text-slot layout.

    Thread-safe and picklable (the pickle carries the model bytes), so one instance can be
    shared by pipeline threads or shipped to worker processes.
    """

    def __init__(self, model_file: str):
        path = os.fspath(model_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BPE model {path!r} does not exist; train one with "
                                    "dalle_jax.tokenizers.bpe.train_bpe")
        with open(path, "rb") as f:
            self._load(f.read(), path)

    def _load(self, model: bytes, path: str) -> None:
        self.path = path
        self._model = model
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model)
        T = sentencepiece_model_pb2.TrainerSpec
        if proto.trainer_spec.model_type != T.BPE:
            raise ValueError(f"{path!r} is not a BPE model")
        if proto.normalizer_spec.name != "identity":
            raise ValueError(f"{path!r} normalises with {proto.normalizer_spec.name!r}; this "
                             "tokenizer normalises itself and needs a model trained by train_bpe")
        special = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if special != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{path!r} has special ids (pad, unk, bos, eos) = {special}, "
                             f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")
        self.byte_fallback = bool(proto.trainer_spec.byte_fallback)
        self.sha256 = hashlib.sha256(model).hexdigest()

        # Merge table for BPE-dropout. As in sentencepiece's BPE encoder, two adjacent symbols
        # may merge when their concatenation is a normal piece; the piece's score is the
        # merge's priority (a higher score was learned earlier).
        P = sentencepiece_model_pb2.ModelProto.SentencePiece
        self._piece_id: dict[str, int] = {}
        self._score: dict[str, float] = {}
        self._byte_id: dict[int, int] = {}
        unknown_start = np.zeros(self.vocab_size, bool)
        unknown_start[UNK_ID] = True
        for i, piece in enumerate(proto.pieces):
            if piece.type == P.NORMAL:
                self._piece_id[piece.piece] = i
                self._score[piece.piece] = piece.score
            elif piece.type == P.BYTE:
                value = int(piece.piece[3:5], 16)  # "<0xAB>"
                self._byte_id[value] = i
                # One unknown character = its first byte (continuation bytes are 10xxxxxx).
                unknown_start[i] = value & 0xC0 != 0x80
        self._unknown_start = unknown_start

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self._model, "path": self.path}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self._load(state["model"], state["path"])

    def __repr__(self) -> str:
        return f"TextTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    # ---------------------------------------------------------------- ids and identity

    @property
    def vocab_size(self) -> int:
        """Model ids ``0 .. vocab_size - 1`` (specials, byte pieces, BPE pieces)."""
        return self._sp.vocab_size()

    def text_vocab_size(self, text_len: int) -> int:
        """Rows of the text embedding: model ids plus one learned pad per text position."""
        return self.vocab_size + _check_text_len(text_len)

    def pad_ids(self, text_len: int) -> np.ndarray:
        """The per-position pad ids ``vocab_size + p`` for ``p < text_len``, int32."""
        return np.arange(self.vocab_size, self.vocab_size + _check_text_len(text_len),
                         dtype=np.int32)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to check later that it is used with the same tokenizer."""
        return {
            "type": "sentencepiece-bpe",
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "byte_fallback": self.byte_fallback,
            "normalizer": NORMALIZER,
            "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        }

    def check_identity(self, expected: Mapping[str, Any]) -> None:
        """Raises ValueError naming every field of ``expected`` this tokenizer does not match."""
        mine = self.identity()
        diffs = [f"{k}: expected {v!r}, this model has {mine.get(k)!r}"
                 for k, v in expected.items() if mine.get(k) != v]
        if diffs:
            raise ValueError(f"tokenizer {self.path!r} does not match the expected tokenizer:\n  "
                             + "\n  ".join(diffs))

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str | bytes) -> list[int]:
        """Model ids of the normalised caption (no BOS, no pads, no dropout)."""
        text = normalize(text)
        return self._sp.encode(text, out_type=int) if text else []

    def decode(self, ids: Iterable[int]) -> str:
        """Text of model or slot ids; special ids and per-position pads are skipped."""
        keep = [int(i) for i in np.asarray(list(ids), np.int64).reshape(-1)
                if NUM_SPECIAL <= i < self.vocab_size or i == UNK_ID]
        return self._sp.decode(keep)

    def num_unknown(self, ids: Iterable[int]) -> int:
        """Characters (byte fallback) or character runs (``<unk>``) outside the vocabulary."""
        ids = np.asarray(list(ids), np.int64)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        return int(self._unknown_start[ids].sum())

    def encode_dropout(self, text: str | bytes, *, dropout: float, rng_seed: Seed) -> list[int]:
        """Model ids with BPE-dropout (Provilkov et al. 2020), deterministic in ``rng_seed``.

        Words (pieces never cross a "▁" word start) are merged as in sentencepiece's BPE
        encoder: repeatedly merge the adjacent pair whose concatenation has the highest score,
        leftmost first on ties. With dropout, every candidate merge is dropped with
        probability ``dropout`` at each step, as in Algorithm 1 of the BPE-dropout paper; the
        word is finished once all candidates of a step are dropped. ``dropout=0`` gives
        exactly `encode`; ``dropout=1`` gives single characters.
        """
        dropout = _check_dropout(dropout)
        text = normalize(text)
        if not text:
            return []
        draw = _Uniforms(rng_seed) if dropout > 0 else None
        ids: list[int] = []
        for word in text.split(" "):
            for piece in self._merge_word(list(WORD_BOUNDARY + word), dropout, draw):
                self._append_piece(ids, piece)
        return ids

    def _merge_word(self, symbols: list[str], dropout: float, draw: _Uniforms | None) -> list[str]:
        score = self._score
        while len(symbols) > 1:
            best, best_score = -1, -np.inf
            for i in range(len(symbols) - 1):
                s = score.get(symbols[i] + symbols[i + 1])
                if s is None or (draw is not None and draw() < dropout):
                    continue
                if s > best_score:
                    best, best_score = i, s
            if best < 0:
                break
            symbols[best: best + 2] = [symbols[best] + symbols[best + 1]]
        return symbols

    def _append_piece(self, ids: list[int], piece: str) -> None:
        i = self._piece_id.get(piece)
        if i is not None:
            ids.append(i)
        elif self.byte_fallback:
            ids.extend(self._byte_id[b] for b in piece.encode("utf-8"))
        elif not ids or ids[-1] != UNK_ID:
            # sentencepiece folds a run of unknown characters into one <unk>.
            ids.append(UNK_ID)

    # ---------------------------------------------------------------- text slots

    def encode_slots(
        self,
        text: str | bytes,
        *,
        text_len: int,
        dropout: float = 0.0,
        rng_seed: Seed | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The ``text_len`` text slots ``[BOS, bpe..., pad_p...]`` of one caption.

        Returns int32 slot ids and ``info``: ``num_tokens`` (slots before the first pad, BOS
        included), ``truncated`` (the caption had more than ``text_len - 1`` tokens; the rest
        was cut) and ``num_unknown`` (see `num_unknown`; counted over the whole caption).
        ``dropout > 0`` (training only; the paper uses 0.1) requires ``rng_seed``.
        """
        text_len = _check_text_len(text_len)
        dropout = _check_dropout(dropout)
        if dropout > 0:
            if rng_seed is None:
                raise ValueError("BPE-dropout needs rng_seed (e.g. derived from the seed, epoch "
                                 "and example index) so that encoding is reproducible")
            ids = self.encode_dropout(text, dropout=dropout, rng_seed=rng_seed)
        else:
            ids = self.encode(text)
        keep = min(len(ids), text_len - 1)
        slots = self.pad_ids(text_len)
        slots[0] = BOS_ID
        slots[1: 1 + keep] = ids[:keep]
        info = {"num_tokens": 1 + keep, "truncated": len(ids) > keep,
                "num_unknown": self.num_unknown(ids)}
        return slots, info

    def encode_batch_slots(
        self,
        texts: Sequence[str | bytes],
        *,
        text_len: int,
        dropout: float = 0.0,
        seeds: Sequence[Seed] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`encode_slots` over a batch: int32 ``(B, text_len)`` slots and info arrays ``(B,)``.

        ``seeds[b]`` seeds example ``b``'s dropout (an int, or a row of ints such as
        ``(seed, epoch, index)``), so an example's tokens do not depend on its batch.
        """
        text_len = _check_text_len(text_len)
        dropout = _check_dropout(dropout)
        n = len(texts)
        if dropout > 0:
            if seeds is None:
                raise ValueError("BPE-dropout needs one seed per example (seeds=...)")
            if len(seeds) != n:
                raise ValueError(f"{len(seeds)} seeds for {n} texts")
        out = np.empty((n, text_len), np.int32)
        info = {"num_tokens": np.empty(n, np.int32), "truncated": np.empty(n, bool),
                "num_unknown": np.empty(n, np.int32)}
        for b, text in enumerate(texts):
            seed = seeds[b] if dropout > 0 else None
            out[b], one = self.encode_slots(text, text_len=text_len, dropout=dropout, rng_seed=seed)
            for k, v in one.items():
                info[k][b] = v
        return out, info
