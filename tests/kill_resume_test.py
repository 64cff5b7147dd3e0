"""A single-process training run killed with SIGKILL (no notice, no final checkpoint: a lost
machine) and started again with the same command ends bitwise where an uninterrupted run
ends: the same params, EMA params and per-step metrics."""

import os
import signal
import time

import jax
import numpy as np
import pytest
from conftest import launch, run, train_rows, wait
from multihost_test import transformer_args
from train_transformer_test import token_dir, tokenizer  # noqa: F401  (module fixtures)

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax import metrics as metrics_lib

STEPS, EVERY = 120, 20


def _saved_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _kill_after_a_checkpoint(workdir, proc, past=3, timeout=240):
    """SIGKILLs ``proc`` once a checkpoint is complete and ``past`` more steps are logged,
    so the rerun must both restore and redo the steps after it. Returns the saved step."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        saved = _saved_steps(workdir)
        if saved and os.path.exists(os.path.join(workdir, "metrics.jsonl")) \
                and train_rows(workdir) >= saved[-1] + past:
            proc.send_signal(signal.SIGKILL)
            return saved[-1]
        time.sleep(0.05)
    raise AssertionError("the run ended or stalled before it could be killed mid-run:\n"
                         + open(proc.log_path).read()[-3000:])


def _train_metrics(workdir):
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {s: {k: v for k, v in r.items() if k.startswith("train/")}
            for s, r in rows.items() if "train/loss" in r}


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_matches_an_uninterrupted_run_bitwise(
        token_dir, tokenizer, tmp_path):  # noqa: F811
    args = transformer_args(token_dir, tokenizer, steps=STEPS,
                   extra=("--config.eval_every=100000", f"--config.ckpt.every_steps={EVERY}"))
    straight = str(tmp_path / "straight")
    run(args, straight)

    work = str(tmp_path / "killed")
    (proc,) = launch(args, work)
    killed_at = _kill_after_a_checkpoint(work, proc)
    ((rc, text),) = wait([proc], timeout=60)
    assert rc == -signal.SIGKILL, text[-3000:]
    assert _saved_steps(work)[-1] < STEPS and not os.path.exists(os.path.join(work, "exports"))
    logged_before = train_rows(work)
    assert logged_before > killed_at  # steps after the checkpoint were lost with the process

    ((_, text),) = run(args, work)
    assert f"resumed from {os.path.join(work, 'checkpoints')} step" in text, text[-3000:]
    # The rerun restarted at a saved step, redoing (and logging again) what was lost.
    assert train_rows(work) > STEPS
    got, want = _train_metrics(work), _train_metrics(straight)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:  # loss, grad/param/update norms, lr: equal, not close
        assert got[step] == want[step], (step, got[step], want[step])
    for ema in (False, True):
        a, _ = ckpt_lib.params_from_checkpoint(os.path.join(straight, "checkpoints"), ema=ema)
        b, meta = ckpt_lib.params_from_checkpoint(os.path.join(work, "checkpoints"), ema=ema)
        assert meta["step"] == STEPS and meta["ema"] == ema
        jax.tree.map(np.testing.assert_array_equal, a, b)
    print(f"killed after the checkpoint at step {killed_at} with {logged_before} steps logged; "
          f"the rerun matched the uninterrupted run bitwise")
