"""The jobs the command line can run, each a function ``(config, workdir) -> None``.

Jobs import their stage lazily so that ``--help`` and a data-only job never pay for
building models.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from absl import logging


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def prepare(cfg, workdir: str) -> None:
    """Builds the dataset named by ``cfg.data`` (skipped when already prepared).

    Only process 0 writes; the others wait at a barrier, so a shared data_dir is never
    written twice.
    """
    import jax
    from jax.experimental import multihost_utils

    from dalle_jax.data import sources

    if jax.process_index() == 0:
        t0 = time.time()
        report = sources.prepare(cfg.data)
        report["seconds"] = round(time.time() - t0, 2)
        path = os.path.join(workdir, "prepare_report.json")
        _write_json(path, report)
        logging.info("prepared: %s", json.dumps(report, default=str))
        splits = report.get("splits", {})
        counts = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                           for k, v in sorted(splits.items()))
        print(f"dataset {report.get('dataset', '?')}: {counts or 'no splits'} "
              f"({report['seconds']:.0f}s); report: {path}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare")


def preview(cfg, workdir: str) -> None:
    """Runs the input pipeline for a few batches: throughput, global sharding and a PNG grid."""
    import jax
    import numpy as np

    from dalle_jax import sharding, visualize
    from dalle_jax.data import pipeline, sources

    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.get_rules(cfg.sharding_rules)
    logging.info("mesh: %s", sharding.describe(mesh))
    it = sources.make_input(cfg.data, cfg.data.train_split, train=True)
    first = next(it)
    t0 = time.time()
    n = 0
    for _ in range(int(cfg.preview.num_batches)):
        batch = next(it)
        n += len(batch["image"])
    seconds = time.time() - t0
    spec = sharding.batch_spec(mesh, rules, first["image"].ndim)
    global_batch = pipeline.to_global({"image": first["image"]}, jax.sharding.NamedSharding(mesh, spec))
    stats = {
        "examples_per_second_per_process": round(n / max(seconds, 1e-9), 1),
        "global_image_batch": list(global_batch["image"].shape),
        "batch_sharding": str(global_batch["image"].sharding.spec),
        "mesh": sharding.describe(mesh),
        "first_captions": [str(c) for c in first["caption"][:8]],
    }
    if jax.process_index() == 0:
        k = min(int(cfg.preview.grid_examples), len(first["image"]))
        path = visualize.save_grid(os.path.join(workdir, "preview", "train_batch.png"),
                                   np.asarray(first["image"][:k]), list(first["caption"][:k]),
                                   ncols=8, scale=2 if cfg.data.image_size <= 64 else 1)
        stats["grid"] = path
        _write_json(os.path.join(workdir, "preview", "stats.json"), stats)
        logging.info("preview: %s", json.dumps(stats))
        print(f"input pipeline: {stats['examples_per_second_per_process']:,} examples/s per "
              f"process, global batch {stats['global_image_batch']} sharded "
              f"{stats['batch_sharding']}; grid: {path}")


def latest_export(workdir: str) -> str | None:
    """The newest ``workdir/exports/step_N`` directory, or None (`exports.latest_export`)."""
    from dalle_jax import exports

    return exports.latest_export(workdir)


def _train_then_export(cfg, workdir: str, what: str, run_training: Callable,
                       export: Callable) -> None:
    """Shared by both stages: train to ``cfg.total_steps``, then export the (EMA) params.

    Skipped when ``workdir/exports/step_N`` (N = total_steps) already exists, so rerunning
    costs nothing; a run stopped early (preemption) resumes later and exports nothing yet.
    ``run_training()`` returns the final train state; ``export(dir, params, step, ema)``
    writes the export.
    """
    import jax

    total = int(cfg.total_steps)
    export_dir = os.path.join(workdir, "exports", f"step_{total:07d}")
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        logging.info("%s already trained to step %d (%s); skipping", what, total, export_dir)
        print(f"{what} already trained: {export_dir}")
        return
    state = run_training()
    step = int(jax.device_get(state.step))
    if step < total:
        return
    ema = float(cfg.optim.ema_decay) > 0
    export(export_dir, state.ema_params if ema else state.params, step, ema)
    print(f"{what} exported to {export_dir}")


def train_dvae(cfg, workdir: str) -> None:
    """Trains the dVAE (stage 1), then exports its EMA params to ``workdir/exports/step_N``.

    A run whose last checkpoint already reached ``total_steps`` and has an export is
    skipped, so rerunning the demo costs nothing.
    """
    from dalle_jax import exports
    from dalle_jax.data import sources
    from dalle_jax.train import dvae_task, loop

    def run_training():
        task = dvae_task.make_task(cfg, workdir)
        return loop.train(cfg, workdir, task,
                          lambda: sources.make_input(cfg.data, cfg.data.train_split, train=True))

    def export(export_dir, params, step, ema):
        exports.save_dvae(export_dir, dvae_task.model_config(cfg), params, step=step,
                          source="trained", ema=ema)

    _train_then_export(cfg, workdir, "dVAE", run_training, export)


def encode(cfg, workdir: str) -> None:
    """Pre-encodes the config's dataset with a dVAE export into token shards for stage 2.

    The dVAE is ``cfg.encode.params`` if set, else the newest export in the workdir.
    Output: ``cfg.encode.out_dir`` or ``workdir/tokens``; finished shards are skipped.
    """
    from dalle_jax import configlib
    from dalle_jax.tokenizers import pre_encode
    from dalle_jax.tokenizers.image_tokenizer import ImageTokenizer

    params_dir = cfg.encode.params or latest_export(workdir)
    if not params_dir:
        raise FileNotFoundError(f"no dVAE export in {workdir}/exports and encode.params is empty: "
                                "train the dVAE first (--job=train_dvae) or set --config.encode.params")
    tokenizer = ImageTokenizer.load(params_dir)
    out_dir = cfg.encode.out_dir or os.path.join(workdir, "tokens")
    splits = configlib.comma_list(cfg.encode.splits)
    report = pre_encode.encode_dataset(cfg.data, tokenizer, out_dir, splits=splits,
                                       shard_size=int(cfg.encode.shard_size),
                                       batch_size=int(cfg.encode.batch_size), dvae_dir=params_dir)
    done = ", ".join(f"{k} {v['examples']:,}" for k, v in sorted(report["splits"].items()))
    print(f"image tokens of {done} examples in {out_dir} ({report['seconds']:.0f}s)")


def import_openai_dvae(cfg, workdir: str) -> None:
    """Converts OpenAI's released ``encoder.pkl``/``decoder.pkl`` into ``workdir/exports/openai``.

    Paths come from ``cfg.openai.encoder_pkl`` / ``cfg.openai.decoder_pkl`` (local files).
    """
    from dalle_jax.tokenizers import openai_import

    if "openai" not in cfg or not cfg.openai.encoder_pkl or not cfg.openai.decoder_pkl:
        raise ValueError("set --config.openai.encoder_pkl=... and --config.openai.decoder_pkl=... "
                         "(configs/dvae_paper.py has these fields)")
    out = os.path.join(workdir, "exports", "openai")
    config = openai_import.main(cfg.openai.encoder_pkl, cfg.openai.decoder_pkl, out,
                                image_size=int(cfg.model.image_size))
    print(f"OpenAI dVAE ({config}) written to {out}")


def train_clip(cfg, workdir: str) -> None:
    """Trains the contrastive image/text scorer used for reranking on the config's image
    dataset, then exports it to ``workdir/exports/step_N`` with its tokenizer file
    (`dalle_jax.train.clip_task`)."""
    from dalle_jax.train import clip_task

    clip_task.train_clip(cfg, workdir)


def import_clip(cfg, workdir: str) -> None:
    """Converts OpenAI CLIP weights and its BPE vocabulary (local files named by
    ``cfg.openai_clip``) into a scorer export at ``workdir/exports/openai_clip``."""
    from dalle_jax.rerank import openai_clip

    c = cfg.get("openai_clip")
    if c is None or not c.checkpoint or not c.vocab:
        raise ValueError("set the OpenAI CLIP files: --config=configs/clip_openai.py:"
                         "checkpoint=PATH/ViT-B-32.pt,vocab=PATH/bpe_simple_vocab_16e6.txt.gz")
    for what, path in (("checkpoint", c.checkpoint), ("vocab", c.vocab)):
        if not os.path.isfile(str(path)):
            raise FileNotFoundError(f"OpenAI CLIP {what} file {str(path)!r} does not exist "
                                    "(nothing is downloaded: give a local file)")
    out = os.path.join(workdir, "exports", "openai_clip")
    openai_clip.import_clip(str(c.checkpoint), str(c.vocab), out)
    print(f"OpenAI CLIP written to {out}")


def _bpe_path(cfg, workdir: str) -> str:
    """``cfg.text.bpe_model`` if set, else ``workdir/bpe.model``."""
    return str(cfg.text.bpe_model) or os.path.join(workdir, "bpe.model")


def train_bpe(cfg, workdir: str) -> None:
    """Trains the caption BPE model on the token directory's train captions (paper §2.2).

    Writes ``cfg.text.bpe_model`` or ``workdir/bpe.model``; skipped when the file exists.
    A small corpus may support fewer pieces than ``text.vocab_size``; the smaller model
    is then kept (the transformer's text vocabulary is read from the model file).
    """
    import jax
    from jax.experimental import multihost_utils

    from dalle_jax.data.tokens import TokenSource
    from dalle_jax.tokenizers import bpe

    path = _bpe_path(cfg, workdir)
    if os.path.exists(path):
        logging.info("BPE model %s exists; skipping", path)
        print(f"BPE model already trained: {path}")
    elif jax.process_index() == 0:
        source = TokenSource(str(cfg.data.tokens_dir), str(cfg.data.train_split))
        bpe.train_bpe_from_source(source, path, vocab_size=int(cfg.text.vocab_size),
                                  strict_vocab_size=False, seed=int(cfg.seed))
        print(f"BPE model ({bpe.TextTokenizer(path).vocab_size} pieces) written to {path}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train_bpe")


def train_transformer(cfg, workdir: str) -> None:
    """Trains the transformer (stage 2) on pre-encoded tokens, then exports its EMA params.

    Reads tokens from ``cfg.data.tokens_dir`` and the BPE model from ``cfg.text.bpe_model``
    or ``workdir/bpe.model`` (``--job=train_bpe`` makes it). The export goes to
    ``workdir/exports/step_N``; a run already exported at ``total_steps`` is skipped.
    """
    from dalle_jax import exports
    from dalle_jax.data import text_pipeline
    from dalle_jax.tokenizers import bpe
    from dalle_jax.train import transformer_task, loop

    task = None

    def run_training():
        nonlocal task
        path = _bpe_path(cfg, workdir)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no BPE model at {path!r}: run --job=train_bpe first or "
                                    "set --config.text.bpe_model")
        tokenizer = bpe.TextTokenizer(path)
        task = transformer_task.make_task(cfg, workdir, tokenizer)
        return loop.train(cfg, workdir, task, lambda: text_pipeline.make_input(
            cfg.data, cfg.text, tokenizer, cfg.data.train_split, train=True))

    def export(export_dir, params, step, ema):
        exports.write_trained(export_dir, params, identity=task.identity, task=task.name,
                              step=step, ema=ema)

    _train_then_export(cfg, workdir, "transformer", run_training, export)


def _sample_sources(cfg, workdir: str) -> tuple[str, str]:
    """``(transformer export, dVAE export)`` of ``cfg.sample``: ``sample.params`` or the
    newest ``workdir/exports/step_N``, and ``sample.dvae_params`` or the newest export of
    the dVAE run whose ``tokens`` directory the model read."""
    s = cfg.sample
    export = str(s.params) or latest_export(workdir)
    if not export:
        raise FileNotFoundError(f"no transformer export in {workdir}/exports and sample.params "
                                "is empty: train it first (--job=train_transformer)")
    dvae_dir = str(s.dvae_params) or latest_export(
        os.path.dirname(os.path.abspath(str(cfg.data.tokens_dir))))
    if not dvae_dir:
        raise FileNotFoundError(
            f"no dVAE export next to the token directory {cfg.data.tokens_dir!r}; set "
            "--config.sample.dvae_params")
    return export, dvae_dir


def _load_sampler(cfg, workdir: str, export: str, dvae_dir: str):
    """The `Sampler` of ``cfg.sample`` over the two exports and the run's BPE model."""
    from dalle_jax.sample import sampler as sampler_lib

    s = cfg.sample
    sampling = sampler_lib.SamplingConfig(temperature=float(s.temperature), top_k=int(s.top_k),
                                          top_p=float(s.top_p),
                                          guidance=float(s.get("guidance", 1.0)))
    logging.info("sampling from %s with dVAE %s", export, dvae_dir)
    from dalle_jax import sharding

    return sampler_lib.Sampler.load(export, _bpe_path(cfg, workdir), dvae_dir, sampling=sampling,
                                    dtype=str(cfg.precision.compute_dtype),
                                    mesh=sharding.make_mesh(cfg.mesh), rules=cfg.sharding_rules)


def sample(cfg, workdir: str) -> None:
    """Samples images for prompts: N candidates each, optionally guided and reranked by a
    contrastive scorer, written as PNGs, grids and a JSON report
    (`dalle_jax.sample.job`, which documents every ``sample.*`` setting).

    Sampling runs on the config's mesh with its sharding rules: the transformer is
    restored straight into its training shardings and the candidates are split over the
    batch axes, with every process of a multi-host job taking part; process 0 writes.
    """
    from dalle_jax.sample import job

    job.run(cfg, workdir)


def export(cfg, workdir: str) -> None:
    """Writes a params-only export in ``export.dtype`` (e.g. bfloat16: half the bytes to
    download into Colab and to hold while sampling) from ``export.source``: a params export
    or a training checkpoint (``.../checkpoints`` or ``.../checkpoints/<step>``, its EMA
    params when the run kept them); "" takes the newest ``WORKDIR/exports/step_N``.
    The new export goes to ``export.out`` ("" = the source's path + ``_<dtype>``) and keeps
    the source's identity, so it loads wherever the source did. Nothing is overwritten.
    """
    import jax

    from dalle_jax import exports

    e = cfg.export
    source = str(e.source) or latest_export(workdir)
    if not source:
        raise FileNotFoundError(f"nothing to export: no {workdir}/exports/step_N and "
                                "export.source is empty (a params export or a checkpoint)")
    dtype = str(e.dtype)
    out = str(e.out) or os.path.abspath(source).rstrip("/") + f"_{dtype}"
    if os.path.isdir(out) and os.listdir(out):
        meta = exports.read_meta(out) if exports.is_export(out) else {}
        if meta.get("export_dtype") == dtype and meta.get("converted_from") == \
                os.path.abspath(source):
            print(f"already exported: {out}")
            return
        raise FileExistsError(f"export.out {out!r} exists and holds something else; "
                              "choose another path")
    exports.convert(source, out, dtype)
    if jax.process_index() == 0:
        print(f"{dtype} export of {source} written to {out}")


def eval_coco(cfg, workdir: str) -> None:
    """The MS-COCO zero-shot evaluation (paper §3.1): FID, IS and CLIP score of reranked
    samples for validation captions, under Gaussian blur and against the reranking size
    (`dalle_jax.evals.coco`, which documents its settings and outputs)."""
    from dalle_jax.evals import coco

    coco.eval_coco(cfg, workdir)


def evaluate(cfg, workdir: str) -> None:
    """Runs the config's ``evals`` evaluators on an export (`dalle_jax.evals.job`)."""
    from dalle_jax.evals import job

    job.run(cfg, workdir)


def plan(cfg, workdir: str) -> None:
    """Prints what one device holds to train this config on its mesh, and whether it fits.

    ``plan.num_devices`` (0: the devices present) resolves the mesh; the devices need not
    exist. ``plan.device_memory_gib`` is one device's memory. Prints the per-device table
    (`dalle_jax.plan.Plan.format`) and, for each remat policy, the largest per-device
    microbatch that fits; writes both to ``workdir/plan.json``. Exits with status 1 when
    the config as given does not fit. For a stage-2 config it also prints what one device
    needs to sample ``sample.batch_size`` sequences per call on the same mesh
    (`dalle_jax.plan.sampling_plan`), with a float32 and a bfloat16 export.
    """
    import jax

    from dalle_jax import plan as plan_lib

    n = int(cfg.plan.num_devices) or jax.device_count()
    memory, margin = float(cfg.plan.device_memory_gib), float(cfg.plan.margin)
    p = plan_lib.plan_config(cfg, n, memory, workdir=workdir, margin=margin)
    print(p.format())
    options = plan_lib.settings_that_fit(cfg, n, memory, workdir=workdir, margin=margin)
    print(f"\nlargest per-device microbatch that fits in {memory:g} GiB (x{margin:g}):")
    for o in options:
        if o["fits"]:
            print(f"  remat={o['remat']:<5} microbatch {o['microbatch']} per device "
                  f"(batch {o['batch_per_step']} per step, grad_accum "
                  f"{o['grad_accum_for_same_batch']} for the same batch per update): "
                  f"{o['total_gib']:.2f} GiB")
        else:
            print(f"  remat={o['remat']:<5} does not fit even at 1 example per device")
    out = {"plan": p.to_dict(), "fit": options}
    if "width" in cfg.model and "sample" in cfg:
        # Sampling an export of this model on the same mesh (the sample job's layout).
        sp = plan_lib.sampling_plan_config(cfg, n, memory, workdir=workdir, margin=margin)
        bf16 = plan_lib.sampling_plan_config(cfg, n, memory, workdir=workdir, margin=margin,
                                             param_dtype="bfloat16")
        print("\n" + sp.format())
        print(f"with a bfloat16 export: {bf16.total_bytes / plan_lib.GiB:.3f} GiB per device")
        out["sampling"] = sp.to_dict()
        out["sampling_bfloat16_export"] = bf16.to_dict()
    if jax.process_index() == 0:
        _write_json(os.path.join(workdir, "plan.json"), out)
    if not p.fits:
        raise SystemExit(1)


def _renamed(old: str, new: str) -> Callable:
    """An old job name that still runs the job ``new``, after a note with the new name."""

    def run(cfg, workdir: str) -> None:
        from dalle_jax import logs

        logs.note("--job=%s is now called --job=%s; running that", old, new)
        JOBS[new](cfg, workdir)

    run.__doc__ = f"The old name of ``{new}``."
    return run


JOBS: dict[str, Callable] = {
    "encode": encode,
    "eval_coco": eval_coco,
    "evaluate": evaluate,
    "export": export,
    "import_clip": import_clip,
    "import_openai_dvae": import_openai_dvae,
    "plan": plan,
    "prepare": prepare,
    "preview": preview,
    "sample": sample,
    "train": _renamed("train", "train_transformer"),
    "train_bpe": train_bpe,
    "train_clip": train_clip,
    "train_dvae": train_dvae,
    "train_transformer": train_transformer,
}
