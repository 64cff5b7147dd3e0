"""Times the stage-2 transformer: the training loop's step and the KV-cached sampler.

  .venv/bin/python bench/transformer.py --dim 256 --depth 4 --heads 4 --text-len 32 \\
      --text-vocab 1000 --grid 8 --image-vocab 512 --batch 16 --attn paper

Prints one JSON object. The flags mirror bench/peer_dalle_pytorch.py so both run the same
model size, sequence and batch (`bench/compare_peer.py` runs the two side by side).

* Training: the exact step `dalle_jax.train.loop` runs (forward, the paper's weighted
  loss, backward, global-norm clipping at 4, AdamW(0.9, 0.96, wd 4.5e-2), EMA and the
  metric sums), jitted with the state donated, on random tokens. Reports the median step
  time, tokens/s (batch x sequence length / step time) and, on an accelerator with a
  known peak, the model FLOPs utilisation (`model_flops_per_step`: counted from the
  architecture and the masks, not from the compiled program).
* Sampling: `dalle_jax.sample.sampler.sample_tokens` (text pass filling the KV cache, then
  one cached step per image token) with top-k keeping 10% of the vocabulary (the peer's
  ``filter_thres=0.9``), plus decoding the tokens to pixels with a small dVAE. Reports
  seconds per image and image tokens per second at ``--sample-batch``, and on an
  accelerator with a known HBM bandwidth the time per token against the weight-bandwidth
  bound (weight bytes / bandwidth: batch-1 sampling reads every weight once per token).
* ``--attn``: ``paper`` (row/column layers, conv last), ``full`` (dense causal in every
  layer), ``row`` or ``column`` (that mask in every layer); the attention itself skips
  what the mask removes, so its cost falls with the mask.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import ml_collections
import numpy as np

from dalle_jax import sharding, treeutil
from dalle_jax.models import transformer as tfm
from dalle_jax.sample import sampler as smp
from dalle_jax.tokenizers import dvae, image_tokenizer
from dalle_jax.train import transformer_task, loop, optim

# Dense peak FLOP/s by device kind and compute dtype, for the utilisation figure.
PEAK_FLOPS = {
    ("NVIDIA H100 80GB HBM3", "bfloat16"): 989e12,
    ("NVIDIA H100 80GB HBM3", "float32"): 67e12,
    ("NVIDIA H200", "bfloat16"): 989e12,
    ("NVIDIA H200", "float32"): 67e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
}
# HBM bandwidth (bytes/s) by device kind: batch-1 sampling reads every weight once per
# token, so weight bytes / bandwidth is the fastest a token can be drawn.
HBM_BYTES_PER_S = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H200": 4.8e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 8.19e11,
}
PATTERNS = {"paper": "paper", "full": "dense", "row": "row", "column": "column"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in dict(dim=256, depth=4, heads=4, dim_head=64, text_len=32, text_vocab=1000, grid=8,
                     image_vocab=512, batch=16, steps=10, warmup=3, sample_batch=1,
                     samples=3).items():
        p.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    p.add_argument("--attn", choices=sorted(PATTERNS), default="paper")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=["structured", "dense"], default="structured",
                   help="how masked layers are computed (same result, different cost)")
    p.add_argument("--remat", choices=["none", "full", "dots"], default="none")
    p.add_argument("--skip-sampling", action="store_true")
    a = p.parse_args(argv)
    if a.heads * a.dim_head != a.dim:
        p.error(f"--heads x --dim-head must equal --dim ({a.heads} x {a.dim_head} != {a.dim})")
    return a


def model_config(a: argparse.Namespace) -> tfm.TransformerConfig:
    pattern = PATTERNS[a.attn]
    if pattern in ("row", "column"):
        pattern = ",".join([pattern] * a.depth)
    return tfm.TransformerConfig(text_vocab=a.text_vocab, image_vocab=a.image_vocab,
                                 text_len=a.text_len, grid=a.grid, width=a.dim, depth=a.depth,
                                 heads=a.heads, attn_pattern=pattern, dtype=a.dtype,
                                 attention=a.attention, remat=a.remat)


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="adamw", b1=0.9, b2=0.96, eps=1e-8, weight_decay=4.5e-2, clip_global_norm=4.0,
        grad_accum=1, lr=dict(kind="constant", value=3e-4)))


def model_flops_per_step(mcfg: tfm.TransformerConfig, batch: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), counted from the
    architecture rather than from the compiled program.

    Forward, per sequence: 2 FLOPs per multiply-add of the Q/K/V, output and MLP matrices at
    every position, of each modality's output head at that modality's positions, and of the
    attention products QK^T and AV over the query-key pairs the layer's mask allows (the
    work the model needs; what an implementation computes beyond the mask is overhead).
    Embedding lookups, norms and softmax are not counted, as is usual for utilisation.
    XLA's own cost analysis is no substitute: on GPU it does not see inside library calls
    (cuBLAS/cuDNN), so it under-counts there.
    """
    from dalle_jax.models import masks

    d, hk, f = mcfg.width, mcfg.heads * mcfg.head_dim, mcfg.mlp_width
    dense_per_token = mcfg.depth * (d * 3 * hk + hk * d + 2 * d * f)
    heads = mcfg.text_len * d * mcfg.text_vocab + mcfg.image_len * d * mcfg.image_vocab
    pairs = sum(int(masks.mask(mcfg.text_len, mcfg.grid, k, kernel=mcfg.conv_kernel).sum())
                for k in mcfg.layer_kinds())
    attention = 2 * pairs * hk  # QK^T and AV
    forward = 2 * (mcfg.seq_len * dense_per_token + heads + attention)
    return 3.0 * forward * batch


