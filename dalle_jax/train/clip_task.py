"""A contrastive image/caption scorer (CLIP-style) on the generic loop, with hard negatives.

Stage 2 samples several images per caption and keeps those a contrastive model scores
highest (the paper reranks with CLIP). This module trains such a scorer on an image
dataset with captions (the built-in `shapes`), with the towers of `dalle_jax.models.clip`:

* **text**: the caption BPE of stage 2 (`BpeClipTokenizer` around
  `dalle_jax.tokenizers.bpe.TextTokenizer`), laid out as CLIP's text tower reads it.
* **loss**: symmetric InfoNCE with a learned temperature (the logit scale is capped at
  ``contrastive.max_logit_scale``, CLIP's 100). Image → text: the batch's captions *plus*
  ``contrastive.negatives`` hard negatives of the image's own caption
  (`dalle_jax.data.shapes_negatives`: relation reversed, colours or shapes swapped, one
  attribute changed, ...), which in-batch negatives almost never supply. Text → image: the
  batch's images. Captions in the batch that mean the same as the image's own (the same
  scene described again, maybe with another template) are masked out of its candidates
  rather than counted as wrong answers, in both directions.
* **paraphrase term** (``contrastive.paraphrase_weight``, `paraphrase_loss`): each caption
  against another wording of its meaning and its hard negatives. Contrastive training
  alone stalls where neither tower encodes the arrangement of the objects (each tower's
  gradient towards it is proportional to the other's sensitivity, both near zero); this
  term teaches the text tower the arrangement directly, and the image tower follows.
* **position init** (``model.position_init_scale``, `scale_position_init`): the image
  tower's positional embedding can start larger than CLIP's.
* **negatives on the host**: drawn in `Task.device_batch` from a generator seeded by
  ``(seed, batch position, record index)``; the batch position comes from the input
  pipeline's own state (`NumberedBatches`), so the negatives change every epoch and a
  resumed run draws exactly the negatives an uninterrupted one would.
* **evaluation**: the run's ``evals`` sections of the scorer, built by the evaluator
  registry (`dalle_jax.evals.clip_retrieval`: hard-negative accuracy and caption
  retrieval on `shapes` evaluation splits); the same evaluator runs in ``--job=evaluate``
  on any scorer export.
* **export** (`train_clip`): the EMA params with the tower config, the tokenizer's
  identity and file (``tokenizer/bpe.model``) and the final evaluation, which
  `dalle_jax.rerank.scorer.ClipScorer.load` reads back.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dalle_jax import sharding
from dalle_jax.data import shapes, sources
from dalle_jax.data import shapes_negatives as negatives_lib
from dalle_jax.tokenizers import bpe
from dalle_jax.train import loop

PyTree = Any

TOKENIZER_FILE = "bpe.model"
# Seeds the training negatives' generators (with the run seed, batch position and index).
_NEGATIVES_STREAM = 0xC11F


# ----------------------------------------------------------------------------- tokenizer


class BpeClipTokenizer:
    """The caption BPE as the contrastive text tower reads it: ``[BOS, ids..., EOT, pad...]``.

    CLIP's text tower pools the features of its end-of-text slot, so every caption needs
    one, and its position (``eot_index``) travels with the tokens. The BPE model already
    reserves the ids this needs: BOS (``<s>``, 2) starts every row, EOS (``</s>``, 3,
    which the stage-2 layout never emits) is the end-of-text token, and ``<pad>`` (0)
    fills the rest, so the tower's vocabulary is the BPE model's, ``vocab_size`` ids.
    A caption longer than ``context_length - 2`` pieces is cut so that EOT is the last
    slot, and reported as truncated.

    Has the surface of the OpenAI CLIP tokenizer's adapter (``encode_batch``,
    ``vocab_size``, ``identity``), so a scorer uses either one the same way.
    """

    START, END, PAD = bpe.BOS_ID, bpe.EOS_ID, bpe.PAD_ID

    def __init__(self, model_file: str):
        self.bpe = bpe.TextTokenizer(model_file)
        self.path = self.bpe.path
        self._cache: dict[str, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"BpeClipTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    def identity(self) -> dict[str, Any]:
        """The BPE model's identity (its sha256 included), the file name an export keeps
        it under, and this layout."""
        return {"type": "sentencepiece", **self.bpe.identity(), "file": TOKENIZER_FILE,
                "layout": {"start": self.START, "end": self.END, "pad": self.PAD}}

    def _ids(self, text: str | bytes) -> tuple[int, ...]:
        key = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        ids = self._cache.get(key)
        if ids is None:
            ids = tuple(self.bpe.encode(key))
            if len(self._cache) < 1_000_000:
                self._cache[key] = ids
        return ids

    def encode_batch(self, texts: Sequence[str | bytes], context_length: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens int32 (N, context_length), eot_index int32 (N,), truncated bool (N,))``."""
        context_length = int(context_length)
        if context_length < 3:
            raise ValueError(f"context_length={context_length}: the text slots need room for "
                             "BOS, at least one token and EOT")
        n = len(texts)
        tokens = np.full((n, context_length), self.PAD, np.int32)
        eot = np.empty((n,), np.int32)
        truncated = np.zeros((n,), bool)
        room = context_length - 2
        for i, text in enumerate(texts):
            ids = self._ids(text)
            keep = min(len(ids), room)
            tokens[i, 0] = self.START
            tokens[i, 1:1 + keep] = ids[:keep]
            tokens[i, 1 + keep] = self.END
            eot[i] = 1 + keep
            truncated[i] = len(ids) > keep
        return tokens, eot, truncated


