"""The contrastive scorer's stage on a tiny `shapes` dataset: tokenizer layout, config
checks, the loss, an overfit check, training with export, and bitwise resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle_jax import configlib, exports, sharding
from dalle_jax import metrics as metrics_lib
from dalle_jax.data import shapes, sources
from dalle_jax.tokenizers import bpe
from dalle_jax.train import clip_task, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    captions = [shapes.sample_scene("train", i)[1] for i in range(1000)]
    return bpe.train_bpe(captions, str(tmp_path_factory.mktemp("bpe") / "bpe"), vocab_size=512,
                         strict_vocab_size=False)


def _cfg(data_dir, bpe_model, total=4):
    cfg = configlib.load_config(os.path.join(ROOT, "configs", "clip_shapes.py")
                                + f":steps={total},batch=16,bpe={bpe_model}")
    cfg.data.data_dir = data_dir
    cfg.data.shapes.update(image_size=16, num_train=64, num_validation=16, num_test=16)
    cfg.data.image_size = 16
    cfg.model.update(embed_dim=16, image_size=16, patch_size=4, vision_width=16, vision_layers=1,
                     vision_heads=2, context_length=16, text_width=16, text_layers=1,
                     text_heads=2)
    cfg.contrastive.negatives = 3
    cfg.eval_every = total  # one evaluation, at the end
    cfg.evals.clip.update(num_examples=16, negatives=4, batch_size=16)
    cfg.ckpt.every_steps = 2
    cfg.log.update(every_steps=1, progress_bar=False)
    return cfg


def test_tokenizer_layout_and_truncation(bpe_model):
    tok = clip_task.BpeClipTokenizer(bpe_model)
    ids = tok.bpe.encode("a red circle")
    long = "on the left a magenta triangle, on the right a green circle"
    n_long = len(tok.bpe.encode(long))
    tokens, eot, truncated = tok.encode_batch(["a red circle", long.encode()], context_length=8)
    assert tokens.dtype == np.int32 and tokens.shape == (2, 8)
    assert eot.dtype == np.int32 and truncated.dtype == bool
    want = [bpe.BOS_ID, *ids, bpe.EOS_ID] + [bpe.PAD_ID] * (8 - len(ids) - 2)
    assert tokens[0].tolist() == want and eot[0] == len(ids) + 1 and not truncated[0]
    assert n_long > 6 and truncated[1] and eot[1] == 7  # EOT in the last slot
    assert tokens[1, 0] == bpe.BOS_ID and tokens[1, 7] == bpe.EOS_ID
    assert tokens[1, 1:7].tolist() == tok.bpe.encode(long)[:6]
    assert tok.vocab_size == tok.bpe.vocab_size and int(tokens.max()) < tok.vocab_size
    ident = tok.identity()
    assert ident["file"] == "bpe.model" and ident["sha256"] == tok.bpe.sha256
    assert ident["type"].startswith("sentencepiece")
    with pytest.raises(ValueError, match="context_length=2"):
        tok.encode_batch(["a red circle"], context_length=2)


def test_bad_config_values_fail_clearly(data_dir, bpe_model, tmp_path):
    cfg = _cfg(data_dir, bpe_model)
    cfg.model.patch_size = 5
    cfg.model.text_heads = 3
    with pytest.raises(ValueError, match=r"(?s)model.patch_size=5 does not divide "
                                         r"model.image_size=16.*model.text_heads=3"):
        clip_task.train_clip(cfg, str(tmp_path))
    cfg = _cfg(data_dir, bpe_model)
    cfg.data.augment = "dvae"
    with pytest.raises(ValueError, match="flips images left-right"):
        clip_task.make_task(cfg, str(tmp_path))
    cfg.data.augment = "none"
    cfg.text.bpe_model = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="no caption BPE model"):
        clip_task.make_task(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="unknown config arg 'bpee'"):
        configlib.load_config(os.path.join(ROOT, "configs", "clip_shapes.py") + ":bpee=x")


def test_loss_masks_same_meaning_and_counts_hard_negatives():
    e = jnp.eye(4, dtype=jnp.float32)
    img, pos = e[:3], e[:3]
    # Caption 2 means the same as caption 0: image 0 may not be penalised for it.
    meaning = jnp.asarray([5, 6, 5])
    neg = jnp.stack([e[3:4]] * 3)  # orthogonal negatives: every image beats them
    loss, m = clip_task.contrastive_loss(img, pos, neg, jnp.log(10.0), meaning)
    loss_nomask, _ = clip_task.contrastive_loss(img, pos, neg, jnp.log(10.0),
                                                jnp.asarray([0, 1, 2]))
    assert float(m["hard_negative_accuracy"]) == 1.0 and float(m["i2t_accuracy"]) == 1.0
    assert float(loss) < float(loss_nomask) + 1e-6
    # A hard negative equal to the image's own caption direction is a miss.
    neg = pos[:, None, :] * 1.0
    _, m = clip_task.contrastive_loss(img, pos, neg + 0.1 * e[3][None, None], jnp.log(10.0),
                                      meaning)
    assert float(m["hard_negative_accuracy"]) == 0.0
    # The logit scale is capped at 100.
    _, m = clip_task.contrastive_loss(img, pos, neg, jnp.log(1e4), meaning)
    np.testing.assert_allclose(float(m["logit_scale"]), 100.0, rtol=1e-5)


def test_paraphrase_loss_prefers_the_paraphrase():
    e = jnp.eye(4, dtype=jnp.float32)
    anchor, para = e[:2], e[:2]
    neg = jnp.stack([e[2:4], e[2:4]])
    loss, m = clip_task.paraphrase_loss(anchor, para, neg, jnp.log(20.0), jnp.asarray([0, 1]))
    assert float(m["text_accuracy"]) == 1.0 and float(m["text_hard_negative_accuracy"]) == 1.0
    swapped, m = clip_task.paraphrase_loss(anchor, para[::-1], neg, jnp.log(20.0),
                                           jnp.asarray([0, 1]))
    assert float(m["text_accuracy"]) == 0.0 and float(swapped) > float(loss)


def test_paraphrases_mean_the_same(bpe_model):
    from dalle_jax.data import shapes_negatives

    rng = np.random.default_rng(0)
    for i in range(30):
        caption = shapes.sample_scene("train", i)[1]
        p = shapes_negatives.paraphrase(caption, rng)
        assert p != caption and shapes.parse_caption(p) == shapes.parse_caption(caption)


def test_overfits_a_fixed_batch(data_dir, bpe_model, tmp_path):
    cfg = _cfg(data_dir, bpe_model)
    sources.prepare(cfg.data)
    task = clip_task.make_task(cfg, str(tmp_path))
    host = next(clip_task.make_train_iter(cfg))
    assert host["batch_position"].tolist() == [0] * 16
    batch = task.device_batch(host)
    # Per image: its caption, a paraphrase, 3 hard negatives.
    assert batch["tokens"].shape == (16, 5, 16) and batch["eot"].shape == (16, 5)
    assert batch["pixels"].shape == (16, 16, 16, 3) and batch["meaning"].shape == (16,)
    # Deterministic: the same host batch gives the same negatives.
    np.testing.assert_array_equal(batch["tokens"], task.device_batch(host)["tokens"])
    params = sharding.unboxed(task.init_variables(jax.random.key(0)))["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        (loss, _), g = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, None, 0)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for _ in range(40):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_export_and_resume(data_dir, bpe_model, tmp_path):
    cfg = _cfg(data_dir, bpe_model)
    sources.prepare(cfg.data)
    straight = str(tmp_path / "straight")
    clip_task.train_clip(cfg, straight)
    export = os.path.join(straight, "exports", "step_0000004")
    meta = exports.read_meta(export)
    assert meta["identity"]["kind"] == "clip" and meta["source"] == "trained"
    assert meta["step"] == 4 and meta["ema"] is True
    assert meta["identity"]["model"]["patch_size"] == 4
    assert meta["identity"]["tokenizer"]["file"] == "bpe.model"
    with open(os.path.join(export, "tokenizer", "bpe.model"), "rb") as f, \
            open(bpe_model, "rb") as g:
        assert f.read() == g.read()
    for split in ("validation", "test_compositional"):
        for k in ("retrieval_top1", "retrieval_top1_pairs", "hard_negative_accuracy"):
            assert 0.0 <= meta["retrieval"][f"{split}/{k}"] <= 1.0
    rows = metrics_lib.read_jsonl(os.path.join(straight, "metrics.jsonl"))
    for k in ("train/loss", "train/i2t_accuracy", "train/t2i_accuracy", "train/temperature",
              "train/hard_negative_accuracy", "eval/validation/retrieval_top1",
              "eval/test_compositional/hard_negative_accuracy",
              "eval/validation/negatives/swap_relation"):
        assert any(k in r for r in rows.values()), k

    # The export loads as a reranking scorer and scores image/caption pairs.
    from dalle_jax.rerank import scorer as scorer_lib

    scorer = scorer_lib.load_scorer(export)
    images = np.stack([shapes.example("validation", i, 16)["image"] for i in range(3)])
    caps = [shapes.example("validation", i, 16)["caption"] for i in range(3)]
    scores = scorer.score(images, caps)
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 1.0 + 1e-5)

    # Interrupted after 2 steps, then the same job again: identical parameters.
    resumed = str(tmp_path / "resumed")
    task = clip_task.make_task(cfg, resumed)
    loop.train(cfg, resumed, task, lambda: clip_task.make_train_iter(cfg), stop_at_step=2)
    assert not os.path.exists(os.path.join(resumed, "exports"))
    clip_task.train_clip(cfg, resumed)
    a, _ = exports.load(export)
    b, meta_b = exports.load(os.path.join(resumed, "exports", "step_0000004"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert json.dumps(meta_b["retrieval"], sort_keys=True) == json.dumps(
        meta["retrieval"], sort_keys=True)


def test_evaluate_job_reproduces_the_exports_retrieval(data_dir, bpe_model, tmp_path):
    """--job=evaluate on a scorer export runs the evaluator training ran: the same figures
    as the export's final evaluation, in WORKDIR/evaluate/step_N."""
    from dalle_jax.evals import job as eval_job

    cfg = _cfg(data_dir, bpe_model)
    sources.prepare(cfg.data)
    run = str(tmp_path / "run")
    clip_task.train_clip(cfg, run)
    meta = exports.read_meta(os.path.join(run, "exports", "step_0000004"))
    cfg.evaluate.params = run
    record = eval_job.run(cfg, run)
    assert record["kind"] == "scorer" and record["step"] == 4
    want = {k: v for k, v in meta["retrieval"].items() if k != "step"}
    assert want and record["metrics"] == want
    assert os.path.isfile(os.path.join(run, "evaluate", "step_0000004", "results.json"))

    # Bad settings name the setting.
    cfg.evals.clip.negatives = 0
    cfg.evaluate.out_dir = str(tmp_path / "other")
    with pytest.raises(ValueError, match="evals.clip.negatives must be >= 1"):
        eval_job.run(cfg, run)
