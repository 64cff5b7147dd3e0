"""Params exports: the one on-disk format of trained and imported parameters.

An export is a directory holding

* ``params/``: the parameter tree (orbax ``StandardCheckpointer``), optionally cast to a
  smaller floating dtype;
* ``meta.json``: what the parameters are. ``identity`` says which model they belong to
  (``kind``: ``"dvae"``, ``"transformer"`` or ``"clip"``, plus the fields that must match
  wherever they are loaded); ``export_dtype`` the dtype they were written in; the rest
  (``task``, ``step``, ``ema``, ``source``, ...) records where they came from;
* for a contrastive scorer, ``tokenizer/<file>``: its text tokenizer, so the export
  needs nothing else to score.

This module writes, reads, identifies and compares exports for every stage; the model
code supplies the abstract trees to restore into. Checkpoints of a training run (train
state, data position) are `dalle_jax.checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax.tokenizers.dvae import DVAEConfig, abstract_params

META_FILE = "meta.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")

# How an identity kind is named in error messages.
_KIND_NAMES = {"dvae": "dVAE", "transformer": "transformer", "clip": "contrastive scorer"}


# ----------------------------------------------------------------------------- any export


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an export directory (it has a ``meta.json``)."""
    return os.path.exists(os.path.join(os.path.abspath(os.fspath(path)), META_FILE))


def latest_export(run_dir: str | os.PathLike) -> str | None:
    """The newest ``run_dir/exports/step_N`` directory, or None."""
    d = os.path.join(os.fspath(run_dir), "exports")
    steps = sorted(int(n[5:]) for n in os.listdir(d) if n.startswith("step_") and n[5:].isdigit()) \
        if os.path.isdir(d) else []
    return os.path.join(d, f"step_{steps[-1]:07d}") if steps else None


def resolve_export(path: str | os.PathLike, what: str) -> str:
    """``path`` itself when it is an export, else the newest export of the run directory
    ``path``; FileNotFoundError naming ``what`` (e.g. "the scorer") when it is neither."""
    path = os.fspath(path)
    if is_export(path):
        return os.path.abspath(path)
    latest = latest_export(path)
    if latest is None:
        raise FileNotFoundError(f"{what} {path!r} is neither an export (a directory with "
                                f"{META_FILE}) nor a run directory with exports/step_N")
    return os.path.abspath(latest)


def write(path: str | os.PathLike, params: Any, meta: dict, *, dtype: str | None = None) -> str:
    """Writes ``params`` and ``meta`` (plus ``export_dtype``) as an export at ``path``.

    Floating leaves are cast to ``dtype`` when given; integer leaves are kept. Refuses to
    overwrite an existing export: nothing already saved is replaced.

    Returns:
        the export directory (absolute).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"export directory {path!r} exists and is not empty; choose another")
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x,
                              params)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(epath.Path(path) / PARAMS_DIR, params)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump(dict(meta, export_dtype=dtype or "float32"), f, indent=2, sort_keys=True,
                      default=str)
    return path


def write_trained(path: str, params: Any, *, identity: dict, task: str, step: int, ema: bool,
                  **extra: Any) -> str:
    """The export a training job writes at its end: ``identity``, the task's name, the
    step and whether the parameters are the EMA ones, plus ``extra``."""
    return write(path, params, {"identity": identity, "task": task, "step": int(step),
                                "ema": bool(ema), **extra})


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of an export (identity, step, dtype, ...)."""
    meta_path = os.path.join(os.path.abspath(os.fspath(path)), META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{os.fspath(path)!r} is not a params export (no {META_FILE})")
    with open(meta_path) as f:
        return json.load(f)


def load(path: str | os.PathLike, *, identity: dict | None = None,
         abstract: Any = None) -> tuple[Any, dict]:
    """``(params, meta)`` of an export; checks ``identity`` against the stored one if given.

    With ``abstract`` (ShapeDtypeStructs carrying shardings) every array is restored
    straight into its device buffer(s) with that dtype.
    """
    path = os.path.abspath(os.fspath(path))
    meta = read_meta(path)
    if identity is not None:
        check_identity(meta, identity, path)
    ckptr = ocp.StandardCheckpointer()
    if abstract is None:
        params = ckptr.restore(epath.Path(path) / PARAMS_DIR)
    else:
        params = ckptr.restore(epath.Path(path) / PARAMS_DIR, abstract)
    return params, meta


def in_stored_dtype(abstract: Any, meta: dict) -> Any:
    """``abstract`` with its floating leaves in the export's dtype (a bfloat16 export is
    then restored as bfloat16: no float32 copy of the model is made on the way)."""
    stored = str(meta.get("export_dtype", "float32"))
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, stored if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
            sharding=a.sharding), abstract)


