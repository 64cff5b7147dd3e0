"""Stage 2 end to end on a tiny hand-written token directory (no dVAE needed)."""

import json
import os

import grain
import jax
import numpy as np
import pytest
from array_record.python import array_record_module

from dalle_jax import configlib, exports, jobs, treeutil, visualize
from dalle_jax import metrics as metrics_lib
from dalle_jax.data import text_pipeline, tokens
from dalle_jax.tokenizers import bpe, dvae, image_tokenizer
from dalle_jax.train import transformer_task, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID, IMAGE_VOCAB, TEXT_LEN = 2, 16, 8
# A real (untrained) dVAE with this grid and vocabulary, so the sample job can decode.
DVAE = dvae.DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=1, n_init=8,
                       vocab_size=IMAGE_VOCAB, post_gain=1.0)
COLOURS = ["red", "green", "blue", "yellow", "white", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]


def _write_split(out_dir, split, n, num_shards, rng):
    per = -(-n // num_shards)
    for s in range(num_shards):
        path = tokens.shard_path(out_dir, split, s, num_shards)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for i in range(s * per, min(n, (s + 1) * per)):
            caption = (f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]} left of a "
                       f"{COLOURS[(i // 2) % len(COLOURS)]} {SHAPES[(i // 3) % len(SHAPES)]}")
            toks = rng.integers(0, IMAGE_VOCAB, GRID * GRID, dtype=np.int32)
            writer.write(tokens.serialize({"image_tokens": toks, "caption": caption,
                                           "label": np.int32(i)}))
        writer.close()
    return {"num_examples": n, "num_shards": num_shards, "shard_size": per}


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tokens"))
    rng = np.random.default_rng(0)
    splits = {"train": _write_split(d, "train", 40, 2, rng),
              "validation": _write_split(d, "validation", 12, 1, rng)}
    meta = {"dvae": {"identity": exports.dvae_identity(DVAE), "grid": GRID},
            "source": {"source": "test"}, "splits": splits}
    with open(os.path.join(d, tokens.META_FILE), "w") as f:
        json.dump(meta, f)
    return d


@pytest.fixture(scope="module")
def tokenizer(token_dir, tmp_path_factory):
    path = bpe.train_bpe_from_source(tokens.TokenSource(token_dir, "train"),
                                     str(tmp_path_factory.mktemp("bpe") / "bpe"),
                                     vocab_size=300, strict_vocab_size=False)
    return bpe.TextTokenizer(path)


def _pcfg(**kw):
    return text_pipeline.TextPipelineConfig(**dict(dict(global_batch_size=4, text_len=TEXT_LEN,
                                                        bpe_dropout=0.1, seed=3), **kw))


def _pipe(token_dir, tokenizer, shard=(0, 1), **kw):
    return text_pipeline.make_text_pipeline(
        tokens.TokenSource(token_dir, "train"), tokenizer, _pcfg(**kw),
        shard_options=grain.sharding.ShardOptions(*shard, drop_remainder=True))


def test_batches_have_the_documented_fields(token_dir, tokenizer):
    batch = next(_pipe(token_dir, tokenizer))
    assert batch["text_tokens"].dtype == np.int32 and batch["text_tokens"].shape == (4, TEXT_LEN)
    assert batch["image_tokens"].dtype == np.int32 and batch["image_tokens"].shape == (4, GRID**2)
    assert batch["caption"].dtype == object and isinstance(batch["caption"][0], str)
    assert batch["text_truncated"].dtype == bool and batch["text_truncated"].any()
    assert (batch["text_tokens"][:, 0] == bpe.BOS_ID).all()


def test_two_processes_cover_an_epoch_without_overlap(token_dir, tokenizer):
    seen = []
    for i in range(2):
        # 40 records, 2 shards of 20, local batch 2: one epoch is 10 batches per process.
        it = _pipe(token_dir, tokenizer, shard=(i, 2))
        assert it.local_batch_size == 2
        labels = np.concatenate([next(it)["caption"] for _ in range(10)])
        seen.append(labels)
    src = tokens.TokenSource(token_dir, "train")
    all_caps = sorted(src[i]["caption"] for i in range(len(src)))
    assert sorted(np.concatenate(seen).tolist()) == all_caps


