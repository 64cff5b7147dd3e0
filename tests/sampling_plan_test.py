"""The sampling memory planner against the compiled sampling program, and what one device
needs to sample the paper's 12B model."""

import dataclasses
import os

import pytest

from dalle_jax import configlib, plan, sharding
from dalle_jax.models import transformer as tfm
from dalle_jax.sample import sampler as smp
from dalle_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = tfm.TransformerConfig(text_vocab=1032, image_vocab=512, text_len=32, grid=16, width=256,
                              depth=4, heads=8, conv_kernel=5)


def _paper_config(**kw):
    cfg = configlib.load_config(os.path.join(ROOT, "configs", "transformer_paper.py") + ":tokens=x")
    mcfg = plan._transformer_config(cfg, None)
    return dataclasses.replace(mcfg, **kw)


CASES = {
    "small fsdp 8": (SMALL, "fsdp", dict(data=1, fsdp=8, tensor=1), 16, "float32"),
    "small fsdp_tp 2x2x2": (SMALL, "fsdp_tp", dict(data=2, fsdp=2, tensor=2), 16, "float32"),
    "small dp 8": (SMALL, "dp", dict(data=8, fsdp=1, tensor=1), 64, "float32"),
    # The paper's layer shapes (width 3,968, 62 heads, 8,192 codes, 256 + 32x32 slots),
    # two layers deep, in bfloat16.
    "paper width fsdp 8": (None, "fsdp", dict(data=1, fsdp=8, tensor=1), 8, "bfloat16"),
    "paper width fsdp 2 x tensor 4": (None, "fsdp_tp", dict(data=1, fsdp=2, tensor=4), 8,
                                      "bfloat16"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampling_plan_bounds_the_compiled_program(name):
    mcfg, rules, degrees, batch, dtype = CASES[name]
    if mcfg is None:
        mcfg = _paper_config(depth=2, dtype=dtype)
    mesh = sharding.make_mesh(degrees)
    mem = loop.memory_report(smp.compile_sampler(mcfg, mesh, rules, batch, param_dtype=dtype))
    p = plan.sampling_plan(mcfg, dict(mesh.shape), rules, batch, param_dtype=dtype)
    # The parameters the program reads are its arguments (the text head, unused when
    # sampling, is dropped from the program but still loaded).
    assert p.rows["params"] >= 0.95 * mem["argument_bytes"]
    ratio = p.total_bytes / mem["peak_bytes"]
    print(name, f"plan {p.total_bytes / 2**20:.1f} MiB, compiled peak "
          f"{mem['peak_bytes'] / 2**20:.1f} MiB, ratio {ratio:.2f}")
    assert 1.0 <= ratio <= 2.0, ratio  # measured 1.15-1.80


def test_sampling_the_12b_model_needs_no_device_to_hold_it_whole():
    cfg = configlib.load_config(os.path.join(ROOT, "configs", "transformer_paper.py")
                                + ":tokens=x,fsdp=8")
    cfg.precision.compute_dtype = "bfloat16"
    cfg.sample.batch_size = 8
    fsdp = plan.sampling_plan_config(cfg, 8, 80.0, param_dtype="bfloat16")
    assert fsdp.num_params == 12_294_332_160
    assert fsdp.rows["params"] == pytest.approx(2 * fsdp.num_params / 8, rel=0.01)
    cfg.mesh.update(fsdp=2, tensor=4)
    cfg.sharding_rules = "fsdp_tp"
    tp = plan.sampling_plan_config(cfg, 8, 80.0, param_dtype="bfloat16")
    assert tp.rows["params"] == pytest.approx(2 * tp.num_params / 8, rel=0.01)
    # Tensor parallelism splits the gathered layers 4 ways.
    assert tp.rows["layer weights in use"] < fsdp.rows["layer weights in use"] / 3
    for p in (fsdp, tp):
        assert p.fits and p.total_bytes < 8 * 2**30, p.format()
    # On one device the float32 model alone (46 GiB) leaves no room on a 40 GiB card.
    cfg.mesh.update(fsdp=1, tensor=1)
    cfg.sharding_rules = "dp"
    assert not plan.sampling_plan_config(cfg, 1, 40.0, param_dtype="float32").fits
