"""dalle-jax: DALL·E 1 in JAX/Flax.

Stages follow the data: `data` (TFDS builders, grain pipeline) → `tokenizers` (dVAE, BPE) →
`models` (sparse transformer, CLIP towers) → `train` (one generic loop) → `sample` (KV-cached,
guided sampling) → `rerank` (scorers, best-of-N) → `eval` (the `shapes` caption checker) and
`evals` (Inception FID / IS, the MS-COCO protocol).
"""

__version__ = "0.1.0"
