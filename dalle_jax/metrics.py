"""Metric logging: one JSON line per logged step, plus the console on process 0.

JSONL is always written (scripts and tests read it); nothing else is required. Values
are plain floats. After a resume the file is appended to, so a step that was logged
before an interruption can appear twice; readers keep the last line of each step
(`read_jsonl` does this).
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


def to_python(v: Any) -> Any:
    v = np.asarray(v)
    if v.ndim == 0:
        return v.item()
    return v.tolist()


class MetricWriter:
    """Appends ``{"step": s, name: value, ...}`` lines to ``workdir/metrics.jsonl`` (process 0)."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
        self.path = os.path.join(workdir, filename)
        self.enabled = jax.process_index() == 0
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: to_python(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        short = ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                          if k != "step" and isinstance(v, float))
        logging.info("step %d: %s", step, short)


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
