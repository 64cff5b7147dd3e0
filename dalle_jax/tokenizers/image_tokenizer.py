"""Images <-> dVAE token grids: the pure `encode` / `decode` functions and
`ImageTokenizer`, which holds a dVAE's config and parameters (loaded from an export,
`dalle_jax.exports`) and checks its inputs on the host.

Encoding takes the argmax of the encoder's logits, no noise (paper §2.2); decoding maps
the decoder's mu through the sigmoid back to [0, 1] pixels (paper §A.3).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import exports
from dalle_jax.tokenizers.dvae import (
    DVAE,
    DVAEConfig,
    as_model,
    check_images,
    map_pixels,
    stats_to_images,
    to_unit_interval,
)


def encode_logits(params: Any, images: jax.Array, *, model: DVAE | DVAEConfig) -> jax.Array:
    """Encoder logits ``(B, G, G, vocab)`` float32 for uint8 / [0, 1] images ``(B, H, W, C)``."""
    model = as_model(model)
    check_images(images, model.config)
    x = map_pixels(to_unit_interval(images))
    return model.apply({"params": params}, x, method=DVAE.encode_logits)


def encode(params: Any, images: jax.Array, *, model: DVAE | DVAEConfig) -> jax.Array:
    """Token grid ``(B, G, G)`` int32: argmax of the logits, no noise (paper §2.2)."""
    return jnp.argmax(encode_logits(params, images, model=model), axis=-1).astype(jnp.int32)


def check_tokens(tokens: jax.Array, config: DVAEConfig) -> None:
    shape = tuple(tokens.shape)
    g = config.grid
    if len(shape) != 3 or shape[1:] != (g, g):
        raise ValueError(f"tokens must have shape (B, {g}, {g}) for this dVAE, got {shape}")
    if not jnp.issubdtype(jnp.dtype(tokens.dtype), jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")


def decode_tokens(params: Any, tokens_BGG: jax.Array, *, model: DVAE | DVAEConfig) -> jax.Array:
    """Decoder statistics ``(B, H, W, 2C)`` for a token grid, via a row gather (no one-hot).

    Ids outside [0, vocab) are clamped; `ImageTokenizer.decode` checks them on the host.
    """
    model = as_model(model)
    check_tokens(tokens_BGG, model.config)
    return model.apply({"params": params}, tokens_BGG, method=DVAE.decode_tokens)


def decode_relaxed(params: Any, z_BGGC: jax.Array, *, model: DVAE | DVAEConfig) -> jax.Array:
    """Decoder statistics ``(B, H, W, 2C)`` for a (relaxed) one-hot ``(B, G, G, vocab)``."""
    model = as_model(model)
    c = model.config
    shape = tuple(z_BGGC.shape)
    if len(shape) != 4 or shape[1:] != (c.grid, c.grid, c.vocab_size):
        raise ValueError(
            f"relaxed codes must have shape (B, {c.grid}, {c.grid}, {c.vocab_size}), got {shape}"
        )
    if not jnp.issubdtype(jnp.dtype(z_BGGC.dtype), jnp.floating):
        raise ValueError(f"relaxed codes must be floating, got dtype {z_BGGC.dtype}")
    return model.apply({"params": params}, z_BGGC, method=DVAE.decode_relaxed)


def decode(params: Any, tokens_BGG: jax.Array, *, model: DVAE | DVAEConfig) -> jax.Array:
    """Images ``(B, H, W, C)`` float32 in [0, 1] from a token grid."""
    return stats_to_images(decode_tokens(params, tokens_BGG, model=model))


class ImageTokenizer:
    """Holds a config and parameters; jitted `encode` / `decode` with host-side checks.

    The class adds no state beyond its inputs: both methods call the pure functions above.
    """

    def __init__(self, config: DVAEConfig, params: Any):
        self.config = config
        self.params = params
        self.model = DVAE(config)
        self._encode = jax.jit(functools.partial(encode, model=self.model))
        self._decode = jax.jit(functools.partial(decode, model=self.model))

    @classmethod
    def load(cls, directory: str, expected_config: DVAEConfig | None = None) -> ImageTokenizer:
        """Loads a dVAE export (from the dVAE trainer or the OpenAI import)."""
        config, params = exports.load_dvae(directory, expected_config)
        return cls(config, params)

    @property
    def grid(self) -> int:
        return self.config.grid

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def encode(self, images: Any) -> jax.Array:
        """``(B, H, W, C)`` uint8 or [0, 1] float images -> ``(B, G, G)`` int32 tokens."""
        if not hasattr(images, "dtype"):
            images = np.asarray(images)
        check_images(images, self.config)
        return self._encode(self.params, images)

    def decode(self, tokens: Any) -> jax.Array:
        """``(B, G, G)`` integer tokens -> ``(B, H, W, C)`` float32 images in [0, 1].

        Raises:
            ValueError: on a wrong shape, a non-integer dtype or ids outside [0, vocab_size).
        """
        if not hasattr(tokens, "dtype"):
            tokens = np.asarray(tokens)
        check_tokens(tokens, self.config)
        if tokens.size:
            lo, hi = int(np.min(tokens)), int(np.max(tokens))  # host sync: a value check
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.config.vocab_size}), got min {lo}, max {hi}"
                )
        return self._decode(self.params, tokens)
