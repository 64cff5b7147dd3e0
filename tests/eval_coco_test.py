"""The MS-COCO zero-shot evaluation job (dalle_jax.evals.coco) end to end on a tiny fixture.

A COCO-format folder (annotation JSON + images of several sizes and formats, one corrupt
and one missing), the tiny stage-2 model of train_transformer_test (16x16 images, 2x2 tokens), a
random scorer export and random Inception weights in the pytorch-fid key layout. The
Inception network costs ~6 GFLOP per image on the CPU, so the runs use 4 captions.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from dalle_jax import configlib, jobs
from dalle_jax.evals import blur, coco, coco_files, fid, plots
from dalle_jax.evals import inception as inc
from dalle_jax.rerank import best_of

from notebook_test import _tiny_scorer_export
from train_transformer_test import _cfg, dvae_export, token_dir, tokenizer  # noqa: F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 24  # listed in the annotation file; two of them are unusable
SIZES = [(20, 16), (16, 24), (32, 32), (40, 20), (12, 30), (18, 18)]
COLOURS = ["red", "green", "blue", "yellow", "white", "purple"]


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    """ROOT/annotations/captions_val2014.json + ROOT/val2014/: 24 listed images (one
    corrupt JPEG, one missing file), one more image whose only caption is blank, an
    annotation of an unknown image; 1-3 captions per image."""
    root = tmp_path_factory.mktemp("coco")
    img_dir = root / "val2014"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(NUM_IMAGES + 1):
        image_id = 1000 + 7 * i
        ext = "png" if i % 3 == 0 else "jpg"
        name = f"COCO_val2014_{image_id:012d}.{ext}"
        images.append({"id": image_id, "file_name": name, "width": 0, "height": 0})
        w, h = SIZES[i % len(SIZES)]
        if i == 5:  # corrupt: a truncated JPEG
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(img_dir / name, format="JPEG")
            data = (img_dir / name).read_bytes()
            (img_dir / name).write_bytes(data[: len(data) // 3])
        elif i == 9:  # missing
            pass
        else:
            arr = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
            arr[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 256, 3)
            Image.fromarray(arr).save(img_dir / name, format="PNG" if ext == "png" else "JPEG")
        if i == NUM_IMAGES:  # the extra image: only a blank caption
            annotations.append({"id": 10 * i, "image_id": image_id, "caption": "   "})
            continue
        for j in range(1 + i % 3):
            annotations.append({"id": 10 * i + j, "image_id": image_id,
                                "caption": f"a {COLOURS[(i + j) % 6]} square  on a "
                                           f"{COLOURS[(i + 2 * j + 1) % 6]} background\n"})
    annotations.append({"id": 99999, "image_id": 5, "caption": "an orphan"})
    (root / "annotations").mkdir()
    with open(root / "annotations" / "captions_val2014.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return str(root)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random Inception variables saved as a torch state dict with pytorch-fid's keys."""
    torch = pytest.importorskip("torch")
    from flax import traverse_util

    flat = traverse_util.flatten_dict(inc.random_variables(0))
    state = {}
    for key, (path, _, perm) in inc._key_table().items():
        a = flat[path]
        if perm is not None:
            a = a.transpose(np.argsort(perm))
        state[key] = torch.from_numpy(np.ascontiguousarray(a))
    path = tmp_path_factory.mktemp("inception") / inc.WEIGHTS_FILENAME
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def model(token_dir, tokenizer, dvae_export, tmp_path_factory):  # noqa: F811
    """``(transformer export, bpe path, dvae export, scorer export)`` of a tiny model."""
    workdir = str(tmp_path_factory.mktemp("transformer"))
    # Two training steps: compiling is most of the cost, and halves without optimisations.
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        jobs.train_transformer(_cfg(token_dir, tokenizer), workdir)
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
    scorer = _tiny_scorer_export(str(tmp_path_factory.mktemp("clip") / "scorer"),
                                 tokenizer.path)
    return jobs.latest_export(workdir), tokenizer.path, dvae_export, scorer


