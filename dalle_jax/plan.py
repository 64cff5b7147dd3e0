"""Memory planner: what one device holds while a config trains on a mesh, before any
device exists.

`plan_config` answers "does this config fit on N devices of M GiB with this mesh, and if
not, what does" without allocating or compiling anything:

* the **train state** per device (params, gradients, Adam moments, EMA, the float16
  gradient scales, gradient-accumulation buffers, counters) is exact: every leaf of the
  `eval_shape`-d state is placed by the config's logical-axis rules on the mesh degrees
  (`sharding.leaf_shardings`), and gradients take the params' shardings;
* the **activations** are estimated from the architecture, the remat policy and the
  per-device microbatch (`transformer_activations`, `dvae_activations`), plus the
  transient full copy of one layer's weights that FSDP gathers.

Agreement with XLA's compiled memory analysis of the loop's own step on CPU
(`loop.compile_train_step` + `loop.memory_report`, 8 fake devices; tests/plan_test.py keeps
it): the state is exact (params, moments, EMA and counters are the step's arguments to the
byte, the batch and metric sums aside), and the whole estimate is a conservative bound on
the compiled peak (arguments + outputs - aliased + temporaries): 1.16x for the tiny demo
transformer with ``dp``, 1.25x with ``fsdp``; 1.36x for a width-256, 64 + 16x16-slot
transformer with ``fsdp`` and full remat; 1.11x for the tiny dVAE with ``fsdp``. XLA on
GPU/TPU schedules differently, so a plan counts as fitting only under ``margin`` of the
device memory (0.9 by default).

`sampling_plan` does the same for sampling (`dalle_jax.sample.sampler`): the parameters
as the rules place them, the key/value cache, the layer weights FSDP gathers and the
working set of the cache-filling pass; tests/plan_test.py compares it with the compiled
sampling program's memory analysis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import sharding
from dalle_jax.models import attention
from dalle_jax.models import transformer as tfm

PyTree = Any
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30

STATE_ROWS = ("params", "gradients", "adam moments", "ema", "grad scales",
              "grad accumulation", "optimizer counters")


def _fits(total: int, device: int, margin: float) -> bool:
    return total <= margin * device


def _verdict(total: int, device: int, margin: float) -> list[str]:
    """The closing lines of a plan's table: total, device memory, fits or not."""
    return [f"  {'total':<40}{total / GiB:>10.3f}",
            f"  {'device memory':<40}{device / GiB:>10.3f}", "",
            ("fits" if _fits(total, device, margin) else "DOES NOT FIT")
            + f" ({total / device:.0%} of the device; the planner asks for at most "
              f"{margin:.0%})"]


def _describe(mcfg: tfm.TransformerConfig) -> str:
    return (f"transformer (width {mcfg.width}, depth {mcfg.depth}, {mcfg.heads} heads, "
            f"{mcfg.text_len} + {mcfg.grid}x{mcfg.grid} slots)")


