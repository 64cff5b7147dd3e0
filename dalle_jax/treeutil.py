"""Small helpers on parameter trees, with no dependency inside the package."""

from __future__ import annotations

import math
from typing import Any

import jax


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree.

    Leaves may be arrays or `jax.ShapeDtypeStruct` (an abstract tree, nothing allocated),
    bare or inside Flax's logical-partitioning boxes (a box is a pytree node over its
    value, so its value is what gets counted).
    """
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
