"""dalle-jax: DALL·E 1 in JAX/Flax.

Stages follow the data: `data` (TFDS builders, grain pipeline) → `tokenizers` (dVAE, BPE) →
`models` (sparse transformer) → `train` (one generic loop) → `sampling` → `rerank` → `evals`.
"""

__version__ = "0.1.0"
