"""Stage 2 on the generic loop: the text + image transformer over pre-encoded tokens.

The loss is paper §2.2's weighted cross-entropy, 1/8 on the text and 7/8 on the image
tokens by default (``model.loss_text_weight``); captions get BPE-dropout 0.1 in training
(App. B.2). With ``text.caption_dropout = p > 0`` (not in the paper) each training
caption is replaced, with probability p, by the empty caption's slots ``[BOS, pad_1, ...]``,
so the same model also learns images without a caption, which classifier-free guided
sampling contrasts with the captioned ones (`dalle_jax.sample.sampler`). Evaluation is
the ``config.evals`` sections run by the loop (`dalle_jax.evals.registry`: validation
loss, caption match).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.data.tokens import read_meta
from dalle_jax.models import transformer
from dalle_jax.train import loop, optim

# Fields that only choose how the model is computed, not what it is: a checkpoint may be
# resumed with another value (the parameters are the same either way).
_EXECUTION_FIELDS = ("dtype", "attention", "remat", "scan_layers")


def model_config(cfg, tokenizer, token_meta: dict) -> transformer.TransformerConfig:
    """The TransformerConfig of a run: sizes from the tokenizer and the token meta.

    ``text_vocab`` is the BPE vocabulary plus one pad per text slot, ``image_vocab`` and
    ``grid`` are the dVAE's (from ``meta.json`` of the token directory).
    """
    text_len = int(cfg.text.text_len)
    fields = dict(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else cfg.model)
    for derived in ("text_vocab", "image_vocab", "text_len", "grid"):
        if derived in fields:
            raise ValueError(f"model.{derived} is derived from the tokenizer/token data; "
                             "remove it from the config")
    return transformer.TransformerConfig(
        text_vocab=tokenizer.text_vocab_size(text_len),
        image_vocab=int(token_meta["dvae"]["identity"]["vocab_size"]),
        text_len=text_len,
        grid=int(token_meta["dvae"]["grid"]),
        dtype=str(cfg.precision.compute_dtype),
        **fields,
    )


def identity(mcfg: transformer.TransformerConfig, tokenizer, token_meta: dict) -> dict:
    """What a checkpoint of this stage must match: model, text tokenizer and dVAE."""
    model = {k: v for k, v in dataclasses.asdict(mcfg).items() if k not in _EXECUTION_FIELDS}
    return {"kind": "transformer", "model": model, "tokenizer": tokenizer.identity(),
            "dvae": token_meta["dvae"]["identity"]}


def make_task(cfg, workdir: str, tokenizer) -> loop.Task:
    """The stage-2 `loop.Task` reading ``cfg.data.tokens_dir`` with ``tokenizer``."""
    meta = read_meta(str(cfg.data.tokens_dir))
    mcfg = model_config(cfg, tokenizer, meta)
    model = transformer.Transformer(mcfg)
    from dalle_jax.evals import registry

    evaluators = registry.build(cfg, registry.EvalContext(
        cfg, registry.output_dir(workdir), "transformer", model=model, text_tokenizer=tokenizer))
    drop = float(cfg.text.get("caption_dropout", 0.0))
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"text.caption_dropout must be in [0, 1), got {drop}")
    null_text = tokenizer.encode_slots("", text_len=mcfg.text_len)[0]
    return model_task(mcfg, identity(mcfg, tokenizer, meta),
                      evaluators if len(evaluators) else None, caption_dropout=drop,
                      null_text=null_text)


def resblock_layout(mcfg: transformer.TransformerConfig) -> optim.ResblockLayout:
    """Per-resblock gradient scaling's view of the transformer: one row per layer, one
    column per resblock (attention, MLP), each ``layers/<name>`` leaf in its resblock."""
    column = {name: i for i, block in enumerate(transformer.RESBLOCKS)
              for name in transformer.RESBLOCK_PARAMS[block]}

    def block_of(path: str) -> int | None:
        head, _, name = path.partition("/")
        return column[name] if head == "layers" else None

    return optim.ResblockLayout(rows=mcfg.depth, names=transformer.RESBLOCKS,
                                block_of=block_of)


def model_task(mcfg: transformer.TransformerConfig, ident: dict,
               evaluate: Any = None, *, caption_dropout: float = 0.0,
               null_text: np.ndarray | None = None) -> loop.Task:
    """The `loop.Task` of a transformer config: init, the paper's weighted loss with dropout
    keyed by the step's rng, batches of ``text_tokens`` and ``image_tokens``; float16 runs
    get per-resblock gradient scaling through ``grad_scales``.

    ``caption_dropout`` replaces each example's text, with that probability, by
    ``null_text`` (the empty caption's slots), drawn from the step's rng.
    """
    model = transformer.Transformer(mcfg)
    weight = float(mcfg.loss_text_weight)
    if caption_dropout > 0:
        if null_text is None or np.shape(null_text) != (mcfg.text_len,):
            raise ValueError(f"caption dropout needs the empty caption's {mcfg.text_len} "
                             "text slots (null_text)")
        null_T = jnp.asarray(null_text, jnp.int32)

    def loss_fn(params, batch, rng, step, grad_scales=None):
        del step
        text_BT = batch["text_tokens"]
        if caption_dropout > 0:
            # Its own stream (the model's dropout keeps ``rng``), one draw per example.
            drop_B = jax.random.bernoulli(jax.random.fold_in(rng, 1), caption_dropout,
                                          (text_BT.shape[0],))
            text_BT = jnp.where(drop_B[:, None], null_T[None, :].astype(text_BT.dtype), text_BT)
        logits_text, logits_image = model.apply(
            {"params": params}, text_BT, batch["image_tokens"],
            deterministic=False, rngs={"dropout": rng}, grad_scales=grad_scales)
        loss, metrics = transformer.loss_fn(logits_text, logits_image, text_BT,
                                            batch["image_tokens"], text_weight=weight)
        metrics.pop("loss")  # the loop records the loss itself
        return loss, metrics

    return loop.Task(
        name="transformer",
        identity=ident,
        init_variables=lambda rng: transformer.init_variables(mcfg, rng),
        loss_fn=loss_fn,
        device_batch=lambda b: {"text_tokens": b["text_tokens"], "image_tokens": b["image_tokens"]},
        evaluate=evaluate,
        tokens_per_example=mcfg.seq_len,
        resblocks=resblock_layout(mcfg),
    )
