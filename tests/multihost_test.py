"""Several JAX processes on this machine (gloo on 127.0.0.1, fake CPU devices) run the
command-line jobs as a multi-host cluster would: the same losses as one process, checkpoints
that move between process counts and mesh shapes, preemption that every process agrees
on, a dead process that stops the others, and a config that must agree everywhere."""

import os
import signal
import time

import numpy as np
import pytest
from conftest import launch, losses, run, train_rows, wait, wait_for_training
from train_transformer_test import dvae_export, token_dir, tokenizer  # noqa: F401  (module fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Losses of a 2 x 4-device run against a 1 x 8-device run of the same mesh: the programs
# are the same; only the cross-process all-reduce (gloo) may sum in another order.
RTOL = 1e-5


def transformer_args(tokens, bpe, steps=6, total=None, extra=()):
    """The tiny stage-2 run of train_transformer_test (its token directory and BPE model), as
    command-line flags."""
    return ["--job=train_transformer",
            f"--config={ROOT}/configs/transformer_shapes.py:steps={steps},batch=8,tokens={tokens}",
            "--config.text.text_len=8", f"--config.text.bpe_model={bpe.path}",
            "--config.text.vocab_size=300", "--config.model.width=32", "--config.model.depth=2",
            "--config.model.heads=2", "--config.model.conv_kernel=3", "--config.eval_every=3",
            "--config.evals.val.num_batches=2", "--config.ckpt.every_steps=100",
            "--config.ckpt.async_save=False", "--config.log.every_steps=1",
            "--config.log.progress_bar=False", f"--config.total_steps={total or steps}",
            *extra]


def test_two_processes_train_stage2_like_one(token_dir, tokenizer, tmp_path):  # noqa: F811
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    run(transformer_args(token_dir, tokenizer), one, processes=1, devices=8)
    results = run(transformer_args(token_dir, tokenizer), two, processes=2, devices=4)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=RTOL)
    # Only process 0 writes the metrics and the config; each process writes its own log
    # file and its own part of every checkpoint and export.
    assert os.path.exists(os.path.join(two, "exports", "step_0000006", "meta.json"))
    logs = [open(os.path.join(two, "logs", f"train_transformer.p{i}.log")).read() for i in range(2)]
    assert "] step 6: " in logs[0] and "] step 6: " not in logs[1]  # the metrics line
    # The console has the training summary, not every logged step.
    assert "] step 6: " not in results[0][1] and "transformer: step 6 of 6" in results[0][1]
    for tree in ("checkpoints/6/state", "exports/step_0000006/params"):
        for i in range(2):
            assert os.listdir(os.path.join(two, tree, f"ocdbt.process_{i}")), (tree, i)
    print(f"stage 2, 1 x 8 vs 2 x 4 devices: max relative loss difference "
          f"{max(abs(b[s] / a[s] - 1) for s in a):.1e}")


def dvae_args(data_dir, steps=4, total=None, job="train_dvae"):
    """The tiny dVAE run of train_dvae_test, as command-line flags."""
    return [f"--job={job}", f"--config={ROOT}/configs/dvae_shapes.py:steps={steps},batch=8",
            f"--config.data.data_dir={data_dir}", "--config.data.shapes.image_size=16",
            "--config.data.shapes.num_train=64", "--config.data.shapes.num_validation=16",
            "--config.data.shapes.num_test=8", "--config.data.image_size=16",
            "--config.model.image_size=16", "--config.model.group_count=2",
            "--config.model.n_hid=8", "--config.model.n_blk_per_group=1",
            "--config.model.n_init=8", "--config.model.vocab_size=16", "--config.eval_every=2",
            "--config.evals.recon.num_batches=1", "--config.evals.recon.grid_examples=4",
            "--config.ckpt.every_steps=100", "--config.ckpt.async_save=False",
            "--config.log.every_steps=1", "--config.log.progress_bar=False",
            f"--config.total_steps={total or steps}"]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shapes"))
    run(dvae_args(d, job="prepare"), os.path.join(d, "prepare"))
    return d


def test_two_processes_train_the_dvae_like_one(shapes_dir, tmp_path):
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    run(dvae_args(shapes_dir), one, processes=1, devices=8)
    run(dvae_args(shapes_dir), two, processes=2, devices=4)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 5))
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=RTOL)
    print(f"dVAE, 1 x 8 vs 2 x 4 devices: max relative loss difference "
          f"{max(abs(b[s] / a[s] - 1) for s in a):.1e}")
    # The reconstruction grid (process 0) shows the first rows of the global batch.
    assert os.path.exists(os.path.join(two, "eval", "recon_latest.png"))


