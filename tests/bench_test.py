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
    for key in ("params", "train_step_s", "train_tokens_per_s", "train_model_flops",
                "train_model_flops_per_s", "sample_s_per_image",
                "sample_image_tokens_per_s"):
        assert out[key] > 0, key
    assert out["seq_len"] == 4 + 4 and out["attn"] == attn
    assert '"train_tokens_per_s"' in capsys.readouterr().out


def test_benchmark_rejects_inconsistent_heads():
    with pytest.raises(SystemExit):
        _load().parse_args(["--dim", "32", "--heads", "3", "--dim-head", "16"])


def test_model_flops_count_matmuls_heads_and_allowed_attention_pairs():
    b = _load()
    args = b.parse_args(TINY + ["--attn", "full"])
    mcfg = b.model_config(args)
    d, L, t, i = 32, 8, 4, 4  # width, sequence, text and image slots
    per_token = 2 * (d * 3 * d + d * d + 2 * d * 4 * d)  # qkv, output, MLP (4d hidden)
    heads = 2 * (t * d * 40 + i * d * 16)
    attention = 2 * 2 * (L * (L + 1) // 2) * d  # causal pairs, QK^T and AV, all heads
    forward = L * 2 * per_token + heads + 2 * attention  # depth 2
    assert b.model_flops_per_step(mcfg, 8) == 3 * forward * 8
    # A sparser mask is less work for the model, so fewer model FLOPs.
    sparse = b.model_config(b.parse_args(TINY + ["--attn", "row"]))
    assert b.model_flops_per_step(sparse, 8) < b.model_flops_per_step(mcfg, 8)