def _mesh_degrees(cfg, num_devices: int) -> dict[str, int]:
    """The config's mesh resolved for ``num_devices`` (which need not exist)."""
    return dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, num_devices)))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of a training configuration on a mesh."""

    what: str
    mesh: dict[str, int]
    rules: str
    compute_dtype: str
    remat: str
    microbatch: int  # examples per device in one step
    global_batch: int  # examples per step over all devices
    grad_accum: int  # steps per optimizer update
    num_params: int
    state: dict[str, int]  # STATE_ROWS -> bytes per device
    activations: dict[str, int]  # name -> bytes per device (estimated)
    device_bytes: int
    margin: float = 0.9

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations.values())

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return _fits(self.total_bytes, self.device_bytes, self.margin)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(state_bytes=self.state_bytes, activation_bytes=self.activation_bytes,
                   total_bytes=self.total_bytes, fits=self.fits)
        return out

    def format(self) -> str:
        devices = math.prod(self.mesh.values())
        mesh = " x ".join(f"{a}={d}" for a, d in self.mesh.items())
        lines = [
            f"{self.what}: {self.num_params:,} parameters",
            f"mesh {mesh} ({devices} devices), sharding_rules={self.rules}, "
            f"compute {self.compute_dtype}, remat={self.remat}",
            f"batch {self.global_batch} per step ({self.microbatch} per device), "
            f"{self.grad_accum} step(s) per update",
            "",
            f"{'per device':<42}{'GiB':>10}",
        ]
        for name, b in list(self.state.items()) + [("", None)] + list(self.activations.items()):
            if b is None:
                continue
            label = name if name in self.state else f"activations: {name}"
            lines.append(f"  {label:<40}{b / GiB:>10.3f}")
        return "\n".join(lines + _verdict(self.total_bytes, self.device_bytes, self.margin))


# ----------------------------------------------------------------------------- state


def _category(path: str) -> str:
    if path.startswith("params/"):
        return "params"
    if path.startswith("ema_params/"):
        return "ema"
    if "/mu/" in path or "/nu/" in path:
        return "adam moments"
    if "acc_grads/" in path:
        return "grad accumulation"
    if path in ("opt_state/scales", "opt_state/last_decrease"):
        return "grad scales"
    return "optimizer counters"


def state_bytes(abstract_state: PyTree, mesh_shape: dict[str, int], rules) -> dict[str, int]:
    """Per-device bytes of a boxed abstract train state by category (`STATE_ROWS`).

    Gradients are one more params-sized tree, placed like the params.

    Raises:
      ValueError: some leaf cannot be sharded on this mesh (`sharding.check_shardable`).
    """
    # The optimizer moments and the EMA are placed like the params.
    sharding.check_shardable(abstract_state.params, mesh_shape, rules)
    out = dict.fromkeys(STATE_ROWS, 0)
    for row in sharding.leaf_shardings(abstract_state, mesh_shape, rules):
        out[_category(row.path)] += row.bytes_per_device
    out["gradients"] = out["params"]
    return out


# ----------------------------------------------------------------------------- activations


def _ways(rules, mesh_shape: dict[str, int], name: str, taken: tuple[str, ...] = ()) -> int:
    """How many ways a logical activation dim is split (mesh axes already used by the
    batch dim do not count)."""
    target = dict(rules)[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh_shape.get(a, 1) for a in axes if a not in taken)


def transformer_activations(mcfg: tfm.TransformerConfig, microbatch: int,
                            mesh_shape: dict[str, int], rules) -> dict[str, int]:
    """Estimated per-device activation bytes of one training step of the transformer.

    * ``residual checkpoints``: what the forward keeps for the backward. With ``remat``
      "full" (the paper's), each layer's float32 input ``(b, L, D)``; with "dots" also its
      matmul outputs; with "none" every intermediate of every layer.
    * ``layer working set``: one layer's intermediates and their gradients while it is
      recomputed and differentiated: norms, Q/K/V, the attention logits and probabilities
      the layer's mask computes (`attention.attention_cost`), the MLP hidden activations.
    * ``logits and loss``: the float32 text and image logits, their softmax and gradient.
    * ``embeddings``: the float32 slot embeddings and their gradient.
    * ``gathered layer weights``: under FSDP the step gathers one layer's weights (and the
      next, prefetched) in the compute dtype, and holds that layer's float32 weight
      gradient before it is reduce-scattered.
    """
    b, d, f = microbatch, mcfg.width, mcfg.mlp_width
    seq, t, n_img = mcfg.seq_len, mcfg.text_len, mcfg.image_len
    c, w = _DTYPE_BYTES[mcfg.dtype], 4
    batch_axes = tuple(a for a in sharding.spec_axes(dict(rules)["batch"]))
    t_heads = _ways(rules, mesh_shape, "heads", batch_axes)
    t_mlp = _ways(rules, mesh_shape, "mlp", batch_axes)
    t_vocab = _ways(rules, mesh_shape, "vocab", batch_axes)
    heads = -(-mcfg.heads // t_heads)
    hk = heads * mcfg.head_dim
    logits_per_head = max(
        (attention.attention_cost(k, t, mcfg.grid, mcfg.conv_kernel)["structured"]
         if mcfg.attention == "structured" else seq * seq) for k in set(mcfg.layer_kinds()))
    attn_scores = b * heads * logits_per_head * (w + w + c)  # logits, probs, probs cast
    per_token = (
        d * w + d * c  # ln1 out (fp32) and its cast
        + 3 * hk * c + hk * c  # q, k, v and the attention output
        + d * w  # attention branch output (fp32)
        + d * w + d * c  # ln2 out and its cast
        + 2 * (-(-f // t_mlp)) * c  # mlp hidden before and after the activation
        + d * w)  # mlp branch output
    layer = b * seq * per_token + attn_scores
    matmul_out = b * seq * (4 * hk * c + 2 * d * c + (-(-f // t_mlp)) * c)
    residual = b * seq * d * w
    if mcfg.remat == "full":
        saved = mcfg.depth * residual
    elif mcfg.remat == "dots":
        saved = mcfg.depth * (residual + matmul_out)
    else:
        saved = mcfg.depth * (residual + layer)
    vocab = -(-mcfg.text_vocab_padded // t_vocab) * t + -(-mcfg.image_vocab_padded // t_vocab) * n_img
    out = {
        "residual checkpoints": int(saved),
        "layer working set": int(2 * layer),
        "logits and loss": int(3 * b * vocab * w),
        "embeddings": int(2 * b * seq * d * w),
    }
    fsdp = mesh_shape.get("fsdp", 1)
    if fsdp > 1:
        weights = (3 * d * mcfg.heads * mcfg.head_dim + mcfg.heads * mcfg.head_dim * d
                   + 2 * d * f) // max(t_mlp, 1)
        out["gathered layer weights"] = int(weights * (2 * c + w))
    return out


def dvae_activations(dvae_config, microbatch: int, mesh_shape: dict[str, int],
                     rules) -> dict[str, int]:
    """Estimated per-device activation bytes of one dVAE training step, from the size of
    every convolution's output in the encoder and decoder (read off `eval_shape` with
    Flax's intermediate capture): the backward pass keeps each convolution's output and
    the activation of its input (about twice the outputs), and about as much as one
    set of outputs is live as gradients. The dVAE has no remat and shards activations
    only over the batch."""
    from dalle_jax.tokenizers import dvae

    del mesh_shape, rules
    model = dvae.DVAE(dvae_config)
    size = dvae_config.image_size
    x = jax.ShapeDtypeStruct((1, size, size, dvae_config.input_channels), jnp.float32)
    params = dvae.abstract_params(dvae_config)

    def run(p, x):
        return model.apply({"params": p}, x, mutable=["intermediates"],
                           capture_intermediates=lambda m, _: isinstance(m, dvae.Conv))

    _, inter = jax.eval_shape(run, params, x)
    per_example = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                      for a in jax.tree.leaves(inter))
    return {"saved for the backward pass": int(2 * microbatch * per_example),
            "gradients in flight": int(microbatch * per_example)}


# ----------------------------------------------------------------------------- the plan


def _mesh_and_batch(cfg, num_devices: int) -> tuple[dict[str, int], Any, int, int]:
    mesh_shape = _mesh_degrees(cfg, num_devices)
    rules = sharding.get_rules(cfg.sharding_rules)
    shards = sharding.batch_shards(mesh_shape, rules)
    global_batch = int(cfg.data.global_batch_size)
    if global_batch % shards:
        raise ValueError(f"data.global_batch_size={global_batch} does not divide over the "
                         f"{shards} batch shards of mesh {mesh_shape}")
    return mesh_shape, rules, global_batch, shards


def _transformer_config(cfg, workdir: str | None) -> tfm.TransformerConfig:
    """The stage-2 model of a config, without needing its BPE model or tokens to exist yet:
    the text vocabulary is ``text.vocab_size`` plus the pads unless a BPE model is found,
    the image codebook and grid come from the token directory's meta or ``plan``."""
    import os

    from dalle_jax.data.tokens import META_FILE, read_meta
    from dalle_jax.train import transformer_task

    tokens_dir = str(cfg.data.tokens_dir)
    if tokens_dir and os.path.exists(os.path.join(tokens_dir, META_FILE)):
        meta = read_meta(tokens_dir)
    else:
        meta = {"dvae": {"identity": {"vocab_size": int(cfg.plan.image_vocab)},
                         "grid": int(cfg.plan.grid)}}
    bpe_path = str(cfg.text.bpe_model) or (os.path.join(workdir, "bpe.model") if workdir else "")
    if bpe_path and os.path.exists(bpe_path):
        from dalle_jax.tokenizers import bpe

        tokenizer = bpe.TextTokenizer(bpe_path)
    else:
        vocab = int(cfg.text.vocab_size)
        tokenizer = type("PlannedVocabulary", (), {
            "text_vocab_size": lambda self, text_len: vocab + text_len})()
    return transformer_task.model_config(cfg, tokenizer, meta)


