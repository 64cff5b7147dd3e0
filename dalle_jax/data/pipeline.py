"""Grain input pipeline: shuffle, augment, batch, split over processes, make global arrays.

The pipeline reads any random-access source (``len(source)`` and ``source[i]`` giving a
dict with a uint8 ``(H, W, 3)`` ``image``, usually a ``caption`` as bytes or str, and
optionally other numeric fields), for example ``builder.as_data_source()[split]`` of a
TFDS ``array_record`` dataset.

Order of operations, all on grain ``MapDataset``s so that every batch has a fixed
position in a fixed sequence:

1. **Shuffle**: a new permutation of *all* record keys every epoch (one global order,
   the same on every process), then repeat for ``num_epochs`` (``None``: forever;
   training stops on step counts).
2. **Load and augment**: each record is augmented with a generator seeded by
   ``(seed, epoch, record_key)`` only, so an example's augmentation does not depend on
   the batch size, the process count, the shuffle or the worker count.
3. **Split over processes**: the global sequence is cut into global batches of
   ``global_batch_size``; process ``p`` of ``P`` keeps rows ``[p * L, (p + 1) * L)`` of
   each (``L = global_batch_size // P``), which is where
   ``jax.make_array_from_process_local_data`` puts its rows in the global batch.
4. **Batch** per process: ``L`` examples.

The global batches are therefore the same whatever the number of processes: a run on 2
hosts sees exactly the examples, in the same rows, that a run on 1 host sees, so the
two train identically and a checkpoint moves between them. Every process reads records
from the whole split (random access), not from a slice of its own.

Batching happens before the data is handed to threads or worker processes, so a
worker produces whole batches at fixed positions: the output is identical for every
``worker_count``. The iterator's checkpoint state is therefore just the number of
batches already returned (plus a fingerprint of the settings), and restoring it slices
the batch sequence at that position, on any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import flags

from dalle_jax.data.augment import AUGMENTATIONS

Batch = dict[str, Any]

_STATE_VERSION = 1
# A state records the next batch's position plus every setting that decides the batch
# sequence (the pipeline's "fingerprint"); restoring into a pipeline whose fingerprint
# differs is refused, because "the next batch" would not be the one the saved run would
# have seen. worker_count and the process count and index are absent because they do not
# change the global batches: one process's state (what a checkpoint keeps) is valid on
# every process of this run and of a run with another number of processes.


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonPipelineSettings:
    """Settings every input pipeline shares (image and token pipelines alike).

    Attributes:
        global_batch_size: examples per step over all processes; must divide evenly by
            the number of shards (processes).
        seed: seeds the shuffle and the per-example randomness; in ``[0, 2**32)``.
        shuffle: reshuffle the records every epoch.
        num_epochs: passes over the data; None repeats forever.
        worker_count: grain worker processes (0: work in this process). Does not change
            the output.
        drop_remainder: drop a final partial batch (only matters for finite epochs; with
            several processes a final partial batch is always dropped, since it could
            not be split evenly).
        read_threads: threads in each process that build batches ahead of time
            (0: build them on demand).
        prefetch_batches: batches each process keeps ready ahead of time.
    """

    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 0
    drop_remainder: bool = True
    read_threads: int = 2
    prefetch_batches: int = 2

    def __post_init__(self):
        if self.global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {self.global_batch_size}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {self.num_epochs}")
        if self.worker_count < 0 or self.read_threads < 0 or self.prefetch_batches < 0:
            raise ValueError("worker_count, read_threads and prefetch_batches must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig(CommonPipelineSettings):
    """Settings of the image pipeline: `CommonPipelineSettings` plus

    Attributes:
        image_size: side of the square output images.
        augment: key of ``AUGMENTATIONS``: "dvae", "transformer" or "none" (centre crop).
    """

    image_size: int
    augment: str = "dvae"

    def __post_init__(self):
        super().__post_init__()
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(
                f"unknown augment {self.augment!r}; choose from {sorted(AUGMENTATIONS)}"
            )


class _ProcessRows:
    """Maps position ``i`` of one process's example sequence to its global position.

    Global batch ``b`` holds global positions ``[b * G, (b + 1) * G)``; process ``p``
    owns the ``L = G / P`` rows starting at ``p * L`` of each. A module-level callable, so
    worker processes can pickle it.
    """

    def __init__(self, examples: Any, shard_index: int, shard_count: int, local_batch: int):
        self._examples = examples
        self._offset = shard_index * local_batch
        self._local = local_batch
        self._global = shard_count * local_batch

    def __call__(self, i: int) -> Any:
        b, j = divmod(int(i), self._local)
        return self._examples[b * self._global + self._offset + j]


def _shuffle_seed(seed: int) -> int:
    """Derives the shuffle seed from the pipeline seed.

    grain seeds epoch ``e`` of a shuffle with ``seed + e``, so using the pipeline seed
    directly would make seed ``s + 1`` replay the orders of seed ``s`` shifted by one
    epoch. Hashing the seed removes that overlap.
    """
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def _decode_text(value: Any) -> Any:
    """Decodes bytes (TFDS ``Text`` features come back as bytes) to str."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return value


