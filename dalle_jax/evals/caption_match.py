"""Caption match on `shapes`: how often do sampled images show what their caption says?

Each image is judged by the `shapes` checker (`dalle_jax.evals.shapes_match`), which reads
colours, shapes and their relation off the pixels. Reported per split (``validation``:
in-distribution objects; ``test_compositional``: objects never seen in training):

* ``best_of_1``: one sample per caption, as drawn;
* ``reranked``: the best of N samples per caption by a *learned* scorer (a contrastive
  model, never the checker itself, which would grade its own choice); the candidates are
  drawn unguided, or with classifier-free guidance at ``rerank_guidance`` (recorded as
  the entry's ``guidance``);
* ``guided``: one classifier-free guided sample per caption;
* ``dvae_reconstruction``: the dVAE's reconstructions of the real images (their tokens,
  decoded), the ceiling the dVAE sets for any sampler.

The same measurement runs as the ``caption_match`` evaluator (`CaptionMatchEvaluator`,
during training or by ``--job=evaluate``) and in the ``sample`` job's report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from dalle_jax import configlib, exports
from dalle_jax.evals import registry, shapes_match

SUMMARY_KEYS = ("count", "matched", "fraction")


def _summary(images: np.ndarray, captions: Sequence[str]) -> dict[str, Any]:
    return shapes_match.score(images, captions)


def evaluate_split(sampler, examples: Sequence[dict], *, seed: int, batch_size: int,
                   grid: int, scorer=None, rerank_n: int = 0, rerank_chunk: int = 64,
                   guided_sampler=None, rerank_sampler=None,
                   progress: Callable[[int], None] | None = None
                   ) -> tuple[dict[str, Any], np.ndarray]:
    """Caption match of ``examples`` (token-source rows with ``caption`` and
    ``image_tokens``) under each way of sampling that is configured.

    Args:
        sampler: the unguided `Sampler` (with its dVAE).
        examples: the split's first examples.
        seed: the sampling seed.
        batch_size: sequences per sampling call.
        grid: the token grid side of ``image_tokens``.
        scorer: a learned `Scorer` for ``reranked`` (None: not reported).
        rerank_n: candidates per caption for ``reranked`` (0: not reported).
        rerank_chunk: candidates per caption drawn and scored at a time.
        guided_sampler: a `Sampler` with guidance for ``guided`` (None: not reported).
        rerank_sampler: the `Sampler` that draws the ``reranked`` candidates (None:
            ``sampler``, unguided).
        progress: called with the number of sequences drawn after each sampling call.

    Returns:
        ``(summary, best_of_1_images)``: the summary dict described in the module doc,
        and the best-of-1 images ``(N, H, W, 3)`` (for a grid).
    """
    from dalle_jax.rerank import best_of as best_of_lib

    if scorer is not None and getattr(scorer, "name", "") == "shapes_checker":
        raise ValueError("the caption checker grades the samples; reranking for a reported "
                         "result needs a learned scorer")
    caps = [str(ex["caption"]) for ex in examples]
    out: dict[str, Any] = {}
    toks = sampler.tokens(caps, num_candidates=1, seed=seed, batch_size=batch_size,
                          progress=progress)
    images = sampler.images(toks, batch_size=batch_size)[:, 0]
    out["best_of_1"] = _summary(images, caps)
    if scorer is not None and rerank_n > 0:
        candidates = rerank_sampler if rerank_sampler is not None else sampler
        kept = best_of_lib.best_of(candidates, scorer, caps, num_candidates=rerank_n, keep=1,
                                   seed=seed, chunk=rerank_chunk, batch_size=batch_size,
                                   progress=progress)
        out["reranked"] = dict(_summary(kept.images[:, 0], caps), n=rerank_n,
                               scorer=scorer.identity(),
                               guidance=float(candidates.sampling.guidance))
        out["reranked"]["mean_score"] = float(kept.scores.mean())
    if guided_sampler is not None:
        gtoks = guided_sampler.tokens(caps, num_candidates=1, seed=seed, batch_size=batch_size,
                                      progress=progress)
        gimages = guided_sampler.images(gtoks, batch_size=batch_size)[:, 0]
        out["guided"] = dict(_summary(gimages, caps),
                             scale=guided_sampler.sampling.guidance)
    real = np.stack([np.asarray(ex["image_tokens"]) for ex in examples])
    recon = _summary(sampler.images(real.reshape((len(examples), grid, grid)),
                                    batch_size=batch_size), caps)
    out["dvae_reconstruction"] = {k: recon[k] for k in SUMMARY_KEYS}
    return out, images


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    """``{"best_of_1": fraction, "reranked": ..., "guided": ..., "dvae_reconstruction": ...}``
    of one split's summary (the entries that were measured)."""
    return {k: v.get("fraction") for k, v in summary.items() if isinstance(v, dict)
            and "fraction" in v}