def _eval_cfg(coco_dir, model, *, weights="", n=4, captions=4, scorer=True):
    export, bpe, dvae, scorer_dir = model
    cfg = configlib.load_config(
        os.path.join(ROOT, "configs", "eval_coco.py")
        + f":coco={coco_dir},transformer={export},dvae={dvae},bpe={bpe},"
        + f"scorer={scorer_dir if scorer else ''},n={n},captions={captions},batch=16,"
        + f"weights={weights}")
    cfg.sample.update(rerank_sizes="1,2" if n > 1 else "", shard_captions=2, chunk=4)
    cfg.metrics.update(blur_radii="0,2", batch_size=8)
    cfg.coco.workers = 2
    return cfg


def _drawn(coco_dir, num=4, seed=0):
    images, _ = coco_files.read_annotations(os.path.join(coco_dir, "annotations",
                                                   "captions_val2014.json"))
    usable, _ = coco_files.check_images(images, os.path.join(coco_dir, "val2014"), progress=False)
    return coco_files.draw_captions(usable, num, seed)


@pytest.fixture(scope="module")
def first_run(coco_dir, model, inception_weights, tmp_path_factory):
    """The job run once with an overlap check against copies of two evaluated images."""
    drawn = _drawn(coco_dir)
    train = tmp_path_factory.mktemp("train_images")
    for k, entry in enumerate(drawn[2:4]):
        shutil.copyfile(os.path.join(coco_dir, "val2014", entry["file_name"]),
                        train / f"copy{k}{os.path.splitext(entry['file_name'])[1]}")
    rng = np.random.default_rng(5)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
            train / f"other{k}.png")
    (train / "broken.jpg").write_bytes(b"not an image")
    cfg = _eval_cfg(coco_dir, model, weights=inception_weights)
    cfg.overlap.update(train_images=str(train), threshold=0.99999)
    workdir = str(tmp_path_factory.mktemp("eval"))
    coco.eval_coco(cfg, workdir)
    out = os.path.join(workdir, coco.OUT_SUBDIR)
    with open(os.path.join(out, coco.RESULTS_FILE)) as f:
        res = json.load(f)
    print("first run:", res["seconds"])
    return cfg, workdir, out, res, drawn


def test_results_counts_metrics_and_plots(first_run):
    cfg, _, out, res, drawn = first_run
    c = res["counts"]
    assert c["captions"] == 4 and c["generated_images"] == 16
    assert c["images_listed"] == NUM_IMAGES + 1 and c["images_without_captions"] == 1
    assert c["orphan_annotations"] == 1 and c["empty_captions"] == 1
    assert c["skipped_images"] == {"missing": 1, "corrupt": 1, "total": 2}
    assert c["images_usable"] == NUM_IMAGES - 2
    assert res["rerank_sizes"] == [1, 2, 4] and res["blur_radii"] == [0.0, 2.0]
    assert res["inception"]["available"] and res["settings"]["sampling"]["num_candidates"] == 4
    for r in ("0", "2"):
        real = res["metrics"][r]["real"]
        assert real["is_mean"] >= 1 - 1e-9 and 0 <= real["clip_score"] <= 100
        assert os.path.exists(real["stats_file"])
        for k in ("1", "2", "4"):
            g = res["metrics"][r]["generated"][k]
            assert g["count"] == 4 and np.isfinite(g["fid"]) and g["fid"] >= 0
            assert g["is_mean"] >= 1 - 1e-9 and g["is_std"] >= 0 and 0 <= g["clip_score"] <= 100
    # Reranking by the scorer can only raise the CLIP score of the picks (same scorer).
    clip0 = [res["metrics"]["0"]["generated"][k]["clip_score"] for k in ("1", "2", "4")]
    assert clip0 == sorted(clip0)
    # The real statistics carry their key and the real IS.
    _, _, meta = fid.load_stats(res["metrics"]["0"]["real"]["stats_file"], resize="tf1x")
    assert meta["count"] == 4 and meta["key"]["blur_radius"] == 0.0
    assert meta["key"]["real_resize"] == "lanczos" and meta["key"]["image_size"] == 16
    for name in ("fid_vs_blur", "is_vs_blur", "fid_vs_rerank", "is_vs_rerank",
                 "clip_vs_rerank", "samples"):
        with Image.open(res["plots"][name]) as im:
            assert im.format == "PNG" and im.size[0] > 100
    # Overlap: the two copied images (and only they) are found; without them 2 remain.
    o = res["overlap"]
    assert o["status"] == "done" and o["used"] == 4 and o["skipped"] == {"corrupt": 1}
    assert o["flagged"] == 2 and o["fraction"] == pytest.approx(0.5)
    flagged = {e["caption_index"] for e in o["most_similar"][:2]}
    assert flagged == {2, 3}
    assert o["without"]["real"]["count"] == 2
    assert o["without"]["generated"]["4"]["count"] == 2
    assert o["without"]["generated"]["4"]["fid"] >= 0
    assert o["with"]["generated"]["4"]["fid"] == pytest.approx(
        res["metrics"]["0"]["generated"]["4"]["fid"])
    # The draw: distinct images, captions from the file, as the public function draws.
    with open(os.path.join(out, coco.DRAW_FILE)) as f:
        draw = json.load(f)
    assert [e["image_id"] for e in draw["captions"]] == [e["image_id"] for e in drawn]
    assert len({e["image_id"] for e in drawn}) == 4
    assert all("  " not in e["caption"] and "\n" not in e["caption"] for e in drawn)


