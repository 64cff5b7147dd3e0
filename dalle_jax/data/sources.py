"""From a config's ``data`` section to TFDS builders, prepared splits and input pipelines.

``data.source`` picks the builder: ``shapes`` (the built-in synthetic dataset) or
``captions`` (image-caption pairs from folders / webdataset shards). Every consumer
(the prepare job, the trainers, the evaluators) goes through these functions, so a
dataset option is read in one place.
"""

from __future__ import annotations

import os
from typing import Any

from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data.caption_sources import CaptionsConfig

SOURCES = ("shapes", "captions")


def dataset_builder(data_cfg):
    """The TFDS builder named by ``data_cfg`` (nothing is generated or read yet)."""
    if data_cfg.source == "shapes":
        from dalle_jax.data import shapes_tfds

        s = data_cfg.shapes
        return shapes_tfds.shapes_builder(
            data_cfg.data_dir, image_size=s.image_size, num_train=s.num_train,
            num_validation=s.num_validation, num_test=s.num_test)
    if data_cfg.source == "captions":
        from dalle_jax.data import captions_tfds

        return captions_tfds.captions_builder(
            data_cfg.data_dir, CaptionsConfig.from_config(data_cfg.captions))
    raise ValueError(f"data.source={data_cfg.source!r} is not one of {SOURCES}")


def prepare(data_cfg) -> dict[str, Any]:
    """Generates the dataset's array_record files if they are not there yet; returns a summary."""
    if data_cfg.source == "captions":
        from dalle_jax.data import captions_tfds

        return captions_tfds.prepare_captions(
            data_cfg.data_dir, CaptionsConfig.from_config(data_cfg.captions))
    builder = dataset_builder(data_cfg)
    builder.download_and_prepare(file_format="array_record")
    return {"dataset": builder.info.full_name, "data_dir": builder.data_dir,
            "splits": {k: v.num_examples for k, v in builder.info.splits.items()}}


def load_split(data_cfg, split: str):
    """Random-access source for one prepared split; a clear error if it was never prepared."""
    builder = dataset_builder(data_cfg)
    if not os.path.isdir(builder.data_dir) or not builder.info.splits:
        raise FileNotFoundError(
            f"dataset {data_cfg.source!r} is not prepared under {data_cfg.data_dir!r} "
            f"(looked for {builder.data_dir}); run the `prepare` job with the same config first")
    splits = builder.info.splits
    if split not in splits:
        raise ValueError(f"split {split!r} not in prepared dataset; available: {sorted(splits)}")
    return builder.as_data_source()[split]


def make_input(data_cfg, split: str, *, train: bool = True, shard_options=None,
               num_epochs: int | None = None) -> pipeline_lib.Pipeline:
    """The grain pipeline over one split: shuffled and augmented for training, or in order
    with the deterministic centre crop (and a finite number of epochs) for evaluation."""
    source = load_split(data_cfg, split)
    cfg = pipeline_lib.PipelineConfig(
        global_batch_size=int(data_cfg.global_batch_size),
        image_size=int(data_cfg.image_size),
        augment=data_cfg.augment if train else "none",
        seed=int(data_cfg.seed),
        shuffle=train,
        num_epochs=num_epochs if (num_epochs is not None or train) else 1,
        worker_count=int(data_cfg.worker_count),
        drop_remainder=True,
    )
    # shard_options=None means ShardByJaxProcess: each process reads its rows of every
    # global batch.
    return pipeline_lib.make_pipeline(source, cfg, shard_options=shard_options)