def test_bpe_dropout_is_deterministic_and_epoch_dependent(token_dir, tokenizer):
    a = [next(it)["text_tokens"] for it in [_pipe(token_dir, tokenizer)] for _ in range(20)]
    b = [next(it)["text_tokens"] for it in [_pipe(token_dir, tokenizer)] for _ in range(20)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    clean = [next(it)["text_tokens"] for it in [_pipe(token_dir, tokenizer, bpe_dropout=0.0)]
             for _ in range(10)]
    assert not np.array_equal(np.stack(a[:10]), np.stack(clean))  # dropout changes segmentation
    # In file order, epoch 1 repeats epoch 0's records with a fresh segmentation.
    ordered = _pipe(token_dir, tokenizer, shuffle=False)
    ep = [np.stack([next(ordered)["text_tokens"] for _ in range(10)]) for _ in range(2)]
    assert not np.array_equal(ep[0], ep[1])
    # Evaluation settings: no dropout, file order.
    ev = _pipe(token_dir, tokenizer, bpe_dropout=0.0, shuffle=False, num_epochs=1)
    first = next(ev)
    src = tokens.TokenSource(token_dir, "train")
    expected, _ = tokenizer.encode_slots(src[0]["caption"], text_len=TEXT_LEN)
    np.testing.assert_array_equal(first["text_tokens"][0], expected)
    assert ev.num_batches == 10


def test_state_restore_gives_the_same_next_batch(token_dir, tokenizer):
    it = _pipe(token_dir, tokenizer)
    for _ in range(13):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    other = _pipe(token_dir, tokenizer)
    other.set_state(state)
    got = next(other)
    for k in ("text_tokens", "image_tokens", "caption", "text_truncated"):
        np.testing.assert_array_equal(got[k], expected[k])
    with pytest.raises(ValueError, match="does not match"):
        _pipe(token_dir, tokenizer, text_len=TEXT_LEN + 1).set_state(state)


def _cfg(token_dir, tokenizer, total=2):
    cfg = configlib.load_config(os.path.join(ROOT, "configs", "transformer_shapes.py")
                                + f":steps={total},batch=8,tokens={token_dir}")
    cfg.text.update(text_len=TEXT_LEN, bpe_model=tokenizer.path, vocab_size=300)
    cfg.model.update(width=32, depth=2, heads=2, conv_kernel=3)
    cfg.eval_every = 2
    cfg.evals.val.num_batches = 2
    cfg.ckpt.update(every_steps=1, async_save=False)
    cfg.log.update(every_steps=1, progress_bar=False)
    return cfg


def test_train_resume_export_and_refuse_other_width(token_dir, tokenizer, tmp_path):
    cfg = _cfg(token_dir, tokenizer)
    straight = str(tmp_path / "straight")
    jobs.train_transformer(cfg, straight)
    export = os.path.join(straight, "exports", "step_0000002")
    rows = metrics_lib.read_jsonl(os.path.join(straight, "metrics.jsonl"))
    for k in ("train/loss", "train/loss_text", "train/loss_image", "train/acc_text",
              "train/acc_image", "train/lr", "train/grad_norm", "eval/loss", "eval/loss_image"):
        assert any(k in r for r in rows.values()), k

    resumed = str(tmp_path / "resumed")
    task = transformer_task.make_task(cfg, resumed, tokenizer)
    loop.train(cfg, resumed, task, lambda: text_pipeline.make_input(
        cfg.data, cfg.text, tokenizer, "train", train=True), stop_at_step=1)
    assert not os.path.exists(os.path.join(resumed, "exports"))
    jobs.train_transformer(cfg, resumed)
    a, meta = exports.load(export)
    b, _ = exports.load(os.path.join(resumed, "exports", "step_0000002"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert meta["identity"]["model"]["width"] == 32
    assert meta["identity"]["tokenizer"]["sha256"] == tokenizer.sha256
    assert meta["identity"]["dvae"]["vocab_size"] == IMAGE_VOCAB

    # Continuing the run with a wider model is refused.
    cfg.total_steps = 3
    cfg.model.width = 64
    with pytest.raises(ValueError, match="(?s)different model.*width: checkpoint has 32"):
        jobs.train_transformer(cfg, resumed)


def test_caption_dropout_trains_on_the_empty_caption(token_dir, tokenizer):
    from dalle_jax import sharding

    cfg = _cfg(token_dir, tokenizer)
    cfg.evals.val.num_batches = 0
    cfg.text.caption_dropout = 0.5
    task = transformer_task.make_task(cfg, "", tokenizer)
    cfg.text.caption_dropout = 0.0
    plain = transformer_task.make_task(cfg, "", tokenizer)
    params = sharding.unboxed(task.init_variables(jax.random.key(0)))["params"]
    # Noise on every leaf: the fresh zero heads would make the loss ignore the text.
    noise = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + 0.1 * noise.standard_normal(a.shape, np.float32), params)
    it = text_pipeline.make_input(cfg.data, cfg.text, tokenizer, "train", train=True)
    batch = task.device_batch(next(it))
    it.close()
    rng = jax.random.key(3)
    # Which rows are dropped comes from the step's rng; those rows carry the empty
    # caption's slots [BOS, pads...], the others their caption.
    drop = np.asarray(jax.random.bernoulli(jax.random.fold_in(rng, 1), 0.5,
                                           (len(batch["text_tokens"]),)))
    assert 0 < drop.sum() < len(drop)
    null = tokenizer.encode_slots("", text_len=TEXT_LEN)[0]
    np.testing.assert_array_equal(null[1:], tokenizer.pad_ids(TEXT_LEN)[1:])
    dropped = dict(batch, text_tokens=np.where(drop[:, None], null[None], batch["text_tokens"]))
    got, _ = task.loss_fn(params, batch, rng, 0)
    want, _ = plain.loss_fn(params, dropped, rng, 0)
    undropped, _ = plain.loss_fn(params, batch, rng, 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(got, undropped)
    cfg.text.caption_dropout = 1.0
    with pytest.raises(ValueError, match="caption_dropout"):
        transformer_task.make_task(cfg, "", tokenizer)


def test_train_bpe_job_writes_once(token_dir, tmp_path):
    cfg = configlib.load_config(os.path.join(ROOT, "configs", "transformer_shapes.py")
                                + f":tokens={token_dir}")
    cfg.text.vocab_size = 300
    jobs.train_bpe(cfg, str(tmp_path))
    path = os.path.join(str(tmp_path), "bpe.model")
    mtime = os.path.getmtime(path)
    jobs.train_bpe(cfg, str(tmp_path))
    assert os.path.getmtime(path) == mtime
    assert bpe.TextTokenizer(path).vocab_size <= 300


@pytest.fixture(scope="module")
def dvae_export(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dvae") / "export")
    exports.save_dvae(out, DVAE, dvae.init_params(DVAE, jax.random.key(0)))
    return out


def _report(out_dir):
    with open(os.path.join(str(out_dir), "report.json")) as f:
        return json.load(f)


def _sample_pngs(report):
    """The kept images of every prompt, read back from their PNGs: (prompts, keep, H, W, 3)
    uint8 (each PNG holds one image inside a 2-pixel border)."""
    from PIL import Image

    out = []
    for prompt in report["prompts"]:
        out.append([np.asarray(Image.open(e["file"]).convert("RGB"))[2:-2, 2:-2]
                    for e in prompt["images"]])
    return np.asarray(out)


def test_sample_job_writes_grid_tokens_and_report(token_dir, tokenizer, dvae_export, tmp_path):
    cfg = _cfg(token_dir, tokenizer)
    workdir = str(tmp_path / "run")
    jobs.train_transformer(cfg, workdir)
    cfg.sample.update(dvae_params=dvae_export, captions=("a red circle", "a blue star"),
                      num_candidates=3, batch_size=4, top_k=4)
    jobs.sample(cfg, workdir)
    out = os.path.join(workdir, "samples")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["export"].endswith("step_0000002") and report["num_candidates"] == 3
    assert [p["prompt"] for p in report["prompts"]] == ["a red circle", "a blue star"]
    assert "caption_match" not in report  # only on shapes token data
    # One PNG per kept image, named by its global sample index, and a grid per prompt.
    second = report["prompts"][1]
    assert [e["sample_index"] for e in second["images"]] == [3, 4, 5]
    assert all(os.path.getsize(e["file"]) > 0 for e in second["images"])
    assert os.path.getsize(second["grid"]) > 0
    ident = report["sources"]["transformer"]["identity"]
    assert ident["kind"] == "transformer" and report["sources"]["dvae"]["export"] == dvae_export
    toks = np.load(os.path.join(out, "tokens.npz"))["tokens"]
    assert toks.shape == (2, 3, GRID, GRID) and toks.min() >= 0 and toks.max() < IMAGE_VOCAB
    assert os.path.getsize(report["grid"]) > 0
    # Rerunning with the same settings skips; the same seed elsewhere draws the same
    # tokens; other settings never overwrite a directory's samples.
    mtime = os.path.getmtime(os.path.join(out, "report.json"))
    jobs.sample(cfg, workdir)
    assert os.path.getmtime(os.path.join(out, "report.json")) == mtime  # unchanged: skipped
    cfg.sample.out_dir = str(tmp_path / "again")
    jobs.sample(cfg, workdir)
    np.testing.assert_array_equal(np.load(str(tmp_path / "again" / "tokens.npz"))["tokens"], toks)
    images = _sample_pngs(report)
    np.testing.assert_array_equal(_sample_pngs(_report(tmp_path / "again")), images)
    # Each PNG is the dVAE's decoding of its saved tokens (pixels to within rounding).
    config, dvae_params = exports.load_dvae(dvae_export)
    decoded = image_tokenizer.ImageTokenizer(config, dvae_params).decode(
        toks.reshape(-1, GRID, GRID))
    want = visualize.to_uint8(np.asarray(decoded)).reshape(images.shape)
    assert np.abs(want.astype(int) - images).max() <= 1
    cfg.sample.update(seed=1, out_dir="")
    with pytest.raises(FileExistsError, match="seed: saved has 0, now has 1"):
        jobs.sample(cfg, workdir)
    assert os.path.getmtime(os.path.join(out, "report.json")) == mtime
    cfg.sample.out_dir = str(tmp_path / "seed1")
    jobs.sample(cfg, workdir)
    other = np.load(str(tmp_path / "seed1" / "tokens.npz"))["tokens"]
    assert (other != toks).mean() > 0.25  # another draw, not a shifted copy of this one
    assert not np.array_equal(_sample_pngs(_report(tmp_path / "seed1")), images)

    # A dVAE other than the one the tokens came from is refused, naming the field.
    other = dvae.DVAEConfig(**{**DVAE.to_dict(), "n_hid": 16})
    other_dir = str(tmp_path / "other_dvae")
    exports.save_dvae(other_dir, other, dvae.init_params(other, jax.random.key(1)))
    cfg.sample.update(dvae_params=other_dir, out_dir=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="n_hid"):
        jobs.sample(cfg, workdir)
    cfg.sample.update(dvae_params=dvae_export, captions=())
    with pytest.raises(ValueError, match="no prompts"):
        jobs.sample(cfg, workdir)


def test_bfloat16_export_loads_onto_the_device_and_samples(token_dir, tokenizer, dvae_export,
                                                          tmp_path):
    import jax.numpy as jnp

    from dalle_jax.sample import sampler as smp

    cfg = _cfg(token_dir, tokenizer)
    workdir = str(tmp_path / "run")
    jobs.train_transformer(cfg, workdir)
    jobs.export(cfg, workdir)  # the newest export, in bfloat16, next to it
    f32 = os.path.join(workdir, "exports", "step_0000002")
    bf16 = f32 + "_bfloat16"
    meta = exports.read_meta(bf16)
    assert meta["export_dtype"] == "bfloat16" and meta["identity"]["kind"] == "transformer"
    assert jobs.latest_export(workdir) == f32  # sampling defaults stay on the float32 export
    jobs.export(cfg, workdir)  # rerun: already there, nothing rewritten
    s = smp.Sampler.load(bf16, tokenizer.path, dvae_export)
    leaves = jax.tree.leaves(s.params)
    device = jax.local_devices()[0]
    for leaf in leaves:
        assert isinstance(leaf, jax.Array) and leaf.devices() == {device}
        assert leaf.dtype == jnp.bfloat16 or not jnp.issubdtype(leaf.dtype, jnp.floating)
    # The same tokens as float32 params rounded to bfloat16 in memory.
    params, _ = exports.load(f32)
    rounded = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    ref = smp.Sampler(s.config, rounded, tokenizer, s.image_tokenizer)
    np.testing.assert_array_equal(s.tokens(["a red circle"], num_candidates=2, seed=3),
                                  ref.tokens(["a red circle"], num_candidates=2, seed=3))
    # A training checkpoint exports too (its EMA params); a taken path is refused.
    cfg.export.update(source=os.path.join(workdir, "checkpoints"), dtype="float32",
                      out=str(tmp_path / "from_ckpt"))
    jobs.export(cfg, workdir)
    a, _ = exports.load(str(tmp_path / "from_ckpt"))
    jax.tree.map(np.testing.assert_array_equal, a, params)
    cfg.export.out = bf16
    with pytest.raises(FileExistsError, match="holds something else"):
        jobs.export(cfg, workdir)
    cfg.export.update(out=str(tmp_path / "x"), dtype="int8")
    with pytest.raises(ValueError, match="export dtype"):
        jobs.export(cfg, workdir)


def test_sample_job_names_bad_input_and_overwrites_nothing(token_dir, tokenizer, dvae_export,
                                                           tmp_path, capsys):
    cfg = _cfg(token_dir, tokenizer)
    workdir = str(tmp_path / "run")
    jobs.train_transformer(cfg, workdir)
    out = tmp_path / "out"
    cfg.sample.update(dvae_params=dvae_export, captions=("a red circle",), num_candidates=2,
                      batch_size=4, out_dir=str(out))
    for field, value, err in [("num_candidates", 0, "num_candidates must be >= 1"),
                              ("guidance", -1.0, "guidance scale must be >= 0"),
                              ("keep", 3, "keep must be in"),
                              ("rerank", str(tmp_path / "nope"), "no scorer export"),
                              ("prompts_file", str(tmp_path / "none.txt"), "does not exist"),
                              ("complete_image", str(tmp_path / "none.png"), "cannot use")]:
        before = cfg.sample[field]
        cfg.sample[field] = value
        with pytest.raises((ValueError, FileNotFoundError), match=err):
            jobs.sample(cfg, workdir)
        cfg.sample[field] = before
        assert not out.exists()  # nothing was written
    # A scorer whose tokenizer does not fit its text tower is refused when loaded.
    from dalle_jax.rerank import scorer as scorer_lib
    from notebook_test import _tiny_scorer_export

    bad = _tiny_scorer_export(str(tmp_path / "scorer"), tokenizer.path)
    meta_path = os.path.join(bad, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["identity"]["model"]["vocab_size"] = 8
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="do not belong together"):
        scorer_lib.load_scorer(bad)
    # A prompt longer than the text slots is sampled truncated, with a warning naming it.
    long = "a red circle to the left of a blue square " * 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{long}\n\n  a blue square  \n")
    cfg.sample.update(captions=(), prompts_file=str(prompts))
    jobs.sample(cfg, workdir)
    assert f"prompt truncated to the model's {TEXT_LEN} text slots: {long.strip()!r}" in \
        capsys.readouterr().out
    with open(out / "report.json") as f:
        assert [p["prompt"] for p in json.load(f)["prompts"]] == [long.strip(), "a blue square"]
    # Image completion from a file of another size: resized, centre-cropped, noted.
    from PIL import Image

    Image.new("RGB", (40, 24), (255, 0, 0)).save(tmp_path / "wide.png")
    cfg.sample.update(complete_image=str(tmp_path / "wide.png"), keep_rows=1,
                      out_dir=str(tmp_path / "completed"))
    jobs.sample(cfg, workdir)
    with open(tmp_path / "completed" / "report.json") as f:
        report = json.load(f)
    assert "40x24 image resized and centre-cropped to 16x16" in report["notes"][0]
    toks = np.load(tmp_path / "completed" / "tokens.npz")["tokens"]
    assert (toks[:, :, 0] == toks[0, 0, 0]).all()  # the kept row is the image's, everywhere


@pytest.fixture(scope="module")
def shapes_token_dir(token_dir, tmp_path_factory):
    """The test token directory, marked as `shapes` data (the checker reads its captions)."""
    import shutil

    d = str(tmp_path_factory.mktemp("shapes") / "tokens")
    shutil.copytree(token_dir, d)
    path = os.path.join(d, tokens.META_FILE)
    with open(path) as f:
        meta = json.load(f)
    meta["source"] = {"source": "shapes"}
    with open(path, "w") as f:
        json.dump(meta, f)
    return d


def test_sample_job_scores_shapes_captions_and_the_dvae_ceiling(shapes_token_dir, tokenizer,
                                                                  dvae_export, tmp_path):
    from PIL import Image

    from dalle_jax.evals import shapes_match

    shapes_dir = shapes_token_dir
    cfg = _cfg(shapes_dir, tokenizer)
    workdir = str(tmp_path / "run")
    jobs.train_transformer(cfg, workdir)
    from notebook_test import _tiny_scorer_export

    scorer = _tiny_scorer_export(str(tmp_path / "scorer"), tokenizer.path)
    cfg.sample.update(dvae_params=dvae_export, captions=("a red circle",), num_candidates=2,
                      batch_size=4, eval_captions=5, eval_splits="validation",
                      rerank=scorer, eval_rerank=3, eval_guidance=2.0,
                      eval_rerank_guidance=1.5)
    jobs.sample(cfg, workdir)
    with open(os.path.join(workdir, "samples", "report.json")) as f:
        report = json.load(f)
    # Reranked by the scorer: both candidates kept, best first, with their scores.
    scores = [e["score"] for e in report["prompts"][0]["images"]]
    assert scores == sorted(scores, reverse=True)
    assert report["sources"]["scorer"]["kind"] == "clip"
    match = report["caption_match"]["validation"]
    assert match["reranked"]["n"] == 3 and match["reranked"]["count"] == 5
    assert match["reranked"]["guidance"] == 1.5  # candidates drawn with eval_rerank_guidance
    assert match["reranked"]["scorer"]["source"] == "trained"
    assert match["guided"]["scale"] == 2.0 and match["guided"]["count"] == 5
    assert len(report["prompts"][0]["images"]) == 2
    assert all(isinstance(e["matches_caption"], bool) for e in report["prompts"][0]["images"])
    # Each kept image's verdict is the checker's on its PNG.
    for e in report["prompts"][0]["images"]:
        png = np.asarray(Image.open(e["file"]).convert("RGB"))[2:-2, 2:-2]
        assert shapes_match.match(png, "a red circle").ok == e["matches_caption"]
    val = report["caption_match"]["validation"]["best_of_1"]
    assert val["count"] == 5 and val["fraction"] == pytest.approx(val["matched"] / 5)
    # The dVAE ceiling, recomputed: the first 5 validation examples' own tokens decoded by
    # the dVAE and judged against their own captions.
    source = tokens.TokenSource(shapes_dir, "validation")
    examples = [source[i] for i in range(5)]
    config, dvae_params = exports.load_dvae(dvae_export)
    recon = image_tokenizer.ImageTokenizer(config, dvae_params).decode(
        np.stack([np.asarray(ex["image_tokens"]) for ex in examples]).reshape(5, GRID, GRID))
    recon = visualize.to_uint8(np.asarray(recon))
    want = sum(shapes_match.match(im, str(ex["caption"])).ok for im, ex in zip(recon, examples))
    ref = report["caption_match"]["validation"]["dvae_reconstruction"]
    assert ref == {"count": 5, "matched": want, "fraction": want / 5}


def test_paper_config_runlocal_trains_scanned_rematerialised_with_halving(token_dir, tokenizer,
                                                                          tmp_path):
    cfg = configlib.load_config(os.path.join(ROOT, "configs", "transformer_paper.py")
                                + f":runlocal,tokens={token_dir}")
    assert cfg.model.scan_layers and cfg.model.remat == "full"
    cfg.text.bpe_model = tokenizer.path
    cfg.ckpt.async_save = False
    cfg.log.progress_bar = False
    workdir = str(tmp_path / "paper")
    jobs.train_transformer(cfg, workdir)
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    lr = {step: r["train/lr"] for step, r in rows.items() if "train/lr" in r}
    # Warm-up over 2 updates to 4.5e-4, halved from update 3 (lr is logged per update).
    np.testing.assert_allclose([lr[2], lr[3], lr[4]], [2.25e-4, 4.5e-4, 2.25e-4], rtol=1e-5)
    assert os.path.isdir(os.path.join(workdir, "exports", "step_0000004"))


def test_paper_config_is_the_papers_12b_model(tokenizer):
    from dalle_jax.models import transformer as tfm

    cfg = configlib.load_config(os.path.join(ROOT, "configs", "transformer_paper.py") + ":tokens=x")
    meta = {"dvae": {"identity": {"vocab_size": 8192}, "grid": 32}}
    tok = type("Tok", (), {"text_vocab_size": lambda self, n: 16384 + n})()
    mcfg = transformer_task.model_config(cfg, tok, meta)
    paper = tfm.TransformerConfig.paper_12b()
    for f in ("text_vocab", "image_vocab", "text_len", "grid", "width", "depth", "heads",
              "mlp_ratio", "attn_pattern", "conv_kernel"):
        assert getattr(mcfg, f) == getattr(paper, f), f
    # Same parameter tree as the paper's model (12.3B with embeddings and heads).
    assert (treeutil.count_params(tfm.abstract_variables(mcfg))
            == treeutil.count_params(tfm.abstract_variables(paper)))
    assert mcfg.scan_layers and mcfg.remat == "full" and mcfg.dtype == "bfloat16"


def _losses(workdir):
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return rows, np.asarray([rows[s]["train/loss"] for s in sorted(rows) if "train/loss" in rows[s]])


def test_float16_with_per_resblock_scaling_tracks_float32(token_dir, tokenizer, tmp_path):
    """A tiny model trained 200 steps in float16 (per-resblock gradient scaling on) follows
    the float32 run's loss curve: every logged loss (means over 20 steps) within 0.2%
    (measured: within 0.03%)."""
    runs = {}
    for dtype in ("float32", "float16"):
        cfg = _cfg(token_dir, tokenizer, total=200)
        cfg.precision.compute_dtype = dtype
        cfg.evals.val.num_batches = 0
        cfg.ckpt.every_steps = 200
        cfg.log.every_steps = 20
        workdir = str(tmp_path / dtype)
        jobs.train_transformer(cfg, workdir)
        runs[dtype] = _losses(workdir)
    (rows32, loss32), (rows16, loss16) = runs["float32"], runs["float16"]
    assert len(loss32) == len(loss16) == 10
    assert loss32[-1] < 0.5 * loss32[0]  # the run learns
    np.testing.assert_allclose(loss16, loss32, rtol=2e-3)
    last = rows16[200]
    assert "grad_scale/log2_min" in last and "grad_scale/mlp_1" in last
    assert "grad_scale/log2_min" not in rows32[200]
    # M = 8 batch shards: every scale starts at 8 * 2^13 and grows by 2^(1/1000) per update
    # whose resblock gradients are finite, so after update k a scale that never saw an
    # overflow has log2 3 + 13 + k / 1000; the row averages updates 181 to 200. A scale
    # that saw one can only be lower, and a skipped update is counted.
    top = 3 + 13 + np.mean(np.arange(181, 201)) / 1000
    np.testing.assert_allclose(last["grad_scale/log2_max"], top, rtol=1e-6)
    if last["grad_scale/skipped_total"] == 0:
        np.testing.assert_allclose(last["grad_scale/log2_min"], top, rtol=1e-6)
    else:
        assert last["grad_scale/log2_min"] < top


def test_bfloat16_training_runs(token_dir, tokenizer, tmp_path):
    cfg = _cfg(token_dir, tokenizer, total=3)
    cfg.precision.compute_dtype = "bfloat16"
    cfg.ckpt.every_steps = 3
    workdir = str(tmp_path / "bf16")
    jobs.train_transformer(cfg, workdir)
    rows, losses = _losses(workdir)
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert "grad_scale/log2_min" not in rows[3]  # scaling is for float16 only


def test_a_mesh_that_cannot_shard_the_model_stops_the_job_before_it_starts(token_dir, tokenizer,
                                                                             tmp_path):
    cfg = _cfg(token_dir, tokenizer)
    cfg.model.width = 36  # 36 does not divide over fsdp=8
    cfg.mesh.update(data=1, fsdp=8)
    cfg.sharding_rules = "fsdp"
    workdir = tmp_path / "bad_mesh"
    with pytest.raises(ValueError, match=r"(?s)layers/qkv_kernel.*dim 1 \('embed', size 36\) "
                                         r"is not divisible by mesh fsdp=8"):
        jobs.train_transformer(cfg, str(workdir))
    assert not (workdir / "checkpoints").exists()


def test_the_old_job_name_runs_the_renamed_job(monkeypatch):
    calls = []
    monkeypatch.setitem(jobs.JOBS, "train_transformer", lambda cfg, w: calls.append((cfg, w)))
    jobs.JOBS["train"]("cfg", "dir")
    assert calls == [("cfg", "dir")]
    assert "train_transformer" in jobs.JOBS["train"].__doc__