def test_shards_hold_the_samplers_candidates(first_run, model):
    """Best-of-k picks are the sampler's own candidates at global index i*N + j."""
    from dalle_jax.sample.sampler import Sampler

    _, _, out, res, drawn = first_run
    with np.load(os.path.join(out, "generated", "gen_00001.npz")) as z:
        shard = {k: z[k] for k in z.files}
    assert shard["caption_index"].tolist() == [2, 3]
    cand, score = shard["candidate"], shard["score"]
    assert (cand[:, 0] == 0).all()
    np.testing.assert_array_equal(shard["sample_index"], (np.arange(2, 4)[:, None] * 4 + cand))
    assert (np.diff(score, axis=1) >= 0).all()
    np.testing.assert_array_equal(cand[:, 2], np.argmax(shard["all_scores"], axis=1))
    np.testing.assert_array_equal(cand[:, 1], np.argmax(shard["all_scores"][:, :2], axis=1))
    # Distinct picks are stored once.
    assert len(shard["images"]) == len({(i, c) for i, row in enumerate(cand) for c in row})
    export, bpe, dvae, _ = model
    s = Sampler.load(export, bpe, dvae)
    caps = [e["caption"] for e in drawn[2:4]]
    toks = s.tokens(caps, num_candidates=4, seed=0, first_sample_index=2 * 4)
    np.testing.assert_array_equal(shard["tokens"],
                                  np.take_along_axis(toks, cand[:, :, None, None], axis=1))
    imgs = s.images(shard["tokens"][:, 2])
    np.testing.assert_array_equal(shard["images"][shard["image_index"][:, 2]], imgs)


def test_restart_resumes_and_refuses_other_settings(first_run, capsys):
    cfg, workdir, out, res, _ = first_run
    gen = os.path.join(out, "generated", "gen_00001.npz")
    with np.load(gen) as z:
        before = {k: z[k] for k in ("tokens", "images", "score")}
    os.remove(gen)
    # Without the real features at radius 2, the saved real statistics are used.
    for name in os.listdir(os.path.join(out, "cache")):
        if name.startswith("inception_real_") and name.endswith("_r2.npz"):
            os.remove(os.path.join(out, "cache", name))
    coco.eval_coco(cfg, workdir)
    with np.load(gen) as z:
        np.testing.assert_array_equal(z["tokens"], before["tokens"])
        np.testing.assert_array_equal(z["images"], before["images"])
        # Scores may move in the last bits with the scorer's batch composition.
        np.testing.assert_allclose(z["score"], before["score"], rtol=1e-5, atol=1e-6)
    with open(os.path.join(out, coco.RESULTS_FILE)) as f:
        again = json.load(f)
    for r in ("0", "2"):
        for k in ("1", "2", "4"):
            a, b = res["metrics"][r]["generated"][k], again["metrics"][r]["generated"][k]
            for m in ("fid", "is_mean", "is_std", "clip_score"):
                assert b[m] == pytest.approx(a[m], rel=1e-6, abs=1e-9), (r, k, m)
    assert again["counts"] == res["counts"]
    assert res["metrics"]["2"]["real"]["from"] == "features"
    assert again["metrics"]["2"]["real"]["from"] == "statistics file"
    assert again["metrics"]["2"]["real"]["is_mean"] == pytest.approx(
        res["metrics"]["2"]["real"]["is_mean"])
    assert "sampling" in again["seconds"] and "real_images" not in again["seconds"]
    # Other sampling settings, another caption draw: refused before anything changes.
    mtime = os.path.getmtime(os.path.join(out, coco.SETTINGS_FILE))
    cfg.sample.temperature = 0.5
    with pytest.raises(FileExistsError, match=r"sampling\.temperature: saved has 1\.0, now "
                                              r"has 0\.5"):
        coco.eval_coco(cfg, workdir)
    cfg.sample.temperature = 1.0
    cfg.coco.seed = 3
    with pytest.raises(FileExistsError, match=r"coco\.seed: saved has 0, now has 3"):
        coco.eval_coco(cfg, workdir)
    cfg.coco.seed = 0
    assert os.path.getmtime(os.path.join(out, coco.SETTINGS_FILE)) == mtime


