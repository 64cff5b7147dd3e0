"""The memory planner against XLA's compiled memory analysis, and the `plan` job."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dalle_jax import configlib, plan, sharding
from dalle_jax.train import dvae_task, transformer_task, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("fast_compile")


def _config(name, **overrides):
    cfg = configlib.load_config(os.path.join(ROOT, "configs", name))
    for key, value in overrides.items():
        section, field = key.split("__")
        cfg[section][field] = value
    cfg.sharding_rules = "fsdp" if cfg.mesh.fsdp > 1 else "dp"
    return cfg


def _compiled(cfg, tmp_path):
    """Memory analysis of the loop's own step for ``cfg`` on the 8 test devices."""
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.get_rules(cfg.sharding_rules)
    b = int(cfg.data.global_batch_size)
    if "width" in cfg.model:
        mcfg = plan._transformer_config(cfg, None)
        task = transformer_task.model_task(mcfg, {})
        batch = {"text_tokens": jax.ShapeDtypeStruct((b, mcfg.text_len), jnp.int32),
                 "image_tokens": jax.ShapeDtypeStruct((b, mcfg.image_len), jnp.int32)}
    else:
        task = dvae_task.make_task(cfg, str(tmp_path))
        size = int(cfg.data.image_size)
        batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8)}
    tx, lr_fn = loop.build_optimizer(cfg, task, dict(mesh.shape))
    compiled, _ = loop.compile_train_step(task, tx, lr_fn, mesh, rules, batch,
                                          ema_decay=0.99, ema_every=1)
    return loop.memory_report(compiled)


SMALL = dict(model__width=256, model__depth=4, model__heads=4, text__text_len=64,
             plan__grid=16, data__global_batch_size=16)
CASES = {
    "tiny transformer, dp": ("transformer_shapes.py:tokens=/nonexistent", {}),
    "tiny transformer, fsdp": ("transformer_shapes.py:tokens=/nonexistent",
                               dict(mesh__data=1, mesh__fsdp=8)),
    "small transformer, fsdp, remat": ("transformer_shapes.py:tokens=/nonexistent",
                                       dict(SMALL, model__remat="full", model__scan_layers=True,
                                            mesh__data=1, mesh__fsdp=8)),
    "tiny dVAE, fsdp": ("dvae_shapes.py:size=tiny", dict(mesh__data=2, mesh__fsdp=4)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_agrees_with_the_compiled_step(name, tmp_path):
    config, overrides = CASES[name]
    cfg = _config(config, **overrides)
    p = plan.plan_config(cfg, 8, 16.0)
    mem = _compiled(cfg, tmp_path)
    # The state is exact: params, moments, EMA and counters are the step's arguments
    # besides the batch and the metric sums (a few KiB).
    held = p.state_bytes - p.state["gradients"]
    assert held <= mem["argument_bytes"] <= held + 64 * 1024, (held, mem)
    # The whole estimate is a conservative bound on the compiled peak (measured: 1.11-1.36x).
    ratio = p.total_bytes / mem["peak_bytes"]
    print(name, f"plan {p.total_bytes / 2**20:.1f} MiB, compiled peak "
          f"{mem['peak_bytes'] / 2**20:.1f} MiB, ratio {ratio:.2f}")
    assert 1.0 <= ratio <= 1.5, ratio


def test_plan_of_the_paper_model_on_the_papers_cluster():
    """12B in float16 on 1,024 GPUs of 16 GB (fsdp 128 x tensor 8), batch 1,024."""
    cfg = configlib.load_config(os.path.join(ROOT, "configs", "transformer_paper.py")
                                + ":tokens=x,fsdp=128,tensor=8")
    cfg.precision.compute_dtype = "float16"
    p = plan.plan_config(cfg, 1024, 16.0)
    assert p.num_params == 12_294_332_160 and p.microbatch == 8
    assert p.mesh == {"data": 1, "fsdp": 128, "tensor": 8}
    # 16 bytes of fp32 state per parameter (params, gradients, two moments... and the EMA
    # makes 20), spread over 1,024 devices, plus replicated bits.
    assert p.state_bytes == pytest.approx(20 * p.num_params / 1024, rel=0.02)
    assert p.state["grad scales"] == 2 * 64 * 2 * 4  # (64 layers, 2 resblocks) f32 + i32
    assert p.fits and "fits" in p.format()
    # Without tensor parallelism the batch shards 1,024 ways and the state does not fit a
    # 3,968-wide model: fsdp 1,024 does not divide it.
    cfg.mesh.update(fsdp=1024, tensor=1)
    cfg.sharding_rules = "fsdp"
    with pytest.raises(ValueError, match="not divisible by mesh fsdp=1024"):
        plan.plan_config(cfg, 1024, 16.0)


def test_settings_that_fit_shrink_the_microbatch():
    cfg = configlib.load_config(os.path.join(ROOT, "configs", "transformer_paper.py")
                                + ":tokens=x,fsdp=64")
    options = {o["remat"]: o for o in plan.settings_that_fit(cfg, 64, 80.0)}
    assert options["full"]["fits"] and options["full"]["microbatch"] >= 1
    # Without remat every layer's activations are kept: a smaller microbatch fits.
    assert (not options["none"]["fits"]
            or options["none"]["microbatch"] < options["full"]["microbatch"])
    for o in options.values():
        if o["fits"]:
            assert o["batch_per_step"] * o["grad_accum_for_same_batch"] >= 1024


def _run_plan(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "dalle_jax.main", "--job=plan",
           f"--config={ROOT}/configs/transformer_paper.py:tokens=x,fsdp=128,tensor=8",
           f"--workdir={tmp_path}", "--config.plan.num_devices=1024",
           "--config.precision.compute_dtype=float16", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_plan_job_prints_the_table_and_exits_nonzero_when_it_does_not_fit(tmp_path):
    ok = _run_plan(tmp_path / "ok", "--config.plan.device_memory_gib=16")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "12,294,332,160 parameters" in ok.stdout and "adam moments" in ok.stdout
    assert "fits (" in ok.stdout and "largest per-device microbatch" in ok.stdout
    with open(tmp_path / "ok" / "plan.json") as f:
        saved = json.load(f)
    assert saved["plan"]["fits"] and saved["plan"]["mesh"]["tensor"] == 8
    assert "sampling the transformer" in ok.stdout and "kv cache" in ok.stdout
    assert saved["sampling"]["fits"] and "with a bfloat16 export" in ok.stdout
    small = _run_plan(tmp_path / "small", "--config.plan.device_memory_gib=4")
    assert small.returncode == 1
    assert "DOES NOT FIT" in small.stdout
