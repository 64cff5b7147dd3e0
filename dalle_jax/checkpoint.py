"""orbax checkpoints: train state, data-iterator position and run identity, saved together.

A checkpoint step holds three items:
  * ``state``: the train state (step, params, optimizer state, EMA) via StandardSave,
    restored into an abstract target that carries the *current* shardings, so a run can
    resume on a different mesh;
  * ``data``: the input pipeline's position (JSON), so resume continues with the exact
    next batch;
  * ``meta``: what the run is (task kind, model config, config), checked before the
    state is restored so a checkpoint from a different model fails with a clear error.
Params-only exports, which sampling and Colab read, are `dalle_jax.exports`.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


def diff_dicts(saved: Any, current: Any, prefix: str = "", *,
               names: tuple[str, str] = ("checkpoint", "this run")) -> list[str]:
    """Human-readable differences between two nested dicts (for mismatch errors).

    ``names`` are what the two sides are called in the messages (saved, current).
    """
    old, new = names
    out = []
    if isinstance(saved, dict) and isinstance(current, dict):
        for k in sorted(set(saved) | set(current)):
            p = f"{prefix}{k}"
            if k not in saved:
                out.append(f"{p}: missing in {old}, now {current[k]!r}")
            elif k not in current:
                out.append(f"{p}: {saved[k]!r} in {old}, not in {new}")
            else:
                out.extend(diff_dicts(saved[k], current[k], p + ".", names=names))
    elif _norm(saved) != _norm(current):
        out.append(f"{prefix.rstrip('.')}: {old} has {saved!r}, {new} has {current!r}")
    return out


def saved_with_settings(path: str, settings: dict, *, what: str, override: str) -> dict | None:
    """The JSON record at ``path`` when it was written with ``settings`` (a rerun then has
    nothing to do), None when there is none; raises FileExistsError naming the differing
    settings (``what``: e.g. "samples made with"; ``override``: the config field that
    writes elsewhere) when it was written with others, so nothing saved is overwritten."""
    import json

    if not os.path.exists(path):
        return None
    with open(path) as f:
        old = json.load(f)
    if old.get("settings") == settings:
        return old
    diff = diff_dicts(old.get("settings") or {}, settings, names=("saved", "now"))
    raise FileExistsError(
        f"{os.path.dirname(path)} holds {what} other settings ({'; '.join(diff[:6])}); set "
        f"--config.{override} to write elsewhere, or remove that directory")


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def check_compatible(saved_meta: dict, identity: dict, where: str) -> None:
    """Raises ValueError if ``saved_meta['identity']`` differs from this run's ``identity``."""
    saved = saved_meta.get("identity", {})
    diffs = diff_dicts(saved, identity)
    if diffs:
        raise ValueError(
            f"checkpoint at {where} is from a different model:\n  " + "\n  ".join(diffs))


class Checkpointer:
    """A CheckpointManager for one run directory (``workdir/checkpoints``)."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: Any, meta: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"pipeline": data_state}),
            meta=ocp.args.JsonSave(meta),
        )
        return self._mngr.save(int(step), args=args, force=force)

    def read_meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any, identity: dict | None = None):
        """Restores ``(state, data_state, meta)``; checks identity first when given."""
        meta = self.read_meta(step)
        if identity is not None:
            check_compatible(meta, identity, f"{self.directory} step {step}")
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
        return out["state"], out["data"]["pipeline"], meta

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def find_checkpoint(path: str) -> tuple[str, int]:
    """Resolves ``.../checkpoints`` or ``.../checkpoints/<step>`` to (manager dir, step)."""
    path = os.path.abspath(path)
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(base)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint found at {path!r}")
    return path, steps[-1]


def params_from_checkpoint(path: str, *, ema: bool = True) -> tuple[Any, dict]:
    """``(params, meta)`` of a training checkpoint (``.../checkpoints`` for its newest step,
    or ``.../checkpoints/<step>``): the EMA params when ``ema`` and the run kept them.

    Read without the model's code (the saved tree as it is), so any stage's checkpoint
    can be exported (`dalle_jax.exports.convert`).
    """
    directory, step = find_checkpoint(path)
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        out = ckpt._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(None)))
    finally:
        ckpt.close()
    state = out["state"]
    params = state["ema_params"] if ema and "ema_params" in state else state["params"]
    return params, dict(meta, step=int(step), ema=bool(ema and "ema_params" in state))

