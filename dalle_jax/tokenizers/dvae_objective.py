"""The dVAE's training objective (paper §2.1, §A.2, §A.3): the Gumbel-softmax
relaxation, the KL to the uniform prior, the reconstruction likelihoods and `dvae_loss`.

Only training and its evaluations need this module; the model is
`dalle_jax.tokenizers.dvae`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from dalle_jax.tokenizers.dvae import (
    DVAE,
    LOGIT_LAPLACE_EPS,
    DVAEConfig,
    as_model,
    check_images,
    map_pixels,
    stats_to_images,
    to_unit_interval,
)


def gumbel_softmax(logits: jax.Array, rng: jax.Array, tau: float | jax.Array) -> jax.Array:
    """Soft relaxed sample ``softmax((logits + g) / tau)``, g ~ Gumbel(0, 1), over the last axis.

    Soft in both passes, no straight-through estimator (paper §2.1; the first author
    confirmed the soft relaxation in both passes on the openai/DALL-E issue tracker).
    """
    logits = logits.astype(jnp.float32)
    g = jax.random.gumbel(rng, logits.shape, jnp.float32)
    return jax.nn.softmax((logits + g) / tau, axis=-1)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """KL(softmax(logits) || uniform) per position, over the last axis, in nats.

    Uses the unrelaxed categorical even when tau > 0 (the first author's answer on the
    openai/DALL-E issue tracker: the KL is taken from the logits' softmax, not the
    relaxed sample).
    """
    logits = logits.astype(jnp.float32)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    q = jnp.exp(log_q)
    return jnp.sum(q * log_q, axis=-1) + math.log(logits.shape[-1])


def logit_laplace_nll(x_mapped: jax.Array, stats: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-pixel logit-Laplace negative log-density (paper §A.3 eq. 2).

    Args:
        x_mapped: targets in (0, 1), already mapped by `map_pixels`, shape ``(..., C)``.
        stats: decoder output ``(..., 2C)``: mu then ln b.

    Returns:
        ``(nll, nll_param)``: the full ``ln 2 + ln b + ln x + ln(1-x) + |logit x - mu| / b`` and
        its parameter-dependent part ``ln b + |logit x - mu| / b`` (same gradients).
        ln b is not clamped: the paper describes no clamp.
    """
    c = x_mapped.shape[-1]
    if stats.shape[-1] != 2 * c:
        raise ValueError(f"stats have {stats.shape[-1]} channels, expected 2 * {c} (mu, ln b)")
    x = x_mapped.astype(jnp.float32)
    mu, ln_b = stats[..., :c].astype(jnp.float32), stats[..., c:].astype(jnp.float32)
    logit_x = jnp.log(x) - jnp.log1p(-x)
    nll_param = ln_b + jnp.abs(logit_x - mu) * jnp.exp(-ln_b)
    nll = nll_param + math.log(2.0) + jnp.log(x) + jnp.log1p(-x)
    return nll, nll_param


# Reconstruction terms `dvae_loss` accepts (see `recon_nll`).
RECON_LOSSES = ("logit_laplace", "mse")


def gaussian_nll(x_mapped: jax.Array, stats: jax.Array, sigma: float) -> tuple[jax.Array, jax.Array]:
    """Per-pixel negative log-density of ``N(sigmoid(mu), sigma**2)`` on the mapped scale.

    A squared error with a fixed scale: ``(x - sigmoid(mu))**2 / (2 sigma**2)`` plus the
    constant ``ln(sigma sqrt(2 pi))``. The ln b channels of ``stats`` are ignored.

    Returns:
        ``(nll, nll_param)`` as in `logit_laplace_nll`.
    """
    c = x_mapped.shape[-1]
    if stats.shape[-1] != 2 * c:
        raise ValueError(f"stats have {stats.shape[-1]} channels, expected 2 * {c} (mu, ln b)")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    mean = jax.nn.sigmoid(stats[..., :c].astype(jnp.float32))
    nll_param = jnp.square(x_mapped.astype(jnp.float32) - mean) / (2.0 * sigma**2)
    return nll_param + math.log(sigma * math.sqrt(2.0 * math.pi)), nll_param


