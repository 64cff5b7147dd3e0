"""Stage-2 validation loss (``type="val_loss"``, subject: the transformer).

The training loss and accuracies (text and image, weighted as in training) over the
first ``num_batches`` batches of ``data.eval_split``, without BPE-dropout or caption
dropout and in file order, so successive evaluations see the same batches.

Settings: ``num_batches`` (0 disables it).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from dalle_jax import sharding
from dalle_jax.evals import registry


def _eval_batch(params, batch, *, model, weight):
    from dalle_jax.models import transformer

    logits_text, logits_image = model.apply({"params": params}, batch["text_tokens"],
                                            batch["image_tokens"], deterministic=True)
    _, metrics = transformer.loss_fn(logits_text, logits_image, batch["text_tokens"],
                                     batch["image_tokens"], text_weight=weight)
    return metrics


@registry.register("val_loss", subject="transformer")
class ValLossEvaluator(registry.Evaluator):
    """Validation loss and accuracies over the first ``num_batches`` batches."""

    def __init__(self, name: str, section: Any, ctx: registry.EvalContext):
        super().__init__(name, section, ctx)
        if ctx.model is None or ctx.text_tokenizer is None:
            raise ValueError(f"evals.{name} (val_loss) needs the transformer and its text "
                             "tokenizer")
        self.num_batches = int(self.setting("num_batches", 8))
        self.enabled = self.num_batches > 0
        cfg = ctx.cfg
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.rules = sharding.get_rules(cfg.sharding_rules)
        self._eval = jax.jit(functools.partial(
            _eval_batch, model=ctx.model, weight=float(ctx.model.config.loss_text_weight)))

    def __call__(self, params: Any, step: int) -> dict:
        from dalle_jax.data import text_pipeline

        del step
        cfg = self.ctx.cfg
        it = text_pipeline.make_input(cfg.data, cfg.text, self.ctx.text_tokenizer,
                                      cfg.data.eval_split, train=False)
        totals: dict[str, float] = {}
        n = 0
        try:
            for i, host in enumerate(it):
                if i >= self.num_batches:
                    break
                spec = sharding.batch_spec(self.mesh, self.rules, 2)
                sh = jax.sharding.NamedSharding(self.mesh, spec)
                batch = {k: jax.make_array_from_process_local_data(sh, np.asarray(host[k]))
                         for k in ("text_tokens", "image_tokens")}
                for k, v in jax.device_get(self._eval(params, batch)).items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                n += 1
        finally:
            it.close()
        return {k: v / n for k, v in totals.items()} if n else {}
