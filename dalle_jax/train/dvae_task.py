"""Stage 1 on the generic loop: the dVAE's loss and metrics.

Training follows paper §2.1 / App. A.2: soft Gumbel-softmax relaxation in both passes,
KL to the uniform prior from the unrelaxed logits, logit-Laplace likelihood, and cosine
schedules for the temperature τ, the KL weight β and the learning rate.

Evaluation is the ``config.evals`` sections run by the loop (`dalle_jax.evals.registry`;
the reconstruction evaluator is `dalle_jax.evals.recon`).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from dalle_jax import metrics as metrics_lib
from dalle_jax import exports
from dalle_jax.tokenizers import dvae, dvae_objective
from dalle_jax.train import loop, schedules


def model_config(cfg) -> dvae.DVAEConfig:
    """The DVAEConfig of a run config (compute dtype from ``precision``)."""
    return dvae.DVAEConfig.from_dict(dict(cfg.model.to_dict(), dtype=cfg.precision.compute_dtype))


def loss_options(cfg) -> dict[str, Any]:
    """Keyword arguments of `dvae_objective.dvae_loss` from the optional ``loss`` section.

    ``loss.recon``: "logit_laplace" (the paper's, default) or "mse"; ``loss.ln_b_min``: floor
    on the logit-Laplace ln b (default -inf, none); ``loss.mse_sigma``: std of the "mse" term.
    """
    section = cfg.get("loss", None)
    section = dict(section.to_dict() if hasattr(section, "to_dict") else section or {})
    known = {"recon", "ln_b_min", "mse_sigma"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"unknown loss options {unknown}; allowed keys are {sorted(known)}")
    recon = str(section.get("recon", "logit_laplace"))
    if recon not in dvae_objective.RECON_LOSSES:
        raise ValueError(f"loss.recon must be one of {dvae_objective.RECON_LOSSES}, got {recon!r}")
    sigma = float(section.get("mse_sigma", 0.1))
    if not sigma > 0:
        raise ValueError(f"loss.mse_sigma must be > 0, got {sigma}")
    return dict(recon_loss=recon, ln_b_min=float(section.get("ln_b_min", -math.inf)),
                mse_sigma=sigma)


def make_task(cfg, workdir: str) -> loop.Task:
    mcfg = model_config(cfg)
    if int(cfg.data.image_size) != mcfg.image_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} but model.image_size="
                         f"{mcfg.image_size}: the dVAE is trained at the data resolution")
    model = dvae.DVAE(mcfg)
    tau_fn = schedules.from_config(cfg.schedules.tau)
    beta_fn = schedules.from_config(cfg.schedules.beta)
    vocab = mcfg.vocab_size
    loss_opts = loss_options(cfg)

    def loss_fn(params, batch, rng, step):
        tau, beta = tau_fn(step), beta_fn(step)
        loss, aux = dvae_objective.dvae_loss(params, batch["image"], rng, tau=tau, beta=beta,
                                              model=model, **loss_opts)
        codes = aux.pop("codes")
        aux.pop("loss")
        aux.pop("code_usage")
        hist = jnp.zeros((vocab,), jnp.float32).at[codes.reshape(-1)].add(1.0)
        return loss, dict(aux, tau=tau, beta=beta, **{"hist/codes": hist})

    def summarize(m: dict) -> dict:
        # Usage over the batches since the last log (log.every_steps of them).
        return dict(m, **metrics_lib.codebook_stats(m["hist/codes"]))

    from dalle_jax.evals import registry

    evaluators = registry.build(cfg, registry.EvalContext(
        cfg, registry.output_dir(workdir), "dvae", model=model))
    return loop.Task(
        name="dvae",
        identity=exports.dvae_identity(mcfg),
        init_variables=lambda rng: dvae.init_variables(mcfg, rng),
        loss_fn=loss_fn,
        device_batch=lambda b: {"image": b["image"]},
        summarize=summarize,
        evaluate=evaluators if len(evaluators) else None,
    )
