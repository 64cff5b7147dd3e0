"""Device mesh, logical axis rules and the shardings derived from them.

Model code names every parameter and activation dimension with a *logical* axis
(``batch``, ``embed``, ``mlp``, ...). A rules table maps logical names onto the
mesh axes ``("data", "fsdp", "tensor")``. One table per preset (``dp``, ``fsdp``,
``fsdp_tp``) is all that changes between a laptop run and a pod run: no module
ever names a mesh axis. A logical name missing from the table raises instead of
silently replicating, so a new layer cannot quietly blow up memory at scale.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

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
    "heads",  # attention heads (activations)
    "kv",  # per-head width
    "attn",  # heads x per-head width fused: the attention projections' parameter dim
    "mlp",  # MLP hidden width
    "vocab",  # output / embedding vocabulary
    "codebook",  # dVAE codes (encoder logits, decoder input)
    "height",  # image rows (activations)
    "width",  # image columns (activations)
    "conv_window",  # spatial kernel dims of a convolution
    "conv_in",  # convolution input channels
    "conv_out",  # convolution output channels
    "channels",  # image colour channels (and the dVAE's per-channel output statistics)
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
    # FSDP plus tensor (Megatron) parallelism on heads / MLP / vocab. The attention
    # projections shard their fused heads x head-width dim ("attn"), which divides a power
    # of two even when the head count does not (the paper's 62 heads of 64 = 2^7 * 31);
    # the (B, L, H, K) attention activations are constrained on "heads", which GSPMD
    # pads internally when H does not divide the tensor degree.
    "fsdp_tp": _preset(embed="fsdp", conv_out="fsdp", heads="tensor", attn="tensor",
                       mlp="tensor", vocab="tensor", codebook="tensor"),
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


def unboxed(tree: Any) -> Any:
    """The arrays of a tree of Flax logical-partitioning boxes, boxes removed.

    Unlike ``nn.unbox`` this never adds a sharding constraint, so it is safe on abstract
    trees and outside jit while a mesh and logical rules are active (the loop runs under
    both, where ``nn.unbox`` would constrain an abstract value).
    """
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: unboxed(x.value) if is_box(x) else x, tree, is_leaf=is_box)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]]):
    """Traces under this apply the models' activation constraints
    (``nn.with_logical_constraint``) on ``mesh`` with ``rules``; outside it they are no-ops.

    Use it around the tracing of a step or an evaluation, not around parameter init:
    inside it Flax also constrains every boxed parameter it unboxes.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


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


def batch_shards(mesh_shape: Mapping[str, int], rules: Sequence[tuple[str, Any]]) -> int:
    """How many ways the ``batch`` rule splits a batch on these mesh degrees (the
    data-parallel replica count)."""
    return math.prod(int(mesh_shape.get(a, 1)) for a in spec_axes(dict(rules)["batch"]))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{n}={s}" for n, s in mesh.shape.items()) + f" ({mesh.size} devices)"


# ----------------------------------------------------------------------------- planning
# The functions below need only the mesh *degrees*, not devices: they answer "how would
# this tree shard on a 1,024-GPU mesh" on a laptop, from an `eval_shape`-d tree.


def path_str(path: Sequence[Any]) -> str:
    """``a/b/c`` from a pytree key path (dict keys and attribute names; box wrappers and
    sequence indices of a state tuple are kept so every leaf stays distinct)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":  # the payload of a Flax logical-partitioning box
                parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis, or a tuple of axes)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


class LeafSharding(NamedTuple):
    """How one array leaf shards on a mesh: the rows of a sharding table."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    logical: tuple[str | None, ...] | None  # None: the leaf has no logical names
    spec: P
    shard_shape: tuple[int, ...]  # per-device shape (dims rounded up where not divisible)
    bytes_per_device: int
    problems: tuple[str, ...]  # dims whose mesh axes do not divide them