def split_names(value: Any) -> list[str]:
    """``"validation, test_compositional"`` → ``["validation", "test_compositional"]``."""
    names = configlib.comma_list(value)
    if not names:
        raise ValueError("caption match needs at least one split (e.g. 'validation')")
    return names


def check_shapes_tokens(tokens_dir: str) -> None:
    """Raises unless ``tokens_dir`` holds image tokens of the built-in `shapes` dataset,
    the only one whose captions the checker can read."""
    from dalle_jax.data.tokens import read_meta

    source = read_meta(str(tokens_dir)).get("source", {}).get("source")
    if source != "shapes":
        raise ValueError(f"caption match needs the built-in 'shapes' dataset; the tokens in "
                         f"{tokens_dir!r} come from {source!r}")


def run_splits(sampler, tokens_dir: str, splits: Sequence[str], *, captions: int, seed: int,
               batch_size: int, scorer=None, rerank_n: int = 0, rerank_chunk: int = 64,
               guidance: float = 1.0, rerank_guidance: float = 1.0,
               progress_bar: Callable | None = None
               ) -> dict[str, tuple[dict[str, Any], np.ndarray, list[str]]]:
    """Caption match of the first ``captions`` examples of each split (`evaluate_split`).

    ``guidance`` != 1 adds the ``guided`` entry; ``rerank_guidance`` != 1 draws the
    ``reranked`` candidates with that guidance scale; ``progress_bar(total, desc)`` returns
    ``(update, close)`` for a progress display (None: none).

    Returns ``{split: (summary, best-of-1 images, captions)}``.
    """
    import dataclasses
    import time

    from dalle_jax.data.tokens import TokenSource

    def with_guidance(scale: float):
        if scale == 1.0:
            return None
        return sampler.with_sampling(dataclasses.replace(sampler.sampling, guidance=scale))

    guided = with_guidance(float(guidance))
    rerank_sampler = (guided if float(rerank_guidance) == float(guidance)
                      else with_guidance(float(rerank_guidance)))
    out = {}
    for split in splits:
        source = TokenSource(str(tokens_dir), split)
        examples = [source[i] for i in range(min(int(captions), len(source)))]
        per = 1 + (rerank_n if scorer is not None else 0) + (1 if guided else 0)
        update, close = (progress_bar(len(examples) * per, f"caption match ({split})")
                         if progress_bar is not None else (None, lambda: None))
        t0 = time.time()
        try:
            summary, images = evaluate_split(
                sampler, examples, seed=seed, batch_size=batch_size, grid=source.grid,
                scorer=scorer, rerank_n=rerank_n, rerank_chunk=rerank_chunk,
                guided_sampler=guided, rerank_sampler=rerank_sampler, progress=update)
        finally:
            close()
        summary["seconds"] = round(time.time() - t0, 2)
        out[split] = (summary, images, [str(ex["caption"]) for ex in examples])
    return out