# ----------------------------------------------------------------------------- config


def _section(cfg, name: str) -> dict:
    s = cfg.get(name, None)
    return dict(s.to_dict() if hasattr(s, "to_dict") else s or {})


def check_config(cfg) -> None:
    """Raises ValueError naming the config field of every inconsistent setting (before
    anything is built)."""
    m = cfg.model
    problems = []
    image, patch = int(m.image_size), int(m.patch_size)
    if patch < 1 or image % patch:
        problems.append(f"model.patch_size={patch} does not divide model.image_size={image}")
    if int(cfg.data.image_size) != image:
        problems.append(f"data.image_size={cfg.data.image_size} but model.image_size={image}: "
                        "the images are read at the model's resolution")
    for tower in ("vision", "text"):
        width, heads = int(m[f"{tower}_width"]), int(m[f"{tower}_heads"])
        if heads < 1 or width % heads:
            problems.append(f"model.{tower}_heads={heads} does not divide "
                            f"model.{tower}_width={width}")
        if int(m[f"{tower}_layers"]) < 1:
            problems.append(f"model.{tower}_layers must be >= 1")
    if int(m.context_length) < 3:
        problems.append(f"model.context_length={m.context_length}: the text slots need room "
                        "for BOS, a token and EOT")
    c = _section(cfg, "contrastive")
    if int(c.get("negatives", 0)) < 0:
        problems.append(f"contrastive.negatives={c.get('negatives')} must be >= 0")
    if not float(c.get("max_logit_scale", 100.0)) > 0:
        problems.append("contrastive.max_logit_scale must be > 0")
    if float(c.get("paraphrase_weight", 0.0)) < 0:
        problems.append(f"contrastive.paraphrase_weight={c.get('paraphrase_weight')} must "
                        "be >= 0")
    if not float(m.get("position_init_scale", 1.0)) > 0:
        problems.append(f"model.position_init_scale={m.get('position_init_scale')} must be "
                        "> 0")
    from dalle_jax.evals import clip_retrieval

    for name, section in _section(cfg, "evals").items():
        if str(section.get("type", name)) == "clip":
            problems += clip_retrieval.section_problems(section, prefix=f"evals.{name}")
    if str(cfg.data.augment) == "dvae":
        problems.append("data.augment='dvae' flips images left-right, which contradicts "
                        "their captions' left/right relations; use 'none' or 'transformer'")
    if str(cfg.data.source) != "shapes":
        problems.append(f"data.source={cfg.data.source!r}: hard negatives and the retrieval "
                        "evaluation need the captions of the built-in 'shapes' dataset")
    if problems:
        raise ValueError("invalid contrastive config:\n  " + "\n  ".join(problems))


