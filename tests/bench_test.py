"""The benchmark script runs end to end at a tiny size and reports every figure it promises."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_transformer", os.path.join(ROOT, "bench", "transformer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Batch 8: the test session has 8 (fake) devices and the batch is split over them.
TINY = ["--dim", "32", "--heads", "2", "--dim-head", "16", "--depth", "2", "--text-len", "4",
        "--grid", "2", "--image-vocab", "16", "--text-vocab", "40", "--batch", "8", "--steps", "1",
        "--warmup", "0", "--samples", "1"]


@pytest.mark.parametrize("attn", ["paper", "row"])
def test_transformer_benchmark_reports_throughput(attn, capsys):
    out = _load().main(TINY + ["--attn", attn])
    for key in ("params", "train_step_s", "train_tokens_per_s", "sample_s_per_image",
                "sample_image_tokens_per_s"):
        assert out[key] > 0, key
    assert out["seq_len"] == 4 + 4 and out["attn"] == attn
    assert '"train_tokens_per_s"' in capsys.readouterr().out


def test_benchmark_rejects_inconsistent_heads():
    with pytest.raises(SystemExit):
        _load().parse_args(["--dim", "32", "--heads", "3", "--dim-head", "16"])
