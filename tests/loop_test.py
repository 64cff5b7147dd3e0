"""The generic training loop on a toy task: resume exactness, identity checks, NaN stop."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax import exports
from dalle_jax import metrics as metrics_lib
from dalle_jax.train import loop


class _Iter:
    """Deterministic toy data with a checkpointable position."""

    def __init__(self, batch=8, poison_at=None):
        self.i, self.batch, self.poison_at = 0, batch, poison_at

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng(self.i)
        x = rng.normal(size=(self.batch, 4)).astype(np.float32)
        y = x @ np.arange(1, 5, dtype=np.float32)[:, None] + 0.5
        if self.poison_at is not None and self.i >= self.poison_at:
            x = np.full_like(x, np.nan)
        self.i += 1
        return {"x": x, "y": y, "caption": np.array(["a"] * self.batch, object)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


class _Linear(nn.Module):
    width: int = 1

    @nn.compact
    def __call__(self, x):
        k = nn.with_logical_partitioning(nn.initializers.normal(0.1), ("embed", "mlp"))
        return nn.Dense(self.width, kernel_init=k)(x)


def _task(width=1, evaluate=None):
    model = _Linear(width)

    def loss_fn(params, batch, rng, step):
        pred = model.apply({"params": params}, batch["x"])
        noise = 0.01 * jax.random.normal(rng, pred.shape)  # uses the step rng: resume must match it
        err = jnp.mean((pred + noise - batch["y"]) ** 2)
        return err, {"mse": err, "hist/sign": jnp.stack([jnp.sum(pred > 0), jnp.sum(pred <= 0)])}

    def summarize(m):
        m = dict(m)
        m["positive_fraction"] = float(m["hist/sign"][0] / max(1, m["hist/sign"].sum()))
        return m

    return loop.Task(
        name="toy", identity={"width": width},
        init_variables=lambda rng: model.init(rng, jnp.zeros((1, 4))),
        loss_fn=loss_fn,
        device_batch=lambda b: {"x": b["x"], "y": b["y"]},
        summarize=summarize, evaluate=evaluate)


def _cfg(total=6, ckpt_every=2):
    c = mlc.ConfigDict()
    c.seed = 3
    c.total_steps = total
    c.eval_every = 3
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding_rules = "dp"
    c.optim = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, clip_global_norm=1.0,
                   grad_accum=1, ema_decay=0.9, ema_every=1,
                   lr=dict(kind="cosine", start_value=0.05, end_value=0.001, steps=total, warmup=0,
                           shape="half"))
    c.ckpt = dict(every_steps=ckpt_every, max_to_keep=5, async_save=True, resume_from="", init_params="")
    c.log = dict(every_steps=2, progress_bar=False)
    return c


def _params(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_resume_is_exact(tmp_path):
    straight = loop.train(_cfg(ckpt_every=1), str(tmp_path / "a"), _task(), lambda: _Iter())
    loop.train(_cfg(), str(tmp_path / "b"), _task(), lambda: _Iter(), stop_at_step=3)
    resumed = loop.train(_cfg(), str(tmp_path / "b"), _task(), lambda: _Iter())
    assert int(resumed.step) == 6
    jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(straight.ema_params), jax.device_get(resumed.ema_params))
    a = metrics_lib.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    b = metrics_lib.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
    assert a[6]["train/loss"] == b[6]["train/loss"]
    assert set(a) == {2, 4, 6}
    for k in ("train/grad_norm", "perf/examples_per_second"):
        assert k in a[6]
    # The row at step 6 averages steps 5 and 6 (the log window), recomputed here from the
    # params saved after every step: step s trains on batch s - 1 with the params saved
    # after step s - 1. A histogram (hist/) is summed over the window's steps.
    saved = {s: ckpt_lib.params_from_checkpoint(str(tmp_path / "a" / "checkpoints" / str(s)),
                                                ema=False)[0] for s in (4, 5, 6)}
    jax.tree.map(np.testing.assert_array_equal, saved[6], _params(straight))

    def flat(params):
        return np.concatenate([np.ravel(v) for v in jax.tree.leaves(params)]).astype(np.float64)

    def pred(params, i):
        batch = _Iter()
        batch.i = i
        x = next(batch)["x"]
        return x @ np.asarray(params["Dense_0"]["kernel"]) + np.asarray(params["Dense_0"]["bias"])

    positive = [int(np.sum(pred(saved[s - 1], s - 1) > 0)) for s in (5, 6)]
    assert positive[0] != positive[1]  # so the window's total differs from either step's
    np.testing.assert_allclose(a[6]["train/positive_fraction"], sum(positive) / 16, rtol=1e-6)
    np.testing.assert_allclose(
        a[6]["train/param_norm"],
        np.mean([np.linalg.norm(flat(saved[s])) for s in (5, 6)]), rtol=1e-5)
    np.testing.assert_allclose(
        a[6]["train/update_norm"],
        np.mean([np.linalg.norm(flat(saved[s]) - flat(saved[s - 1])) for s in (5, 6)]),
        rtol=1e-4)
    # lr is the schedule at the 0-based step a batch trains on: the half cosine from 0.05
    # to 0.001 over 6 steps, averaged over steps 0, 1 (row 2) and 4, 5 (row 6).
    def lr(t):
        return 0.05 + (0.001 - 0.05) * 0.5 * (1 - np.cos(np.pi * t / 6))

    np.testing.assert_allclose(a[2]["train/lr"], (lr(0) + lr(1)) / 2, rtol=1e-6)
    np.testing.assert_allclose(a[6]["train/lr"], (lr(4) + lr(5)) / 2, rtol=1e-6)


def test_eval_is_called_with_params(tmp_path):
    calls = []

    def evaluate(params, step):
        calls.append(step)
        return {"score": float(step)}

    loop.train(_cfg(), str(tmp_path), _task(evaluate=evaluate), lambda: _Iter())
    assert calls == [3, 6]
    rows = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert rows[3]["eval/score"] == 3.0


def test_checkpoint_from_different_model_is_refused(tmp_path):
    loop.train(_cfg(total=2), str(tmp_path), _task(width=1), lambda: _Iter())
    with pytest.raises(ValueError, match="(?s)different model.*width: checkpoint has 1, this run has 2"):
        loop.train(_cfg(total=4), str(tmp_path), _task(width=2), lambda: _Iter())
    # Nothing saved was touched by the refused run.
    assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).all_steps() == [2]


def test_non_finite_loss_stops_with_step_range(tmp_path):
    with pytest.raises(FloatingPointError, match="between steps 2 and 4"):
        loop.train(_cfg(), str(tmp_path), _task(), lambda: _Iter(poison_at=3))


def test_init_params_from_export(tmp_path):
    state = loop.train(_cfg(total=2), str(tmp_path / "a"), _task(), lambda: _Iter())
    export = exports.write(str(tmp_path / "export"), state.params,
                                    {"task": "toy", "identity": {"width": 1}})
    with pytest.raises(FileExistsError):
        exports.write(export, state.params, {"identity": {}})
    cfg = _cfg(total=1)
    cfg.ckpt.init_params = export
    seen = {}

    def evaluate(params, step):
        seen["p"] = params
        return {}

    out = loop.train(cfg, str(tmp_path / "b"), _task(), lambda: _Iter())
    assert int(out.step) == 1
    with open(os.path.join(export, "meta.json")) as f:
        assert json.load(f)["identity"] == {"width": 1}
    cfg.ckpt.init_params = str(tmp_path / "a")
    with pytest.raises(ValueError, match="not a params export"):
        loop.train(cfg, str(tmp_path / "c"), _task(), lambda: _Iter())
