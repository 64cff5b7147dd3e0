"""The `encode` job's engine: run a dVAE over a prepared dataset and write token shards.

Each split is cut into shards of consecutive examples. Shards are dealt round-robin to
processes, and inside a process every batch is split over the local devices, so the
work spreads over all devices and hosts with no communication. Images get the
deterministic centre crop and area resize to the dVAE's resolution. Finished shards are
skipped on a rerun, so an interrupted encoding resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from array_record.python import array_record_module
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dalle_jax import exports
from dalle_jax.data import augment, sources, tokens
from dalle_jax.tokenizers.image_tokenizer import ImageTokenizer, encode


def _record(example: dict, tokens_GG: np.ndarray, vocab: int) -> dict:
    out: dict[str, Any] = {}
    for k, v in example.items():
        if k == "image":
            continue
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        out[k] = v
    dtype = np.int16 if vocab <= 32767 else np.int32
    out["image_tokens"] = tokens_GG.reshape(-1).astype(dtype)
    return out


def _check_or_write_meta(out_dir: str, meta: dict) -> None:
    path = os.path.join(out_dir, tokens.META_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for key in ("dvae", "source"):
            if old.get(key) != meta.get(key):
                raise ValueError(
                    f"{out_dir!r} holds tokens made with a different {key}:\n  existing: "
                    f"{old.get(key)}\n  now: {meta.get(key)}\nchoose another encode.out_dir")
        for split, info in meta["splits"].items():
            prev = old.get("splits", {}).get(split)
            if prev is not None and prev != info:
                raise ValueError(f"{out_dir!r} split {split!r} was encoded with {prev}, now {info}; "
                                 "choose another encode.out_dir")
        meta = dict(old, splits={**old.get("splits", {}), **meta["splits"]})
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)


def encode_dataset(
    data_cfg,
    tokenizer: ImageTokenizer,
    out_dir: str,
    *,
    splits: list[str],
    shard_size: int = 10_000,
    batch_size: int = 64,
    progress: bool = True,
    dvae_dir: str = "",
) -> dict:
    """Encodes ``splits`` of the dataset named by ``data_cfg`` into ``out_dir``; returns a report."""
    devices = jax.local_devices()
    if batch_size % len(devices):
        batch_size += len(devices) - batch_size % len(devices)
    mesh = Mesh(np.asarray(devices), ("data",))
    batch_sh = NamedSharding(mesh, P("data"))
    params = jax.device_put(tokenizer.params, NamedSharding(mesh, P()))
    encode_fn = jax.jit(lambda p, x: encode(p, x, model=tokenizer.model), out_shardings=batch_sh)
    size = tokenizer.config.image_size
    vocab = tokenizer.config.vocab_size

    split_sources = {s: sources.load_split(data_cfg, s) for s in splits}
    plan = {s: {"num_examples": len(src), "shard_size": shard_size,
                "num_shards": max(1, math.ceil(len(src) / shard_size))}
            for s, src in split_sources.items()}
    meta = {
        "dvae": {"identity": exports.dvae_identity(tokenizer.config), "grid": tokenizer.grid,
                 "params": dvae_dir},
        "source": {"source": data_cfg.source, "image_size": size,
                   "shapes": data_cfg.shapes.to_dict() if data_cfg.source == "shapes" else None,
                   "captions": data_cfg.captions.to_dict() if data_cfg.source == "captions" else None},
        "splits": plan,
    }
    meta["dvae"].pop("params")  # where the params live is not part of what the tokens are
    _check_or_write_meta(out_dir, meta)

    report = {"out_dir": out_dir, "splits": {}}
    t0 = time.time()
    for split, source in split_sources.items():
        n_shards = plan[split]["num_shards"]
        mine = [s for s in range(n_shards) if s % jax.process_count() == jax.process_index()]
        todo = [s for s in mine if not os.path.exists(tokens.shard_path(out_dir, split, s, n_shards))]
        n_todo = sum(min(len(source), (s + 1) * shard_size) - s * shard_size for s in todo)
        bar = None
        if progress and jax.process_index() == 0 and n_todo:
            from dalle_jax import logs

            bar = logs.progress(n_todo, f"encode {split}", leave=True, mininterval=2.0)
        for s in todo:
            lo, hi = s * shard_size, min(len(source), (s + 1) * shard_size)
            path = tokens.shard_path(out_dir, split, s, n_shards)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
            for b in range(lo, hi, batch_size):
                idx = list(range(b, min(hi, b + batch_size)))
                examples = [source[i] for i in idx]
                images = np.zeros((batch_size, size, size, 3), np.uint8)  # fixed shape: one compile
                for j, ex in enumerate(examples):
                    images[j] = augment.center_crop_resize(ex["image"], None, size)
                toks = np.asarray(jax.device_get(encode_fn(params, jax.device_put(images, batch_sh))))
                for j, ex in enumerate(examples):
                    writer.write(tokens.serialize(_record(ex, toks[j], vocab)))
                if bar is not None:
                    bar.update(len(idx))
            writer.close()
            os.replace(path + ".tmp", path)
        if bar is not None:
            bar.close()
        report["splits"][split] = {"examples": plan[split]["num_examples"], "shards": n_shards,
                                   "shards_written_here": len(todo),
                                   "shards_skipped_here": len(mine) - len(todo)}
    report["seconds"] = round(time.time() - t0, 2)
    logging.info("encoded: %s", report)
    return report
