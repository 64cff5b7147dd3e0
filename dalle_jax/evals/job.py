"""The ``evaluate`` job: the ``config.evals`` evaluators of one model, run on its export.

``--job=evaluate`` reads ``evaluate.params`` (an export directory, or a run directory
whose newest ``exports/step_N`` is taken; empty: WORKDIR's newest export) and runs every
``evals`` section that evaluates that kind of model (a dVAE export: ``recon``; a
transformer export: ``val_loss``, ``caption_match``, ``shapes_fid``; a scorer export,
trained or imported: ``clip``), or only the sections named in ``evaluate.only``. The ``every`` of a section plays no part here.

Outputs, in ``evaluate.out_dir`` (default ``WORKDIR/evaluate/step_N``): the evaluators'
pictures and JSON, ``metrics.jsonl`` (one row, ``eval/<metric>`` at the export's step)
and ``results.json`` (export, step, metrics, the sections run and their settings, and
the sections that could not run with the reason, e.g. a missing Inception weights file;
the others still run). A directory that already holds results of other settings is
never overwritten: the job stops and names the differing fields.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging

from dalle_jax.evals import caption_match, registry


def _run_dir(export: str) -> str:
    """The training run directory of ``run/exports/step_N`` (else the export's parent)."""
    parent = os.path.dirname(os.path.abspath(export))
    return os.path.dirname(parent) if os.path.basename(parent) == "exports" else parent


def _kind(meta: dict) -> str:
    return str(meta.get("identity", {}).get("kind") or meta.get("task") or "")


def _context(cfg, export: str, meta: dict, out_dir: str) -> tuple[registry.EvalContext, Any]:
    """``(context, params)`` of the export."""
    kind = _kind(meta)
    if kind == "dvae":
        import functools

        import jax

        from dalle_jax import exports, sharding
        from dalle_jax.tokenizers import dvae
        from dalle_jax.train import dvae_task

        # Placed as in training, on the config's mesh.
        mcfg = dvae_task.model_config(cfg)
        abstract = jax.eval_shape(functools.partial(dvae.init_variables, mcfg),
                                  jax.random.key(0))["params"]
        shardings = sharding.tree_shardings(abstract, sharding.make_mesh(cfg.mesh),
                                            sharding.get_rules(cfg.sharding_rules))
        # The run config's architecture must be the export's: a dVAE from another model
        # fails here with the differing fields named.
        config, params = exports.load_dvae(export, mcfg, sharding=shardings)
        return registry.EvalContext(cfg, out_dir, "dvae", model=dvae.DVAE(config)), params
    if kind == "transformer":
        from dalle_jax import sharding
        from dalle_jax.models import transformer
        from dalle_jax.sample import sampler as sampler_lib

        bpe = str(cfg.text.bpe_model) or os.path.join(_run_dir(export), "bpe.model")
        if not os.path.isfile(bpe):
            raise FileNotFoundError(f"the BPE model of {export!r} was not found at {bpe!r}; set "
                                    "--config.text.bpe_model")
        sampler = sampler_lib.Sampler.load(
            export, bpe, caption_match.dvae_export_for(cfg),
            dtype=str(cfg.precision.compute_dtype), mesh=sharding.make_mesh(cfg.mesh),
            rules=cfg.sharding_rules)
        ctx = registry.EvalContext(
            cfg, out_dir, "transformer", model=transformer.Transformer(sampler.config),
            text_tokenizer=sampler.text_tokenizer, image_tokenizer=sampler.image_tokenizer,
            sampler=sampler)
        return ctx, sampler.params
    if kind == "clip":
        from dalle_jax import sharding
        from dalle_jax.models import clip
        from dalle_jax.rerank import scorer as scorer_lib

        # The towers and tokenizer come from the export (its own config), the data and
        # evaluation settings from the run config.
        scorer = scorer_lib.ClipScorer.load(export, mesh=sharding.make_mesh(cfg.mesh),
                                            rules=cfg.sharding_rules)
        ctx = registry.EvalContext(cfg, out_dir, "scorer", model=clip.CLIP(scorer.config),
                                   text_tokenizer=scorer.tokenizer)
        return ctx, scorer.params
    raise ValueError(f"{export!r} is a {kind or 'unknown'!r} export; --job=evaluate takes a "
                     "dVAE, transformer or scorer export")


def _settings(cfg, export: str, names: list[str]) -> dict[str, Any]:
    evals = cfg.evals.to_dict() if hasattr(cfg.evals, "to_dict") else dict(cfg.evals)
    out = {"export": os.path.abspath(export), "evals": {n: evals[n] for n in names}}
    return json.loads(json.dumps(out, default=str))


def run(cfg, workdir: str) -> dict[str, Any]:
    """Runs the job (see the module doc); returns the results record."""
    import jax

    from dalle_jax import checkpoint, exports
    from dalle_jax import metrics as metrics_lib

    e = cfg.evaluate
    export = exports.resolve_export(str(e.params) or workdir, "the model to evaluate")
    meta = exports.read_meta(export)
    step = int(meta.get("step", 0) or 0)
    out_dir = str(e.out_dir) or os.path.join(workdir, "evaluate", f"step_{step:07d}")
    registry.check_sections(cfg)
    ctx, params = _context(cfg, export, meta, out_dir)
    ctx.progress = True
    suite = registry.build(cfg, ctx, only=str(e.only))
    if not len(suite):
        raise ValueError(f"the config has no enabled evals section for a {ctx.subject} "
                         f"(sections: {sorted(cfg.evals.keys())})")
    settings = _settings(cfg, export, suite.names())
    results_path = os.path.join(out_dir, "results.json")
    old = checkpoint.saved_with_settings(results_path, settings, what="results of",
                                         override="evaluate.out_dir")
    if old is not None:
        print(f"already evaluated with these settings: {results_path}")
        return old

    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for s in suite.scheduled:
        t0 = time.time()
        try:
            got = suite.run_one(s, params, step)
        except FileNotFoundError as err:
            # A missing file (e.g. Inception weights) stops that evaluator only.
            logging.warning("evals.%s not run: %s", s.name, err)
            print(f"evals.{s.name} not run: {err}")
            skipped[s.name] = str(err)
            continue
        seconds[s.name] = round(time.time() - t0, 2)
        metrics.update(got)
        print(f"evals.{s.name}: {len(got)} metrics in {seconds[s.name]:.1f}s")
    ctx.cache.clear()
    record = {"export": os.path.abspath(export), "kind": ctx.subject, "step": step,
              "metrics": metrics, "skipped": skipped, "seconds": seconds, "settings": settings}
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        metrics_lib.MetricWriter(out_dir).write(step, {f"eval/{k}": v for k, v in metrics.items()})
        with open(results_path + ".tmp", "w") as f:
            json.dump(record, f, indent=2, sort_keys=True, default=str)
        os.replace(results_path + ".tmp", results_path)
        width = max((len(k) for k in metrics), default=10)
        print(f"evaluation of {export} (step {step}):")
        for k in sorted(metrics):
            print(f"  {k:<{width}}  {metrics[k]:.4f}")
        print(f"results: {results_path}")
    return record
