"""dVAE parameter exports: one on-disk format for trained and imported dVAEs.

An export is a directory with ``params/`` (orbax) and ``meta.json`` (written by
`dalle_jax.checkpoint.export_params`). For a dVAE, ``meta.json`` holds ``task: "dvae"``,
the full `DVAEConfig` under ``config`` and its weight-defining fields under ``identity``,
so stage 2 and the encode job can check that they load the dVAE they expect.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax.tokenizers.dvae import DVAEConfig, abstract_params

META_FILE = "meta.json"


def identity(config: DVAEConfig) -> dict:
    """The fields that make two dVAEs interchangeable (compute dtype excluded)."""
    d = config.to_dict()
    d.pop("dtype", None)
    return {"kind": "dvae", **d}


def save_params(out_dir: str | os.PathLike, config: DVAEConfig, params: Any, **extra: Any) -> str:
    """Writes a dVAE export; refuses a non-empty ``out_dir``. ``extra`` goes into meta.json."""
    if jax.tree.structure(abstract_params(config)) != jax.tree.structure(params):
        raise ValueError("params do not have the structure of the dVAE described by config")
    meta = {"task": "dvae", "identity": identity(config), "config": config.to_dict(), **extra}
    return ckpt_lib.export_params(os.fspath(out_dir), params, meta)


def read_config(directory: str | os.PathLike) -> DVAEConfig:
    """The `DVAEConfig` stored in an export."""
    path = os.path.join(os.fspath(directory), META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory} is not a dVAE parameter checkpoint")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("task") != "dvae":
        raise ValueError(f"{directory} holds a {meta.get('task')!r} export, not a dVAE")
    return DVAEConfig.from_dict(meta["config"])


def load_params(
    directory: str | os.PathLike,
    expected_config: DVAEConfig | None = None,
    *,
    sharding: Any = None,
) -> tuple[DVAEConfig, Any]:
    """Reads a dVAE export.

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
    stored = read_config(directory)
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
    params, _ = ckpt_lib.load_params(directory, abstract=target)
    return config, params
