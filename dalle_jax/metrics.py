"""Metric logging: one JSON line per logged step, TensorBoard events when installed.

JSONL is always written (scripts and tests read it); nothing else is required. Values
are plain floats. After a resume the file is appended to, so a step that was logged
before an interruption can appear twice; readers keep the last line of each step
(`read_jsonl` does this).

TensorBoard: with the optional ``tensorboardX`` package (``pip install
'dalle-jax[tensorboard]'``) and ``tensorboard=True`` (the training configs'
``log.tensorboard``, on by default), the same scalars go to an event file beside
``metrics.jsonl``, and `write_images` adds image summaries (the dVAE's reconstruction
grids, sample grids) at their step. Without the package the job runs the same and says
so once. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from dalle_jax import logs

# Said once per process: TensorBoard was asked for but tensorboardX is not installed.
_said_no_tensorboard = False


def to_python(v: Any) -> Any:
    v = np.asarray(v)
    if v.ndim == 0:
        return v.item()
    return v.tolist()


class MetricWriter:
    """Appends ``{"step": s, name: value, ...}`` lines to ``workdir/metrics.jsonl`` and, with
    TensorBoard on, writes the scalars and images to an event file in ``workdir`` (process 0).

    Args:
      tensorboard: write TensorBoard events if ``tensorboardX`` is importable.
      first_step: a resumed run's first step; TensorBoard then drops what an interrupted
        earlier run logged from this step on (it is logged again).

    The newest writer of a process receives `write_images` (module function) calls, so
    code that saves a grid PNG needs no writer of its own; `close` ends that.
    """

    _current: MetricWriter | None = None

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", *, tensorboard: bool = True,
                 first_step: int | None = None):
        self.path = os.path.join(workdir, filename)
        self.enabled = jax.process_index() == 0
        self.latest: dict[str, Any] = {}  # the last value of every metric written
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                self._tb = _summary_writer(workdir, first_step)
            MetricWriter._current = self

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are written."""
        return self._tb is not None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: to_python(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        self.latest.update({k: v for k, v in row.items() if k != "step"})
        short = ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                          if k != "step" and isinstance(v, float))
        logging.info("step %d: %s", step, short)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, float(v), int(step))
            self._tb.flush()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Image summaries ``{tag: image}`` at ``step`` (TensorBoard only; a no-op without
        it). An image is an H x W x 3 uint8 array, a PIL image, or the path of a PNG."""
        if not self.enabled or self._tb is None:
            return
        for tag, image in images.items():
            self._tb.add_image(tag, _as_hwc_uint8(image), int(step), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if MetricWriter._current is self:
            MetricWriter._current = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_images(step: int, images: Mapping[str, Any]) -> None:
    """`MetricWriter.write_images` on this process's newest open writer (none: no-op).

    For the code that saves grid PNGs (evaluators, the sample job): one call beside the
    PNG puts the same picture in TensorBoard at the job's step.
    """
    writer = MetricWriter._current
    if writer is not None:
        writer.write_images(step, images)


def _summary_writer(logdir: str, first_step: int | None):
    """A ``tensorboardX.SummaryWriter`` on ``logdir``, or None (saying why once) when the
    package is not installed."""
    global _said_no_tensorboard
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        if not _said_no_tensorboard:
            logs.note("TensorBoard: off (tensorboardX is not installed; pip install "
                      "'dalle-jax[tensorboard]' to add it); metrics go to %s",
                      os.path.join(logdir, "metrics.jsonl"))
            _said_no_tensorboard = True
        return None
    purge = int(first_step) if first_step else None
    return SummaryWriter(logdir=logdir, purge_step=purge, flush_secs=30)


def _as_hwc_uint8(image: Any) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image is H x W x C (C in 1, 3, 4), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return a


def headline(row: Mapping[str, Any], limit: int = 4) -> str:
    """A short ``name=value`` list of a metrics row for the console: the training loss,
    then evaluation results (not their timing), at most ``limit`` of them."""
    keys = [k for k in ("train/loss",) if k in row]
    keys += sorted(k for k in row if k.startswith("eval/") and not k.endswith("/seconds")
                   and k != "eval/seconds")
    items = [f"{k}={row[k]:.4g}" for k in keys if isinstance(row[k], float)]
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" (+{more} more in metrics.jsonl)" if more > 0 else "")


def read_jsonl(path: str) -> dict[int, dict[str, Any]]:
    """Reads a metrics file into ``{step: row}`` keeping the last row of each step."""
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.setdefault(row["step"], {}).update(row)
    return rows


def check_finite(metrics: Mapping[str, Any], step_range: tuple[int, int],
                 keys: tuple[str, ...] = ("loss", "grad_norm", "param_norm")) -> None:
    """Raises FloatingPointError naming the step range if a watched metric is not finite."""
    for k in keys:
        for name, v in metrics.items():
            if name.split("/")[-1] == k and isinstance(v, float) and not math.isfinite(v):
                raise FloatingPointError(
                    f"{name} became {v} between steps {step_range[0]} and {step_range[1]}; "
                    "stopping (the last checkpoint is unaffected)")


def codebook_stats(hist_C: np.ndarray) -> dict[str, float]:
    """Usage (fraction of codes seen) and perplexity of a code histogram."""
    hist = np.asarray(hist_C, np.float64)
    total = hist.sum()
    if total <= 0:
        return {"codebook_usage": 0.0, "codebook_perplexity": 0.0}
    p = hist / total
    nz = p[p > 0]
    return {"codebook_usage": float((hist > 0).mean()),
            "codebook_perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}
