"""dVAE reconstruction on the eval split (``type="recon"``, subject: the dVAE).

Reports what stage 2 will actually see: reconstructions from the *argmax* tokens (MSE,
PSNR), codebook usage and perplexity of those tokens, and the ELB in bits/dim estimated
with a hard sample from q (β = 1), which is the true bound rather than the relaxed one.
Images are deterministic centre crops of the config's ``data.eval_split``. Writes an
inputs-vs-reconstructions grid ``recon_<step>.png`` (and ``recon_latest.png``).

Settings: ``num_batches`` (0 disables it), ``grid_examples`` (images in the grid).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dalle_jax import metrics as metrics_lib
from dalle_jax import sharding, visualize
from dalle_jax.evals import registry


def _eval_batch(params, images, rng, *, model, loss_opts):
    from dalle_jax.tokenizers import dvae, dvae_objective, image_tokenizer

    _, aux = dvae_objective.dvae_loss(params, images, rng, tau=1.0, beta=1.0, model=model, hard_sample=True,
                            **loss_opts)
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


@registry.register("recon", subject="dvae")
class ReconEvaluator(registry.Evaluator):
    """Reconstruction metrics on the eval split and an inputs-vs-reconstructions PNG grid."""

    def __init__(self, name: str, section: Any, ctx: registry.EvalContext):
        from dalle_jax.train import dvae_task

        super().__init__(name, section, ctx)
        cfg = ctx.cfg
        self.num_batches = int(self.setting("num_batches", 8))
        self.grid_examples = int(self.setting("grid_examples", 16))
        self.enabled = self.num_batches > 0
        self.rules = sharding.get_rules(cfg.sharding_rules)
        self._eval = jax.jit(functools.partial(_eval_batch, model=ctx.model,
                                               loss_opts=dvae_task.loss_options(cfg)))

    def __call__(self, params: Any, step: int) -> dict:
        from dalle_jax.data import sources

        cfg = self.ctx.cfg
        # The mesh is made when evaluating, not when the evaluator is built, so a task can
        # be built for a mesh whose devices are not here (the memory planner does).
        mesh = sharding.make_mesh(cfg.mesh)
        it = sources.make_input(cfg.data, cfg.data.eval_split, train=False, num_epochs=1)
        vocab = self.ctx.model.config.vocab_size
        totals: dict[str, float] = {}
        hist = np.zeros((vocab,), np.float64)
        n = 0
        grid_in = grid_out = None
        try:
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
                    # The first rows of the global batch (process 0's own rows when
                    # several processes share it), inputs and reconstructions alike.
                    k = min(self.grid_examples, host["image"].shape[0])
                    if jax.process_count() > 1:
                        recon = multihost_utils.process_allgather(recon, tiled=True)
                    grid_in = host["image"][:k]
                    grid_out = visualize.to_uint8(np.asarray(recon)[:k])
        finally:
            it.close()
        if n == 0:
            return {}
        result = {k: v / n for k, v in totals.items()}
        result.update(metrics_lib.codebook_stats(hist))
        if jax.process_index() == 0 and grid_in is not None and self.grid_examples > 0:
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
        d = self.ctx.out_dir
        path = visualize.save_grid(os.path.join(d, f"recon_{step:07d}.png"), grid, ncols=cols,
                                   scale=scale)
        visualize.save_grid(os.path.join(d, "recon_latest.png"), grid, ncols=cols, scale=scale)
        metrics_lib.write_images(step, {f"eval/{self.name}": path})  # TensorBoard, if on
        return path
