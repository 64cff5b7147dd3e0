"""OpenAI CLIP's text tokenizer: byte-level BPE with end-of-word markers.

OpenAI's CLIP weights only make sense with the ids of the tokenizer they were trained
with, so this module reproduces that tokenizer from its merges file
(``bpe_simple_vocab_16e6.txt.gz``, shipped with OpenAI's ``clip`` package), read from a local
path:

* text cleanup: ``ftfy.fix_text`` (mojibake, odd quotes and widths; a core dependency so
  every installation tokenizes alike), HTML entities unescaped twice, whitespace runs
  collapsed to one space, outer whitespace stripped, lower case;
* pre-tokenization with `PATTERN` (the special tokens, English contractions, letter runs,
  single digits, runs of other non-space symbols);
* each piece's UTF-8 bytes mapped to printable characters (`bytes_to_unicode`), its last
  character marked with ``</w>``, and merged by BPE: the lowest-ranked adjacent pair of
  the merges file, every occurrence left to right, until no pair has a rank;
* the vocabulary is built from the merges file alone: the 256 byte characters, the same
  with ``</w>``, one token per merge (in merge order), then ``<|startoftext|>`` and
  ``<|endoftext|>``. With OpenAI's file and its 48,894 merges that is 49,408 ids.

`ClipTokenizer.encode_batch` lays captions out as the text tower reads them:
``[SOT, ids..., EOT, 0, ...]`` with the end-of-text slot of each row.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import os
from collections.abc import Sequence

import numpy as np

# OpenAI's pre-tokenization pattern (matched case-insensitively, on lower-cased text).
PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
           r"""|[^\s\p{L}\p{N}]+""")
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
END_OF_WORD = "</w>"
# OpenAI's vocabulary: 49152 BPE tokens less the 256 byte tokens and the two specials are
# merges (the file holds more; they use the first ones).
OPENAI_NUM_MERGES = 49152 - 256 - 2
OPENAI_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
_WHERE = ("OpenAI's merges file ships with their CLIP code (github.com/openai/CLIP, "
          f"clip/{OPENAI_MERGES_FILE}); download it and pass its local path")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> one printable character, so BPE works on strings without whitespace
    or control characters.

    The printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the remaining bytes, in increasing order, take the characters from
    U+0100 upward. The dict is ordered by the printable bytes first, then the others,
    the order the vocabulary's first 256 ids follow.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """OpenAI's cleanup before pre-tokenization: ftfy, HTML unescaped twice, whitespace
    collapsed and stripped, lower case."""
    try:
        import ftfy
    except ImportError as e:  # pragma: no cover - ftfy is a core dependency
        raise ImportError("the OpenAI CLIP tokenizer needs ftfy (pip install ftfy), as "
                          "OpenAI's own tokenizer does") from e
    import regex

    text = ftfy.fix_text(str(text))
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _read_merges(path: str, num_merges: int | None) -> tuple[list[tuple[str, str]], bytes]:
    """The merges (pairs) of a gzip'd or plain merges file, and the file's bytes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP BPE merges file {path!r} does not exist; {_WHERE}")
    with open(path, "rb") as f:
        raw = f.read()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    lines = data.decode("utf-8").split("\n")
    # OpenAI's file (and Hugging Face's merges.txt) starts with a version header.
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    merges = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path!r} line {n + 2}: a merge is two symbols separated by a "
                             f"space, got {line!r}")
        merges.append((parts[0], parts[1]))
    if num_merges is None:
        num_merges = min(OPENAI_NUM_MERGES, len(merges))
    if not 0 <= num_merges <= len(merges):
        raise ValueError(f"num_merges={num_merges} but {path!r} holds {len(merges)} merges")
    return merges[:num_merges], raw


class ClipTokenizer:
    """OpenAI CLIP's BPE tokenizer from a local merges file.

    Args:
        merges_path: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` or any merges file in its
            format (gzip'd or plain text, optional ``#version`` header line, one
            ``left right`` pair per line).
        num_merges: how many merges to use; None: OpenAI's 48,894 (or all, if the file
            has fewer).

    Attributes:
        vocab_size: ``512 + num_merges + 2``.
        sot_id, eot_id: the start- and end-of-text ids (the last two).
        encoder: token string -> id.
    """

    def __init__(self, merges_path: str, *, num_merges: int | None = None):
        import regex

        self.path = str(merges_path)
        merges, raw = _read_merges(self.path, num_merges)
        self.num_merges = len(merges)
        self._sha256 = hashlib.sha256(raw).hexdigest()
        self.byte_encoder = bytes_to_unicode()
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self._pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self._cache: dict[str, tuple[str, ...]] = {SOT: (SOT,), EOT: (EOT,)}

    def __repr__(self) -> str:
        return f"ClipTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """The BPE tokens of one byte-encoded piece (the last one ends with ``</w>``)."""
        if piece in self._cache:
            return self._cache[piece]
        word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        ranks = self.ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = tuple(word)
        if len(self._cache) < 100_000:
            self._cache[piece] = out
        return out

    def encode(self, text: str) -> list[int]:
        """The BPE ids of ``text`` (no start or end token)."""
        ids = []
        for piece in self._pattern.findall(clean_text(text)):
            encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[tok] for tok in self._bpe(encoded))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of BPE ids (for messages and debugging; special tokens kept as text)."""
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        text = "".join(self.decoder[int(i)] for i in ids)
        chars = text.replace(END_OF_WORD, " ")
        out = bytearray()
        for c in chars:
            out.extend(bytes([byte_decoder[c]]) if c in byte_decoder else c.encode("utf-8"))
        return out.decode("utf-8", errors="replace").strip()

    def encode_batch(self, texts: Sequence[str], context_length: int = 77
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token rows for the text tower.

        Each row is ``[SOT, ids..., EOT, 0, ...]`` (OpenAI pads with id 0). A text too long
        for ``context_length`` slots keeps its first ids and has EOT in the last slot.

        Returns:
            ``tokens`` int32 ``(N, context_length)``, ``eot_index`` int32 ``(N,)`` (the EOT
            slot of each row) and ``truncated`` bool ``(N,)`` (which texts were cut, so the
            caller can say so).
        """
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of texts, not one string")
        n = len(texts)
        tokens = np.zeros((n, context_length), np.int32)
        eot_index = np.zeros((n,), np.int32)
        truncated = np.zeros((n,), np.bool_)
        for r, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > context_length:
                ids = ids[:context_length - 1] + [self.eot_id]
                truncated[r] = True
            tokens[r, :len(ids)] = ids
            eot_index[r] = len(ids) - 1
        return tokens, eot_index, truncated

    def identity(self) -> dict:
        """What a scorer export records of its tokenizer: kind, size, the merges file's
        sha256 and name (the file an export keeps under ``tokenizer/``)."""
        return {"type": "openai_clip_bpe", "vocab_size": self.vocab_size,
                "num_merges": self.num_merges, "sha256": self._sha256,
                "file": os.path.basename(self.path)}