def test_missing_inception_weights_still_samples(coco_dir, model, tmp_path, monkeypatch,
                                                 capsys):
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    cfg = _eval_cfg(coco_dir, model, n=1, scorer=False)
    coco.eval_coco(cfg, str(tmp_path))
    out = tmp_path / coco.OUT_SUBDIR
    printed = capsys.readouterr().out
    with open(out / coco.RESULTS_FILE) as f:
        res = json.load(f)
    msg = res["inception"]["message"]
    assert not res["inception"]["available"]
    for text in (msg, printed):
        assert inc.WEIGHTS_FILENAME in text and "DALLE_JAX_INCEPTION_WEIGHTS (not set)" in text
    with np.load(out / "generated" / "gen_00000.npz") as z:
        assert z["images"].shape == (2, 16, 16, 3) and z["tokens"].shape == (2, 1, 2, 2)
        assert np.isnan(z["score"]).all()
    g = res["metrics"]["0"]["generated"]["1"]
    assert g["fid"] is None and g["is_mean"] is None and g["clip_score"] is None
    assert "no scorer" in res["clip_score_note"]
    assert set(res["plots"]) == {"samples"} and "Inception" in res["plots_note"]
    assert res["counts"]["skipped_images"]["total"] == 2
    assert not (out / "fid_vs_blur.png").exists()


def test_bad_requests_are_clear_errors(coco_dir, model, tmp_path):
    cfg = _eval_cfg(coco_dir, model, captions=100)
    with pytest.raises(ValueError, match=r"has 22 usable captions of distinct images .*"
                                         r"fewer than coco\.num_captions=100"):
        coco.eval_coco(cfg, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / coco.OUT_SUBDIR / coco.SETTINGS_FILE)
    cfg = _eval_cfg(coco_dir, model, n=4, scorer=False)
    with pytest.raises(ValueError, match="need a scorer"):
        coco.eval_coco(cfg, str(tmp_path / "b"))
    cfg = _eval_cfg(coco_dir, model)
    cfg.sample.rerank_sizes = "1,8"
    with pytest.raises(ValueError, match=r"rerank_sizes \[8\] outside \[1, num_candidates=4\]"):
        coco.eval_coco(cfg, str(tmp_path / "c"))
    # A dVAE other than the transformer's is refused before settings.json pins it.
    from dalle_jax import exports
    from dalle_jax.tokenizers import dvae as dvae_lib

    from train_transformer_test import DVAE

    other = dvae_lib.DVAEConfig(**{**DVAE.to_dict(), "n_hid": 16})
    other_dir = str(tmp_path / "other_dvae")
    exports.save_dvae(other_dir, other, dvae_lib.init_params(other, jax.random.key(1)))
    cfg = _eval_cfg(coco_dir, model)
    cfg.sample.dvae = other_dir
    with pytest.raises(ValueError, match="not the one the transformer was trained on.*n_hid"):
        coco.eval_coco(cfg, str(tmp_path / "e"))
    assert not os.path.exists(tmp_path / "e" / coco.OUT_SUBDIR / coco.SETTINGS_FILE)
    cfg = _eval_cfg(coco_dir, model)
    cfg.coco.root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        coco.eval_coco(cfg, str(tmp_path / "d"))