def dvae_export_for(cfg) -> str:
    """The dVAE export that decodes a stage-2 run's image tokens: ``sample.dvae_params``, or
    the newest export of the dVAE run whose ``tokens`` directory the model read."""
    import os

    explicit = str(cfg.sample.get("dvae_params", "")) if "sample" in cfg else ""
    if explicit:
        return exports.resolve_export(explicit, "the dVAE")
    return exports.resolve_export(os.path.dirname(os.path.abspath(str(cfg.data.tokens_dir))),
                          "the dVAE next to the token directory")


def load_image_tokenizer(ctx) -> None:
    """Loads the dVAE that decodes the run's image tokens into ``ctx.image_tokenizer``,
    unless the context has it (or a sampler that carries it) already."""
    from dalle_jax.tokenizers import image_tokenizer

    if ctx.image_tokenizer is None and ctx.sampler is None:
        ctx.image_tokenizer = image_tokenizer.ImageTokenizer.load(dvae_export_for(ctx.cfg))


def sampler_for(ctx, params, sampling) -> Any:
    """A `Sampler` over ``params`` of the context's transformer (the context's own sampler
    when it holds these very parameters)."""
    from dalle_jax.sample import sampler as sampler_lib

    s = ctx.sampler
    if s is not None and params is s.params:
        return s if s.sampling == sampling else s.with_sampling(sampling)
    if s is not None:
        return s.with_params(params).with_sampling(sampling)
    if ctx.model is None or ctx.text_tokenizer is None:
        raise ValueError("sampling needs the transformer and its text tokenizer")
    load_image_tokenizer(ctx)
    from dalle_jax import sharding

    ctx.sampler = sampler_lib.Sampler(
        ctx.model.config, params, ctx.text_tokenizer, ctx.image_tokenizer, sampling,
        mesh=sharding.make_mesh(ctx.cfg.mesh), rules=ctx.cfg.sharding_rules)
    return ctx.sampler


def sampling_of(cfg, section) -> Any:
    """The unguided `SamplingConfig` of an evaluator section, defaulting to ``cfg.sample``."""
    from dalle_jax.sample import sampler as sampler_lib

    base = cfg.sample if "sample" in cfg else {}

    def get(key, default):
        v = section.get(key, None) if hasattr(section, "get") else None
        return base.get(key, default) if v is None else v

    return sampler_lib.SamplingConfig(temperature=float(get("temperature", 1.0)),
                                      top_k=int(get("top_k", 0)), top_p=float(get("top_p", 1.0)))


