"""Stage-2 input pipeline: pre-encoded image tokens plus BPE-encoded caption slots.

Reads a random-access source of token records (`dalle_jax.data.tokens.TokenSource`:
``image_tokens`` int32 ``(G*G,)`` and ``caption``) and yields host-local batches::

    text_tokens     int32 (B, T)   [BOS, bpe..., pad_p...] (see `TextTokenizer.encode_slots`)
    image_tokens    int32 (B, I)
    caption         object (B,)    the caption text
    text_truncated  bool (B,)      the caption had more than T - 1 BPE tokens

The order of operations and the checkpoint state are those of `dalle_jax.data.pipeline`
(reshuffle every epoch → repeat → per-example map → this process's rows of each global
batch → batch, all on grain ``MapDataset``s), whose iteration and restore machinery this
module reuses. The
per-example map is BPE encoding with BPE-dropout (paper §2.2 / App. B.2: rate 0.1)
seeded by ``(seed, epoch, record key)`` only, so a caption's segmentation does not
depend on the batch size, the process count, the shuffle or the worker count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from dalle_jax.data import pipeline as image_pipeline
from dalle_jax.data.pipeline import _decode_text



@dataclasses.dataclass(frozen=True, kw_only=True)
class TextPipelineConfig(image_pipeline.CommonPipelineSettings):
    """Settings of the stage-2 pipeline: `pipeline.CommonPipelineSettings` (the seed also
    seeds the BPE-dropout) plus

    Attributes:
        text_len: text slots ``T`` per example.
        bpe_dropout: BPE-dropout rate (training: 0.1 as in the paper; evaluation: 0).
    """

    text_len: int
    bpe_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.text_len < 2:
            raise ValueError(f"text_len must be >= 2, got {self.text_len}")
        if not 0.0 <= self.bpe_dropout < 1.0:
            raise ValueError(f"bpe_dropout must be in [0, 1), got {self.bpe_dropout}")


class _EncodeExample:
    """Reads one token record and encodes its caption (module level, so it pickles)."""

    def __init__(self, source: Any, tokenizer: Any, cfg: TextPipelineConfig, num_records: int):
        self._source = source
        self._tokenizer = tokenizer
        self._text_len = cfg.text_len
        self._dropout = cfg.bpe_dropout
        self._seed = cfg.seed
        self._num_records = num_records

    def __call__(self, index: int, record_key: int) -> dict[str, Any]:
        # `index` runs over the repeated records, so it gives the epoch: a caption gets a new
        # segmentation each epoch (the point of BPE-dropout) but the same one on a rerun.
        epoch = index // self._num_records
        record = self._source[int(record_key)]
        caption = str(_decode_text(record["caption"]))
        slots, info = self._tokenizer.encode_slots(
            caption, text_len=self._text_len, dropout=self._dropout,
            rng_seed=(self._seed, epoch, int(record_key)) if self._dropout > 0 else None)
        return {
            "text_tokens": slots,
            "image_tokens": np.asarray(record["image_tokens"], np.int32),
            "caption": caption,
            "text_truncated": np.bool_(info["truncated"]),
        }


class TextPipeline(image_pipeline.Pipeline):
    """Iterator over stage-2 host batches with a JSON-serialisable checkpoint state.

    Sharding, shuffling, batching, iteration and the checkpoint state come from
    `dalle_jax.data.pipeline.Pipeline`; only the per-example map and the record settings
    in the fingerprint differ.
    """

    def __init__(self, source: Any, tokenizer: Any, cfg: TextPipelineConfig,
                 shard_options: grain.sharding.ShardOptions):
        self._tokenizer = tokenizer
        super().__init__(source, cfg, shard_options)

    def _example_fn(self, source: Any, cfg: TextPipelineConfig, num_records: int):
        return _EncodeExample(source, self._tokenizer, cfg, num_records)

    def _settings(self, cfg: TextPipelineConfig) -> dict[str, Any]:
        # The tokenizer's hash is included: another BPE model gives other text tokens.
        return {
            "kind": "text",
            "text_len": cfg.text_len,
            "bpe_dropout": cfg.bpe_dropout,
            "tokenizer_sha256": str(getattr(self._tokenizer, "sha256", "")),
        }


def make_text_pipeline(
    source: Any,
    tokenizer: Any,
    cfg: TextPipelineConfig,
    *,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> TextPipeline:
    """Builds the stage-2 pipeline for this process.

    Args:
        source: random-access token records (``image_tokens``, ``caption``).
        tokenizer: a `TextTokenizer`.
        cfg: pipeline settings.
        shard_options: which rows of each global batch this process reads; defaults to
            ``ShardByJaxProcess()`` (call after ``jax.distributed.initialize``); tests
            pass ``ShardOptions(i, n)``.
    """
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return TextPipeline(source, tokenizer, cfg, shard_options)


def make_input(data_cfg: Any, text_cfg: Any, tokenizer: Any, split: str, *, train: bool,
               num_epochs: int | None = None) -> TextPipeline:
    """The pipeline of a run config's ``data`` and ``text`` sections for one split.

    Training reshuffles, repeats forever and applies ``text.dropout``; evaluation reads
    the split in order with dropout 0 (``num_epochs`` passes, default one).
    """
    from dalle_jax.data.tokens import TokenSource

    source = TokenSource(str(data_cfg.tokens_dir), split)
    cfg = TextPipelineConfig(
        global_batch_size=int(data_cfg.global_batch_size),
        text_len=int(text_cfg.text_len),
        bpe_dropout=float(text_cfg.dropout) if train else 0.0,
        seed=int(data_cfg.seed),
        shuffle=train,
        num_epochs=num_epochs if not train else None,
        worker_count=int(data_cfg.worker_count) if train else 0,
    )
    if not train and cfg.num_epochs is None:
        cfg = dataclasses.replace(cfg, num_epochs=1)
    return make_text_pipeline(source, tokenizer, cfg)


__all__ = ["TextPipeline", "TextPipelineConfig", "make_input", "make_text_pipeline"]
