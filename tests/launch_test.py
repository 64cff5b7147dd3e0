"""The launch scripts: the command lines and environment each produces (dry runs), and
shellcheck over them and the benchmark scripts."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(os.path.join(d, f) for d in (LAUNCH, os.path.join(ROOT, "bench"))
                 for f in os.listdir(d) if f.endswith((".sh", ".sbatch")))
CACHE = "/shared/jax-cache"


def dry_run(script, *args, env=None):
    """``(environment, argv)`` that ``script ARGS`` would run."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_"))}
    full.update(DRY_RUN="1", JAX_COMPILATION_CACHE_DIR=CACHE, PYTHON="/venv/bin/python")
    full.update(env or {})
    out = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    variables = dict(line[len("env: "):].split("=", 1) for line in lines
                     if line.startswith("env: "))
    (cmd,) = [shlex.split(line[len("cmd:"):]) for line in lines if line.startswith("cmd:")]
    return variables, cmd


JOB = ("train_transformer", "configs/transformer_paper.py", "/shared/runs/x", "--config.text.bpe_model=/a b/c")
MAIN = ["-m", "dalle_jax.main", "--job=train_transformer", "--config=configs/transformer_paper.py",
        "--workdir=/shared/runs/x", "--config.text.bpe_model=/a b/c"]


def test_local_runs_the_entry_point_with_the_compilation_cache():
    variables, cmd = dry_run("local.sh", *JOB)
    assert cmd == ["/venv/bin/python", *MAIN]
    assert variables["JAX_COMPILATION_CACHE_DIR"] == CACHE


def test_gpu_host_drives_every_local_gpu_from_one_process():
    variables, cmd = dry_run("gpu_host.sh", *JOB, env={"XLA_FLAGS": "--xla_dump_to=/tmp/d"})
    assert cmd == ["/venv/bin/python", *MAIN, "--multihost=off"]
    assert variables["JAX_COMPILATION_CACHE_DIR"] == CACHE
    assert variables["XLA_FLAGS"] == (
        "--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true")
    assert float(variables["XLA_PYTHON_CLIENT_MEM_FRACTION"]) > 0.75


def test_slurm_batch_script_runs_one_task_script_per_process_with_srun():
    env = {"SLURM_SUBMIT_DIR": ROOT, "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "16"}
    variables, cmd = dry_run("slurm.sbatch", *JOB, env=env)
    assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd
    assert cmd[-6:] == ["bash", os.path.join(LAUNCH, "slurm_task.sh"), *JOB]
    assert variables["JAX_COMPILATION_CACHE_DIR"] == CACHE
    with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
        header = f.read()
    # Every task is sent SIGTERM before the time limit (preemption: save and stop) and the
    # job is requeued to resume.
    for line in ("#SBATCH --signal=TERM@", "#SBATCH --requeue", "#SBATCH --ntasks-per-node="):
        assert line in header


@pytest.mark.parametrize("nodelist,head", [("gpu[003-006,9],login1", "gpu003"),
                                           ("a100-7", "a100-7"), ("n1,n[2-3]", "n1"),
                                           ("node[12]", "node12")])
def test_slurm_task_finds_coordinator_count_and_index(nodelist, head):
    env = {"SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
           "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "4242",
           "PATH": "/usr/bin:/bin"}  # no scontrol: the script's own host-list parsing
    variables, cmd = dry_run("slurm_task.sh", *JOB, env=env)
    assert cmd == ["/venv/bin/python", *MAIN, f"--coordinator_address={head}:24242",
                   "--num_processes=16", "--process_id=9"]
    assert variables["CUDA_VISIBLE_DEVICES"] == "1"  # one GPU per task
    assert variables["JAX_COMPILATION_CACHE_DIR"] == CACHE
    # One task per node: it keeps every GPU of its node; the port can be chosen.
    env.update(SLURM_NTASKS_PER_NODE="1", SLURM_NTASKS="2", SLURM_PROCID="1",
               DALLE_JAX_PORT="1234")
    variables, cmd = dry_run("slurm_task.sh", *JOB, env=env)
    assert "CUDA_VISIBLE_DEVICES" not in variables
    assert cmd[-3:] == [f"--coordinator_address={head}:1234", "--num_processes=2",
                        "--process_id=1"]


def test_slurm_task_outside_slurm_says_so():
    out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_task.sh"), *JOB],
                         env={"PATH": os.environ["PATH"], "HOME": "/tmp"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "not inside a SLURM job" in out.stderr


def test_tpu_pod_runs_the_job_on_every_worker():
    variables, cmd = dry_run("tpu_pod.sh", "my-v4-64", "us-central2-b", *JOB,
                             env={"GCLOUD_ARGS": "--project=p --internal-ip",
                                  "REMOTE_REPO": "src/dalle jax"})
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert cmd[5:10] == ["my-v4-64", "--zone=us-central2-b", "--worker=all", "--project=p",
                         "--internal-ip"]
    (remote,) = [c[len("--command="):] for c in cmd if c.startswith("--command=")]
    # What every worker's shell runs.
    words = shlex.split(remote)
    assert words[:3] == ["cd", "src/dalle jax", "&&"]
    assert f"JAX_COMPILATION_CACHE_DIR={CACHE}" in words
    assert words[-len(MAIN) - 2:] == [".venv/bin/python", *MAIN, "--multihost=on"]


def _shellcheck():
    found = shutil.which("shellcheck")
    if found is None and os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                     "shellcheck")):
        found = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return found


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    out = subprocess.run([_shellcheck(), "-x", "-P", "SCRIPTDIR", *SCRIPTS],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
