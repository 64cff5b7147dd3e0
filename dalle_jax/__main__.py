"""``python -m dalle_jax`` is the same as ``python -m dalle_jax.main``."""

from dalle_jax.main import run

run()