def convert(source: str, out: str, dtype: str) -> str:
    """Writes ``source`` (an export, or a training checkpoint: see
    `dalle_jax.checkpoint.params_from_checkpoint`) as an export in ``dtype`` at ``out``.

    The identity and metadata are kept, so the new export loads wherever the old one
    did; floating leaves are cast, integer leaves kept. ``out`` must not exist yet.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if is_export(source):
        params, meta = load(source)
    else:
        params, meta = ckpt_lib.params_from_checkpoint(source)
    meta = {k: v for k, v in meta.items() if k != "export_dtype"}
    meta["converted_from"] = os.path.abspath(source)
    return write(out, params, meta, dtype=dtype)


# ----------------------------------------------------------------------------- identities


def identity_of(meta: dict, kind: str, where: str) -> dict:
    """The stored identity of an export that must hold a ``kind`` model."""
    ident = meta.get("identity") or {}
    if ident.get("kind") != kind:
        raise ValueError(f"{where!r} is not a {_KIND_NAMES.get(kind, kind)} export (identity "
                         f"kind {ident.get('kind')!r}, expected {kind!r})")
    return ident


def check_identity(meta: dict, identity: dict, where: str) -> None:
    """Raises ValueError, listing the differing fields, if ``meta['identity']`` is not
    ``identity``."""
    diffs = ckpt_lib.diff_dicts(meta.get("identity", {}), identity)
    if diffs:
        raise ValueError(
            f"checkpoint at {where} is from a different model:\n  " + "\n  ".join(diffs))


def dvae_identity(config: DVAEConfig) -> dict:
    """The fields that make two dVAEs interchangeable (compute dtype excluded)."""
    d = config.to_dict()
    d.pop("dtype", None)
    return {"kind": "dvae", **d}


def check_dvae_identity(trained_with: dict, found: dict, dvae_export: str) -> None:
    """Raises ValueError, listing the differing fields, if the dVAE identity ``found`` (of
    ``dvae_export``) is not the one a transformer was ``trained_with``."""
    diff = ckpt_lib.diff_dicts(trained_with, found)
    if diff:
        raise ValueError(f"dVAE {dvae_export!r} is not the one the transformer was trained "
                         "on: " + "; ".join(diff))


# ----------------------------------------------------------------------------- dVAE exports
#
# ``meta.json`` of a dVAE export holds ``task: "dvae"``, the full `DVAEConfig` under
# ``config`` and its weight-defining fields under ``identity``, so stage 2 and the encode
# job can check that they load the dVAE they expect.


def save_dvae(out_dir: str | os.PathLike, config: DVAEConfig, params: Any, **extra: Any) -> str:
    """Writes a dVAE export; refuses a non-empty ``out_dir``. ``extra`` goes into meta.json."""
    if jax.tree.structure(abstract_params(config)) != jax.tree.structure(params):
        raise ValueError("params do not have the structure of the dVAE described by config")
    meta = {"task": "dvae", "identity": dvae_identity(config), "config": config.to_dict(),
            **extra}
    return write(os.fspath(out_dir), params, meta)


def read_dvae_config(directory: str | os.PathLike) -> DVAEConfig:
    """The `DVAEConfig` stored in a dVAE export."""
    path = os.path.join(os.fspath(directory), META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory} is not a dVAE parameter checkpoint")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("task") != "dvae":
        raise ValueError(f"{directory} holds a {meta.get('task')!r} export, not a dVAE")
    return DVAEConfig.from_dict(meta["config"])


def load_dvae(
    directory: str | os.PathLike,
    expected_config: DVAEConfig | None = None,
    *,
    sharding: Any = None,
) -> tuple[DVAEConfig, Any]:
    """Reads a dVAE export: ``(config, params)``.

    Args:
        directory: the export directory.
        expected_config: if given, its architecture fields (all but ``image_size`` and
            ``dtype``, which do not change the weights) must match the stored config; the
            returned config is then ``expected_config`` itself.
        sharding: one `jax.sharding.Sharding` for every array, or a tree of them matching
            the parameters; default: this process's first device (each process of a
            multi-host job then holds its own copy).

    Raises:
        ValueError: the stored dVAE has a different architecture (lists the fields).
    """
    directory = os.path.abspath(os.fspath(directory))
    stored = read_dvae_config(directory)
    config = stored
    if expected_config is not None:
        diff = stored.architecture_diff(expected_config)
        if diff:
            fields = ", ".join(f"{k}: checkpoint {a} vs expected {b}" for k, (a, b) in diff.items())
            raise ValueError(f"dVAE checkpoint {directory} has a different architecture: {fields}")
        config = expected_config
    abstract = abstract_params(stored)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: sharding, abstract)
    else:
        shardings = sharding
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    params, _ = load(directory, abstract=target)
    return config, params


# ----------------------------------------------------------------------------- scorer exports


def write_scorer(path: str, params: Any, meta: dict, tokenizer_file: str, name: str) -> str:
    """Writes a contrastive scorer export: params, ``meta.json`` and a copy of its text
    tokenizer's file as ``tokenizer/<name>`` (the name its identity's ``file`` gives)."""
    path = write(path, params, meta)
    if jax.process_index() == 0:
        d = os.path.join(path, TOKENIZER_DIR)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, name + ".tmp")
        shutil.copyfile(tokenizer_file, tmp)
        os.replace(tmp, os.path.join(d, name))
    return path


def tokenizer_path(export_dir: str, tokenizer_identity: dict) -> str:
    """Where a scorer export keeps the tokenizer file its identity names."""
    return os.path.join(export_dir, TOKENIZER_DIR, str(tokenizer_identity.get("file", "")))
