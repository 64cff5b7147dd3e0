"""The ``sample`` job: prompts in, ranked images, grids and a JSON report out.

Settings live in the config's ``sample`` section (each can be set on the command line,
e.g. ``--config.sample.num_candidates=64``):

* prompts: ``captions`` (a tuple) and/or ``prompts_file`` (one prompt per line, blank
  lines skipped). A prompt longer than the model's text slots is truncated, with a warning
  naming it.
* ``num_candidates`` N images are drawn per prompt (global sample ``i * N + j`` for
  candidate ``j`` of prompt ``i``, so an image depends only on its prompt, the seed and its
  index); ``keep`` of them are written (0: all N).
* ``rerank``: a contrastive scorer export (``--job=train_clip`` or ``--job=import_clip``),
  or the workdir of such a run (its newest export);
  candidates are then ordered by its score and the best ``keep`` kept, streamed in chunks
  of ``rerank_chunk`` candidates per prompt so that N = 512 runs in bounded memory.
  Without a scorer the first ``keep`` candidates are kept.
* ``guidance``: classifier-free guidance scale (1: off; needs a model trained with
  ``text.caption_dropout``). ``temperature``, ``top_k``, ``top_p`` filter each token.
* Image completion: ``complete_image`` (an image file) keeps the top ``keep_rows`` rows of
  its tokens (-1: the paper's 15 of 32 rows, scaled to the grid) and samples the rest for
  every prompt. An image of another size is resized and centre-cropped, with a note.

Output (``out_dir``, default ``WORKDIR/samples``): ``prompt_<i>/<rank>_sample<index>.png``
for each kept image, ``prompt_<i>/grid.png`` per prompt, ``grid.png`` (a row per prompt),
``tokens.npz`` and ``report.json`` (prompts, seed, each kept image's global sample index,
candidate index and score, the settings, and the identities of the transformer, dVAE and
scorer exports). A directory that already holds samples made with other settings is not
overwritten: the job stops and names the differing settings.

On `shapes` token data the report also holds the caption match of the first
``eval_captions`` captions of each split in ``eval_splits`` (`dalle_jax.evals.caption_match`):
best-of-1, best-of-``eval_rerank`` reranked by the scorer (candidates drawn with guidance
``eval_rerank_guidance``; 1: unguided), and guided at ``eval_guidance``.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import numpy as np
from absl import logging

PAPER_KEPT_ROWS = (15, 32)  # the paper's image completion keeps the top 15 of 32 rows


def read_prompts(s) -> list[str]:
    """The prompts of a ``sample`` config section: ``captions`` then ``prompts_file``."""
    prompts = [str(c) for c in s.captions]
    path = str(s.get("prompts_file", ""))
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sample.prompts_file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompts: sample.captions is empty and sample.prompts_file gives "
                         "none; give at least one caption")
    return prompts


def default_keep_rows(grid: int) -> int:
    """The paper keeps the top 15 of 32 token rows; the same share of ``grid`` rows."""
    kept, of = PAPER_KEPT_ROWS
    return max(1, round(kept * grid / of))


def load_completion_image(path: str, size: int) -> tuple[np.ndarray, str | None]:
    """``(uint8 (size, size, 3) image, note)``: the file, resized so its shorter side is
    ``size`` (bicubic) and centre-cropped when it is not already ``size`` x ``size``."""
    from dalle_jax.data import imageio
    from dalle_jax.evals import blur

    try:
        img = imageio.load_rgb(path).image
    except imageio.BadImage as e:
        raise ValueError(f"cannot use {path!r} for image completion: {e}") from e
    w, h = img.size
    note = None
    if (w, h) != (size, size):
        note = (f"{path}: {w}x{h} image resized and centre-cropped to {size}x{size} (the "
                "dVAE's input size)")
    return blur.resize_center_crop(img, size, "bicubic"), note


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


def _progress_bar(total: int, desc: str):
    """`logs.progress` as ``(update, close)``."""
    from dalle_jax import logs

    bar = logs.progress(total, desc)
    return bar.update, bar.close


def settings_of(cfg, prompts: list[str], export: str, dvae_dir: str) -> dict[str, Any]:
    s = cfg.sample
    out = dict(s.to_dict() if hasattr(s, "to_dict") else s, export=export, dvae=dvae_dir)
    out["captions"] = prompts
    out.pop("prompts_file", None)
    return json.loads(json.dumps(out, default=str))


def run(cfg, workdir: str) -> None:
    """The ``sample`` job (see the module doc)."""
    import jax

    from dalle_jax import checkpoint, exports, visualize
    from dalle_jax.data.tokens import read_meta
    from dalle_jax.jobs import _load_sampler, _sample_sources, _write_json, latest_export
    from dalle_jax.rerank import best_of as best_of_lib
    from dalle_jax.rerank import scorer as scorer_lib
    from dalle_jax.sample import sampler as sampler_lib

    s = cfg.sample
    prompts = read_prompts(s)
    n, seed, bs = int(s.num_candidates), int(s.seed), int(s.batch_size)
    if n < 1:
        raise ValueError(f"sample.num_candidates must be >= 1, got {n}")
    keep = int(s.get("keep", 0)) or n
    if not 1 <= keep <= n:
        raise ValueError(f"sample.keep must be in [0, num_candidates={n}] (0 keeps all), "
                         f"got {keep}")
    # Sampling settings are checked before anything is loaded or written.
    sampling = sampler_lib.SamplingConfig(
        temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
        guidance=float(s.get("guidance", 1.0)))
    rerank_path = str(s.get("rerank", ""))
    if rerank_path and not exports.is_export(rerank_path):
        # A scorer run's workdir: its newest export.
        rerank_path = latest_export(rerank_path) or rerank_path
    export, dvae_dir = _sample_sources(cfg, workdir)
    out_dir = str(s.get("out_dir", "")) or os.path.join(workdir, "samples")
    settings = settings_of(cfg, prompts, export, dvae_dir)
    report_path = os.path.join(out_dir, "report.json")
    if checkpoint.saved_with_settings(report_path, settings, what="samples made with",
                                      override="sample.out_dir") is not None:
        print(f"samples already written for these settings: {report_path}")
        return

    sampler = _load_sampler(cfg, workdir, export, dvae_dir)
    if sampler.sampling != sampling:
        sampler = sampler.with_sampling(sampling)
    scorer = None
    if rerank_path:
        scorer = scorer_lib.load_scorer(rerank_path, batch_size=bs)
    _, info = sampler.text_tokenizer.encode_batch_slots(prompts, text_len=sampler.config.text_len)
    for p, t in zip(prompts, np.asarray(info.get("truncated", np.zeros(len(prompts), bool)))):
        if t:
            logging.warning("prompt longer than the model's %d text slots, truncated: %r",
                            sampler.config.text_len, p)
            print(f"warning: prompt truncated to the model's {sampler.config.text_len} text "
                  f"slots: {p!r}")

    prefix, notes = None, []
    image = str(s.get("complete_image", ""))
    if image:
        size = sampler.image_tokenizer.config.image_size
        picture, note = load_completion_image(image, size)
        if note:
            notes.append(note)
            print("note: " + note)
        g = sampler.config.grid
        rows = int(s.get("keep_rows", -1))
        rows = default_keep_rows(g) if rows < 0 else rows
        if not 0 <= rows <= g:
            raise ValueError(f"sample.keep_rows must be in [0, {g}] (-1: the paper's share), "
                             f"got {rows}")
        toks = np.asarray(sampler.image_tokenizer.encode(picture[None])).reshape(1, -1)
        prefix = np.repeat(toks[:, :rows * g], len(prompts), axis=0)
        settings["keep_rows_used"] = rows

    t0 = time.time()
    update, close = _progress_bar(len(prompts) * n, "sampling")
    try:
        if scorer is not None:
            kept = best_of_lib.best_of(sampler, scorer, prompts, num_candidates=n, keep=keep,
                                       seed=seed, chunk=int(s.get("rerank_chunk", 64)),
                                       batch_size=bs, prefix=prefix, progress=update)
            tokens, images, scores = kept.tokens, kept.images, kept.scores
            cands, sample_index = kept.candidates, kept.sample_index
        else:
            tokens = sampler.tokens(prompts, num_candidates=n, seed=seed, batch_size=bs,
                                    prefix=prefix, progress=update)[:, :keep]
            images = sampler.images(tokens, batch_size=bs)
            scores = None
            cands = np.broadcast_to(np.arange(keep), (len(prompts), keep))
            sample_index = np.arange(len(prompts))[:, None] * n + cands
    finally:
        close()
    seconds = time.time() - t0

    token_meta = read_meta(str(cfg.data.tokens_dir))
    shapes_data = token_meta.get("source", {}).get("source") == "shapes"
    evaluation = {}
    if shapes_data and int(s.eval_captions) > 0:
        evaluation = _caption_match(cfg, sampler, scorer, seed, bs)
    if jax.process_index() != 0:
        return

    report: dict[str, Any] = {
        "settings": settings, "export": export, "seed": seed, "num_candidates": n,
        "keep": keep, "sampling": {"temperature": sampling.temperature,
                                   "top_k": sampling.top_k, "top_p": sampling.top_p,
                                   "guidance": sampling.guidance},
        "sources": dict(sampler.sources,
                        scorer=None if scorer is None else scorer.identity()),
        "sampling_seconds": round(seconds, 2), "notes": notes,
        "grid": os.path.join(out_dir, "grid.png"), "prompts": []}
    verdicts = None
    if shapes_data:
        from dalle_jax.evals import shapes_match

        verdicts = [[shapes_match.match(images[i, j], p) for j in range(keep)]
                    for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        pdir = os.path.join(out_dir, f"prompt_{i:03d}_{_slug(p)}")
        entries = []
        for j in range(keep):
            path = os.path.join(pdir, f"{j:02d}_sample{int(sample_index[i, j])}.png")
            visualize.save_grid(path, images[i, j:j + 1], None, ncols=1, scale=1)
            e = {"file": path, "rank": j, "sample_index": int(sample_index[i, j]),
                 "candidate": int(cands[i, j])}
            if scores is not None:
                e["score"] = float(scores[i, j])
            if verdicts is not None:
                e["matches_caption"] = verdicts[i][j].ok
                e["reason"] = verdicts[i][j].reason
            entries.append(e)
        labels = [(f"{e['score']:.3f}" if "score" in e else f"#{e['sample_index']}")
                  for e in entries]
        visualize.save_grid(os.path.join(pdir, "grid.png"), images[i], labels,
                            ncols=min(keep, 8), scale=2)
        report["prompts"].append({"prompt": p, "index": i, "grid": os.path.join(pdir, "grid.png"),
                                  "images": entries})
    labels = [(("ok " if verdicts[i][j].ok else "x ") if verdicts else "") + (p if j == 0 else "")
              for i, p in enumerate(prompts) for j in range(keep)]
    visualize.save_grid(report["grid"], images.reshape((-1,) + images.shape[2:]), labels,
                        ncols=keep, scale=2, caption_lines=2)
    np.savez(os.path.join(out_dir, "tokens.npz"), tokens=tokens, captions=np.asarray(prompts),
             sample_index=sample_index)
    if evaluation:
        report["caption_match"] = {}
        for split, (summary, eval_images, caps) in evaluation.items():
            summary["grid"] = os.path.join(out_dir, f"eval_{split}.png")
            visualize.save_grid(summary["grid"], eval_images[:32], caps[:32], ncols=8, scale=2,
                                caption_lines=2)
            report["caption_match"][split] = summary
            logging.info("caption match on %s: %s", split, json.dumps(summary, default=str))
    from dalle_jax import metrics as metrics_lib

    # The same grids in TensorBoard (when installed), at the transformer's training step.
    grids = {"samples/grid": report["grid"]}
    grids.update({f"samples/caption_match/{split}": summary["grid"]
                  for split, summary in report.get("caption_match", {}).items()})
    with metrics_lib.MetricWriter(out_dir) as writer:
        writer.write_images(int(sampler.sources["transformer"].get("step") or 0), grids)
    _write_json(report_path, report)
    print(f"{len(prompts)} prompts x {keep} of {n} candidates"
          + (", reranked" if scorer is not None else "")
          + f" in {seconds:.0f}s: {report['grid']}; report: {report_path}")
    if evaluation:
        from dalle_jax.evals import caption_match

        for split, summary in report["caption_match"].items():
            figures = ", ".join(f"{k} {100 * v:.1f}%" for k, v in
                                caption_match.headline(summary).items() if v is not None)
            print(f"caption match on {split}: {figures}")


def _caption_match(cfg, sampler, scorer, seed: int, bs: int) -> dict:
    """``split -> (summary, best-of-1 images, captions)`` of the shapes caption match.

    Single samples are drawn unguided whatever ``sample.guidance`` is; the guided entries
    follow ``eval_guidance`` and ``eval_rerank_guidance``."""
    import dataclasses

    from dalle_jax.evals import caption_match

    if sampler.sampling.guidance != 1.0:
        sampler = sampler.with_sampling(dataclasses.replace(sampler.sampling, guidance=1.0))
    s = cfg.sample
    rerank_n = int(s.get("eval_rerank", 0))
    if rerank_n and scorer is None:
        logging.warning("sample.eval_rerank=%d but no scorer (sample.rerank): the reranked "
                        "caption match is not measured", rerank_n)
    return caption_match.run_splits(
        sampler, str(cfg.data.tokens_dir), caption_match.split_names(s.eval_splits),
        captions=int(s.eval_captions), seed=seed, batch_size=bs, scorer=scorer,
        rerank_n=rerank_n, rerank_chunk=int(s.get("rerank_chunk", 64)),
        guidance=float(s.get("eval_guidance", 1.0)),
        rerank_guidance=float(s.get("eval_rerank_guidance", 1.0)), progress_bar=_progress_bar)