class _LoadAndAugment:
    """Reads one record by key and augments its image (module level, so it pickles)."""

    def __init__(self, source: Any, augment: str, image_size: int, seed: int, num_records: int):
        self._source = source
        self._augment = augment
        self._image_size = image_size
        self._seed = seed
        self._num_records = num_records

    def __call__(self, index: int, record_key: int) -> dict[str, Any]:
        # `index` runs over the repeated records, so it tells the epoch; the generator is
        # then keyed by what the example *is* in that epoch, not by where it lands.
        epoch = index // self._num_records
        rng = np.random.default_rng([self._seed, epoch, int(record_key)])
        record = self._source[int(record_key)]
        example = {key: _decode_text(value) for key, value in record.items()}
        example["image"] = AUGMENTATIONS[self._augment](
            np.asarray(record["image"]), rng, self._image_size
        )
        return example


def _collate(examples: Sequence[Mapping[str, Any]]) -> Batch:
    """Stacks numeric fields into arrays and collects str fields into object arrays."""
    batch: Batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if isinstance(values[0], str):
            column = np.empty(len(values), dtype=object)
            column[:] = values
            batch[key] = column
        else:
            batch[key] = np.stack([np.asarray(value) for value in values])
    return batch


class Pipeline:
    """Iterator over host-local batches with a JSON-serialisable checkpoint state.

    Each batch is a dict of numpy arrays with a leading axis of ``local_batch_size``:
    ``image`` uint8 ``(B, S, S, 3)``, ``caption`` object array of str ``(B,)`` and the
    source's other fields stacked. Use ``to_global`` to make them ``jax.Array``s.
    """

    def __init__(
        self,
        source: Any,
        cfg: Any,
        shard_options: grain.sharding.ShardOptions,
    ):
        num_records = len(source)
        count, index = shard_options.shard_count, shard_options.shard_index
        if cfg.global_batch_size % count:
            raise ValueError(
                f"global_batch_size {cfg.global_batch_size} is not divisible by the "
                f"process (shard) count {count}"
            )
        if num_records == 0:
            raise ValueError("the source is empty: there is nothing to read")
        self.config = cfg
        self.shard_options = shard_options
        self.local_batch_size = local = cfg.global_batch_size // count

        keys = grain.MapDataset.range(num_records)
        if cfg.shuffle:
            keys = keys.shuffle(seed=_shuffle_seed(cfg.seed))
        examples = keys.repeat(cfg.num_epochs).map_with_index(
            self._example_fn(source, cfg, num_records)
        )
        drop_remainder = cfg.drop_remainder
        if count > 1:
            # This process's rows of every whole global batch; a final partial global
            # batch cannot be split evenly, so it is dropped on every process alike.
            whole = len(examples) // cfg.global_batch_size
            examples = grain.MapDataset.range(whole * local).map(
                _ProcessRows(examples, index, count, local))
            drop_remainder = True
        self._batches = examples.batch(local, drop_remainder=drop_remainder, batch_fn=_collate)
        self._fingerprint = {
            "num_records": num_records,
            "global_batch_size": cfg.global_batch_size,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "num_epochs": cfg.num_epochs,
            "drop_remainder": cfg.drop_remainder,
            **self._settings(cfg),
        }
        self._next_batch = 0
        self._iterator: Iterator[Batch] | None = None

    # The two hooks a pipeline over another kind of record overrides.
    def _example_fn(self, source: Any, cfg: Any, num_records: int):
        """``(index, record_key) -> example``; module-level callable so workers can pickle it."""
        return _LoadAndAugment(source, cfg.augment, cfg.image_size, cfg.seed, num_records)

    def _settings(self, cfg: Any) -> dict[str, Any]:
        """Record-specific settings that change the batches (part of the fingerprint)."""
        return {"image_size": cfg.image_size, "augment": cfg.augment}

    @property
    def num_batches(self) -> int | None:
        """Batches in the whole (finite) run, or None when it repeats forever."""
        if self.config.num_epochs is None:
            return None
        return len(self._batches)

    def _open(self) -> Iterator[Batch]:
        """Starts reading at batch ``self._next_batch``."""
        cfg = self.config
        if cfg.worker_count > 0 and not flags.FLAGS.is_parsed():
            # grain workers read an absl flag and fail on unparsed flags (grain 0.2.18,
            # google/grain#1355); programs run through absl.app have parsed them already.
            flags.FLAGS.mark_as_parsed()
        dataset = self._batches[self._next_batch :].to_iter_dataset(
            grain.ReadOptions(
                num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches
            )
        )
        if cfg.worker_count > 0:
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=cfg.worker_count,
                    per_worker_buffer_size=max(1, cfg.prefetch_batches),
                )
            )
        return iter(dataset)

    def __iter__(self) -> "Pipeline":
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._open()
        batch = next(self._iterator)
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict: the next batch's position and the settings.

        The dict is the same on every process of a run (and on any number of processes),
        so saving one process's copy is enough.
        """
        return {"version": _STATE_VERSION, "next_batch": self._next_batch, **self._fingerprint}

    def set_state(self, state: Mapping[str, Any] | str | bytes) -> None:
        """Restores a ``get_state`` result (dict, or its JSON as str/bytes).

        The next batch is then the one an uninterrupted iterator would have returned
        (this process's rows of it, whichever process, or process count, saved the state).

        Raises:
            ValueError: the state comes from a pipeline with different data, global batch
                size, randomness or record settings (the fingerprint).
        """
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported pipeline state version {state.get('version')!r}")
        mismatched = {
            key: (state.get(key), value)
            for key, value in self._fingerprint.items()
            if state.get(key) != value
        }
        if mismatched:
            raise ValueError(
                f"pipeline state does not match this pipeline (saved, current): {mismatched}"
            )
        self.close()
        self._next_batch = int(state["next_batch"])

    def close(self) -> None:
        """Stops the reader threads and worker processes, if any are running."""
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
            self._iterator = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def make_pipeline(
    source: Any,
    cfg: PipelineConfig,
    *,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> Pipeline:
    """Builds the input pipeline for this process.

    Args:
        source: random-access source; ``source[i]`` is a dict with a uint8 ``image``.
        cfg: pipeline settings.
        shard_options: which rows of each global batch this process reads (its
            ``shard_index`` of ``shard_count``); defaults to
            ``grain.sharding.ShardByJaxProcess()``, which reads the process index, so
            call this after ``jax.distributed.initialize``. Tests pass explicit
            ``ShardOptions(i, n)`` to act as process ``i`` of ``n``.

    Returns:
        A ``Pipeline`` yielding batches of ``cfg.global_batch_size // shard_count``.

    Raises:
        ValueError: the global batch does not split evenly over the processes, or the
            source is empty.
    """
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return Pipeline(source, cfg, shard_options)


def to_global(batch: Mapping[str, Any], sharding: jax.sharding.Sharding) -> Batch:
    """Assembles global ``jax.Array``s from every process's host-local batch.

    Numeric arrays are combined with ``jax.make_array_from_process_local_data``: the
    global leading axis is the concatenation of all processes' local batches. String
    fields (object/str/bytes dtypes) cannot live on devices and stay host-local numpy.
    64-bit fields become 32-bit unless ``jax_enable_x64`` is set, as jax does for any
    host value.
    """
    out: Batch = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "OSU":
            out[key] = value
            continue
        # Cast on the host: it is explicit, and the device copy is no larger than needed.
        value = value.astype(jax.dtypes.canonicalize_dtype(value.dtype), copy=False)
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


__all__ = [
    "Batch",
    "Pipeline",
    "PipelineConfig",
    "make_pipeline",
    "to_global",
]
