"""The optax chain from a config's ``optim`` section (paper §A.2 dVAE, §B.2 transformer).

AdamW with decoupled weight decay, optional global-norm clipping before the update, a
learning-rate schedule, optional gradient accumulation, and two pieces of the paper's
transformer recipe:

* **which leaves decay** is decided by what a leaf *is*, read from its logical axis names
  (`decays`): weight matrices and convolution kernels decay; biases, gains, embeddings,
  position embeddings and the output heads (unembeddings) do not. The paper does not say
  which parameters it decays. It does single out gains, biases, embeddings and
  unembeddings as the parameters kept in fp32 with fp32 moments (App. D), and this is the
  usual split (GPT-2, the Sparse Transformer's successors, MaxText's default mask);
  a zero-initialised head pulled towards zero by decay would only fight the loss.
  Deciding by rank would be wrong here: every per-layer leaf is stored stacked on a
  leading ``layers`` axis, so even a layer norm's gain is 2-D.
* **clipping Adam's running variance** by value (`scale_by_adam`, ``optim.max_variance``):
  "We clip the estimate for running variance by value to 5 before it is used to update
  the parameters or moments" (App. B.2). The stored second moment is clipped right after
  its update, so the clipped value is both what the next moment update starts from and
  what (bias-corrected) divides the update.
* **per-resblock gradient scaling** for float16 training (`per_resblock_grad_scaling`),
  the optimizer half of the paper's mixed-precision scheme (§2.4, App. D); the model half
  is `dalle_jax.models.transformer.grad_scaled`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from dalle_jax import sharding
from dalle_jax.train import schedules

PyTree = Any

# ----------------------------------------------------------------------------- weight decay

# Logical axes of embedding and unembedding tables: a leaf with one of these never decays.
_TABLE_AXES = frozenset({"vocab", "length", "height", "width"})
# Logical axes of weight matrices (two of them make a matrix) and convolution kernels.
_MATRIX_AXES = frozenset({"embed", "heads", "kv", "attn", "mlp", "conv_in", "conv_out",
                          "codebook", "channels"})
_STACK_AXES = frozenset({"layers"})


def decays(logical: tuple[str | None, ...] | None, *, where: str = "") -> bool:
    """Whether a leaf with these logical axis names gets weight decay.

    True for convolution kernels (a ``conv_window`` axis) and for matrices (two or more
    weight axes, the stacking ``layers`` axis not counted) that are not embedding or
    unembedding tables (no ``vocab``/``length``/``height``/``width`` axis). Biases and
    gains (one weight axis) do not decay.

    Raises:
      ValueError: the leaf has no logical names, or one this function does not know (a new
        axis must be classified here, not silently decayed or spared).
    """
    if logical is None:
        raise ValueError(f"parameter {where!r} has no logical axis names: weight decay is "
                         "decided from them (use nn.with_logical_partitioning)")
    names = {a for a in logical if a is not None}
    unknown = names - _TABLE_AXES - _MATRIX_AXES - _STACK_AXES - {"conv_window"}
    if unknown:
        raise ValueError(f"parameter {where!r} has logical axes {sorted(unknown)} that "
                         "dalle_jax.train.optim.decays does not classify")
    if "conv_window" in names:
        return True
    if names & _TABLE_AXES:
        return False
    return sum(1 for a in logical if a in _MATRIX_AXES) >= 2


def decay_mask(param_axes: PyTree) -> Callable[[PyTree], PyTree]:
    """The ``mask`` for `optax.adamw` from a tree of logical axes (`sharding.logical_specs`).

    The mask is looked up by parameter path, so it applies both to the boxed abstract tree
    the loop initialises the optimizer with and to the plain arrays of every update.
    """
    is_spec = lambda x: isinstance(x, P) or x is None  # noqa: E731
    table = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=is_spec)[0]:
        name = sharding.path_str(path)
        table[name] = decays(tuple(spec) if spec is not None else None, where=name)

    def mask(params):
        def lookup(path, _):
            name = sharding.path_str(path)
            if name not in table:
                raise KeyError(f"parameter {name!r} is not in the weight-decay table; "
                               f"known: {sorted(table)[:8]}...")
            return table[name]

        return jax.tree_util.tree_map_with_path(lookup, params)

    return mask


# ----------------------------------------------------------------------------- Adam


def scale_by_adam(b1: float, b2: float, eps: float,
                  max_variance: float = 0.0) -> optax.GradientTransformation:
    """Adam's moment estimates with the running variance clipped by value at
    ``max_variance`` (0 = no clip, the same arithmetic as `optax.scale_by_adam`).

    State: `optax.ScaleByAdamState`, so a checkpoint layout does not depend on the clip.
    """
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    if not max_variance:
        return base

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        nu = jax.tree.map(lambda v: jnp.minimum(v, jnp.asarray(max_variance, v.dtype)), nu)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(base.init, update)


# ----------------------------------------------------------------------------- grad scaling


@dataclasses.dataclass(frozen=True)
class ResblockLayout:
    """Which parameters belong to which resblock, for per-resblock gradient scaling.

    Attributes:
      rows: number of layers; every scaled leaf is stacked with its layer on axis 0.
      names: the resblocks of a layer (the scale table's columns, e.g. attention, MLP).
      block_of: parameter path (``layers/qkv_kernel``) -> column index, or None for a
        leaf outside every resblock (embeddings, heads, final norm: float32 throughout).
    """

    rows: int
    names: tuple[str, ...]
    block_of: Callable[[str], int | None]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, len(self.names))


@dataclasses.dataclass(frozen=True)
class GradScalingRule:
    """The paper's scale update (App. D item 1), all scales in one ``(rows, cols)`` table.

    After every update each scale whose resblock's parameter gradients were all finite
    grows by ``growth``; each other scale shrinks by ``backoff``, but a scale is not
    shrunk twice within ``window`` updates; then all scales are clamped to
    ``[minimum, maximum]``. Paper: init ``M * 2^13``, growth ``2^(1/1000)``, backoff
    ``sqrt(2)``, window 125, clamp ``[M * 2^7, M * 2^24]``, with ``M`` the number of
    data-parallel replicas (`paper`).
    """

    init: float = 2.0**13
    minimum: float = 2.0**7
    maximum: float = 2.0**24
    growth: float = 2.0**(1 / 1000)
    backoff: float = 2.0**0.5
    window: int = 125

    def __post_init__(self):
        if not 0 < self.minimum <= self.init <= self.maximum:
            raise ValueError(f"grad scaling needs 0 < minimum <= init <= maximum, got "
                             f"{self.minimum}, {self.init}, {self.maximum}")
        if self.growth < 1 or self.backoff < 1 or self.window < 0:
            raise ValueError(f"grad scaling needs growth >= 1, backoff >= 1, window >= 0; got "
                             f"{self.growth}, {self.backoff}, {self.window}")

    @classmethod
    def from_config(cls, c, replicas: int) -> GradScalingRule:
        """From a ``precision.grad_scaling`` section (log2 exponents, before the factor M).

        ``c.replicas`` 0 means ``replicas`` (the mesh's batch shards): the loss is a mean
        over the global batch, so each device's partial gradient is ``1/M`` of a
        per-device mean, and the scales carry the factor M to compensate (App. D item 3).
        """
        m = int(c.replicas) or int(replicas)
        return cls(init=m * 2.0 ** float(c.init_log2), minimum=m * 2.0 ** float(c.min_log2),
                   maximum=m * 2.0 ** float(c.max_log2),
                   growth=2.0 ** (1.0 / float(c.doubling_updates)),
                   backoff=2.0 ** float(c.backoff_log2), window=int(c.window))

    def next(self, scales, finite, count, last_decrease):
        """``(scales, last_decrease)`` after update number ``count`` with per-block
        finiteness ``finite`` (same shape as ``scales``)."""
        may_shrink = (count - last_decrease) >= self.window
        shrink = ~finite & may_shrink
        scales = jnp.where(finite, scales * self.growth,
                           jnp.where(shrink, scales / self.backoff, scales))
        last_decrease = jnp.where(shrink, count, last_decrease)
        return jnp.clip(scales, self.minimum, self.maximum), last_decrease


class ResblockScalingState(NamedTuple):
    """State of `per_resblock_grad_scaling`: the scales and the wrapped optimizer's state."""

    scales: jax.Array  # (rows, cols) float32
    last_decrease: jax.Array  # (rows, cols) int32: update index of each scale's last shrink
    count: jax.Array  # int32: updates seen (skipped ones included)
    skipped: jax.Array  # int32: updates skipped so far
    last_skipped: jax.Array  # bool: the latest update was skipped
    inner_state: Any


def _per_leaf(grads: PyTree, layout: ResblockLayout) -> PyTree:
    """The column of each gradient leaf (None outside every resblock), checked."""

    def col(path, g):
        c = layout.block_of(sharding.path_str(path))
        if c is not None and (g.ndim == 0 or g.shape[0] != layout.rows):
            raise ValueError(f"{sharding.path_str(path)} belongs to resblock column {c} but "
                             f"its leading axis is not the {layout.rows} layers: {g.shape}")
        return c

    return jax.tree_util.tree_map_with_path(col, grads)


def unscale(grads: PyTree, scales: jax.Array, layout: ResblockLayout) -> PyTree:
    """Each resblock's parameter gradients divided by that resblock's scale."""
    cols = _per_leaf(grads, layout)

    def div(g, c):
        if c is None:
            return g
        s = scales[:, c].reshape((layout.rows,) + (1,) * (g.ndim - 1))
        return g / s.astype(g.dtype)

    return jax.tree.map(div, grads, cols, is_leaf=lambda x: x is None)


def block_finite(grads: PyTree, layout: ResblockLayout) -> tuple[jax.Array, jax.Array]:
    """``(finite (rows, cols), rest_finite)``: whether each resblock's parameter gradients
    are all finite, and whether every gradient outside the resblocks is."""
    cols = _per_leaf(grads, layout)
    finite = jnp.ones(layout.shape, bool)
    rest = jnp.asarray(True)
    for g, c in zip(jax.tree.leaves(grads), jax.tree.leaves(cols, is_leaf=lambda x: x is None)):
        ok = jnp.isfinite(g)
        if c is None:
            rest = rest & ok.all()
        else:
            rows_ok = ok.reshape(layout.rows, -1).all(axis=1)
            finite = finite.at[:, c].set(finite[:, c] & rows_ok)
    return finite, rest


def per_resblock_grad_scaling(inner: optax.GradientTransformation, layout: ResblockLayout,
                              rule: GradScalingRule) -> optax.GradientTransformation:
    """Owns one gradient scale per resblock and applies ``inner`` to unscaled gradients.

    The train step reads the current scales (`grad_scales`) and passes them to the model,
    whose resblocks return parameter gradients multiplied by their scale
    (`transformer.grad_scaled`). Each update then:

    1. divides each resblock's parameter gradients by its scale (`unscale`);
    2. checks every gradient for non-finite values, per resblock and elsewhere;
    3. if all are finite, runs ``inner`` (clipping, Adam, ...) on them; otherwise the
       whole update is skipped: zero updates, and ``inner``'s state (moments, step
       counts) is left as it was;
    4. updates every scale by ``rule`` from its own resblock's finiteness.

    The scales live in this transform's state, so they are checkpointed, restored and
    placed on the mesh with the rest of the optimizer state.
    """

    def init(params):
        return ResblockScalingState(
            scales=jnp.full(layout.shape, rule.init, jnp.float32),
            last_decrease=jnp.full(layout.shape, -rule.window, jnp.int32),
            count=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
            last_skipped=jnp.zeros((), bool), inner_state=inner.init(params))

    def update(grads, state, params=None):
        grads = unscale(grads, state.scales, layout)
        finite, rest = block_finite(grads, layout)
        ok = finite.all() & rest
        safe = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)), grads)
        updates, inner_state = inner.update(safe, state.inner_state, params)
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        inner_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), inner_state,
                                   state.inner_state)
        scales, last_decrease = rule.next(state.scales, finite, state.count,
                                          state.last_decrease)
        return updates, ResblockScalingState(
            scales=scales, last_decrease=last_decrease, count=state.count + 1,
            skipped=state.skipped + (~ok).astype(jnp.int32), last_skipped=~ok,
            inner_state=inner_state)

    return optax.GradientTransformation(init, update)


