"""The jobs the command line can run, each a function ``(config, workdir) -> None``.

Jobs import their stage lazily so that ``--help`` and a data-only job never pay for
building models.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from absl import logging


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def prepare(cfg, workdir: str) -> None:
    """Builds the dataset named by ``cfg.data`` (skipped when already prepared).

    Only process 0 writes; the others wait at a barrier, so a shared data_dir is never
    written twice.
    """
    import jax
    from jax.experimental import multihost_utils

    from dalle_jax.data import sources

    if jax.process_index() == 0:
        t0 = time.time()
        report = sources.prepare(cfg.data)
        report["seconds"] = round(time.time() - t0, 2)
        _write_json(os.path.join(workdir, "prepare_report.json"), report)
        logging.info("prepared: %s", json.dumps(report, default=str))
        print(json.dumps(report, indent=2, default=str))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare")


def preview(cfg, workdir: str) -> None:
    """Runs the input pipeline for a few batches: throughput, global sharding and a PNG grid."""
    import jax
    import numpy as np

    from dalle_jax import sharding, visualize
    from dalle_jax.data import pipeline, sources

    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.get_rules(cfg.sharding_rules)
    logging.info("mesh: %s", sharding.describe(mesh))
    it = sources.make_input(cfg.data, cfg.data.train_split, train=True)
    first = next(it)
    t0 = time.time()
    n = 0
    for _ in range(int(cfg.preview.num_batches)):
        batch = next(it)
        n += len(batch["image"])
    seconds = time.time() - t0
    spec = sharding.batch_spec(mesh, rules, first["image"].ndim)
    global_batch = pipeline.to_global({"image": first["image"]}, jax.sharding.NamedSharding(mesh, spec))
    stats = {
        "examples_per_second_per_process": round(n / max(seconds, 1e-9), 1),
        "global_image_batch": list(global_batch["image"].shape),
        "batch_sharding": str(global_batch["image"].sharding.spec),
        "mesh": sharding.describe(mesh),
        "first_captions": [str(c) for c in first["caption"][:8]],
    }
    if jax.process_index() == 0:
        k = min(int(cfg.preview.grid_examples), len(first["image"]))
        path = visualize.save_grid(os.path.join(workdir, "preview", "train_batch.png"),
                                   np.asarray(first["image"][:k]), list(first["caption"][:k]),
                                   ncols=8, scale=2 if cfg.data.image_size <= 64 else 1)
        stats["grid"] = path
        _write_json(os.path.join(workdir, "preview", "stats.json"), stats)
        print(json.dumps(stats, indent=2))


JOBS: dict[str, Callable] = {
    "prepare": prepare,
    "preview": preview,
}
