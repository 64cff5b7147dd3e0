"""Pre-encoded datasets: image tokens (+ caption and labels) in array_record shards.

Stage 2 trains on these instead of pixels: the dVAE runs once per image, not once per
epoch. Layout of a token directory::

    meta.json                                   dVAE identity, source dataset, shards per split
    <split>/<split>-00000-of-00012.array_record one msgpack record per example, in source order

A shard file appears only when complete (written under a temporary name, then renamed),
so an interrupted encoding resumes by skipping the shards that exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from array_record.python import array_record_data_source
from flax import serialization

META_FILE = "meta.json"


def shard_path(out_dir: str, split: str, shard: int, num_shards: int) -> str:
    return os.path.join(out_dir, split, f"{split}-{shard:05d}-of-{num_shards:05d}.array_record")


def serialize(example: Mapping[str, Any]) -> bytes:
    return serialization.msgpack_serialize(dict(example))


def deserialize(data: bytes) -> dict[str, Any]:
    out = serialization.msgpack_restore(data)
    out["image_tokens"] = np.asarray(out["image_tokens"], np.int32)
    return out


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a token dataset (no {META_FILE}); "
                                "run the `encode` job first")
    with open(path) as f:
        return json.load(f)


class TokenSource:
    """Random access to one split of a token directory (a grain-compatible data source).

    ``source[i]`` is a dict with ``image_tokens`` (int32, G*G, raster order), ``caption``
    (str) and the source dataset's numeric labels.
    """

    def __init__(self, directory: str, split: str):
        self.meta = read_meta(directory)
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise ValueError(f"split {split!r} was not encoded in {directory!r}; "
                             f"available: {sorted(splits)}")
        n = int(splits[split]["num_shards"])
        paths = [shard_path(directory, split, s, n) for s in range(n)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"encoding of split {split!r} in {directory!r} is incomplete: {len(missing)} of "
                f"{n} shards missing (e.g. {os.path.basename(missing[0])}); rerun the encode job")
        self._source = array_record_data_source.ArrayRecordDataSource(paths)
        expected = splits[split].get("num_examples")
        if expected is not None and len(self._source) != int(expected):
            raise ValueError(f"split {split!r} has {len(self._source)} records, meta says {expected}")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return deserialize(self._source[index])

    @property
    def grid(self) -> int:
        return int(self.meta["dvae"]["grid"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["dvae"]["identity"]["vocab_size"])
