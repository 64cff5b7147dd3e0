"""The optax chain from a config's ``optim`` section (paper §A.2 dVAE, §B.2 transformer).

AdamW with decoupled weight decay on matrices and convolution kernels only (biases,
gains and embeddings are not decayed: the paper does not say which parameters it
decays, and this is the usual choice), optional global-norm clipping before the
update, a learning-rate schedule, and optional gradient accumulation.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from dalle_jax.train import schedules


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: >= 2-D arrays not named like an embedding."""

    def decide(path, leaf):
        names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
        return leaf.ndim >= 2 and "embed" not in names and "pad" not in names

    return jax.tree_util.tree_map_with_path(decide, params)


def build(c) -> tuple[optax.GradientTransformation, schedules.Schedule]:
    """Returns ``(optimizer, lr_schedule)`` for an ``optim`` config section."""
    if c.name != "adamw":
        raise ValueError(f"optim.name={c.name!r}: only 'adamw' is implemented")
    lr = schedules.from_config(c.lr)
    parts = []
    if float(c.clip_global_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(c.clip_global_norm)))
    parts.append(optax.adamw(lr, b1=float(c.b1), b2=float(c.b2), eps=float(c.eps),
                             weight_decay=float(c.weight_decay), mask=decay_mask))
    tx = optax.chain(*parts)
    if int(c.grad_accum) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(c.grad_accum))
    return tx, lr
