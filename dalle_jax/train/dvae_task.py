"""Stage 1 on the generic loop: the dVAE's loss, metrics and reconstruction evaluation.

Training follows paper §2.1 / App. A.2: soft Gumbel-softmax relaxation in both passes,
KL to the uniform prior from the unrelaxed logits, logit-Laplace likelihood, and cosine
schedules for the temperature τ, the KL weight β and the learning rate.

Evaluation (on the config's eval split, deterministic centre crops) reports what stage 2
will actually see: reconstructions from the *argmax* tokens (MSE, PSNR), codebook usage
and perplexity of those tokens, and the ELB in bits/dim estimated with a hard sample from
q (β = 1), which is the true bound rather than the relaxed one.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dalle_jax import metrics as metrics_lib
from dalle_jax import sharding, visualize
from dalle_jax.data import sources
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

    evaluator = ReconEvaluator(cfg, workdir, model)
    return loop.Task(
        name="dvae",
        identity=exports.dvae_identity(mcfg),
        init_variables=lambda rng: dvae.init_variables(mcfg, rng),
        loss_fn=loss_fn,
        device_batch=lambda b: {"image": b["image"]},
        summarize=summarize,
        evaluate=evaluator if cfg.evals.recon.num_batches > 0 else None,
    )


class ReconEvaluator:
    """Reconstruction metrics on the eval split and an inputs-vs-reconstructions PNG grid."""

    def __init__(self, cfg, workdir: str, model: dvae.DVAE):
        self.cfg = cfg
        self.workdir = workdir
        self.model = model
        self.num_batches = int(cfg.evals.recon.num_batches)
        self.grid_examples = int(cfg.evals.recon.grid_examples)
        self.rules = sharding.get_rules(cfg.sharding_rules)
        self._eval = jax.jit(functools.partial(_eval_batch, model=model,
                                               loss_opts=loss_options(cfg)))

    def __call__(self, params: Any, step: int) -> dict:
        # The mesh is made when evaluating, not when the task is built, so a task can be
        # built for a mesh whose devices are not here (the memory planner does).
        mesh = sharding.make_mesh(self.cfg.mesh)
        it = sources.make_input(self.cfg.data, self.cfg.data.eval_split, train=False, num_epochs=1)
        vocab = self.model.config.vocab_size
        totals: dict[str, float] = {}
        hist = np.zeros((vocab,), np.float64)
        n = 0
        grid_in = grid_out = None
        for i, host in enumerate(it):
            if i >= self.num_batches:
                break
            spec = sharding.batch_spec(mesh, self.rules, 4)
            images = jax.make_array_from_process_local_data(
                jax.sharding.NamedSharding(mesh, spec), host["image"])
            out = self._eval(params, images, jax.random.key(step))
            recon = out.pop("recon")  # batch-sharded: spread over the processes
            out = jax.device_get(out)
            hist += np.asarray(out.pop("hist"))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1
            if grid_in is None:
                # The first rows of the global batch (process 0's own rows when several
                # processes share it), inputs and reconstructions alike.
                k = min(self.grid_examples, host["image"].shape[0])
                if jax.process_count() > 1:
                    recon = multihost_utils.process_allgather(recon, tiled=True)
                grid_in, grid_out = host["image"][:k], visualize.to_uint8(np.asarray(recon)[:k])
        it.close()
        if n == 0:
            return {}
        result = {k: v / n for k, v in totals.items()}
        result.update(metrics_lib.codebook_stats(hist))
        if jax.process_index() == 0 and grid_in is not None:
            self.save_grid(grid_in, grid_out, step)
        return result

    def save_grid(self, inputs, recons, step: int) -> str:
        """Rows alternate inputs and their reconstructions from argmax tokens."""
        k = len(inputs)
        cols = min(8, k)
        rows = []
        for s in range(0, k, cols):
            rows += [inputs[s:s + cols], recons[s:s + cols]]
        if len(rows[-1]) < cols:  # pad the last pair of rows to a full width
            pad = np.zeros((cols - len(rows[-1]),) + inputs.shape[1:], np.uint8)
            rows[-2], rows[-1] = np.concatenate([rows[-2], pad]), np.concatenate([rows[-1], pad])
        grid = np.concatenate(rows)
        scale = 2 if inputs.shape[1] <= 64 else 1
        d = os.path.join(self.workdir, "eval")
        path = visualize.save_grid(os.path.join(d, f"recon_{step:07d}.png"), grid, ncols=cols,
                                   scale=scale)
        visualize.save_grid(os.path.join(d, "recon_latest.png"), grid, ncols=cols, scale=scale)
        return path


def _eval_batch(params, images, rng, *, model, loss_opts):
    from dalle_jax.tokenizers import image_tokenizer

    _, aux = dvae_objective.dvae_loss(params, images, rng, tau=1.0, beta=1.0, model=model,
                                      hard_sample=True, **loss_opts)
    tokens = image_tokenizer.encode(params, images, model=model)
    recon = image_tokenizer.decode(params, tokens, model=model)
    x01 = dvae.to_unit_interval(images)
    mse_B = jnp.mean((recon - x01) ** 2, axis=(1, 2, 3))
    vocab = model.config.vocab_size
    return {
        "elb_bpd": aux["elb_bpd"],
        "recon_nll": aux["recon_nll"],
        "kl_per_dim": aux["kl_per_dim"],
        "mse": jnp.mean(mse_B),
        "psnr": jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse_B, 1e-10))),
        "hist": jnp.zeros((vocab,), jnp.float32).at[tokens.reshape(-1)].add(1.0),
        "recon": recon,
    }