def model_config(cfg, tokenizer: BpeClipTokenizer):
    """The `ClipConfig` of a run config: the ``model`` section, the tokenizer's vocabulary
    and the compute dtype of ``precision``."""
    from dalle_jax.models import clip

    check_config(cfg)
    m = cfg.model
    return clip.ClipConfig(
        embed_dim=int(m.embed_dim), image_size=int(m.image_size), patch_size=int(m.patch_size),
        vision_width=int(m.vision_width), vision_layers=int(m.vision_layers),
        vision_heads=int(m.vision_heads), vocab_size=int(tokenizer.vocab_size),
        context_length=int(m.context_length), text_width=int(m.text_width),
        text_layers=int(m.text_layers), text_heads=int(m.text_heads),
        activation=str(m.get("activation", "gelu")),
        dtype=str(cfg.precision.compute_dtype))


def identity(config, tokenizer: BpeClipTokenizer) -> dict:
    """What makes two scorers interchangeable: the towers (with the float32 params'
    dtype; the compute dtype is a setting of each run) and the tokenizer."""
    model = dataclasses.asdict(dataclasses.replace(config, dtype="float32"))
    return {"kind": "clip", "model": model, "tokenizer": tokenizer.identity()}


def load_tokenizer(cfg) -> BpeClipTokenizer:
    path = str(cfg.text.bpe_model)
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"no caption BPE model at text.bpe_model={path!r}: train one with --job=train_bpe "
            "(or dalle_jax.tokenizers.bpe.train_bpe) and point the config's bpe= at it")
    return BpeClipTokenizer(path)


# ----------------------------------------------------------------------------- params

# Logical axes of every parameter of `dalle_jax.models.clip.CLIP`, by leaf name. The towers
# create plain arrays; the loop shards parameters and decides weight decay from these
# names (`dalle_jax.train.optim.decays`): matrices, projections and the patch convolution
# decay; gains, biases, embeddings, positions and the logit scale do not.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "conv1": ("conv_window", "conv_window", "channels", "conv_out"),
    "class_embedding": ("embed",),
    "positional_embedding": ("length", "embed"),
    "proj": ("embed", "mlp"),
    "text_projection": ("embed", "mlp"),
    "token_embedding": ("vocab", "embed"),
    "scale": ("embed",),  # layer norms
    "bias": ("embed",),
    "attn_qkv_kernel": ("embed", None, "attn"),
    "attn_qkv_bias": (None, "attn"),
    "attn_out_kernel": ("attn", "embed"),
    "attn_out_bias": ("embed",),
    "mlp_c_fc_kernel": ("embed", "mlp"),
    "mlp_c_fc_bias": ("mlp",),
    "mlp_c_proj_kernel": ("mlp", "embed"),
    "mlp_c_proj_bias": ("embed",),
    "logit_scale": (),
}