# ----------------------------------------------------------------------------- helpers


def test_draw_is_deterministic_and_one_caption_per_image():
    images = [coco_files.CocoImage(i, f"{i}.jpg", tuple(f"caption {i}.{j}" for j in range(1 + i % 4)))
              for i in range(50)]
    a, b = coco_files.draw_captions(images, 20, 1), coco_files.draw_captions(images, 20, 1)
    assert a == b and len({e["image_id"] for e in a}) == 20
    assert a != coco_files.draw_captions(images, 20, 2)
    assert all(e["caption"] == f"caption {e['image_id']}.{e['caption_choice']}" for e in a)
    with pytest.raises(ValueError, match="asked for 51 captions .* only 50"):
        coco_files.draw_captions(images, 51, 0)


def test_chunks_and_sizes():
    assert coco.rerank_sizes("", 8) == [1, 2, 4, 8]
    assert coco.rerank_sizes("", 12) == [1, 2, 4, 8, 12]
    assert coco.rerank_sizes("4, 1", 16) == [1, 4, 16]
    assert best_of.chunk_bounds(8, [1, 2, 4, 8], 64) == [(0, 1), (1, 2), (2, 4), (4, 8)]
    assert best_of.chunk_bounds(512, [1, 512], 128) == [(0, 1), (1, 128), (128, 256),
                                                      (256, 384), (384, 512)]
    assert best_of.chunk_bounds(10, [3, 10], 4) == [(0, 3), (3, 4), (4, 8), (8, 10)]
    assert coco.clip_score([0.3, -0.2, 0.1]) == pytest.approx(100 * 0.4 / 3)


def test_blur_resize_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert blur.gaussian_blur(images, 0) is images
    blurred = blur.gaussian_blur(images, 2)
    assert blurred.shape == images.shape and blurred.std() < images.std()
    with pytest.raises(ValueError, match="radius must be >= 0"):
        blur.gaussian_blur(images, -1)
    wide = Image.fromarray(np.concatenate([np.zeros((10, 10, 3), np.uint8),
                                           np.full((10, 20, 3), 255, np.uint8),
                                           np.zeros((10, 10, 3), np.uint8)], axis=1))
    crop = blur.resize_center_crop(wide, 8)
    assert crop.shape == (8, 8, 3) and crop[:, 2:6].min() > 200  # the centre survives
    path = plots.line_plot(str(tmp_path / "p.png"),
                           [plots.Series("a", [1, 2, 4], [3.0, 2.0, None]),
                            plots.Series("b", [1, 2, 4], [1.0, float("nan"), 1.5])],
                           title="t", xlabel="x", ylabel="y", x_ticks=[1, 2, 4], x_log2=True)
    with Image.open(path) as im:
        assert im.size == (720, 440)
    assert plots.nice_ticks(0.3, 7.6) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="no finite points"):
        plots.line_plot(str(tmp_path / "q.png"), [plots.Series("a", [1], [None])])


def test_frechet_reference_matches_fid():
    rng = np.random.default_rng(0)
    d = 16
    for m, n in [(6, 5), (50, 40), (6, 40), (50, 3)]:
        real = rng.standard_normal((m, d)) @ rng.standard_normal((d, d))
        gen = 0.5 + rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
        want = fid.fid_from_features(real, gen)
        got = fid.FrechetReference.from_features(real).distance(gen)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (m, n)
        got = fid.FrechetReference.from_stats(*fid.gaussian_stats(real)).distance(gen)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (m, n)
    # A covariance of few samples in many dimensions, factorised in its range only.
    real, gen = rng.standard_normal((5, 256)), rng.standard_normal((300, 256)) + 0.1
    want = fid.fid_from_features(real, gen)
    ref = fid.FrechetReference.from_stats(*fid.gaussian_stats(real), count=5)
    assert ref.distance(gen) == pytest.approx(want, rel=1e-9)
    assert ref.distance(gen[:7]) == pytest.approx(fid.fid_from_features(real, gen[:7]), rel=1e-9)