def leaf_shardings(abstract_tree: Any, mesh_shape: Mapping[str, int],
                   rules: Sequence[tuple[str, Any]]) -> list[LeafSharding]:
    """One `LeafSharding` per array leaf of an `eval_shape`-d (boxed) Flax tree.

    ``mesh_shape`` maps each mesh axis to its degree; the devices need not exist.
    Leaves without logical names (step counters, scalars) are replicated. A logical name
    without a rule raises (as in `logical_to_spec`).
    """
    specs = logical_specs(abstract_tree)
    is_spec = lambda x: isinstance(x, P) or x is None  # noqa: E731
    spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
    array_leaves = jax.tree_util.tree_leaves_with_path(unboxed(abstract_tree))
    if len(spec_leaves) != len(array_leaves):
        raise ValueError(f"tree has {len(array_leaves)} arrays but {len(spec_leaves)} specs")
    rows = []
    for (path, leaf), logical in zip(array_leaves, spec_leaves):
        logical = tuple(logical) if logical is not None else None
        spec = logical_to_spec(logical, rules)
        shape = tuple(int(d) for d in leaf.shape)
        shard, problems = [], []
        entries = tuple(spec) + (None,) * (len(shape) - len(spec))
        for i, (dim, entry) in enumerate(zip(shape, entries)):
            axes = spec_axes(entry)
            ways = math.prod(int(mesh_shape.get(a, 1)) for a in axes)
            if dim % ways:
                name = logical[i] if logical else None
                problems.append(f"dim {i} ({name!r}, size {dim}) is not divisible by mesh "
                                + " x ".join(f"{a}={mesh_shape.get(a, 1)}" for a in axes))
            shard.append(-(-dim // ways))
        itemsize = np.dtype(leaf.dtype).itemsize
        rows.append(LeafSharding(path_str(path), shape, str(np.dtype(leaf.dtype)), logical,
                                 spec, tuple(shard), math.prod(shard) * itemsize,
                                 tuple(problems)))
    return rows


def check_shardable(abstract_tree: Any, mesh_shape: Mapping[str, int],
                    rules: Sequence[tuple[str, Any]], *, what: str = "parameters") -> None:
    """Raises ValueError naming every leaf whose shape its mesh axes do not divide.

    jax needs every dim of a sharded argument divisible by the product of its mesh axes;
    checking this on the abstract tree fails a mis-sized mesh before anything is
    allocated or compiled, with the parameter, its dim and the mesh axis in the message.
    """
    bad = [f"{r.path} {r.shape} -> {r.spec}: " + "; ".join(r.problems)
           for r in leaf_shardings(abstract_tree, mesh_shape, rules) if r.problems]
    if bad:
        mesh = ", ".join(f"{a}={d}" for a, d in mesh_shape.items())
        raise ValueError(f"the mesh ({mesh}) cannot shard these {what}:\n  " + "\n  ".join(bad)
                         + "\nchoose mesh degrees that divide them, or another sharding_rules "
                           "preset")


def _spec_text(spec: P) -> str:
    parts = []
    for entry in spec:
        axes = spec_axes(entry)
        parts.append("-" if not axes else "+".join(axes))
    return "(" + ", ".join(parts) + ")" if parts else "()"


def format_table(rows: Sequence[LeafSharding], mesh_shape: Mapping[str, int], title: str) -> str:
    """A plain-text sharding table: one line per leaf (path, shape, logical names, mesh axes
    per dim, per-device shape and bytes), then the totals. Stable across runs, so it can
    be checked in and compared (tests/golden/)."""
    mesh = " ".join(f"{a}={mesh_shape.get(a, 1)}" for a in MESH_AXES)
    devices = math.prod(int(mesh_shape.get(a, 1)) for a in MESH_AXES)
    lines = [f"# {title}", f"# mesh: {mesh} ({devices} devices)",
             "# path | shape | dtype | logical axes | mesh axes | per-device shape | bytes/device"]
    total = per_device = 0
    for r in rows:
        logical = "(" + ", ".join(a or "-" for a in r.logical) + ")" if r.logical else "()"
        lines.append(" | ".join([r.path, str(r.shape), r.dtype, logical, _spec_text(r.spec),
                                 str(r.shard_shape), f"{r.bytes_per_device:,}"]))
        total += math.prod(r.shape) * np.dtype(r.dtype).itemsize
        per_device += r.bytes_per_device
    lines.append(f"# total: {len(rows)} arrays, {total:,} bytes; per device {per_device:,} bytes "
                 f"({per_device / 2**30:.3f} GiB)")
    return "\n".join(lines) + "\n"