@pytest.mark.slow
def test_checkpoints_move_between_process_counts_and_meshes(token_dir, tokenizer,  # noqa: F811
                                                            tmp_path):
    # Steps 1-3 on one layout, 4-6 on the other, against 6 uninterrupted steps. The
    # schedule is that of a 6-step run throughout (total_steps only stops the first part).
    straight = str(tmp_path / "straight")
    run(transformer_args(token_dir, tokenizer), straight)
    reference = losses(straight)
    fsdp = ["--config.sharding_rules=fsdp", "--config.mesh.fsdp=4"]
    layouts = {"2 processes x 4 devices, dp": dict(processes=2, devices=4, extra=()),
               "1 process x 8 devices, fsdp 4": dict(processes=1, devices=8, extra=fsdp)}
    for name, (first, second) in {"2x4 -> 1x8": list(layouts.values()),
                                  "1x8 -> 2x4": list(layouts.values())[::-1]}.items():
        work = str(tmp_path / name.replace(" ", ""))
        run(transformer_args(token_dir, tokenizer, total=3, extra=first["extra"]), work,
            processes=first["processes"], devices=first["devices"])
        run(transformer_args(token_dir, tokenizer, extra=second["extra"]), work,
            processes=second["processes"], devices=second["devices"])
        got = losses(work)
        assert sorted(got) == list(range(1, 7)), name
        # The second part resumed at step 3 rather than starting again (which would log
        # steps 1-3 twice).
        assert train_rows(work) == 6, name
        np.testing.assert_allclose([got[s] for s in range(1, 7)],
                                   [reference[s] for s in range(1, 7)], rtol=1e-4, err_msg=name)
        print(f"{name}: max relative loss difference to the uninterrupted run "
              f"{max(abs(got[s] / reference[s] - 1) for s in range(1, 7)):.1e}")


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [1, 0])
def test_sigterm_to_any_process_saves_everywhere_and_resumes(token_dir, tokenizer,  # noqa: F811
                                                             tmp_path, signalled):
    steps = 150  # long enough that the notice lands mid-run on a fast machine too
    args = transformer_args(token_dir, tokenizer, steps=steps, extra=("--config.eval_every=1000",))
    straight = str(tmp_path / "straight")  # 1 x 8 devices: the same losses, faster
    run(args, straight, processes=1, devices=8)

    work = str(tmp_path / "preempted")
    procs = launch(args, work, processes=2, devices=4)
    wait_for_training(work, procs)
    procs[signalled].send_signal(signal.SIGTERM)
    results = wait(procs, timeout=120)
    for rc, text in results:
        assert rc == 0, text[-4000:]
    saved = sorted(int(d) for d in os.listdir(os.path.join(work, "checkpoints")) if d.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < steps, saved
    for _, text in results:  # both processes name the same step
        assert f"every process saves at step {saved[0]}" in text
    assert not os.path.exists(os.path.join(work, "exports"))

    run(args, work, processes=2, devices=4)
    got, want = losses(work), losses(straight)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=RTOL)
    assert train_rows(work) == steps  # resumed after the saved step, nothing repeated
    print(f"SIGTERM to process {signalled}: both saved at step {saved[0]} of {steps}")


@pytest.mark.slow
def test_a_process_that_dies_stops_the_others(token_dir, tokenizer, tmp_path):  # noqa: F811
    work = str(tmp_path / "killed")
    procs = launch(transformer_args(token_dir, tokenizer, steps=100000), work, processes=2, devices=4,
                   heartbeat_s=5)
    wait_for_training(work, procs)
    t0 = time.time()
    procs[1].kill()  # SIGKILL: no notice, no checkpoint
    (rc, text), _ = wait(procs, timeout=90)
    assert rc != 0 and time.time() - t0 < 60
    assert "stopped sending heartbeats" in text, text[-3000:]


def test_processes_with_different_configs_stop_at_start(token_dir, tokenizer,  # noqa: F811
                                                        tmp_path):
    work = str(tmp_path / "differ")
    results = wait(launch(transformer_args(token_dir, tokenizer), work, processes=2, devices=4,
                          extra_args={1: ["--config.model.depth=3", "--config.seed=5"]}),
                   timeout=120)
    assert all(rc != 0 for rc, _ in results)
    assert "processes [1] run a config that differs from process 0's" in results[0][1]
    assert "model.depth: process 0 has 2, this process has 3" in results[1][1]
    assert "seed: process 0 has 0, this process has 5" in results[1][1]
    assert not os.path.exists(os.path.join(work, "checkpoints"))


def test_sampling_is_the_same_on_one_device_a_mesh_and_two_processes(
        token_dir, tokenizer, dvae_export, tmp_path):  # noqa: F811
    model = str(tmp_path / "model")
    run(transformer_args(token_dir, tokenizer), model)
    sample = ["--job=sample", f"--config.sample.params={model}/exports/step_0000006",
              f"--config.sample.dvae_params={dvae_export}", "--config.sample.num_candidates=3",
              "--config.sample.batch_size=8", "--config.sample.top_k=4"]
    args = [a for a in transformer_args(token_dir, tokenizer) if not a.startswith("--job")] + sample
    fsdp = ["--config.sharding_rules=fsdp", "--config.mesh.fsdp=4"]
    layouts = {"1 device": (dict(processes=1, devices=1), []),
               "8 devices, dp": (dict(processes=1, devices=8), []),
               "2 processes x 4 devices, fsdp": (dict(processes=2, devices=4), fsdp)}
    tokens = {}
    for name, (kw, extra) in layouts.items():
        work = str(tmp_path / name.replace(" ", "").replace(",", ""))
        run(args + extra, work, **kw)
        tokens[name] = np.load(os.path.join(work, "samples", "tokens.npz"))["tokens"]
        assert os.path.exists(os.path.join(work, "samples", "grid.png"))
    first = tokens.pop("1 device")
    assert first.shape[:2] == (10, 3)
    for name, got in tokens.items():
        np.testing.assert_array_equal(got, first, err_msg=name)
