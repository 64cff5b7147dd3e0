"""The evaluator registry (`dalle_jax.evals.registry`), its evaluators in training, and the
``evaluate`` job on dVAE and transformer exports."""

import json
import os

import ml_collections as mlc
import numpy as np
import pytest

from dalle_jax import configlib, jobs
from dalle_jax import metrics as metrics_lib
from dalle_jax.data import shapes, tokens
from dalle_jax.evals import fid, registry
from dalle_jax.train import loop

from inception_test import tfi, torch_release  # noqa: F401  (fixtures)
from train_transformer_test import (  # noqa: F401  (fixtures)
    _cfg, dvae_export, shapes_token_dir, token_dir, tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- registry

CALLS: list[tuple[str, int]] = []


@registry.register("test_counter", subject="transformer")
class _Counter(registry.Evaluator):
    def __call__(self, params, step):
        CALLS.append((self.name, step))
        return {f"{self.name}/value": float(step) * self.setting("scale", 1.0)}


@registry.register("test_dvae_counter", subject="dvae")
class _DvaeCounter(_Counter):
    pass


def _ctx(subject="transformer"):
    return registry.EvalContext(cfg=None, out_dir="/nonexistent", subject=subject)


def _registry_cfg(**sections):
    return mlc.ConfigDict(dict(eval_every=4, total_steps=10, evals=sections))


def test_unknown_evaluator_type_names_the_registered_ones():
    cfg = _registry_cfg(bad=dict(type="no_such_metric"))
    with pytest.raises(ValueError, match="unknown evaluator type 'no_such_metric'.*caption_match"):
        registry.build(cfg, _ctx())
    with pytest.raises(ValueError, match="no_such_metric"):
        registry.check_sections(cfg)
    # Every built-in evaluator is registered under the name the configs use.
    assert {"recon", "val_loss", "caption_match", "shapes_fid"} <= set(registry.types())


def test_each_evaluator_keeps_its_own_schedule_in_the_loop():
    cfg = _registry_cfg(a=dict(type="test_counter", every=3),
                        b=dict(type="test_counter", scale=10.0),  # eval_every: 4
                        c=dict(type="test_counter", every=0),  # evaluate job only
                        d=dict(type="test_dvae_counter", every=1))  # another subject
    suite = registry.build(cfg, _ctx())
    assert suite.names() == ["a", "b", "c"]
    CALLS.clear()
    ran = {}
    for step in range(1, 11):
        if loop._eval_due(suite, 0, step, 10):
            ran[step] = suite(None, step)
    assert CALLS == [("a", 3), ("b", 4), ("a", 6), ("b", 8), ("a", 9), ("a", 10), ("b", 10)]
    assert sorted(ran) == [3, 4, 6, 8, 9, 10]
    assert ran[4]["b/value"] == 40.0 and "a/value" not in ran[4]
    assert set(ran[10]) == {"a/value", "b/value", "a/seconds", "b/seconds"}
    # A plain callable keeps the loop's eval_every.
    assert [s for s in range(1, 11) if loop._eval_due(lambda p, s: {}, 4, s, 10)] == [4, 8, 10]
    # The evaluate job runs everything, schedules aside.
    CALLS.clear()
    suite(None, 7, everything=True)
    assert CALLS == [("a", 7), ("b", 7), ("c", 7)]


def test_build_by_name_and_subject_and_metric_clashes():
    cfg = _registry_cfg(a=dict(type="test_counter"), b=dict(type="test_counter"),
                        d=dict(type="test_dvae_counter"))
    assert registry.build(cfg, _ctx(), only="b").names() == ["b"]
    assert registry.build(cfg, _ctx("dvae")).names() == ["d"]
    with pytest.raises(ValueError, match="evals.d .*evaluates a dvae, not the transformer"):
        registry.build(cfg, _ctx(), only="a,d")
    with pytest.raises(ValueError, match=r"no evals section named \['zz'\]"):
        registry.build(cfg, _ctx(), only="zz")
    with pytest.raises(ValueError, match="every must be >= 0"):
        registry.build(_registry_cfg(a=dict(type="test_counter", every=-1)), _ctx())

    @registry.register("test_clash", subject="transformer")
    class _Clash(registry.Evaluator):
        def __call__(self, params, step):
            return {"a/value": 0.0}

    suite = registry.build(_registry_cfg(a=dict(type="test_counter"), z=dict(type="test_clash")),
                           _ctx())
    with pytest.raises(ValueError, match="'z' reports metrics already reported.*a/value"):
        suite(None, 4)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("test_clash", subject="transformer")(type("Other", (), {}))


def test_every_config_names_registered_evaluators():
    for name in ("dvae_shapes", "dvae_paper", "transformer_shapes", "transformer_paper"):
        cfg = configlib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
        registry.check_sections(cfg)
        assert "evaluate" in cfg


# ----------------------------------------------------------------------------- stage 2


@pytest.fixture(scope="module")
def trained(shapes_token_dir, tokenizer, dvae_export, tmp_path_factory):  # noqa: F811
    """A 2-step transformer run whose training also ran the caption match (every=2)."""
    from notebook_test import _tiny_scorer_export

    root = tmp_path_factory.mktemp("evals")
    scorer = _tiny_scorer_export(str(root / "scorer"), tokenizer.path)
    cfg = _cfg(shapes_token_dir, tokenizer)
    cfg.sample.dvae_params = dvae_export
    cfg.evals.caption_match.update(every=2, captions=4, splits="validation", batch_size=4,
                                   rerank=0, guidance=1.0, grid_examples=4)
    workdir = str(root / "run")
    jobs.train_transformer(cfg, workdir)
    return cfg, workdir, scorer


def test_training_runs_the_caption_match_evaluator(trained):
    cfg, workdir, _ = trained
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    ev = rows[2]
    with open(os.path.join(workdir, "eval", "caption_match_0000002.json")) as f:
        summary = json.load(f)["validation"]
    # The logged fraction is the one in the JSON, and it is matched / count of 4 captions.
    best = summary["best_of_1"]
    assert best["count"] == 4
    assert ev["eval/caption_match/validation/best_of_1"] == pytest.approx(best["matched"] / 4)
    assert ev["eval/caption_match/validation/dvae_reconstruction"] == pytest.approx(
        summary["dvae_reconstruction"]["matched"] / 4)
    assert "eval/caption_match/validation/reranked" not in ev  # rerank=0
    assert "eval/loss" in ev  # the validation loss ran at the same step
    assert os.path.isfile(os.path.join(workdir, "eval", "caption_match_validation_0000002.png"))


def _evaluate_cfg(cfg, workdir, scorer, **fid_kw):
    cfg = mlc.ConfigDict(cfg.to_dict())
    cfg.evals.caption_match.update(every=0, rerank=2, scorer=scorer, guidance=2.0,
                                   rerank_guidance=2.0)
    cfg.evals.fid.update(num_images=8, batch_size=4, scorer=scorer, **fid_kw)
    cfg.evaluate.params = workdir
    return cfg


def test_evaluate_job_on_a_transformer_export(trained, tmp_path, monkeypatch):
    from dalle_jax.rerank import scorer as scorer_lib

    cfg, workdir, scorer = trained
    monkeypatch.delenv("DALLE_JAX_INCEPTION_WEIGHTS", raising=False)
    ecfg = _evaluate_cfg(cfg, workdir, scorer)
    out = str(tmp_path / "eval")
    record = jobs.JOBS["evaluate"](ecfg, out) or json.load(
        open(os.path.join(out, "evaluate", "step_0000002", "results.json")))
    m = record["metrics"]
    for key in ("loss", "caption_match/validation/best_of_1", "caption_match/validation/reranked",
                "caption_match/validation/guided", "shapes_fid/validation/scorer_features",
                "shapes_fid/validation/dvae_reconstruction/scorer_features"):
        assert key in m, key
    assert record["step"] == 2 and record["kind"] == "transformer" and not record["skipped"]
    # The FID is the Fréchet distance of the scorer's features of the dataset's own
    # renders of the validation examples and of the dVAE's decodings of their tokens.
    d = os.path.join(out, "evaluate", "step_0000002")
    s = scorer_lib.load_scorer(scorer)
    real = np.stack([shapes.example("validation", i, 16)["image"] for i in range(8)])
    src = tokens.TokenSource(cfg.data.tokens_dir, "validation")
    from dalle_jax.sample import sampler as sampler_lib

    samp = sampler_lib.Sampler.load(
        os.path.join(workdir, "exports", "step_0000002"), cfg.text.bpe_model,
        cfg.sample.dvae_params)
    recon = samp.images(np.stack([src[i]["image_tokens"] for i in range(8)]).reshape(8, 2, 2))
    want = fid.fid_from_features(np.asarray(s.embed_images(real), np.float64),
                                 np.asarray(s.embed_images(recon), np.float64))
    got = m["shapes_fid/validation/dvae_reconstruction/scorer_features"]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert got >= 0
    rows = metrics_lib.read_jsonl(os.path.join(d, "metrics.jsonl"))
    assert rows[2]["eval/caption_match/validation/guided"] == m["caption_match/validation/guided"]
    assert os.path.isfile(os.path.join(d, "caption_match_validation_0000002.png"))
    with open(os.path.join(d, "caption_match_0000002.json")) as f:
        assert json.load(f)["validation"]["reranked"]["guidance"] == 2.0  # rerank_guidance
    # Run again with the same settings: nothing is redone or rewritten.
    mtime = os.path.getmtime(os.path.join(d, "results.json"))
    jobs.JOBS["evaluate"](ecfg, out)
    assert os.path.getmtime(os.path.join(d, "results.json")) == mtime
    # Other settings never overwrite those results.
    other = _evaluate_cfg(cfg, workdir, scorer)
    other.evals.caption_match.captions = 3
    with pytest.raises(FileExistsError, match="other settings.*captions"):
        jobs.JOBS["evaluate"](other, out)
    assert os.path.getmtime(os.path.join(d, "results.json")) == mtime


def test_evaluate_job_without_inception_weights_runs_the_rest(trained, tmp_path, monkeypatch):
    cfg, workdir, scorer = trained
    monkeypatch.delenv("DALLE_JAX_INCEPTION_WEIGHTS", raising=False)
    ecfg = _evaluate_cfg(cfg, workdir, scorer, features="inception")
    ecfg.evaluate.only = "fid,val"
    out = str(tmp_path / "eval")
    jobs.JOBS["evaluate"](ecfg, out)
    with open(os.path.join(out, "evaluate", "step_0000002", "results.json")) as f:
        record = json.load(f)
    assert "pt_inception-2015-12-05" in record["skipped"]["fid"]
    assert "DALLE_JAX_INCEPTION_WEIGHTS" in record["skipped"]["fid"]
    assert "loss" in record["metrics"]
    assert not any(k.startswith("caption_match") for k in record["metrics"])  # not in `only`


@pytest.mark.slow  # Inception-v3 at 299 pixels on CPU: minutes
def test_shapes_fid_with_inception_weights(trained, torch_release, tmp_path):  # noqa: F811
    from dalle_jax.evals import inception as inc

    cfg, workdir, scorer = trained
    _, weights = torch_release  # torch-fidelity's Inception with random weights, as a .pth
    ecfg = _evaluate_cfg(cfg, workdir, scorer, features="auto", inception_weights=weights)
    ecfg.evaluate.only = "fid"
    out = str(tmp_path / "eval")
    jobs.JOBS["evaluate"](ecfg, out)
    with open(os.path.join(out, "evaluate", "step_0000002", "results.json")) as f:
        m = json.load(f)["metrics"]
    assert set(m) == {"shapes_fid/validation/inception",
                      "shapes_fid/validation/dvae_reconstruction/inception"}
    # The same Fréchet distance from the 2048-d pool features of the two image sets.
    apply_fn, variables = inc.load_inception(weights)
    src = tokens.TokenSource(cfg.data.tokens_dir, "validation")
    from dalle_jax.sample import sampler as sampler_lib

    samp = sampler_lib.Sampler.load(
        os.path.join(workdir, "exports", "step_0000002"), cfg.text.bpe_model,
        cfg.sample.dvae_params)
    recon = samp.images(np.stack([src[i]["image_tokens"] for i in range(8)]).reshape(8, 2, 2))
    real = np.stack([shapes.example("validation", i, 16)["image"] for i in range(8)])
    f_real, f_recon = (inc.extract_features(apply_fn, variables, x, 4)["pool"]
                       for x in (real, recon))
    assert f_real.shape == (8, 2048)
    want = fid.fid_from_features(np.asarray(f_real, np.float64), np.asarray(f_recon, np.float64))
    assert m["shapes_fid/validation/dvae_reconstruction/inception"] == pytest.approx(want,
                                                                                    rel=1e-5)


def test_evaluate_job_refuses_what_it_cannot_evaluate(trained, tmp_path):
    cfg, workdir, scorer = trained
    ecfg = _evaluate_cfg(cfg, workdir, scorer)
    ecfg.evaluate.params = scorer  # a scorer export, and no evals section evaluates one
    with pytest.raises(ValueError, match="no enabled evals section for a scorer"):
        jobs.JOBS["evaluate"](ecfg, str(tmp_path / "a"))
    ecfg.evaluate.params = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither an export"):
        jobs.JOBS["evaluate"](ecfg, str(tmp_path / "b"))


# ----------------------------------------------------------------------------- stage 1


def test_evaluate_job_on_a_dvae_export_repeats_the_training_evaluation(tmp_path):
    from train_dvae_test import _cfg as _dvae_cfg

    from dalle_jax.data import sources

    cfg = _dvae_cfg(str(tmp_path / "data"))
    sources.prepare(cfg.data)
    run = str(tmp_path / "dvae")
    jobs.train_dvae(cfg, run)
    trained = metrics_lib.read_jsonl(os.path.join(run, "metrics.jsonl"))[4]
    cfg.evaluate.params = run
    out = str(tmp_path / "eval")
    jobs.JOBS["evaluate"](cfg, out)
    d = os.path.join(out, "evaluate", "step_0000004")
    with open(os.path.join(d, "results.json")) as f:
        record = json.load(f)
    # The export holds the EMA parameters the loop evaluated at its last step, and the
    # evaluation is deterministic: the same figures.
    assert record["kind"] == "dvae" and record["step"] == 4
    for k in ("psnr", "mse", "elb_bpd", "codebook_usage"):
        assert record["metrics"][k] == pytest.approx(trained[f"eval/{k}"], rel=1e-6), k
    assert os.path.isfile(os.path.join(d, "recon_0000004.png"))
    # A config of another architecture is refused, naming the field.
    cfg.model.n_hid = 16
    with pytest.raises(ValueError, match="n_hid"):
        jobs.JOBS["evaluate"](cfg, str(tmp_path / "other"))


def test_benchmark_table_has_a_column_per_seed_and_their_mean(tmp_path):
    from dalle_jax.evals import benchmark

    dvae = {"metrics": {"psnr": 27.0, "codebook_usage": 0.5}, "export": "d"}
    s0 = {"metrics": {"loss_image": 1.0, "caption_match/validation/best_of_1": 0.25,
                      "shapes_fid/validation/scorer_features": 0.5}, "export": "a",
          "settings": {"evals": {"cm": {"type": "caption_match", "captions": 1000,
                                        "temperature": 0.7, "rerank": 16, "guidance": 2.0}}}}
    s1 = {"metrics": {"loss_image": 2.0, "caption_match/validation/best_of_1": 0.5,
                      "shapes_fid/validation/scorer_features": 1.5}, "export": "b",
          "skipped": {"fid2": "no weights"}}
    paths = []
    for name, r in (("dvae", dvae), ("s0", s0), ("s1", s1)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    out = str(tmp_path / "table")
    assert benchmark.main([out, paths[0], f"0={paths[1]}", f"7={paths[2]}"]) == 0
    md = open(out + ".md").read()
    assert md.splitlines()[0] == "| measurement | seed 0 | seed 7 | mean |"
    assert "| 25.0% | 50.0% | **37.5%** |" in md
    assert "| 1.00 | 2.00 | **1.50** |" in md  # the validation loss
    assert "| 27.00 | 27.00 | **27.00** |" in md  # one dVAE under both seeds
    assert "features of the scorer trained here, not Inception" in md
    assert "first 1000 captions" in md and "evals.fid2 (no weights)" in md
    rows = json.load(open(out + ".json"))["rows"]
    assert [r["mean"] for r in rows if r["key"] == "loss_image"] == [1.5]