def boxed_params(params: PyTree) -> PyTree:
    """The towers' parameters with their logical axes (`PARAM_AXES`) attached.

    Raises:
      ValueError: a leaf whose name is not in the table, or whose rank differs from its
        axes (the towers changed; the table must follow).
    """
    import flax.linen as nn

    def box(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        where = sharding.path_str(path)
        if name not in PARAM_AXES:
            raise ValueError(f"contrastive model parameter {where!r} has no logical axes in "
                             "dalle_jax.train.clip_task.PARAM_AXES")
        axes = PARAM_AXES[name]
        if len(axes) != np.ndim(x):
            raise ValueError(f"parameter {where!r} has shape {np.shape(x)}, but PARAM_AXES "
                             f"gives {len(axes)} axes {axes}")
        return nn.LogicallyPartitioned(x, names=axes)

    return jax.tree_util.tree_map_with_path(box, params)


def scale_position_init(params: PyTree, factor: float) -> PyTree:
    """Freshly initialised params with the image tower's positional embedding multiplied
    by ``factor`` (1: the towers' own initialisation).

    The ViT's positional embedding starts small next to the patch embedding of a coloured
    object, and in `shapes` where an object is decides half of what a caption says
    (left of / above, and which object is which); a larger start lets the image tower use
    positions sooner.
    """
    if factor == 1.0:
        return params
    visual = dict(params["visual"])
    visual["positional_embedding"] = visual["positional_embedding"] * factor
    return dict(params, visual=visual)


# ----------------------------------------------------------------------------- meanings

_ALL_MEANINGS = shapes.all_meanings()["in_distribution"] + shapes.all_meanings()["held_out"]
_MEANING_ID = {m: i for i, m in enumerate(_ALL_MEANINGS)}


@functools.lru_cache(maxsize=65536)
def meaning_id(caption: str) -> int:
    """An integer per caption meaning: the same for every wording of one `shapes` scene
    description (a caption that does not parse gets a hash of its normalised text)."""
    m = shapes.parse_caption(caption)
    if m is not None:
        return _MEANING_ID[m]
    return len(_ALL_MEANINGS) + zlib.crc32(bpe.normalize(caption).encode()) % (2**30)


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


# ----------------------------------------------------------------------------- input


class NumberedBatches:
    """Wraps a training pipeline so that every host batch carries its position in the
    batch sequence (``batch_position``, one value per row).

    Positions come from the pipeline's own checkpoint state (the number of batches it
    has returned), so they continue correctly after a resume; `make_task`'s
    `device_batch` seeds each example's hard negatives with them.
    """

    def __init__(self, pipeline):
        self._it = pipeline

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        position = int(self._it.get_state()["next_batch"])
        batch = dict(next(self._it))
        batch["batch_position"] = np.full((len(batch["image"]),), position, np.int64)
        return batch

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state) -> None:
        self._it.set_state(state)

    def close(self) -> None:
        self._it.close()


def make_train_iter(cfg) -> NumberedBatches:
    return NumberedBatches(sources.make_input(cfg.data, cfg.data.train_split, train=True))


# ----------------------------------------------------------------------------- loss


def contrastive_loss(img, pos, neg, logit_scale, meaning, *, max_logit_scale: float = 100.0):
    """Symmetric InfoNCE over a batch with hard negatives; returns ``(loss, metrics)``.

    Args:
      img: ``(B, E)`` image embeddings; pos: ``(B, E)`` their captions' embeddings;
        neg: ``(B, K, E)`` each image's hard negative captions (K may be 0). All
        L2-normalised.
      logit_scale: the learned log of the inverse temperature (capped at
        ``log(max_logit_scale)``).
      meaning: ``(B,)`` int meaning ids: a batch caption with the same id as image i's
        own is left out of image i's candidates (and image i out of that caption's).
    """
    img, pos, neg = (x.astype(jnp.float32) for x in (img, pos, neg))
    log_scale = jnp.minimum(jnp.asarray(logit_scale, jnp.float32), np.log(max_logit_scale))
    scale = jnp.exp(log_scale)
    b = img.shape[0]
    eye = jnp.eye(b, dtype=bool)
    same = (meaning[:, None] == meaning[None, :]) & ~eye
    big_neg = jnp.float32(-1e9)
    sim = jnp.where(same, big_neg, scale * (img @ pos.T))  # [image i, caption j]
    hard = scale * jnp.einsum("be,bke->bk", img, neg)
    i2t = jnp.concatenate([sim, hard], axis=1)
    t2i = sim.T
    labels = jnp.arange(b)

    def xent(logits):
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[labels, labels])

    loss_i2t, loss_t2i = xent(i2t), xent(t2i)
    diag = jnp.diagonal(sim)
    metrics = {
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "i2t_accuracy": jnp.mean(jnp.argmax(i2t, axis=1) == labels),
        "t2i_accuracy": jnp.mean(jnp.argmax(t2i, axis=1) == labels),
        "logit_scale": scale,
        "temperature": 1.0 / scale,
    }
    if neg.shape[1]:
        metrics["hard_negative_accuracy"] = jnp.mean(diag > jnp.max(hard, axis=1))
    return 0.5 * (loss_i2t + loss_t2i), metrics


