"""The ``eval_coco`` job: zero-shot MS-COCO evaluation of the stage-2 model (paper §3.1).

The DALL·E paper evaluates on captions of the MS-COCO 2014 validation set, never trained
on: it samples images for 30,000 captions, reranks N candidates per caption with a
contrastive model, and compares the samples with the validation images by FID and IS,
also after blurring both sides with Gaussian kernels of growing radius (Fig. 9: the gap
to other models narrows once the dVAE's missing high frequencies are blurred away
everywhere), and checks how many validation images have near-duplicates in the training
data (App. F). This job does all of that, resumably.

Steps (every setting lives in the config, `configs/eval_coco.py` documents them):

1. **Captions.** The raw COCO layout is read: ``coco.root/annotations/captions_val2014.json``
   (``images`` [{id, file_name}], ``annotations`` [{image_id, caption}]) and the image
   folder ``coco.root/val2014/``. (TFDS ``coco_captions`` is not read: it needs a
   download-and-prepare step of its own, and the raw files are what the paper's numbers
   refer to.) Every listed image is decoded once (`dalle_jax.data.imageio.load_rgb`, in a
   thread pool); missing and undecodable images are skipped and counted by reason, as are
   images without a non-empty caption. ``coco.num_captions`` captions are then drawn with
   ``coco.seed``: a seeded permutation of the usable images (sorted by id) picks the
   images, and one of each image's captions is picked with the same generator. So every
   evaluated caption comes from a **distinct** image (30,000 of the 40,504 validation
   images at the paper's size), and the real-image set of the FID has no duplicates
   which would shrink its spread; the draw is a pure function of the annotation file, the
   set of usable images and the seed. It is stored in ``draw.json``. Fewer usable images
   than ``num_captions`` is an error naming both numbers.
2. **Real images.** Each drawn image is resized (shorter side to the model's image size,
   PIL filter ``metrics.real_resize``, Lanczos by default, as the DALL·E reference
   preprocessing) and centre-cropped, and stored in ``real/real_NNNNN.npz`` shards.
3. **Samples.** The stage-2 model (`Sampler.load` of ``sample.transformer``,
   ``sample.bpe``, ``sample.dvae``) draws ``sample.num_candidates`` N candidates per
   caption; candidate j of caption i is global sample ``i * N + j`` (as in the sampler
   and the ``sample`` job). With a scorer (``sample.scorer``, required when N > 1), each
   candidate is scored, and for every reranking size k in ``sample.rerank_sizes`` (N is
   always included) the best of the *first k* candidates is kept, ties going to the
   earlier candidate. Candidates are drawn in ranges aligned with the sizes (and at most
   ``sample.chunk`` per caption at a time; `Sampler.tokens` draws a range with exactly
   the tokens of the full draw), so one pass of N candidates yields every size's pick in
   bounded memory. The picks of ``sample.shard_captions`` captions go to one
   ``generated/gen_NNNNN.npz`` shard (tokens, candidate and global sample indices,
   scores, every candidate's score, and the distinct picked images, uint8), written
   through a temporary file and renamed. A restart skips finished shards.
4. **Settings.** ``settings.json`` records everything the stored images depend on (the
   annotation file's hash, the draw's size and seed, the exports' paths and identities,
   the BPE file's hash, the scorer, sampling, the layout). A restart with any of them
   different stops before doing anything and names the differences: one directory never
   mixes two evaluations. The exports are compared by path (with their recorded identity
   and step), since hashing a large model's weights would take long: a moved export
   counts as another one. The COCO folder may move (only its annotation file's hash
   counts). Metric settings may change between runs (see 6).
5. **Metrics.** For each blur radius in ``metrics.blur_radii`` (PIL
   ``ImageFilter.GaussianBlur``, on both sides at the model's resolution) and each
   reranking size: FID against the real images, IS (``logits_unbiased``, torch-fidelity's
   split rule, ``min(is_splits, n)`` splits), and with a scorer the CLIP score, the mean
   over captions of ``100 * max(cos, 0)`` of the scorer's image and caption embeddings
   (with reranking by the same scorer this favours the reranked sizes by construction; it
   is reported for the real images too as a reference). Inception features come from
   `dalle_jax.evals.inception` (weights ``metrics.inception_weights`` or
   ``$DALLE_JAX_INCEPTION_WEIGHTS``), extracted in batches over the config's mesh, and are
   cached per shard and radius under ``cache/`` (a regenerated shard gets new ones). The
   real images' statistics are saved with `fid.save_stats` to
   ``metrics.real_stats_dir`` (default ``eval_coco/real_stats``), keyed by the draw, the
   radius, the real-image resize, the image size, the Inception input resize and the
   weights file, and reused by later runs (also of other models). Without the weights
   file the job still draws, generates and scores CLIP, and says which file it needs and
   where it looked; FID, IS, the overlap check's features and the plots are skipped.
6. **Report.** ``eval_coco/results.json``: the settings, the metric settings, the counts
   (captions, generated images, skipped images by reason, truncated captions), and per
   blur radius the real images' IS and CLIP score and per reranking size FID, IS mean ±
   std and CLIP score; plots ``fid_vs_blur.png``, ``is_vs_blur.png`` (a line per
   reranking size), ``fid_vs_rerank.png``, ``is_vs_rerank.png`` (at the smallest radius,
   normally 0) and ``clip_vs_rerank.png``, drawn with PIL (`dalle_jax.evals.plots`), and
   ``samples.png`` (the first captions' picks per size). A results file written with other
   metric settings is kept as ``results.<time>.json``.
7. **Overlap check** (optional, ``overlap.train_images``: a folder searched recursively,
   a ``.txt`` file listing one path per line, or a comma-separated list of paths): the
   training images are prepared like the real ones (resize, crop, no blur), and the
   cosine similarity of their Inception pool features to each evaluated validation
   image's is computed in chunks; a validation image whose nearest training image reaches
   ``overlap.threshold`` counts as overlapping. The report gives the fraction, the
   nearest neighbours of the most similar ones, and FID / IS at the smallest blur radius
   with and without the captions of the overlapping validation images (their real images
   and their samples both left out).

Several processes (multi-host): every process samples (the sampler runs over the mesh)
and extracts features (each its own contiguous share of the rows); process 0 writes every
file, so the output directory must be on storage all processes see.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from absl import logging

from dalle_jax.evals import coco_files, fid
from dalle_jax.rerank import best_of

OUT_SUBDIR = "eval_coco"
SETTINGS_FILE = "settings.json"
DRAW_FILE = "draw.json"
RESULTS_FILE = "results.json"
PAPER_NUM_CAPTIONS = 30_000
# Images per group of shards whose Inception features or CLIP scores are computed at once.
CACHE_GROUP_ROWS = 4096


# ----------------------------------------------------------------------------- settings


def parse_floats(value: Any, what: str) -> list[float]:
    """``"0,1,2"`` or a sequence of numbers -> sorted distinct floats (at least one)."""
    items = [x for x in str(value).replace(" ", "").split(",") if x] \
        if isinstance(value, str) else list(value)
    try:
        out = sorted({float(x) for x in items})
    except ValueError as e:
        raise ValueError(f"{what} must be comma-separated numbers, got {value!r}") from e
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def rerank_sizes(value: Any, num_candidates: int) -> list[int]:
    """The reranking sizes to report: the given ones (``"1,2,4"`` or a sequence; "" =
    the powers of two below N) and always N itself, sorted; each in [1, N]."""
    n = int(num_candidates)
    if isinstance(value, str):
        items = [x for x in value.replace(" ", "").split(",") if x]
    else:
        items = list(value)
    try:
        sizes = {int(x) for x in items} if items else {2 ** e for e in range(n.bit_length())}
    except ValueError as e:
        raise ValueError(f"sample.rerank_sizes must be comma-separated integers, "
                         f"got {value!r}") from e
    bad = sorted(k for k in sizes if not 1 <= k <= n)
    if bad:
        raise ValueError(f"sample.rerank_sizes {bad} outside [1, num_candidates={n}]")
    return sorted(sizes | {n})


def clip_score(cosines: np.ndarray) -> float:
    """The CLIP score of image/caption pairs: mean of ``100 * max(cos, 0)``."""
    c = np.asarray(cosines, np.float64)
    return float(np.mean(100.0 * np.maximum(c, 0.0)))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _rkey(radius: float) -> str:
    return f"{radius:g}"


# ----------------------------------------------------------------------------- files


def _save_npz(path: str, **arrays: Any) -> None:
    """Writes a compressed ``.npz`` through a temporary file renamed into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _bar(it: Iterable, total: int, desc: str, enabled: bool = True):
    from dalle_jax import logs

    return logs.progress(total, desc, iterable=it, enabled=enabled)


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


