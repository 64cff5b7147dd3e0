"""FID between generated and real `shapes` images (``type="shapes_fid"``, subject: the
transformer).

Generated images are one sample per caption (best of 1, unguided) for the first
``num_images`` captions of ``split``; real images are those examples themselves,
rendered by the dataset at the model's image size. Also reported: the FID of the dVAE's
reconstructions of the same real images (their tokens, decoded), the floor that the dVAE
sets for any sampler.

Which features:

* ``inception``: the FID Inception-v3 (`dalle_jax.evals.inception`), with the weights
  file at ``inception_weights`` or ``$DALLE_JAX_INCEPTION_WEIGHTS``. These are the
  numbers comparable with published FIDs (as far as 64-pixel synthetic images allow).
* ``scorer``: the unit-norm image embeddings of the contrastive scorer trained here
  (``scorer``: an export or ``train_clip`` run). Not Inception, and not comparable with
  any published FID: the metric names say ``scorer_features``.
* ``auto`` (default): Inception when its weights file is found, else the scorer, with
  a warning that names the missing file and where it was looked for.

Metrics: ``shapes_fid/<split>/<features>`` and
``shapes_fid/<split>/dvae_reconstruction/<features>``, with ``<features>`` ``inception``
or ``scorer_features``. When an earlier evaluator of the same call (``caption_match``)
drew the best-of-1 images of these captions with the same seed and sampling, they are
reused instead of drawn again.

Settings: ``split`` ("validation"), ``num_images`` (500; 0 disables it), ``seed`` (0),
``batch_size`` (64), ``features``, ``inception_weights``, ``scorer``, and the sampling
keys of ``caption_match`` (``temperature``, ``top_k``, ``top_p``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import logging

from dalle_jax import exports
from dalle_jax.evals import caption_match, fid, registry

FEATURES = ("auto", "inception", "scorer")


@registry.register("shapes_fid", subject="transformer")
class ShapesFidEvaluator(registry.Evaluator):
    """See the module doc."""

    traced_under_rules = False  # the Sampler applies the rules itself

    def __init__(self, name: str, section: Any, ctx: registry.EvalContext):
        super().__init__(name, section, ctx)
        self.split = str(self.setting("split", "validation"))
        self.num_images = int(self.setting("num_images", 500))
        self.enabled = self.num_images > 0
        self.seed = int(self.setting("seed", 0))
        self.batch_size = int(self.setting("batch_size", 64))
        self.features = str(self.setting("features", "auto"))
        if self.features not in FEATURES:
            raise ValueError(f"evals.{name}.features must be one of {FEATURES}, got "
                             f"{self.features!r}")
        if self.num_images == 1:
            raise ValueError(f"evals.{name}.num_images must be 0 (off) or >= 2: a covariance "
                             "needs two images")
        self.weights = str(self.setting("inception_weights", "")) or None
        self.scorer_path = str(self.setting("scorer", ""))
        self.sampling = caption_match.sampling_of(ctx.cfg, section)
        self._extractor = None
        if self.enabled:
            if self.features == "scorer" and not self.scorer_path:
                raise ValueError(f"evals.{name}.features='scorer' needs evals.{name}.scorer")

    def prepare(self) -> None:
        caption_match.load_image_tokenizer(self.ctx)
        self.extractor()

    # ------------------------------------------------------------------ features
    def extractor(self) -> tuple[str, Any]:
        """``(label, images -> features)``, built once."""
        if self._extractor is not None:
            return self._extractor
        from dalle_jax.evals import inception

        if self.features in ("auto", "inception"):
            try:
                path = inception.weights_path(self.weights)
            except FileNotFoundError as e:
                if self.features == "inception" or not self.scorer_path:
                    raise FileNotFoundError(
                        f"evals.{self.name}: {e}" + ("" if self.features == "inception" else
                                                     f" (or set evals.{self.name}.scorer to "
                                                     "use the scorer's features instead)")
                    ) from None
                logging.warning("%s; evals.%s uses the scorer's image features instead "
                                "(labelled scorer_features, not comparable with Inception "
                                "FIDs)", e, self.name)
                print(f"note: no Inception weights ({e}); the shapes FID uses the scorer's "
                      "features (reported as scorer_features)")
            else:
                apply_fn, variables = inception.load_inception(path)

                def run(images):
                    return inception.extract_features(apply_fn, variables, images,
                                                      self.batch_size, desc="inception")["pool"]

                self._extractor = ("inception", run)
                return self._extractor
        from dalle_jax.rerank import scorer as scorer_lib

        scorer = scorer_lib.load_scorer(
            exports.resolve_export(self.scorer_path, "the scorer"),
            batch_size=self.batch_size)
        self._extractor = ("scorer_features", scorer.embed_images)
        return self._extractor

    # ------------------------------------------------------------------ images
    def real_images(self, size: int) -> tuple[np.ndarray, list[str]]:
        from dalle_jax.data import shapes

        rows = [shapes.example(self.split, i, size) for i in range(self.num_images)]
        return np.stack([r["image"] for r in rows]), [str(r["caption"]) for r in rows]

    def generated(self, params: Any, captions: list[str]) -> np.ndarray:
        key = ("best_of_1", self.split, self.seed, self.sampling)
        cached = self.ctx.cache.get(key)
        if cached is not None and list(cached[1][:len(captions)]) == captions \
                and len(cached[0]) >= len(captions):
            return cached[0][:len(captions)]
        sampler = caption_match.sampler_for(self.ctx, params, self.sampling)
        update, close = self.ctx.progress_bar(len(captions), f"FID samples ({self.split})")
        try:
            toks = sampler.tokens(captions, num_candidates=1, seed=self.seed,
                                  batch_size=self.batch_size, progress=update)
        finally:
            close()
        return sampler.images(toks, batch_size=self.batch_size)[:, 0]

    def reconstructions(self, params: Any) -> np.ndarray:
        from dalle_jax.data.tokens import TokenSource

        sampler = caption_match.sampler_for(self.ctx, params, self.sampling)
        source = TokenSource(str(self.ctx.cfg.data.tokens_dir), self.split)
        if len(source) < self.num_images:
            raise ValueError(f"evals.{self.name}.num_images={self.num_images} but the "
                             f"{self.split!r} split has {len(source)} examples")
        real = np.stack([np.asarray(source[i]["image_tokens"]) for i in range(self.num_images)])
        return sampler.images(real.reshape((self.num_images, source.grid, source.grid)),
                              batch_size=self.batch_size)

    def __call__(self, params: Any, step: int) -> dict:
        import json

        import jax

        caption_match.check_shapes_tokens(str(self.ctx.cfg.data.tokens_dir))
        recon = self.reconstructions(params)
        real, captions = self.real_images(int(recon.shape[1]))
        fake = self.generated(params, captions)
        label, features = self.extractor()
        f_real, f_fake, f_recon = (np.asarray(features(x), np.float64)
                                   for x in (real, fake, recon))
        prefix = f"shapes_fid/{self.split}"
        out = {f"{prefix}/{label}": fid.fid_from_features(f_real, f_fake),
               f"{prefix}/dvae_reconstruction/{label}": fid.fid_from_features(f_real, f_recon)}
        if jax.process_index() == 0:
            os.makedirs(self.ctx.out_dir, exist_ok=True)
            path = os.path.join(self.ctx.out_dir, f"shapes_fid_{step:07d}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(dict(out, features=label, num_images=self.num_images,
                               split=self.split, seed=self.seed,
                               feature_dim=int(f_real.shape[1])), f, indent=2, sort_keys=True)
            os.replace(path + ".tmp", path)
        return out
