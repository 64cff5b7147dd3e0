"""dalle-jax: DALL·E 1 in JAX/Flax.

Packages follow the data: `data` (TFDS builders, NumPy augmentations, grain pipelines) →
`tokenizers` (the dVAE, its OpenAI import and pre-encoding, caption BPE) → `models` (the
sparse transformer and its masks, the contrastive towers) → `train` (one generic loop,
the optimizer, a task per model) → `sample` (KV-cached, guided sampling and the `sample`
job) → `rerank` (scorers, streamed best-of-N) → `evals` (evaluators, the `shapes` caption
checker, Inception FID / IS, the MS-COCO protocol). `jobs` lists what the command line
(`main`) runs; docs/design.md in the repository describes the whole.
"""

__version__ = "0.1.0"