def plan_config(cfg, num_devices: int, device_memory_gib: float, *,
                workdir: str | None = None, margin: float = 0.9) -> Plan:
    """The `Plan` of a training config on ``num_devices`` devices of ``device_memory_gib``.

    The config's kind is read from its sections: a ``model.width`` means the stage-2
    transformer, a ``model.n_hid`` the dVAE. ``cfg.data.global_batch_size`` is the batch of
    one step (``optim.grad_accum`` steps make an update), split over the mesh's batch axes.
    """
    from dalle_jax.train import loop

    mesh_shape, rules, global_batch, shards = _mesh_and_batch(cfg, num_devices)
    microbatch = global_batch // shards
    compute = str(cfg.precision.compute_dtype)
    if "width" in cfg.model:
        from dalle_jax.train import transformer_task

        mcfg = _transformer_config(cfg, workdir)
        task = transformer_task.model_task(mcfg, {})
        what = _describe(mcfg)
        remat = mcfg.remat
        acts = functools.partial(transformer_activations, mcfg)
    else:
        from dalle_jax.train import dvae_task

        dcfg = dvae_task.model_config(cfg)
        task = dvae_task.make_task(cfg, workdir or "")
        what = f"dVAE ({dcfg.image_size}px -> {dcfg.grid}x{dcfg.grid} tokens)"
        remat = "none"
        acts = functools.partial(dvae_activations, dcfg)
    # The loop's own optimizer (float16 scaling, its refusal for the dVAE included).
    tx, _ = loop.build_optimizer(cfg, task, mesh_shape)
    abstract = loop.abstract_train_state(task.init_variables, tx)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(sharding.unboxed(abstract.params)))
    return Plan(what=what, mesh=mesh_shape, rules=str(cfg.sharding_rules),
                compute_dtype=compute, remat=remat, microbatch=microbatch,
                global_batch=global_batch, grad_accum=int(cfg.optim.grad_accum),
                num_params=int(num_params), state=state_bytes(abstract, mesh_shape, rules),
                activations=acts(microbatch, mesh_shape, rules),
                device_bytes=int(device_memory_gib * GiB), margin=margin)


