"""The dVAE stage end to end on a tiny `shapes` dataset: train, evaluate, export, resume."""

import os

import jax
import numpy as np
import pytest

from dalle_jax import configlib, exports, jobs
from dalle_jax import metrics as metrics_lib
from dalle_jax.data import sources
from dalle_jax.train import dvae_task, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _cfg(data_dir, total=4):
    cfg = configlib.load_config(os.path.join(ROOT, "configs", "dvae_shapes.py") + f":steps={total},batch=8")
    cfg.data.data_dir = data_dir
    cfg.data.shapes.update(image_size=16, num_train=64, num_validation=16, num_test=8)
    cfg.data.image_size = 16
    cfg.model.update(image_size=16, group_count=2, n_hid=8, n_blk_per_group=1, n_init=8, vocab_size=16)
    cfg.eval_every = 2
    cfg.evals.recon.update(num_batches=1, grid_examples=4)
    cfg.ckpt.every_steps = 2
    cfg.log.update(every_steps=1, progress_bar=False)
    return cfg


def test_train_dvae_resume_and_export(data_dir, tmp_path):
    cfg = _cfg(data_dir)
    sources.prepare(cfg.data)
    straight = str(tmp_path / "straight")
    jobs.train_dvae(cfg, straight)
    export = os.path.join(straight, "exports", "step_0000004")
    assert os.path.exists(os.path.join(straight, "eval", "recon_latest.png"))
    rows = metrics_lib.read_jsonl(os.path.join(straight, "metrics.jsonl"))
    for k in ("train/loss", "train/recon_nll", "train/kl_per_dim", "train/elb_bpd", "train/mse",
              "train/psnr", "train/codebook_usage", "train/codebook_perplexity", "train/tau",
              "train/beta", "train/lr", "train/grad_norm", "train/param_norm",
              "perf/examples_per_second", "eval/mse", "eval/psnr", "eval/elb_bpd",
              "eval/codebook_usage"):
        assert any(k in r for r in rows.values()), k

    # Interrupted after 2 steps, then the same command again: identical parameters.
    resumed = str(tmp_path / "resumed")
    task = dvae_task.make_task(cfg, resumed)
    loop.train(cfg, resumed, task, lambda: sources.make_input(cfg.data, "train"), stop_at_step=2)
    assert not os.path.exists(os.path.join(resumed, "exports"))
    jobs.train_dvae(cfg, resumed)
    a, meta_a = exports.load(export)
    b, _ = exports.load(os.path.join(resumed, "exports", "step_0000004"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert meta_a["identity"]["kind"] == "dvae" and meta_a["identity"]["vocab_size"] == 16

    # Rerunning a finished run does nothing (and overwrites nothing).
    mtime = os.path.getmtime(os.path.join(export, "meta.json"))
    jobs.train_dvae(cfg, straight)
    assert os.path.getmtime(os.path.join(export, "meta.json")) == mtime


def test_resume_with_a_different_dvae_is_refused(data_dir, tmp_path):
    cfg = _cfg(data_dir, total=2)
    sources.prepare(cfg.data)
    jobs.train_dvae(cfg, str(tmp_path))
    cfg.total_steps = 4
    cfg.model.vocab_size = 32
    with pytest.raises(ValueError, match="(?s)different model.*vocab_size: checkpoint has 16"):
        jobs.train_dvae(cfg, str(tmp_path))


def test_image_size_mismatch_is_reported(data_dir, tmp_path):
    cfg = _cfg(data_dir)
    cfg.model.image_size = 32
    with pytest.raises(ValueError, match="data.image_size=16 but model.image_size=32"):
        dvae_task.make_task(cfg, str(tmp_path))


def test_encode_job_writes_resumable_token_shards(data_dir, tmp_path):
    from dalle_jax.data import augment, tokens
    from dalle_jax.tokenizers.image_tokenizer import ImageTokenizer

    cfg = _cfg(data_dir, total=1)
    cfg.evals.recon.num_batches = 0
    sources.prepare(cfg.data)
    workdir = str(tmp_path / "w")
    jobs.train_dvae(cfg, workdir)
    cfg.encode.update(shard_size=24, batch_size=16)
    jobs.encode(cfg, workdir)
    out = os.path.join(workdir, "tokens")
    meta = tokens.read_meta(out)
    assert meta["splits"]["train"] == {"num_examples": 64, "shard_size": 24, "num_shards": 3}
    train = tokens.TokenSource(out, "train")
    assert len(train) == 64 and train.grid == 8 and train.vocab_size == 16
    assert len(tokens.TokenSource(out, "test_compositional")) == 8

    # Records follow the source order and equal a direct encode of the centre crop.
    src = sources.load_split(cfg.data, "train")
    tok = ImageTokenizer.load(jobs.latest_export(workdir))
    idx = [0, 23, 24, 63]
    images = np.stack([augment.center_crop_resize(src[i]["image"], None, 16) for i in idx])
    want = np.asarray(tok.encode(images)).reshape(len(idx), -1)
    for row, i in zip(want, idx):
        rec = train[i]
        np.testing.assert_array_equal(rec["image_tokens"], row)
        assert rec["caption"] == src[i]["caption"].decode()
        assert rec["index"] == i and rec["image_tokens"].dtype == np.int32
        np.testing.assert_array_equal(rec["colors"], src[i]["colors"])

    # A lost shard is rewritten on rerun; finished shards are left alone.
    keep = tokens.shard_path(out, "train", 0, 3)
    lost = tokens.shard_path(out, "train", 2, 3)
    mtime = os.path.getmtime(keep)
    os.remove(lost)
    with pytest.raises(FileNotFoundError, match="incomplete: 1 of 3 shards missing"):
        tokens.TokenSource(out, "train")
    jobs.encode(cfg, workdir)
    assert os.path.exists(lost) and os.path.getmtime(keep) == mtime
    assert train[63]["caption"] == tokens.TokenSource(out, "train")[63]["caption"]

    # Tokens from another dVAE never mix into the same directory.
    other = str(tmp_path / "other")
    cfg.model.vocab_size = 32
    jobs.train_dvae(cfg, other)
    cfg.encode.params = jobs.latest_export(other)
    with pytest.raises(ValueError, match="different dvae"):
        jobs.encode(cfg, workdir)


def test_encode_without_a_dvae_says_what_to_do(data_dir, tmp_path):
    cfg = _cfg(data_dir)
    with pytest.raises(FileNotFoundError, match="train the dVAE first"):
        jobs.encode(cfg, str(tmp_path))


def test_bfloat16_training_runs_and_float16_is_refused(data_dir, tmp_path):
    cfg = _cfg(data_dir, total=2)
    sources.prepare(cfg.data)
    cfg.precision.compute_dtype = "bfloat16"
    jobs.train_dvae(cfg, str(tmp_path / "bf16"))
    rows = metrics_lib.read_jsonl(os.path.join(str(tmp_path / "bf16"), "metrics.jsonl"))
    assert all(np.isfinite(rows[s]["train/loss"]) for s in (1, 2))
    # float16 needs per-resblock gradient scaling, which only the transformer has: the run
    # stops before it writes anything.
    cfg.precision.compute_dtype = "float16"
    with pytest.raises(ValueError, match="float16 needs per-resblock gradient scaling"):
        jobs.train_dvae(cfg, str(tmp_path / "fp16"))
    assert not os.path.exists(str(tmp_path / "fp16" / "checkpoints"))