def grad_scales(opt_state: Any) -> jax.Array | None:
    """The current ``(rows, cols)`` scales if ``opt_state`` is per-resblock scaled."""
    return opt_state.scales if isinstance(opt_state, ResblockScalingState) else None


def scaling_metrics(opt_state: ResblockScalingState, layout: ResblockLayout) -> dict:
    """Step metrics of the scaler: whether the update was skipped (averaged over a log
    window: the skipped fraction), updates skipped so far, and log2 of the scales: min,
    max and each resblock's (``grad_scale/<name>_<layer>``), so the late layers' scales
    can be seen to differ from the early ones."""
    log2 = jnp.log2(opt_state.scales)
    out = {"grad_scale/skipped": opt_state.last_skipped.astype(jnp.float32),
           "grad_scale/skipped_total": opt_state.skipped.astype(jnp.float32),
           "grad_scale/log2_min": log2.min(), "grad_scale/log2_max": log2.max()}
    width = len(str(layout.rows - 1))
    for c, name in enumerate(layout.names):
        for r in range(layout.rows):
            out[f"grad_scale/{name}_{r:0{width}d}"] = log2[r, c]
    return out


# ----------------------------------------------------------------------------- build


def build(c, param_axes: PyTree, *, resblocks: ResblockLayout | None = None,
          scaling: GradScalingRule | None = None
          ) -> tuple[optax.GradientTransformation, schedules.Schedule]:
    """Returns ``(optimizer, lr_schedule)`` for an ``optim`` config section.

    Args:
      c: the ``optim`` section.
      param_axes: logical axis names of every parameter (`sharding.logical_specs` of the
        boxed params), from which the weight-decay mask is decided.
      resblocks, scaling: with both, the optimizer is wrapped in
        `per_resblock_grad_scaling` (float16 training).
    """
    if c.name != "adamw":
        raise ValueError(f"optim.name={c.name!r}: only 'adamw' is implemented")
    lr = schedules.from_config(c.lr)
    max_variance = float(c.get("max_variance", 0.0))
    if max_variance < 0:
        raise ValueError(f"optim.max_variance must be >= 0 (0 = no clip), got {max_variance}")
    parts = []
    if float(c.clip_global_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(c.clip_global_norm)))
    mask = decay_mask(param_axes)
    if max_variance:
        parts += [scale_by_adam(float(c.b1), float(c.b2), float(c.eps), max_variance),
                  optax.add_decayed_weights(float(c.weight_decay), mask),
                  optax.scale_by_learning_rate(lr)]
    else:
        parts.append(optax.adamw(lr, b1=float(c.b1), b2=float(c.b2), eps=float(c.eps),
                                 weight_decay=float(c.weight_decay), mask=mask))
    tx = optax.chain(*parts)
    if int(c.grad_accum) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(c.grad_accum))
    if (resblocks is None) != (scaling is None):
        raise ValueError("per-resblock gradient scaling needs both a resblock layout and a rule")
    if resblocks is not None:
        tx = per_resblock_grad_scaling(tx, resblocks, scaling)
    return tx, lr