def paraphrase_loss(anchor, para, neg, logit_scale, meaning, *, max_logit_scale: float = 100.0):
    """InfoNCE between captions: each caption against the batch's paraphrases (another
    wording of the same meaning) and its own hard negatives; returns ``(loss, metrics)``.

    The text tower gets a direct signal to tell the arrangements apart (a caption must be
    nearer its paraphrase, possibly with the objects named in the other order, than its
    negative with the objects swapped), without first waiting for the image tower to
    separate them. Shapes as `contrastive_loss` (``para`` like ``pos``); the same logit
    scale.
    """
    anchor, para, neg = (x.astype(jnp.float32) for x in (anchor, para, neg))
    scale = jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), np.log(max_logit_scale)))
    b = anchor.shape[0]
    same = (meaning[:, None] == meaning[None, :]) & ~jnp.eye(b, dtype=bool)
    sim = jnp.where(same, jnp.float32(-1e9), scale * (anchor @ para.T))
    hard = scale * jnp.einsum("be,bke->bk", anchor, neg)
    logits = jnp.concatenate([sim, hard], axis=1)
    labels = jnp.arange(b)
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[labels, labels])
    metrics = {"text_loss": loss,
               "text_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels)}
    if neg.shape[1]:
        metrics["text_hard_negative_accuracy"] = jnp.mean(
            jnp.diagonal(sim) > jnp.max(hard, axis=1))
    return loss, metrics


def make_task(cfg, workdir: str, tokenizer: BpeClipTokenizer | None = None) -> loop.Task:
    """The contrastive stage for `loop.train` (its input: `make_train_iter`).

    The returned task also carries ``clip_config`` (the towers' `ClipConfig`) and
    ``tokenizer`` (the `BpeClipTokenizer`), which the export needs.
    """
    check_config(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg)
    from dalle_jax.models import clip

    config = model_config(cfg, tokenizer)
    model = clip.CLIP(config)
    c = _section(cfg, "contrastive")
    k = int(c.get("negatives", 0))
    max_scale = float(c.get("max_logit_scale", 100.0))
    length = config.context_length
    seed = int(cfg.seed)
    split = str(cfg.data.train_split)
    first = negatives_lib.STRUCTURAL_KINDS if c.get("structural_first", False) else ()
    position_scale = float(cfg.model.get("position_init_scale", 1.0))
    para_weight = float(c.get("paraphrase_weight", 0.0))
    extra = 1 if para_weight > 0 else 0  # a paraphrase after each caption

    def loss_fn(params, batch, rng, step):
        del rng, step
        tokens, eot = batch["tokens"], batch["eot"]
        b = tokens.shape[0]
        img, txt, logit_scale = model.apply(
            {"params": params}, batch["pixels"], tokens.reshape(-1, length), eot.reshape(-1))
        img = clip.normalize(img)
        txt = clip.normalize(txt).reshape(b, 1 + extra + k, -1)
        negs = txt[:, 1 + extra:]
        loss, metrics = contrastive_loss(img, txt[:, 0], negs, logit_scale, batch["meaning"],
                                         max_logit_scale=max_scale)
        if extra:
            text_loss, text_metrics = paraphrase_loss(
                txt[:, 0], txt[:, 1], negs, logit_scale, batch["meaning"],
                max_logit_scale=max_scale)
            metrics = dict(metrics, contrastive_loss=loss, **text_metrics)
            loss = loss + para_weight * text_loss
        return loss, metrics

    def device_batch(host: dict) -> dict:
        captions = [_text(c) for c in host["caption"]]
        index = np.asarray(host["index"]).reshape(-1)
        position = np.asarray(host.get("batch_position", np.full(len(captions), -1)))
        texts = []
        for r, caption in enumerate(captions):
            texts.append(caption)
            if k or extra:
                rng = np.random.default_rng(
                    [_NEGATIVES_STREAM, seed, int(position[r]) + 1, int(index[r])])
            if extra:
                texts.append(negatives_lib.paraphrase(caption, rng))
            if k:
                texts += negatives_lib.sample_negatives(caption, k, rng, split=split,
                                                        first=first)
        tokens, eot, _ = tokenizer.encode_batch(texts, length)
        b, n = len(captions), 1 + extra + k
        return {
            "pixels": np.asarray(clip.preprocess(np.asarray(host["image"]), config), np.float32),
            "tokens": tokens.reshape(b, n, length),
            "eot": eot.reshape(b, n),
            "meaning": np.asarray([meaning_id(t) for t in captions], np.int32),
        }

    from dalle_jax.evals import registry

    # The ``evals`` sections of the scorer (`dalle_jax.evals.clip_retrieval`).
    evaluators = registry.build(cfg, registry.EvalContext(
        cfg, registry.output_dir(workdir), "scorer", model=model, text_tokenizer=tokenizer))
    task = loop.Task(
        name="clip",
        identity=identity(config, tokenizer),
        init_variables=lambda rng: {"params": boxed_params(
            scale_position_init(clip.init_params(config, rng), position_scale))},
        loss_fn=loss_fn,
        device_batch=device_batch,
        evaluate=evaluators if len(evaluators) else None,
        tokens_per_example=0,
    )
    task.clip_config = config  # for the export
    task.tokenizer = tokenizer
    return task


# ----------------------------------------------------------------------------- the job


def export_scorer(export_dir: str, task: loop.Task, params: PyTree, *, step: int, ema: bool,
                  retrieval: dict | None) -> str:
    """Writes a self-contained scorer export: params, ``meta.json`` (identity with the
    tower config and tokenizer, step, EMA, final evaluation) and ``tokenizer/bpe.model``."""
    from dalle_jax import exports

    meta = {"identity": task.identity, "task": task.name, "source": "trained", "step": int(step),
            "ema": bool(ema), "retrieval": dict(retrieval or {})}
    exports.write_scorer(export_dir, params, meta, task.tokenizer.path, TOKENIZER_FILE)
    return export_dir


def final_evaluation(suite, params: PyTree, step: int) -> dict | None:
    """The metrics at ``step`` of the scorer's evaluators (those that keep their ``last``
    result), with ``step``: the training loop's final evaluation when it was of these
    params at this step, else run now. None without such evaluators."""
    if suite is None:
        return None
    final: dict = {}
    for s in suite.scheduled:
        if not hasattr(s.evaluator, "last"):
            continue
        last = s.evaluator.last
        if last is None or last.get("step") != step:
            suite.run_one(s, params, step)
            last = s.evaluator.last
        final.update(last)
    return final or None


def format_retrieval(metrics: dict) -> str:
    keys = sorted(k for k in metrics if k.endswith(("/retrieval_top1", "/retrieval_top1_pairs",
                                                     "/hard_negative_accuracy")))
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys)


def train_clip(cfg, workdir: str) -> None:
    """Trains the contrastive scorer, then exports its (EMA) params with the tower config,
    the tokenizer file and the final evaluation to ``workdir/exports/step_N``.

    The BPE model is ``cfg.text.bpe_model``. A run already exported at ``total_steps`` is
    skipped; a stopped run resumes from its last checkpoint (same negatives, same batches).
    """
    from dalle_jax.jobs import _train_then_export

    check_config(cfg)
    task = None

    def run_training():
        nonlocal task
        task = make_task(cfg, workdir)
        return loop.train(cfg, workdir, task, lambda: make_train_iter(cfg))

    def export(export_dir, params, step, ema):
        final = final_evaluation(task.evaluate, params, step)
        export_scorer(export_dir, task, params, step=step, ema=ema, retrieval=final)
        if final:
            logging.info("final evaluation: %s", format_retrieval(final))
            print(f"contrastive scorer, step {step}: {format_retrieval(final)}")

    _train_then_export(cfg, workdir, "contrastive scorer", run_training, export)
