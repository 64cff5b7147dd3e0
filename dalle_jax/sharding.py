"""Device mesh, logical axis rules and the shardings derived from them.

Model code names every parameter and activation dimension with a *logical* axis
(``batch``, ``embed``, ``mlp``, ...). A rules table maps logical names onto the
mesh axes ``("data", "fsdp", "tensor")``. One table per preset (``dp``, ``fsdp``,
``fsdp_tp``) is all that changes between a laptop run and a pod run: no module
ever names a mesh axis. A logical name missing from the table raises instead of
silently replicating, so a new layer cannot quietly blow up memory at scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The logical vocabulary. Every name used by model code must be listed here.
LOGICAL_AXES = (
    "batch",  # examples
    "length",  # sequence positions
    "embed",  # residual-stream width
    "heads",  # attention heads
    "kv",  # per-head width
    "mlp",  # MLP hidden width
    "vocab",  # output / embedding vocabulary
    "codebook",  # dVAE codes (encoder logits, decoder input)
    "height",  # image rows (activations)
    "width",  # image columns (activations)
    "conv_window",  # spatial kernel dims of a convolution
    "conv_in",  # convolution input channels
    "conv_out",  # convolution output channels
    "layers",  # stacked layer axis of nn.scan
)

_BATCH = ("data", "fsdp")


def _preset(**overrides: Any) -> tuple[tuple[str, Any], ...]:
    """A rules table over the whole vocabulary: the batch on (data, fsdp), the rest
    replicated unless overridden."""
    unknown = set(overrides) - set(LOGICAL_AXES)
    if unknown:
        raise ValueError(f"rules for unknown logical axes {sorted(unknown)}")
    table = {name: None for name in LOGICAL_AXES}
    table["batch"] = _BATCH
    table.update(overrides)
    return tuple(table.items())


# Presets. Values are a mesh axis, a tuple of mesh axes, or None (replicated).
RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    # Pure data parallelism: every weight replicated, the batch split over all devices.
    "dp": _preset(),
    # ZeRO-3 style: weights split along their model-width dims over "fsdp", gathered
    # per layer by XLA; the batch still spans data x fsdp.
    "fsdp": _preset(embed="fsdp", conv_out="fsdp"),
    # FSDP plus tensor (Megatron) parallelism on heads / MLP / vocab.
    "fsdp_tp": _preset(embed="fsdp", conv_out="fsdp", heads="tensor", mlp="tensor",
                       vocab="tensor", codebook="tensor"),
}


def get_rules(preset: str | Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """Returns a rules table from a preset name (or validates an explicit table)."""
    if isinstance(preset, str):
        if preset not in RULES:
            raise ValueError(f"unknown sharding_rules preset {preset!r}; choose one of {sorted(RULES)}")
        return RULES[preset]
    rules = tuple((str(k), v) for k, v in preset)
    for name, target in rules:
        for ax in (target,) if isinstance(target, str) or target is None else target:
            if ax is not None and ax not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {target!r} names unknown mesh axis {ax!r}")
    return rules


def mesh_shape(degrees: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves mesh degrees (one may be -1, meaning "the rest") for ``num_devices``."""
    unknown = set(degrees) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
    dims = [int(degrees.get(ax, 1)) for ax in MESH_AXES]
    if sum(d == -1 for d in dims) > 1:
        raise ValueError(f"at most one mesh degree may be -1, got {dict(zip(MESH_AXES, dims))}")
    if any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"mesh degrees must be positive or -1, got {dict(zip(MESH_AXES, dims))}")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} does not divide {num_devices} devices")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, have {num_devices}"
        )
    return tuple(dims)


def make_mesh(degrees: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``("data", "fsdp", "tensor")`` mesh with Auto axis types.

    Auto (GSPMD-style propagation) is set explicitly because newer ``jax.make_mesh``
    defaults to Explicit axes, which changes how un-annotated ops are typed.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(degrees, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(logical: Sequence[str | None] | None, rules: Sequence[tuple[str, Any]]) -> P:
    """Maps a tuple of logical names to a PartitionSpec; unknown names raise."""
    if logical is None:
        return P()
    table = dict(rules)
    out = []
    used: set[str] = set()
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(
                f"logical axis {name!r} has no sharding rule; known: {sorted(table)}. "
                "Add it to dalle_jax.sharding.RULES."
            )
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis can shard only one dim of an array; later dims fall back to replicated.
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_specs(tree: Any) -> Any:
    """Logical names of every leaf of a (possibly abstract) Flax variable tree."""
    return nn.get_partition_spec(tree)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for an ``eval_shape``-d tree of (boxed) Flax variables.

    Leaves without logical metadata are replicated (scalars, step counters).
    """
    specs = logical_specs(abstract_tree)

    def to_sharding(spec):
        return NamedSharding(mesh, logical_to_spec(tuple(spec) if spec is not None else None, rules))

    return jax.tree.map(to_sharding, specs, is_leaf=lambda x: isinstance(x, P) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh, rules: Sequence[tuple[str, Any]], ndim: int = 1) -> P:
    """PartitionSpec for a batch-major array: leading dim on the ``batch`` rule."""
    lead = logical_to_spec(("batch",), rules)[0]
    if isinstance(lead, tuple):
        lead = tuple(a for a in lead if a in mesh.axis_names) or None
    return P(lead, *([None] * (ndim - 1)))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{n}={s}" for n, s in mesh.shape.items()) + f" ({mesh.size} devices)"