@registry.register("caption_match", subject="transformer")
class CaptionMatchEvaluator(registry.Evaluator):
    """Samples for the captions of `shapes` splits and checks them (see the module doc).

    Settings: ``captions`` per split (200), ``splits`` ("validation,test_compositional"),
    ``seed`` (0), ``batch_size`` (64), ``temperature`` / ``top_k`` / ``top_p`` (those of
    ``cfg.sample`` when absent), ``rerank`` (candidates per caption reranked by the learned
    scorer at ``scorer``; 0: not measured), ``rerank_chunk``, ``scorer`` (a scorer export
    or ``train_clip`` run directory), ``guidance`` (scale of the ``guided`` entry; 1: not
    measured), ``rerank_guidance`` (guidance scale of the reranked candidates; 1:
    unguided), ``grid_examples`` (best-of-1 images in each split's PNG).

    Metrics: ``caption_match/<split>/<entry>`` = the matched fraction of each entry.
    Writes ``caption_match_<step>.json`` (the full summaries) and
    ``caption_match_<split>_<step>.png`` to the context's output directory. The
    best-of-1 images are kept in the context's cache for other evaluators of the same
    call (``shapes_fid``).
    """

    traced_under_rules = False  # the Sampler applies the rules itself

    def __init__(self, name: str, section: Any, ctx: registry.EvalContext):
        super().__init__(name, section, ctx)
        cfg = ctx.cfg
        self.captions = int(self.setting("captions", 200))
        self.enabled = self.captions > 0
        self.splits = split_names(self.setting("splits", "validation,test_compositional"))
        self.seed = int(self.setting("seed", 0))
        self.batch_size = int(self.setting("batch_size", 64))
        self.rerank_n = int(self.setting("rerank", 0))
        self.rerank_chunk = int(self.setting("rerank_chunk", 64))
        self.guidance = float(self.setting("guidance", 1.0))
        self.rerank_guidance = float(self.setting("rerank_guidance", 1.0))
        self.grid_examples = int(self.setting("grid_examples", 32))
        if (self.rerank_n < 0 or self.batch_size < 1 or self.guidance < 0
                or self.rerank_guidance < 0):
            raise ValueError(f"evals.{name}: rerank must be >= 0, batch_size >= 1, guidance "
                             f"and rerank_guidance >= 0; got {self.rerank_n}, "
                             f"{self.batch_size}, {self.guidance}, {self.rerank_guidance}")
        self.sampling = sampling_of(cfg, section)
        self.scorer_path = str(self.setting("scorer", ""))
        if self.rerank_n and not self.scorer_path:
            logging.info("evals.%s.rerank=%d but evals.%s.scorer is empty: the reranked caption "
                         "match is not measured", name, self.rerank_n, name)
            self.rerank_n = 0
        self._scorer = None

    def prepare(self) -> None:
        load_image_tokenizer(self.ctx)
        if self.rerank_n:
            self.scorer()

    def scorer(self):
        if self._scorer is None and self.scorer_path:
            from dalle_jax.rerank import scorer as scorer_lib

            self._scorer = scorer_lib.load_scorer(
                exports.resolve_export(self.scorer_path, "the scorer"), batch_size=self.batch_size)
        return self._scorer

    def run(self, params: Any, progress_bar: Callable | None = None) -> dict[str, tuple]:
        """``{split: (summary, best-of-1 images, captions)}`` of ``params``."""
        check_shapes_tokens(str(self.ctx.cfg.data.tokens_dir))
        sampler = sampler_for(self.ctx, params, self.sampling)
        out = run_splits(sampler, str(self.ctx.cfg.data.tokens_dir), self.splits,
                         captions=self.captions, seed=self.seed, batch_size=self.batch_size,
                         scorer=self.scorer() if self.rerank_n else None,
                         rerank_n=self.rerank_n, rerank_chunk=self.rerank_chunk,
                         guidance=self.guidance, rerank_guidance=self.rerank_guidance,
                         progress_bar=progress_bar)
        for split, (_, images, caps) in out.items():
            self.ctx.cache[("best_of_1", split, self.seed, self.sampling)] = (images, caps)
        return out

    def __call__(self, params: Any, step: int) -> dict:
        import json
        import os

        import jax

        from dalle_jax import metrics as metrics_lib
        from dalle_jax import visualize

        out = self.run(params, self.ctx.progress_bar)
        metrics = {}
        report = {}
        for split, (summary, images, caps) in out.items():
            for entry, fraction in headline(summary).items():
                metrics[f"caption_match/{split}/{entry}"] = fraction
            if jax.process_index() == 0 and self.grid_examples > 0:
                k = self.grid_examples
                summary["grid"] = visualize.save_grid(
                    os.path.join(self.ctx.out_dir, f"caption_match_{split}_{step:07d}.png"),
                    images[:k], caps[:k], ncols=8, scale=2, caption_lines=2)
                metrics_lib.write_images(step, {f"eval/{self.name}/{split}": summary["grid"]})
            report[split] = summary
        if jax.process_index() == 0:
            os.makedirs(self.ctx.out_dir, exist_ok=True)
            path = os.path.join(self.ctx.out_dir, f"caption_match_{step:07d}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(report, f, indent=2, sort_keys=True, default=str)
            os.replace(path + ".tmp", path)
        return metrics