def recon_nll(
    x_mapped: jax.Array,
    stats: jax.Array,
    *,
    recon_loss: str = "logit_laplace",
    ln_b_min: float = -math.inf,
    mse_sigma: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """The per-pixel reconstruction term ``(nll, nll_param)`` of `dvae_loss`.

    Args:
        x_mapped: targets mapped by `map_pixels`, ``(..., C)``.
        stats: decoder output ``(..., 2C)`` (mu, ln b).
        recon_loss: ``"logit_laplace"`` (the paper's, §A.3) or ``"mse"`` (`gaussian_nll`
            with std ``mse_sigma`` on the mapped scale; both are densities of the mapped
            pixel, so the ELB stays a bound in the same units).
        ln_b_min: for the logit-Laplace term, ln b is raised to at least this value (a hard
            floor; below it ln b gets no gradient). -inf keeps it unclamped as in the paper.
            Images with exactly constant regions otherwise let the likelihood grow without
            bound by shrinking b there.
        mse_sigma: the std of the ``"mse"`` term; its weight against the KL is
            ``1 / (2 mse_sigma**2)``.
    """
    if recon_loss == "mse":
        return gaussian_nll(x_mapped, stats, mse_sigma)
    if recon_loss != "logit_laplace":
        raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
    if ln_b_min > -math.inf:
        c = x_mapped.shape[-1]
        stats = jnp.concatenate([stats[..., :c], jnp.maximum(stats[..., c:], ln_b_min)], axis=-1)
    return logit_laplace_nll(x_mapped, stats)


def dvae_loss(
    params: Any,
    images: jax.Array,
    rng: jax.Array,
    *,
    tau: float | jax.Array,
    beta: float | jax.Array,
    model: DVAE | DVAEConfig,
    hard_sample: bool = False,
    recon_loss: str = "logit_laplace",
    ln_b_min: float = -math.inf,
    mse_sigma: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The dVAE objective (paper §2.1, §A.2) and its metrics.

    ``loss = mean_B [ sum_pixels nll + beta * sum_positions KL ] / (H * W * C)``; with the
    paper's sizes the KL weight is beta / 192 (paper §A.2). ``nll`` is the full negative
    log-density (paper §A.3: "the logarithm of the RHS of Equation 2"); its constant terms
    do not change the gradients.

    Args:
        params: the ``params`` collection.
        images: ``(B, H, W, C)`` uint8 in [0, 255] or floating in [0, 1].
        rng: key for the Gumbel noise.
        tau: relaxation temperature.
        beta: KL weight.
        model: the `DVAE` (or its config).
        hard_sample: decode ``one_hot(argmax(logits + g))``, a true sample from q, instead of
            the relaxation. Gives the *true* (not relaxed) ELB estimate; for evaluation only,
            since nothing reaches the encoder through the reconstruction term.
        recon_loss, ln_b_min, mse_sigma: the reconstruction term, see `recon_nll`. The
            defaults are the paper's (unclamped logit-Laplace).

    Returns:
        ``(loss, aux)``. ``aux`` holds batch means of (all in nats unless noted):

        * ``recon_nll``: full reconstruction NLL per dimension (in mapped-pixel space; the
          logit-Laplace one, or the Gaussian one with ``recon_loss="mse"``);
        * ``recon_nll_param``: its parameter-dependent part per dimension;
        * ``kl_per_dim``: sum of KL over positions / (H*W*C); ``kl_per_position``: mean KL;
        * ``elb_bpd``: negative ELB (beta = 1) in bits per dimension of the 8-bit image:
          ``(sum nll + D*ln(255/(1-2eps)) + sum KL) / (D ln 2)``, D = H*W*C. The added term
          turns the density on the mapped scale into a probability of the 8-bit value: the
          8-bit grid has spacing (1-2eps)/255 after `map_pixels`, and the probability of a
          value is taken as density * spacing (midpoint rule, not a dequantised bound). It is
          the relaxed ELB unless ``hard_sample``;
        * ``mse``, ``psnr`` (dB, per image then averaged) of ``unmap(sigmoid(mu))`` against
          the [0, 1] image;
        * ``code_usage``: distinct argmax codes in the batch; ``codes``: the argmax codes
          ``(B, G, G)`` int32 for longer-run usage statistics.
    """
    model = as_model(model)
    cfg = model.config
    check_images(images, cfg)
    x01 = to_unit_interval(images)
    x_mapped = map_pixels(x01)
    logits = model.apply({"params": params}, x_mapped, method=DVAE.encode_logits)
    if hard_sample:
        g = jax.random.gumbel(rng, logits.shape, jnp.float32)
        sample = jnp.argmax(logits + g, axis=-1)
        stats = model.apply({"params": params}, sample, method=DVAE.decode_tokens)
    else:
        z = gumbel_softmax(logits, rng, tau)
        stats = model.apply({"params": params}, z, method=DVAE.decode_relaxed)

    dims = cfg.image_size * cfg.image_size * cfg.input_channels
    nll, nll_param = recon_nll(x_mapped, stats, recon_loss=recon_loss, ln_b_min=ln_b_min,
                               mse_sigma=mse_sigma)
    nll_sum_B = jnp.sum(nll, axis=(1, 2, 3))
    kl_BGG = kl_to_uniform(logits)
    kl_sum_B = jnp.sum(kl_BGG, axis=(1, 2))
    loss = jnp.mean((nll_sum_B + beta * kl_sum_B) / dims)

    recon = stats_to_images(stats)
    mse_B = jnp.mean((recon - x01) ** 2, axis=(1, 2, 3))
    psnr_B = -10.0 * jnp.log10(jnp.maximum(mse_B, 1e-10))
    discretisation = dims * math.log(255.0 / (1.0 - 2.0 * LOGIT_LAPLACE_EPS))
    elb_bpd_B = (nll_sum_B + discretisation + kl_sum_B) / (dims * math.log(2.0))
    codes = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    used = jnp.zeros((cfg.vocab_size,), jnp.int32).at[codes.reshape(-1)].add(1)
    aux = dict(
        loss=loss,
        recon_nll=jnp.mean(nll_sum_B) / dims,
        recon_nll_param=jnp.mean(jnp.sum(nll_param, axis=(1, 2, 3))) / dims,
        kl_per_dim=jnp.mean(kl_sum_B) / dims,
        kl_per_position=jnp.mean(kl_BGG),
        elb_bpd=jnp.mean(elb_bpd_B),
        mse=jnp.mean(mse_B),
        psnr=jnp.mean(psnr_B),
        code_usage=jnp.sum(used > 0),
        codes=codes,
    )
    return loss, aux