def _times(fn, n: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + n):
        t = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def bench_train(a: argparse.Namespace, mcfg: tfm.TransformerConfig) -> dict:
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    rules = sharding.get_rules("dp")
    task = transformer_task.model_task(mcfg, {"kind": "benchmark"})
    tx, lr_fn = optim.build(optim_config(), loop.param_axes(task))
    rng = np.random.default_rng(0)
    batch_sh = jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh, rules, 2))
    batch = {
        "text_tokens": jax.device_put(rng.integers(
            0, mcfg.text_vocab, (a.batch, mcfg.text_len), dtype=np.int32), batch_sh),
        "image_tokens": jax.device_put(rng.integers(
            0, mcfg.image_vocab, (a.batch, mcfg.image_len), dtype=np.int32), batch_sh),
    }
    with jax.set_mesh(mesh):
        state, _ = loop.init_state(task, tx, mesh, rules, seed=0)
        acc = loop.metric_accumulator(task, state, batch)
        step = jax.jit(loop.make_train_step(task, tx, lr_fn, ema_decay=0.99, ema_every=25,
                                            seed=0), donate_argnums=(0, 1))
        t0 = time.perf_counter()
        compiled = step.lower(state, acc, batch).compile()
        compile_s = time.perf_counter() - t0
        holder = {"state": state, "acc": acc}

        def run():
            holder["state"], holder["acc"] = compiled(holder["state"], holder["acc"], batch)
            jax.block_until_ready(holder["acc"])

        times = _times(run, a.steps, a.warmup)
    step_s = statistics.median(times)
    out = {"params": treeutil.count_params(holder["state"].params), "train_step_s": round(step_s, 4),
        "train_tokens_per_s": round(a.batch * mcfg.seq_len / step_s, 1),
        "train_step_min_s": round(min(times), 4),
        "train_compile_s": round(compile_s, 1)}
    flops = model_flops_per_step(mcfg, a.batch)
    out["train_model_flops"] = flops
    out["train_model_flops_per_s"] = round(flops / step_s, 1)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
        out["train_xla_flops"] = float(cost["flops"])  # the compiler's count, for reference
    peak = PEAK_FLOPS.get((jax.devices()[0].device_kind, a.dtype))
    if peak:
        out["mfu"] = round(flops / step_s / (peak * jax.device_count()), 4)
    mem = loop.memory_report(compiled)
    if mem:
        out["train_peak_gib"] = round(mem["peak_bytes"] / 2**30, 2)
    return out


def bench_sampling(a: argparse.Namespace, mcfg: tfm.TransformerConfig) -> dict:
    import flax.linen as nn

    params = nn.unbox(jax.jit(functools.partial(tfm.init_variables, mcfg))(
        jax.random.key(0)))["params"]
    # Random heads, so the samples are not all the same token.
    params["image_head"] = jax.random.normal(jax.random.key(1), params["image_head"].shape) * 0.02
    # Weights stored in the compute dtype, as a bfloat16 export would be.
    params = jax.tree.map(lambda x: x.astype(a.dtype), params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    top_k = max(1, int(round(0.1 * mcfg.image_vocab)))  # the peer's filter_thres=0.9
    sample = jax.jit(functools.partial(smp.sample_tokens, config=mcfg,
                                       sampling=smp.SamplingConfig(top_k=top_k)))
    dcfg = dvae.DVAEConfig(image_size=mcfg.grid * 8, n_hid=16, n_blk_per_group=1,
                           vocab_size=mcfg.image_vocab)
    decoder = image_tokenizer.ImageTokenizer(dcfg, dvae.init_params(dcfg, jax.random.key(2)))
    text = np.random.default_rng(0).integers(0, mcfg.text_vocab,
                                             (a.sample_batch, mcfg.text_len), dtype=np.int32)
    ids = np.arange(a.sample_batch, dtype=np.int32)
    counter = iter(range(10**9))

    def run():
        toks = sample(params, text, ids, jax.random.key(next(counter)))
        jax.block_until_ready(decoder.decode(toks.reshape(-1, mcfg.grid, mcfg.grid)))

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    s = statistics.median(_times(run, a.samples, 0))
    out = {"sample_batch": a.sample_batch, "sample_s": round(s, 4),
           "sample_s_per_image": round(s / a.sample_batch, 4),
           "sample_image_tokens_per_s": round(a.sample_batch * mcfg.image_len / s, 1),
           "sample_compile_s": round(compile_s, 1), "sample_weight_bytes": int(weight_bytes)}
    bandwidth = HBM_BYTES_PER_S.get(jax.devices()[0].device_kind)
    if bandwidth:
        # Time per sampling step (one image token for each sequence) against reading every
        # weight once (the dVAE decode is included in `s`, so this is an upper bound).
        bound = weight_bytes / bandwidth
        out["sample_weight_bound_s_per_token"] = bound
        out["sample_vs_weight_bound"] = round(s / mcfg.image_len / bound, 2)
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    mcfg = model_config(a)
    out = {"system": f"dalle-jax / jax {jax.__version__} {jax.devices()[0].platform.upper()}",
           "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
           "attn": a.attn, "attention": a.attention, "dtype": a.dtype, "batch": a.batch, "seq_len": mcfg.seq_len}
    out.update(bench_train(a, mcfg))
    if not a.skip_sampling:
        out.update(bench_sampling(a, mcfg))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