def settings_that_fit(cfg, num_devices: int, device_memory_gib: float, *,
                      workdir: str | None = None, margin: float = 0.9) -> list[dict]:
    """For each remat policy (transformer configs), the largest per-device microbatch
    (a power of two up to the config's) that fits, with its plan's total; empty entries are
    policies that do not fit even at one example per device."""
    mesh_shape, _, global_batch, shards = _mesh_and_batch(cfg, num_devices)
    policies = ("full", "dots", "none") if "width" in cfg.model else (None,)
    out = []
    for remat in policies:
        best = None
        micro = 1
        while micro * shards <= global_batch:
            trial = _with(cfg, remat, micro * shards)
            p = plan_config(trial, num_devices, device_memory_gib, workdir=workdir,
                            margin=margin)
            if not p.fits:
                break
            best = p
            micro *= 2
        entry = {"remat": remat or "none", "fits": best is not None}
        if best is not None:
            accum = int(cfg.optim.grad_accum) * -(-global_batch // best.global_batch)
            entry.update(microbatch=best.microbatch, batch_per_step=best.global_batch,
                         grad_accum_for_same_batch=accum,
                         total_gib=round(best.total_bytes / GiB, 3))
        out.append(entry)
    return out


def _with(cfg, remat: str | None, global_batch: int):
    trial = cfg.copy_and_resolve_references()
    if remat is not None:
        trial.model.remat = remat
    trial.data.global_batch_size = global_batch
    return trial


# ----------------------------------------------------------------------------- sampling

SAMPLING_ROWS = ("params", "kv cache", "layer weights in use", "gathered embeddings and head",
                 "mask table", "working set")


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Per-device bytes of sampling a transformer on a mesh (`sampling_plan`)."""

    what: str
    mesh: dict[str, int]
    rules: str
    param_dtype: str
    compute_dtype: str
    batch: int  # sequences per sampling call over all devices
    per_device_batch: int
    num_params: int
    rows: dict[str, int]  # SAMPLING_ROWS -> bytes per device
    device_bytes: int
    margin: float = 0.9

    @property
    def total_bytes(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return _fits(self.total_bytes, self.device_bytes, self.margin)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), total_bytes=self.total_bytes, fits=self.fits)

    def format(self) -> str:
        devices = math.prod(self.mesh.values())
        mesh = " x ".join(f"{a}={d}" for a, d in self.mesh.items())
        lines = [f"sampling the {self.what}: {self.num_params:,} parameters in "
                 f"{self.param_dtype}, compute {self.compute_dtype}",
                 f"mesh {mesh} ({devices} devices), sharding_rules={self.rules}; "
                 f"{self.batch} sequences per call ({self.per_device_batch} per batch shard)",
                 "", f"{'per device':<42}{'GiB':>10}"]
        lines += [f"  {name:<40}{b / GiB:>10.3f}" for name, b in self.rows.items()]
        return "\n".join(lines + _verdict(self.total_bytes, self.device_bytes, self.margin))


def sampling_plan(mcfg: tfm.TransformerConfig, mesh_shape: dict[str, int], rules, batch: int,
                  *, param_dtype: str = "float32", device_memory_gib: float = 80.0,
                  margin: float = 0.9, rules_name: str = "") -> SamplingPlan:
    """What one device holds to sample ``batch`` sequences at once on this mesh.

    * ``params``: exact, every leaf placed by the rules (as `Sampler` on a mesh restores
      it), in ``param_dtype`` (a bfloat16 export halves it);
    * ``kv cache``: exact, keys and values of every layer and slot for the device's
      sequences, heads split where the rules split them, in the compute dtype;
    * ``layer weights in use``: the layer being run has its weights (its tensor shard)
      as one working copy, gathered whole with FSDP, sliced out of the layer stack
      otherwise; two layers are counted (XLA may fetch the next while one runs);
    * ``gathered embeddings and head``: likewise for the FSDP-split embeddings and image
      head, counted in float32 (the head's matmul runs in float32);
    * ``mask table``: the per-layer attention masks the cached steps read rows of;
    * ``working set``: estimated, the cache-filling pass over the text (its float32
      activations, MLP hidden and attention logits and probabilities) plus a step's
      logits and their filtering.
    """
    rules = sharding.get_rules(rules)
    shards = sharding.batch_shards(mesh_shape, rules)
    if batch % shards:
        raise ValueError(f"batch {batch} does not divide over the {shards} batch shards of "
                         f"mesh {mesh_shape}")
    b = batch // shards
    boxed = jax.eval_shape(functools.partial(tfm.init_variables, mcfg),
                           jax.random.key(0))["params"]
    sharding.check_shardable(boxed, mesh_shape, rules)
    scale = _DTYPE_BYTES[param_dtype] / 4  # the abstract params are float32
    leaves = sharding.leaf_shardings(boxed, mesh_shape, rules)
    params = sum(r.bytes_per_device for r in leaves)
    fsdp_layer = fsdp_other = 0
    for r in leaves:
        axes = [a for e in tuple(r.spec) for a in sharding.spec_axes(e)]
        gathered = math.prod(mesh_shape.get(a, 1) for a in axes if a != "tensor")
        if r.path.startswith("layers/"):
            fsdp_layer += r.bytes_per_device * gathered // mcfg.depth
        elif gathered > 1:  # embeddings and the image head, which is used in float32
            fsdp_other += r.bytes_per_device * gathered
    heads = -(-mcfg.heads // _ways(rules, mesh_shape, "heads"))
    cdt = _DTYPE_BYTES[mcfg.dtype]
    cache = 2 * mcfg.depth * b * mcfg.seq_len * heads * mcfg.head_dim * cdt
    masks, _ = tfm.layer_masks(mcfg)
    t, d, seq = mcfg.text_len, mcfg.width, mcfg.seq_len
    mlp = mcfg.mlp_ratio * d // _ways(rules, mesh_shape, "mlp")
    prefill = 4 * b * t * (8 * d + 2 * mlp) + 2 * 4 * b * heads * t * seq
    step_logits = 3 * 4 * b * mcfg.image_vocab_padded
    rows = {"params": int(params * scale), "kv cache": int(cache),
            "layer weights in use": int(2 * fsdp_layer * scale),
            "gathered embeddings and head": int(fsdp_other),
            "mask table": int(np.asarray(masks).nbytes), "working set": int(prefill + step_logits)}
    num_params = sum(math.prod(r.shape) for r in leaves)
    return SamplingPlan(what=_describe(mcfg), mesh=dict(mesh_shape), rules=rules_name, param_dtype=param_dtype,
                        compute_dtype=str(mcfg.dtype), batch=batch, per_device_batch=b,
                        num_params=int(num_params), rows=rows,
                        device_bytes=int(device_memory_gib * GiB), margin=margin)


def sampling_plan_config(cfg, num_devices: int, device_memory_gib: float, *,
                         workdir: str | None = None, margin: float = 0.9,
                         param_dtype: str = "float32") -> SamplingPlan:
    """`sampling_plan` of a stage-2 config: its model, mesh and rules, ``sample.batch_size``
    sequences per call (rounded up to the batch shards, as the sampler does), twice that
    with classifier-free guidance (``sample.guidance != 1``: every sequence runs with an
    unconditional twin)."""
    mesh_shape = _mesh_degrees(cfg, num_devices)
    rules = sharding.get_rules(cfg.sharding_rules)
    shards = sharding.batch_shards(mesh_shape, rules)
    batch = -(-int(cfg.sample.batch_size) // shards) * shards
    if float(cfg.sample.get("guidance", 1.0)) != 1.0:
        batch *= 2
    mcfg = dataclasses.replace(_transformer_config(cfg, workdir),
                               dtype=str(cfg.precision.compute_dtype))
    return sampling_plan(mcfg, mesh_shape, rules, batch, param_dtype=param_dtype,
                         device_memory_gib=device_memory_gib, margin=margin,
                         rules_name=str(cfg.sharding_rules))