_INCEPTION: dict[tuple, tuple] = {}


def _load_inception(path: str, resize: str) -> tuple[Any, Any, str]:
    """``(apply_fn, variables, sha256 of the file)``, kept for the next run in this
    process: the same `InceptionFn` object lets `inception.extract_features` reuse its
    compiled program (the network takes seconds to compile, minutes on a busy CPU)."""
    from dalle_jax.evals import inception

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, resize)
    if key not in _INCEPTION:
        _INCEPTION.clear()
        fn, variables = inception.load_inception(path, resize=resize)
        _INCEPTION[key] = (fn, variables, _sha256_file(path))
    return _INCEPTION[key]


def _resolve_export(path: str, what: str, field: str) -> str:
    """An export directory (has meta.json), or the newest ``exports/step_N`` of a run
    directory."""
    from dalle_jax import exports

    if not path:
        raise ValueError(f"eval_coco needs the {what}: set --config.sample.{field}")
    return exports.resolve_export(path, f"sample.{field} (the {what})")


# ----------------------------------------------------------------------------- the job


class _Evaluation:
    """One ``eval_coco`` run over ``workdir/eval_coco`` (see the module doc)."""

    def __init__(self, cfg, workdir: str):
        from dalle_jax.evals import blur, inception

        self.cfg = cfg
        c, s, m = cfg.coco, cfg.sample, cfg.metrics
        self.out = os.path.join(os.path.abspath(workdir), OUT_SUBDIR)
        root = str(c.root)
        self.annotations = os.path.abspath(os.path.join(root, str(c.annotations)))
        self.image_dir = os.path.abspath(os.path.join(root, str(c.images)))
        self.num = int(c.num_captions)
        if self.num < 1:
            raise ValueError(f"coco.num_captions must be >= 1, got {self.num}")
        self.draw_seed = int(c.seed)
        self.workers = int(c.get("workers", 0))
        self.n = int(s.num_candidates)
        if self.n < 1:
            raise ValueError(f"sample.num_candidates must be >= 1, got {self.n}")
        self.sizes = rerank_sizes(s.rerank_sizes, self.n)
        self.scorer_path = str(s.scorer)
        if self.n > 1 and not self.scorer_path:
            raise ValueError(f"sample.num_candidates={self.n} candidates per caption need a "
                             "scorer to rerank them (sample.scorer); without one use "
                             "num_candidates=1")
        for name in ("batch_size", "chunk", "shard_captions"):
            if int(s[name]) < 1:
                raise ValueError(f"sample.{name} must be >= 1, got {s[name]}")
        self.batch_size, self.chunk = int(s.batch_size), int(s.chunk)
        self.shard_captions = int(s.shard_captions)
        from dalle_jax.sample import sampler as sampler_lib

        self.sampling = sampler_lib.SamplingConfig(
            temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
            guidance=float(s.guidance))
        self.seed = int(s.seed)
        self.radii = [blur.check_radius(r) for r in parse_floats(m.blur_radii,
                                                                  "metrics.blur_radii")]
        self.real_resize = str(m.real_resize)
        if self.real_resize not in blur.RESAMPLE:
            raise ValueError(f"metrics.real_resize must be one of {sorted(blur.RESAMPLE)}, "
                             f"got {self.real_resize!r}")
        self.inception_resize = str(m.inception_resize)
        if self.inception_resize not in inception.RESIZE_MODES:
            raise ValueError(f"metrics.inception_resize must be one of "
                             f"{inception.RESIZE_MODES}, got {self.inception_resize!r}")
        self.metric_batch = int(m.batch_size)
        self.is_splits = int(m.is_splits)
        if self.metric_batch < 1 or self.is_splits < 1:
            raise ValueError("metrics.batch_size and metrics.is_splits must be >= 1")
        self.stats_dir = str(m.real_stats_dir) or os.path.join(self.out, "real_stats")
        o = cfg.get("overlap")
        self.overlap_spec = str(o.train_images) if o is not None else ""
        self.overlap_threshold = float(o.threshold) if o is not None else 0.0
        self.overlap_chunk = int(o.chunk) if o is not None else 1024
        self.transformer = _resolve_export(str(s.transformer), "transformer", "transformer")
        self.dvae = _resolve_export(str(s.dvae), "dVAE", "dvae")
        self.scorer_dir = (_resolve_export(self.scorer_path, "scorer", "scorer")
                           if self.scorer_path else None)
        bpe_path = str(s.bpe)
        if bpe_path and os.path.isdir(bpe_path):
            bpe_path = os.path.join(bpe_path, "bpe.model")
        if not bpe_path or not os.path.isfile(bpe_path):
            raise FileNotFoundError(f"sample.bpe={str(s.bpe)!r}: the transformer's BPE model "
                                    "file (or the run directory holding bpe.model) is needed")
        self.bpe = os.path.abspath(bpe_path)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ settings

    def settings(self) -> dict[str, Any]:
        """What the stored draw, real images and samples depend on (``settings.json``)."""
        from dalle_jax import exports

        meta = exports.read_meta(self.transformer)
        dvae_cfg = exports.read_dvae_config(self.dvae)
        self.image_size = int(dvae_cfg.image_size)
        scorer = None
        if self.scorer_dir:
            smeta = exports.read_meta(self.scorer_dir)
            scorer = {"export": self.scorer_dir, "step": smeta.get("step"),
                      "source": smeta.get("source"), "identity": smeta.get("identity")}
        if not os.path.isfile(self.annotations):
            raise FileNotFoundError(f"COCO captions file {self.annotations!r} does not exist "
                                    "(expected the raw layout: coco.root/annotations/"
                                    "captions_val2014.json and coco.root/val2014/)")
        s = self.sampling
        out = {
            # The COCO files are compared by content (the annotation file's hash; the
            # images are decoded into draw.json and the real shards once), so moving the
            # dataset does not stop a restart; the exports by path and identity.
            "coco": {"annotations_sha256": _sha256_file(self.annotations),
                     "num_captions": self.num, "seed": self.draw_seed},
            "transformer": {"export": self.transformer, "step": meta.get("step"),
                            "ema": meta.get("ema"), "identity": meta.get("identity")},
            "dvae": {"export": self.dvae, "identity": exports.dvae_identity(dvae_cfg)},
            "bpe_model": {"path": self.bpe, "sha256": _sha256_file(self.bpe)},
            "scorer": scorer,
            "sampling": {"seed": self.seed, "num_candidates": self.n,
                         "rerank_sizes": self.sizes, "temperature": s.temperature,
                         "top_k": s.top_k, "top_p": s.top_p, "guidance": s.guidance,
                         "dtype": str(self.cfg.precision.compute_dtype)},
            "layout": {"shard_captions": self.shard_captions, "image_size": self.image_size,
                       "real_resize": self.real_resize},
        }
        return json.loads(json.dumps(out, default=str))

    def check_settings(self, settings: dict[str, Any]) -> None:
        from dalle_jax import checkpoint

        path = os.path.join(self.out, SETTINGS_FILE)
        if not os.path.exists(path):
            return
        old = _read_json(path)
        if old != settings:
            diff = checkpoint.diff_dicts(old, settings, names=("saved", "now"))
            raise FileExistsError(
                f"{self.out} holds an evaluation made with other settings ("
                f"{'; '.join(diff[:8])}{'; ...' if len(diff) > 8 else ''}); never mixing "
                "the two, nothing was changed: use another workdir, or remove that directory "
                "to start over")

    # ------------------------------------------------------------------ draw

    def draw(self) -> dict[str, Any]:
        """The caption draw (``draw.json``, made once: the image scan decodes every image)."""
        path = os.path.join(self.out, DRAW_FILE)
        key = {"annotations_sha256": self.settings_["coco"]["annotations_sha256"],
               "num_captions": self.num, "seed": self.draw_seed}
        if os.path.exists(path):
            d = _read_json(path)
            if d.get("key") == key:
                return d
            raise FileExistsError(f"{path} was drawn with other settings; remove {self.out} "
                                  "to start over")
        t0 = time.time()
        images, counts = coco_files.read_annotations(self.annotations)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"COCO image folder {self.image_dir!r} does not exist")
        usable, skipped = coco_files.check_images(images, self.image_dir, workers=self.workers)
        reasons = Counter(x["reason"] for x in skipped)
        if len(usable) < self.num:
            raise ValueError(
                f"{self.annotations} has {len(usable)} usable captions of distinct images "
                f"({counts['images_listed']} images listed, {len(skipped)} skipped: "
                f"{dict(sorted(reasons.items()))}, {counts['images_without_captions']} without "
                f"a caption), fewer than coco.num_captions={self.num}")
        captions = coco_files.draw_captions(usable, self.num, self.draw_seed)
        counts.update(images_usable=len(usable), images_skipped=len(skipped),
                      skipped_by_reason=dict(sorted(reasons.items())))
        d = {"key": key, "counts": counts, "skipped": skipped, "captions": captions,
             "images_sha256": _sha256_json([(c["image_id"], c["file_name"])
                                            for c in captions])}
        if _is_main():
            _write_json(path, d)
        self.timings["draw"] = round(time.time() - t0, 2)
        return d

    # ------------------------------------------------------------------ shards

    def shard_ranges(self) -> list[tuple[int, int]]:
        k = self.shard_captions
        return [(lo, min(lo + k, self.num)) for lo in range(0, self.num, k)]

    def real_path(self, s: int) -> str:
        return os.path.join(self.out, "real", f"real_{s:05d}.npz")

    def gen_path(self, s: int) -> str:
        return os.path.join(self.out, "generated", f"gen_{s:05d}.npz")

    def make_real_shards(self, captions: list[dict]) -> None:
        """Resized, centre-cropped real images per shard (missing shards only)."""
        from dalle_jax.evals import blur

        todo = [s for s in range(len(self.ranges)) if not os.path.exists(self.real_path(s))]
        if not todo or not _is_main():
            _barrier("eval_coco_real")
            return
        t0 = time.time()

        def load(entry):
            img = coco_files.load_image(os.path.join(self.image_dir, entry["file_name"]))
            return blur.resize_center_crop(img, self.image_size, self.real_resize)

        with concurrent.futures.ThreadPoolExecutor(coco_files.workers_for(self.workers)) as pool:
            for s in _bar(todo, len(todo), "real image shards"):
                lo, hi = self.ranges[s]
                images = np.stack(list(pool.map(load, captions[lo:hi])))
                _save_npz(self.real_path(s), images=images, caption_index=np.arange(lo, hi),
                          uid=np.asarray(uuid.uuid4().hex))
        self.timings["real_images"] = round(time.time() - t0, 2)
        _barrier("eval_coco_real")

    def generate(self, sampler, scorer, captions: list[dict]) -> None:
        """Samples the missing shards, in order (each written as soon as it is done)."""
        # Every process lists the same missing shards (process 0 writes them).
        _barrier("eval_coco_generate")
        todo = [s for s in range(len(self.ranges)) if not os.path.exists(self.gen_path(s))]
        if not todo:
            return
        from dalle_jax import logs

        total = sum(self.ranges[s][1] - self.ranges[s][0] for s in todo) * self.sizes[-1]
        bar = logs.progress(total, "sampling")
        t0 = time.time()
        try:
            for s in todo:
                lo, hi = self.ranges[s]
                out = best_of.best_of_each_size(
                    sampler, scorer, [c["caption"] for c in captions[lo:hi]],
                    num_candidates=self.n, sizes=self.sizes, seed=self.seed, first_caption=lo,
                    batch_size=self.batch_size, chunk=self.chunk, progress=bar.update)
                if _is_main():
                    _save_npz(self.gen_path(s), caption_index=np.arange(lo, hi),
                              num_images=np.int64(len(out["images"])),
                              uid=np.asarray(uuid.uuid4().hex), **out)
                logging.info("eval_coco: shard %d (captions %d..%d) written", s, lo, hi - 1)
        finally:
            bar.close()
        self.timings["sampling"] = round(time.time() - t0, 2)
        _barrier("eval_coco_generated")

    def gen_meta(self, s: int) -> dict[str, np.ndarray]:
        """A generated shard's arrays other than the images (cached in memory)."""
        if s not in self._gen_meta:
            with np.load(self.gen_path(s)) as z:
                self._gen_meta[s] = {k: z[k] for k in z.files if k != "images"}
                sizes = self._gen_meta[s]["sizes"].tolist()
            if sizes != self.sizes or len(self._gen_meta[s]["caption_index"]) != \
                    self.ranges[s][1] - self.ranges[s][0]:
                raise ValueError(f"{self.gen_path(s)} does not hold the shard this evaluation "
                                 "expects; remove it to have it sampled again")
        return self._gen_meta[s]

    def real_uid(self, s: int) -> str:
        if s not in self._real_uid:
            with np.load(self.real_path(s)) as z:
                self._real_uid[s] = str(z["uid"])
        return self._real_uid[s]

    def images_of(self, kind: str, s: int) -> np.ndarray:
        path = self.real_path(s) if kind == "real" else self.gen_path(s)
        with np.load(path) as z:
            return z["images"]

    def rows_of(self, kind: str, s: int) -> int:
        if kind == "real":
            lo, hi = self.ranges[s]
            return hi - lo
        return int(self.gen_meta(s)["num_images"])

    def uid_of(self, kind: str, s: int) -> str:
        return self.real_uid(s) if kind == "real" else str(self.gen_meta(s)["uid"])

    # ------------------------------------------------------------------ features

    def features(self, sources: list[tuple[int, Callable[[], np.ndarray]]], desc: str
                 ) -> dict[str, np.ndarray]:
        """Inception features of the rows of ``sources`` (``(rows, load)`` pairs, in
        order), over the mesh; with several processes each extracts a contiguous share."""
        import jax

        from dalle_jax.evals import inception

        total = sum(n for n, _ in sources)
        mesh = self.mesh
        nproc = jax.process_count() if mesh is not None else 1
        if total < nproc:
            mesh, nproc = None, 1
        p = jax.process_index() if nproc > 1 else 0
        lo, hi = total * p // nproc, total * (p + 1) // nproc

        def rows():
            start = 0
            for count, load in sources:
                a, b = max(lo, start), min(hi, start + count)
                if a < b:
                    yield load()[a - start:b - start]
                start += count

        return inception.extract_features(self.inception_fn, self.inception_vars, rows(),
                                          self.metric_batch, mesh, desc=desc)

    def _cache_path(self, what: str, kind: str, s: int, radius: float) -> str:
        return os.path.join(self.out, "cache", f"{what}_{kind}_{s:05d}_r{_rkey(radius)}.npz")

    def _cache_key(self, kind: str, s: int, radius: float, key_extra: dict) -> str:
        return json.dumps(dict(key_extra, uid=self.uid_of(kind, s), radius=radius),
                          sort_keys=True)

    def _cache_valid(self, what: str, kind: str, s: int, radius: float,
                     key_extra: dict) -> bool:
        path = self._cache_path(what, kind, s, radius)
        if not os.path.exists(path):
            return False
        with np.load(path) as z:
            return "key" in z.files and str(z["key"]) == self._cache_key(kind, s, radius,
                                                                         key_extra)

    def _cached(self, what: str, kind: str, shards: Sequence[int], radius: float,
                key_extra: dict, compute: Callable[[list[int]], list[dict[str, np.ndarray]]]
                ) -> Callable[[int], dict[str, np.ndarray]]:
        """Per-shard cached arrays: ``compute(missing shards)`` fills the missing ones; a
        cache is valid for the shard file it was made from (its uid) and ``key_extra``."""
        keys = {s: self._cache_key(kind, s, radius, key_extra) for s in shards}

        def valid(s):
            return self._cache_valid(what, kind, s, radius, key_extra)

        todo = [s for s in shards if not valid(s)]
        # Shards go in groups of about CACHE_GROUP_ROWS images, so memory stays bounded
        # and an interrupted run keeps what it has computed.
        groups: list[list[int]] = []
        rows = CACHE_GROUP_ROWS
        for s in todo:
            n = self.rows_of(kind, s)
            if rows + n > CACHE_GROUP_ROWS:
                groups.append([])
                rows = 0
            groups[-1].append(s)
            rows += n
        for group in groups:
            results = compute(group)
            if _is_main():
                for s, arrays in zip(group, results):
                    _save_npz(self._cache_path(what, kind, s, radius),
                              key=np.asarray(keys[s]), **arrays)
        if todo:
            _barrier(f"eval_coco_cache_{what}_{kind}")

        def load(s):
            with np.load(self._cache_path(what, kind, s, radius)) as z:
                return {k: z[k] for k in z.files if k != "key"}

        return load

    def inception_cache(self, kind: str, radius: float, shards: Sequence[int] | None = None):
        """``load(shard) -> {"pool", "logits_unbiased"}`` of a shard's (distinct) images
        blurred at ``radius``."""
        from dalle_jax.evals import blur

        shards = list(range(len(self.ranges))) if shards is None else list(shards)

        def compute(todo):
            counts = [self.rows_of(kind, s) for s in todo]
            sources = [(n, lambda s=s: blur.gaussian_blur(self.images_of(kind, s), radius))
                       for s, n in zip(todo, counts)]
            f = self.features(sources, f"inception {kind} r={_rkey(radius)}")
            out, start = [], 0
            for n in counts:
                out.append({k: np.asarray(f[k][start:start + n], np.float32)
                            for k in ("pool", "logits_unbiased")})
                start += n
            return out

        return self._cached("inception", kind, shards, radius, self.inception_key, compute)

    def clip_cache(self, kind: str, radius: float, captions: list[dict]):
        """``load(shard) -> {"cos"}``: the scorer's cosine of each of a shard's (distinct)
        images blurred at ``radius`` with its caption."""
        from dalle_jax.evals import blur

        def compute(todo):
            # One scorer call per group of shards (its batches stay full).
            images, caps, counts = [], [], []
            for s in todo:
                lo, _ = self.ranges[s]
                images.append(blur.gaussian_blur(self.images_of(kind, s), radius))
                rows = (np.arange(len(images[-1])) if kind == "real"
                        else self.gen_meta(s)["image_caption"])
                caps += [captions[lo + int(i)]["caption"] for i in rows]
                counts.append(len(rows))
            cos = np.asarray(self.scorer.score(np.concatenate(images), caps), np.float32)
            bounds = np.cumsum([0] + counts)
            return [{"cos": cos[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]

        return self._cached("clip", kind, range(len(self.ranges)), radius,
                            {"scorer": _sha256_json(self.settings_["scorer"])}, compute)

    # ------------------------------------------------------------------ metrics

    def real_reference(self, radius: float, draw: dict
                       ) -> tuple[fid.FrechetReference, dict[str, Any]]:
        """The real images' side of the FIDs at ``radius`` and their IS.

        From the per-shard feature caches when they are all there (cheap), else from the
        statistics file (`fid.save_stats`, in ``real_stats_dir``, keyed by the draw, the
        radius, the resizes, the image size and the Inception weights), else the
        features are extracted. The statistics file is written whenever it is missing,
        so later evaluations of the same draw (other models, other workdirs sharing the
        directory) reuse it.
        """
        key = {"dataset": "coco_captions_val2014", "draw_images_sha256": draw["images_sha256"],
               "num_images": self.num, "blur_radius": radius, "real_resize": self.real_resize,
               "image_size": self.image_size, "inception_resize": self.inception_resize,
               "weights_sha256": self.inception_key["weights_sha256"]}
        path = os.path.join(self.stats_dir, f"coco_val2014_{_sha256_json(key)[:16]}.npz")
        cached = all(self._cache_valid("inception", "real", s, radius, self.inception_key)
                     for s in range(len(self.ranges)))
        meta = None
        if os.path.exists(path):
            mu, sigma, meta = fid.load_stats(path, resize=self.inception_resize)
            if meta.get("key") != key:
                logging.warning("%s has another key; recomputing it", path)
                meta = None
            elif not cached:
                return fid.FrechetReference.from_stats(mu, sigma, int(meta["count"])), {
                    "is_mean": meta["is_mean"], "is_std": meta["is_std"],
                    "is_splits": meta["is_splits"], "stats_file": path, "count": self.num,
                    "from": "statistics file"}
        load = self.inception_cache("real", radius)
        parts = [load(s) for s in range(len(self.ranges))]
        ref = fid.FrechetReference.from_features(np.concatenate([f["pool"] for f in parts]))
        logits = np.concatenate([f["logits_unbiased"] for f in parts])
        splits = min(self.is_splits, len(logits))
        is_mean, is_std = fid.inception_score(logits, splits=splits)
        if meta is None and _is_main():
            os.makedirs(self.stats_dir, exist_ok=True)
            fid.save_stats(path, ref.mu, ref.sigma, count=len(logits),
                           resize=self.inception_resize, key=key, is_mean=is_mean,
                           is_std=is_std, is_splits=splits)
        return ref, {"is_mean": is_mean, "is_std": is_std, "is_splits": splits,
                     "stats_file": path, "count": self.num, "from": "features"}

    def metrics_at(self, radius: float, draw: dict, keep: np.ndarray | None = None
                   ) -> dict[str, Any]:
        """FID and IS per reranking size at ``radius`` (``keep``: only these captions,
        real images and samples alike)."""
        shards = range(len(self.ranges))
        ref = None
        if keep is None:
            ref, real = self.real_reference(radius, draw)
        else:
            load_r = self.inception_cache("real", radius)
            parts = [load_r(s) for s in shards]
            pool = np.concatenate([f["pool"][keep[lo:hi]]
                                   for f, (lo, hi) in zip(parts, self.ranges)])
            logits_r = np.concatenate([f["logits_unbiased"][keep[lo:hi]]
                                       for f, (lo, hi) in zip(parts, self.ranges)])
            real = {"count": len(pool), "is_mean": None, "is_std": None}
            if len(pool) >= 2:
                ref = fid.FrechetReference.from_features(pool)
                real["is_splits"] = min(self.is_splits, len(logits_r))
                real["is_mean"], real["is_std"] = fid.inception_score(
                    logits_r, splits=real["is_splits"])
        load_g = self.inception_cache("gen", radius)
        caches = [load_g(s) for s in shards]
        gen = {}
        for ki, k in enumerate(self.sizes):
            pool, logits = [], []
            for s, f in zip(shards, caches):
                lo, hi = self.ranges[s]
                idx = self.gen_meta(s)["image_index"][:, ki]
                if keep is not None:
                    idx = idx[keep[lo:hi]]
                pool.append(f["pool"][idx])
                logits.append(f["logits_unbiased"][idx])
            pool, logits = np.concatenate(pool), np.concatenate(logits)
            entry: dict[str, Any] = {"count": len(pool), "fid": None, "is_mean": None,
                                     "is_std": None}
            if len(pool) >= 2 and ref is not None:
                entry["fid"] = ref.distance(pool)
            if len(pool) >= 1:
                entry["is_splits"] = min(self.is_splits, len(logits))
                entry["is_mean"], entry["is_std"] = fid.inception_score(
                    logits, splits=entry["is_splits"])
            gen[str(k)] = entry
        return {"real": real, "generated": gen}

    def clip_at(self, radius: float, captions: list[dict]) -> tuple[float, dict[str, float]]:
        """CLIP scores at ``radius``: of the real images and of each size's picks (at
        radius 0 the picks' scores are the ones stored when they were reranked)."""
        shards = range(len(self.ranges))
        real = self.clip_cache("real", radius, captions)
        real_cos = np.concatenate([real(s)["cos"] for s in shards])
        per_size: list[list[np.ndarray]] = [[] for _ in self.sizes]
        stored = radius == 0 and all(np.isfinite(self.gen_meta(s)["score"]).all()
                                     for s in shards)
        gen = None if stored else self.clip_cache("gen", radius, captions)
        for s in shards:
            meta = self.gen_meta(s)
            for ki in range(len(self.sizes)):
                per_size[ki].append(meta["score"][:, ki] if stored
                                    else gen(s)["cos"][meta["image_index"][:, ki]])
        return clip_score(real_cos), {str(k): clip_score(np.concatenate(v))
                                      for k, v in zip(self.sizes, per_size)}

    # ------------------------------------------------------------------ overlap

    def overlap(self, draw: dict, metrics_available: bool) -> dict[str, Any] | None:
        """The training-set overlap check (module doc, 7)."""
        if not self.overlap_spec:
            return None
        from dalle_jax.data import imageio
        from dalle_jax.evals import blur

        paths = coco_files.list_images(self.overlap_spec)
        out: dict[str, Any] = {"train_images": self.overlap_spec, "listed": len(paths),
                               "threshold": self.overlap_threshold,
                               "feature": "inception pool (2048), cosine similarity"}
        if not paths:
            raise ValueError(f"overlap.train_images={self.overlap_spec!r} names no images")
        if not metrics_available:
            out["status"] = "skipped: needs the Inception weights (see inception.message)"
            return out
        t0 = time.time()
        load_r = self.inception_cache("real", 0.0)
        val = np.concatenate([load_r(s)["pool"] for s in range(len(self.ranges))])
        val = val / np.maximum(np.linalg.norm(val, axis=1, keepdims=True), 1e-12)
        best = np.full(len(val), -np.inf, np.float32)
        nearest = np.full(len(val), -1, np.int64)
        skipped: Counter = Counter()
        used_paths: list[str] = []

        def load(path):
            if not os.path.isfile(path):
                return None, "missing"
            try:
                return blur.resize_center_crop(coco_files.load_image(path), self.image_size,
                                               self.real_resize), None
            except imageio.BadImage as e:
                return None, e.reason

        with concurrent.futures.ThreadPoolExecutor(coco_files.workers_for(self.workers)) as pool:
            for c0 in range(0, len(paths), self.overlap_chunk):
                chunk = paths[c0:c0 + self.overlap_chunk]
                loaded = list(pool.map(load, chunk))
                ok = [(p, im) for p, (im, why) in zip(chunk, loaded) if im is not None]
                skipped.update(why for im, why in loaded if im is None)
                if not ok:
                    continue
                arr = np.stack([im for _, im in ok])
                feats = self.features([(len(arr), lambda arr=arr: arr)], "inception train")
                t = feats["pool"] / np.maximum(
                    np.linalg.norm(feats["pool"], axis=1, keepdims=True), 1e-12)
                sim = val @ t.T
                j = np.argmax(sim, axis=1)
                top = sim[np.arange(len(val)), j]
                better = top > best
                best = np.where(better, top, best)
                nearest = np.where(better, len(used_paths) + j, nearest)
                used_paths += [p for p, _ in ok]
        out.update(used=len(used_paths), skipped=dict(sorted(skipped.items())))
        if not used_paths:
            out["status"] = "no usable training images"
            return out
        flagged = best >= self.overlap_threshold
        caps = draw["captions"]
        order = np.argsort(-best, kind="stable")[:20]
        out.update(
            status="done", flagged=int(flagged.sum()), fraction=float(flagged.mean()),
            max_similarity={"mean": float(best.mean()), "median": float(np.median(best)),
                            "p99": float(np.quantile(best, 0.99)), "max": float(best.max())},
            most_similar=[{"caption_index": int(i), "file_name": caps[i]["file_name"],
                           "train_image": used_paths[nearest[i]], "similarity": float(best[i])}
                          for i in order],
            radius=self.radii[0])
        out["without"] = self.metrics_at(self.radii[0], draw, keep=~flagged)
        self.timings["overlap"] = round(time.time() - t0, 2)
        return out

    # ------------------------------------------------------------------ report

    def plots(self, results: dict[str, Any]) -> dict[str, str]:
        """The FID / IS plots; one without a single finite value (e.g. a FID of one
        caption) is left out with a warning."""
        from dalle_jax.evals import plots

        out: dict[str, str] = {}

        def draw(name, path, series, **kw):
            try:
                out[name] = plots.line_plot(path, series, **kw)
            except ValueError as e:
                logging.warning("eval_coco: plot %s skipped: %s", name, e)

        metrics = results["metrics"]
        radii = self.radii
        for name, label in (("fid", "FID"), ("is_mean", "IS")):
            series = [plots.Series(f"best of {k}", radii,
                                   [metrics[_rkey(r)]["generated"][str(k)][name] for r in radii])
                      for k in self.sizes]
            short = "is" if name == "is_mean" else name
            draw(f"{short}_vs_blur", os.path.join(self.out, f"{short}_vs_blur.png"), series,
                 title=f"{label} against blur radius (MS-COCO, {self.num} captions)",
                 xlabel="Gaussian blur radius (pixels)", ylabel=label, x_ticks=radii)
            r0 = radii[0]
            series = [plots.Series(f"blur {_rkey(r0)}", self.sizes,
                                   [metrics[_rkey(r0)]["generated"][str(k)][name]
                                    for k in self.sizes])]
            draw(f"{short}_vs_rerank", os.path.join(self.out, f"{short}_vs_rerank.png"),
                 series, title=f"{label} against reranking size (blur {_rkey(r0)})",
                 xlabel="candidates reranked (best of k)", ylabel=label,
                 x_ticks=self.sizes, x_log2=True)
        return out

    def clip_plot(self, clip: dict[str, Any]) -> str:
        from dalle_jax.evals import plots

        r0 = self.radii[0]
        return plots.line_plot(
            os.path.join(self.out, "clip_vs_rerank.png"),
            [plots.Series("samples", self.sizes,
                          [clip[_rkey(r0)]["generated"][str(k)] for k in self.sizes]),
             plots.Series("real images", self.sizes,
                          [clip[_rkey(r0)]["real"]] * len(self.sizes))],
            title=f"CLIP score against reranking size (blur {_rkey(r0)})",
            xlabel="candidates reranked (best of k)", ylabel="CLIP score",
            x_ticks=self.sizes, x_log2=True)

    def sample_grid(self, captions: list[dict]) -> str:
        from dalle_jax import visualize

        meta = self.gen_meta(0)
        images = self.images_of("gen", 0)
        rows = min(8, len(meta["caption_index"]))
        picked = images[meta["image_index"][:rows]].reshape((-1,) + images.shape[1:])
        labels = [f"best of {k}" + (f": {captions[i]['caption']}" if ki == 0 else "")
                  for i in range(rows) for ki, k in enumerate(self.sizes)]
        scale = max(1, 96 // self.image_size)
        return visualize.save_grid(os.path.join(self.out, "samples.png"), picked, labels,
                                   ncols=len(self.sizes), scale=scale, caption_lines=4)

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        from dalle_jax import exports, sharding
        from dalle_jax.evals import inception
        from dalle_jax.rerank import scorer as scorer_lib
        from dalle_jax.sample import sampler as sampler_lib
        from dalle_jax.tokenizers import bpe

        t_start = time.time()
        self._gen_meta: dict[int, dict[str, np.ndarray]] = {}
        self._real_uid: dict[int, str] = {}
        self.settings_ = self.settings()
        self.check_settings(self.settings_)
        # The Inception weights are looked up first, so a missing file is reported before
        # hours of sampling, not after (the job still samples without them).
        weights, message = None, None
        try:
            weights = inception.weights_path(str(self.cfg.metrics.inception_weights) or None)
        except FileNotFoundError as e:
            message = str(e)
            print(f"eval_coco: FID and IS will be skipped: {message}")
            logging.warning("eval_coco: %s", message)
        os.makedirs(self.out, exist_ok=True)
        draw = self.draw()
        captions = draw["captions"]
        self.ranges = self.shard_ranges()
        self.mesh = sharding.make_mesh(self.cfg.mesh)
        rules = str(self.cfg.sharding_rules)
        # The parts are checked against each other before settings.json pins them: a
        # wrong BPE file or dVAE, or a broken scorer export, is fixed without starting over.
        ident = exports.identity_of(self.settings_["transformer"], "transformer",
                                    self.transformer)
        tokenizer = bpe.TextTokenizer(self.bpe)
        tokenizer.check_identity(ident["tokenizer"])
        exports.check_dvae_identity(ident["dvae"], self.settings_["dvae"]["identity"], self.dvae)
        self.scorer = (scorer_lib.load_scorer(self.scorer_dir, batch_size=self.batch_size)
                       if self.scorer_dir else None)
        if _is_main() and not os.path.exists(os.path.join(self.out, SETTINGS_FILE)):
            _write_json(os.path.join(self.out, SETTINGS_FILE), self.settings_)
        text_len = int(ident["model"]["text_len"])
        _, info = tokenizer.encode_batch_slots([c["caption"] for c in captions],
                                               text_len=text_len)
        truncated = int(np.asarray(info["truncated"]).sum())
        if truncated:
            print(f"eval_coco: {truncated} of {len(captions)} captions are longer than the "
                  f"model's {text_len} text slots and are truncated")

        self.make_real_shards(captions)
        if not all(os.path.exists(self.gen_path(s)) for s in range(len(self.ranges))):
            # The transformer is loaded only when there is something left to sample.
            sampler = sampler_lib.Sampler.load(
                self.transformer, self.bpe, self.dvae, sampling=self.sampling,
                dtype=str(self.cfg.precision.compute_dtype), mesh=self.mesh, rules=rules)
            self.generate(sampler, self.scorer, captions)
            del sampler

        counts = dict(draw["counts"], captions=self.num,
                      generated_images=self.num * self.sizes[-1],
                      skipped_images=dict(draw["counts"]["skipped_by_reason"],
                                          total=draw["counts"]["images_skipped"]),
                      truncated_captions=truncated)
        results: dict[str, Any] = {
            "settings": self.settings_,
            "coco_files": {"annotations": self.annotations, "images": self.image_dir},
            "metric_settings": {
                "blur_radii": self.radii, "blur": "PIL ImageFilter.GaussianBlur(radius) on "
                "both real and generated images at the model's image size",
                "real_resize": f"shorter side to {self.image_size} with PIL "
                               f"{self.real_resize}, centre crop",
                "inception_resize": self.inception_resize, "is_splits": self.is_splits,
                "inception_weights": weights, "real_stats_dir": self.stats_dir,
                "clip_score": "mean over captions of 100 * max(cosine, 0) of the scorer's "
                              "image and caption embeddings",
                "overlap": {"train_images": self.overlap_spec,
                            "threshold": self.overlap_threshold} if self.overlap_spec else None},
            "counts": counts, "rerank_sizes": self.sizes, "blur_radii": self.radii,
            "inception": {"available": False, "weights": weights, "message": message},
            "metrics": {_rkey(r): {"real": {"is_mean": None, "is_std": None},
                                   "generated": {str(k): {"fid": None, "is_mean": None,
                                                          "is_std": None}
                                                 for k in self.sizes}}
                        for r in self.radii},
            "overlap": None, "plots": {},
        }
        if weights is not None:
            try:
                self.inception_fn, self.inception_vars, weights_sha = _load_inception(
                    weights, self.inception_resize)
            except ImportError as e:
                message = str(e)
                weights = None
                results["inception"]["message"] = message
                print(f"eval_coco: FID and IS skipped: {message}")
        if weights is not None:
            t0 = time.time()
            results["inception"] = {"available": True, "weights": weights, "message": None}
            self.inception_key = {"weights_sha256": weights_sha,
                                  "resize": self.inception_resize,
                                  "extractor": inception.EXTRACTOR_NAME}
            for r in self.radii:
                results["metrics"][_rkey(r)] = self.metrics_at(r, draw)
            self.timings["inception_metrics"] = round(time.time() - t0, 2)
        clip: dict[str, Any] = {}
        if self.scorer is not None:
            t0 = time.time()
            for r in self.radii:
                real, gen = self.clip_at(r, captions)
                clip[_rkey(r)] = {"real": real, "generated": gen}
                m = results["metrics"][_rkey(r)]
                m["real"]["clip_score"] = real
                for k, v in gen.items():
                    m["generated"][k]["clip_score"] = v
            self.timings["clip_score"] = round(time.time() - t0, 2)
        else:
            for r in self.radii:
                m = results["metrics"][_rkey(r)]
                m["real"]["clip_score"] = None
                for k in m["generated"]:
                    m["generated"][k]["clip_score"] = None
            results["clip_score_note"] = "not available: no scorer (sample.scorer)"
        results["overlap"] = self.overlap(draw, weights is not None)
        if results["overlap"] and results["overlap"].get("status") == "done":
            results["overlap"]["with"] = results["metrics"][_rkey(self.radii[0])]
        if _is_main():
            if weights is not None:
                results["plots"] = self.plots(results)
            else:
                results["plots_note"] = "skipped: FID and IS need the Inception weights"
            if clip:
                results["plots"]["clip_vs_rerank"] = self.clip_plot(clip)
            results["plots"]["samples"] = self.sample_grid(captions)
        self.timings["total"] = round(time.time() - t_start, 2)
        results["seconds"] = self.timings
        if _is_main():
            path = os.path.join(self.out, RESULTS_FILE)
            if os.path.exists(path):
                old = _read_json(path)
                if old.get("metric_settings") != json.loads(json.dumps(
                        results["metric_settings"], default=str)):
                    os.replace(path, os.path.join(
                        self.out, time.strftime("results.%Y%m%d-%H%M%S.json")))
            _write_json(path, results)
            _print_summary(results, path)
        return results


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _print_summary(results: dict[str, Any], path: str) -> None:
    skipped = dict(results["counts"]["skipped_images"])
    total = skipped.pop("total")
    lines = [f"eval_coco: {results['counts']['captions']} captions, "
             f"{results['counts']['generated_images']} images generated, "
             f"{total} COCO images skipped {skipped}"]
    for r, m in results["metrics"].items():
        for k, g in m["generated"].items():
            lines.append(f"  blur {r:>4} best of {k:>4}: FID {_fmt(g.get('fid'))}  IS "
                         f"{_fmt(g.get('is_mean'))} ± {_fmt(g.get('is_std'))}  CLIP "
                         f"{_fmt(g.get('clip_score'))}")
    if not results["inception"]["available"]:
        lines.append("  FID / IS not computed: " + str(results["inception"]["message"]))
    o = results.get("overlap")
    if o and o.get("status") == "done":
        lines.append(f"  overlap with training images: {o['flagged']} of "
                     f"{results['counts']['captions']} ({100 * o['fraction']:.1f}%) at cosine "
                     f">= {o['threshold']}")
    lines.append(f"  results: {path}")
    print("\n".join(lines))


def eval_coco(cfg, workdir: str) -> None:
    """The MS-COCO zero-shot evaluation job (`dalle_jax.evals.coco`): draws captions,
    samples and reranks, and reports FID / IS at several blur radii and reranking sizes,
    the CLIP score and optionally the training-set overlap, in
    ``workdir/eval_coco/results.json`` with plots next to it. Resumable."""
    _Evaluation(cfg, workdir).run()
