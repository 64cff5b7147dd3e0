"""Autoregressive image sampling from the stage-2 transformer with a preallocated KV cache.

The sampler is a pure function of ``(params, text, sample ids, key)``: one jitted program
runs the text (and any kept image prefix) through the model in one pass that fills the
key/value cache of every layer, then a `jax.lax.fori_loop` draws the remaining image
tokens one slot at a time, each step attending to the cache through the *same* mask rows
the training forward uses (``transformer.layer_masks``). Sampling logits therefore equal
the training forward's logits for the same sequence (tested), so the masks hold during
sampling exactly as in training.

Randomness (as everywhere in the project, keys come from ``fold_in`` of a global index):
sample ``i`` draws slot ``k`` with ``fold_in(fold_in(key, i), k)``, where ``i`` is the
sample's *global* index (prompt index times candidates plus candidate, see
`Sampler.generate`). An image is therefore a pure
function of (caption, seed, sample index): it does not change with the batch size, the
number of devices or the other prompts in the batch.

Classifier-free guidance (not in the paper; ``SamplingConfig.guidance``): a model trained
with caption dropout (``text.caption_dropout``: a dropped caption becomes the empty
caption's slots, ``[BOS, pad_1, ..., pad_{T-1}]``) also models images without a caption.
With guidance ``s != 1`` every sequence runs next to an unconditional twin, both in one
batch of ``2B`` rows that share the same cached program, and each step samples from
``uncond + s * (cond - uncond)`` of the two rows' image logits; the drawn token is fed to
both rows. ``s = 1`` is plain conditional sampling (the twin is not even run, so the
images are bitwise those of unguided sampling); ``s = 0`` ignores the caption.

Filtering (applied to the (guided) image logits of each step, in this order):
``temperature`` (divides the logits), ``top_k`` (keep the k largest, 0 = off) and
``top_p`` (nucleus: keep the smallest set of largest-probability tokens whose mass
reaches p, 1 = off).

Image completion (paper §3.1, Fig. 2 bottom row): ``prefix_BP`` fixes the first ``P``
image tokens (e.g. the top 15 of 32 rows of a real image's tokens, ``P = 15 * 32``);
they join the text in the cache-filling pass and only cells ``P..I-1`` are sampled.

On a mesh (`Sampler` with ``mesh=``, or `Sampler.load` with ``mesh=``) the parameters are
placed (or restored straight from the export) by the same logical-axis rules as in
training, so a model sharded over ``fsdp`` / ``tensor`` for training samples sharded the
same way and no device (or host) holds it whole; candidates are split over the batch
axes of the mesh, and with several processes every process runs the same program on its
devices. Since keys follow global sample indices, the images are the same on one device,
on a mesh and over several processes (tested).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from dalle_jax import sharding
from dalle_jax.models import transformer as tfm

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each image token is drawn from its logits.

    Attributes:
        temperature: logits are divided by it (> 0; 1 samples the model's distribution).
        top_k: keep only the k most likely tokens (0 keeps all).
        top_p: keep the smallest set of most likely tokens with total probability >= p
            (1.0 keeps all).
        guidance: classifier-free guidance scale ``s`` (>= 0): image logits
            ``uncond + s * (cond - uncond)``. 1 is unguided sampling; values above 1 follow
            the caption more closely. Needs a model trained with caption dropout.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.guidance >= 0:
            raise ValueError(f"guidance scale must be >= 0 (1 = unguided), got {self.guidance}")

    @property
    def guided(self) -> bool:
        """Whether sampling runs an unconditional twin of every sequence."""
        return self.guidance != 1.0


def filter_logits(logits_BC: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p on float32 logits; removed tokens get -inf."""
    logits_BC = logits_BC.astype(jnp.float32) / sampling.temperature
    neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
    vocab = logits_BC.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_B1 = jax.lax.top_k(logits_BC, sampling.top_k)[0][:, -1:]
        logits_BC = jnp.where(logits_BC < kth_B1, neg_inf, logits_BC)
    if sampling.top_p < 1.0:
        sorted_BC = jnp.sort(logits_BC, axis=-1)[:, ::-1]
        probs_BC = jax.nn.softmax(sorted_BC, axis=-1)
        # Mass strictly before each sorted token: a token is kept while that is < p, so the
        # most likely token is always kept.
        before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
        n_keep_B1 = jnp.sum(before_BC < sampling.top_p, axis=-1, keepdims=True)
        cutoff_B1 = jnp.take_along_axis(sorted_BC, n_keep_B1 - 1, axis=-1)
        logits_BC = jnp.where(logits_BC < cutoff_B1, neg_inf, logits_BC)
    return logits_BC


# ----------------------------------------------------------------------------- cached model

# Logical axes of the key / value cache (depth, batch, slots, heads, head width).
CACHE_AXES = ("layers", "batch", "length", "heads", "kv")


def init_cache(config: tfm.TransformerConfig, batch: int) -> tuple[jax.Array, jax.Array]:
    """An empty ``(keys, values)`` cache for ``batch`` sequences, each ``(depth, B, L, H, K)``
    in the compute dtype (every slot is written before a query can see it)."""
    shape = (config.depth, batch, config.seq_len, config.heads, config.head_dim)
    # On a mesh the cache is split like the keys and values it stores: batch over the batch
    # axes, heads over "tensor" where the rules say so (a no-op off a mesh).
    return tuple(nn.with_logical_constraint(jnp.zeros(shape, config.compute_dtype), CACHE_AXES)
                 for _ in range(2))


def forward_cached(params: PyTree, config: tfm.TransformerConfig, x_BQD: jax.Array,
                   start: int | jax.Array, cache: tuple[jax.Array, jax.Array]
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The layer stack and final norm on ``Q`` consecutive slots ``start .. start+Q-1``.

    Writes the slots' keys and values into ``cache`` and lets each query attend to every
    cached slot through its rows of the training masks; slots after a query are masked
    (causality), so unwritten cache entries are never seen. Returns the normed hidden
    states ``(B, Q, D)`` and the updated cache.
    """
    table_NLL, index = tfm.layer_masks(config)
    q_len = x_BQD.shape[1]
    rows_NQL = jax.lax.dynamic_slice_in_dim(jnp.asarray(table_NLL), start, q_len, axis=1)
    dt = config.compute_dtype

    # One layer per scan iteration: each reads its own slice of the stacked weights and
    # updates its slot of the cache in place, so no per-layer copies of the weights (or of
    # the cache) are made, and the program does not grow with the depth.
    def layer(carry, inputs):
        x_BQD, cache_k, cache_v = carry
        p, l, kind = inputs
        h_BQD = tfm.layer_norm(x_BQD, p["ln1_scale"], p["ln1_bias"])
        q, k, v = tfm.qkv_projection(p, h_BQD, dt, config.heads)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype),
                                               (l, 0, start, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype),
                                               (l, 0, start, 0, 0))
        keys = jax.lax.dynamic_index_in_dim(cache_k, l, keepdims=False)
        values = jax.lax.dynamic_index_in_dim(cache_v, l, keepdims=False)
        rows_QL = jax.lax.dynamic_index_in_dim(rows_NQL, kind, keepdims=False)
        x_BQD = x_BQD + tfm.attention_output(p, tfm.attend(q, keys, values, rows_QL), dt)
        x_BQD = x_BQD + tfm.mlp_branch(p, x_BQD, config)
        return (x_BQD, cache_k, cache_v), None

    (x_BQD, cache_k, cache_v), _ = jax.lax.scan(
        layer, (x_BQD.astype(jnp.float32), *cache),
        (params["layers"], jnp.arange(config.depth), jnp.asarray(index)))
    h_BQD = tfm.layer_norm(x_BQD, params["final_ln_scale"], params["final_ln_bias"])
    return h_BQD, (cache_k, cache_v)


def prefix_embeddings(params: PyTree, config: tfm.TransformerConfig, text_BT: jax.Array,
                      prefix_BP: jax.Array) -> jax.Array:
    """Embeddings of the text slots and of the image slots whose inputs are all known.

    With ``P`` kept image tokens, image slots ``0..P-1`` hold ``[BOI, z_0, ..., z_{P-2}]``.
    """
    x_BTD = tfm.embed_text(params["text_embed"], params["text_pos"], text_BT)
    if prefix_BP.shape[1] == 0:
        return x_BTD
    _, image_in_BP = tfm.make_inputs(text_BT, prefix_BP, config.boi_id)
    x_BPD = tfm.embed_image(params["image_embed"], params["row_embed"], params["col_embed"],
                            image_in_BP)
    return jnp.concatenate([x_BTD, x_BPD], axis=1)


def image_logits(params: PyTree, config: tfm.TransformerConfig, h_BQD: jax.Array) -> jax.Array:
    """Float32 image logits of normed hidden states (the head's padding cut off)."""
    logits = jnp.einsum("bqd,dv->bqv", h_BQD.astype(jnp.float32), params["image_head"])
    return tfm.unpad(logits, config.image_vocab)


# ----------------------------------------------------------------------------- sampling


def _check_inputs(config: tfm.TransformerConfig, text_BT: jax.Array, sample_ids_B: jax.Array,
                  prefix_BP: jax.Array) -> None:
    b, t = text_BT.shape
    if t != config.text_len:
        raise ValueError(f"text has {t} slots, the model expects text_len={config.text_len}")
    if sample_ids_B.shape != (b,):
        raise ValueError(f"need one sample id per sequence: text batch {b}, "
                         f"sample_ids shape {sample_ids_B.shape}")
    if prefix_BP.ndim != 2 or prefix_BP.shape[0] != b:
        raise ValueError(f"prefix must be (batch={b}, P), got shape {prefix_BP.shape}")
    if prefix_BP.shape[1] > config.image_len:
        raise ValueError(f"prefix of {prefix_BP.shape[1]} tokens is longer than the image "
                         f"({config.image_len} tokens)")


def sample_tokens(params: PyTree, text_BT: jax.Array, sample_ids_B: jax.Array, key: jax.Array,
                  prefix_BP: jax.Array | None = None, null_text_T: jax.Array | None = None, *,
                  config: tfm.TransformerConfig,
                  sampling: SamplingConfig = SamplingConfig()) -> jax.Array:
    """Image tokens ``(B, I)`` for text slots ``(B, T)``; jittable (config and sampling static).

    Args:
        params: the transformer's ``params`` collection (unboxed).
        text_BT: text slots as `TextTokenizer.encode_slots` writes them.
        sample_ids_B: global sample index of each row (its RNG stream, see module doc).
        key: the base PRNG key (the run's seed).
        prefix_BP: optional first ``P`` image tokens to keep (image completion).
        null_text_T: the unconditional text slots (the empty caption's), needed when
            ``sampling.guided``.
    """
    b = text_BT.shape[0]
    if prefix_BP is None:
        prefix_BP = jnp.zeros((b, 0), jnp.int32)
    _check_inputs(config, text_BT, sample_ids_B, prefix_BP)
    t, n_img, n_keep = config.text_len, config.image_len, prefix_BP.shape[1]
    if n_keep == n_img:
        return prefix_BP.astype(jnp.int32)
    guided = sampling.guided
    if guided:
        if null_text_T is None or null_text_T.shape != (t,):
            raise ValueError(f"guided sampling needs the unconditional text slots "
                             f"null_text_T of shape ({t},)")
        # Row 2i is sequence i, row 2i+1 its unconditional twin: interleaved so that a
        # batch-sharded mesh keeps each pair on one device (the guidance step needs no
        # communication).
        null_BT = jnp.broadcast_to(null_text_T.astype(text_BT.dtype), text_BT.shape)
        text_BT = jnp.stack([text_BT, null_BT], axis=1).reshape(2 * b, t)
        prefix_BP = jnp.repeat(prefix_BP, 2, axis=0)
    rows = text_BT.shape[0]

    sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(sample_ids_B)
    cache = init_cache(config, rows)
    _, cache = forward_cached(params, config, prefix_embeddings(params, config, text_BT,
                                                                prefix_BP), 0, cache)
    prefix_BP = prefix_BP[::2] if guided else prefix_BP
    tokens_BI = jnp.zeros((b, n_img), jnp.int32)
    tokens_BI = jax.lax.dynamic_update_slice_in_dim(tokens_BI, prefix_BP.astype(jnp.int32),
                                                    0, axis=1)
    pos_ID = tfm.image_positions(params["row_embed"], params["col_embed"])

    def step(k, carry):
        tokens_BI, cache = carry
        # Slot T+k's input: BOI for the first cell, else the previous cell's token.
        prev_B = jax.lax.dynamic_index_in_dim(tokens_BI, jnp.maximum(k - 1, 0), axis=1,
                                              keepdims=False)
        in_B = jnp.where(k == 0, config.boi_id, prev_B)
        if guided:
            in_B = jnp.repeat(in_B, 2)
        x_B1D = (jnp.take(params["image_embed"], in_B, axis=0)
                 + jax.lax.dynamic_index_in_dim(pos_ID, k, axis=0, keepdims=True))[:, None]
        h_B1D, cache = forward_cached(params, config, x_B1D, t + k, cache)
        logits_BC = image_logits(params, config, h_B1D)[:, 0]
        if guided:
            pairs_B2C = logits_BC.reshape(b, 2, -1)
            cond_BC, uncond_BC = pairs_B2C[:, 0], pairs_B2C[:, 1]
            logits_BC = uncond_BC + sampling.guidance * (cond_BC - uncond_BC)
        logits_BC = filter_logits(logits_BC, sampling)
        step_keys = jax.vmap(lambda sk: jax.random.fold_in(sk, k))(sample_keys)
        z_B = jax.vmap(jax.random.categorical)(step_keys, logits_BC).astype(jnp.int32)
        tokens_BI = jax.lax.dynamic_update_index_in_dim(tokens_BI, z_B, k, axis=1)
        return tokens_BI, cache

    tokens_BI, _ = jax.lax.fori_loop(n_keep, n_img, step, (tokens_BI, cache))
    return tokens_BI


# ----------------------------------------------------------------------------- convenience


def _abstract_boxed(config: tfm.TransformerConfig) -> PyTree:
    return jax.eval_shape(functools.partial(tfm.init_variables, config),
                          jax.random.key(0))["params"]


def param_shardings(config: tfm.TransformerConfig, mesh, rules) -> PyTree:
    """Where each transformer parameter lives on ``mesh`` under the logical-axis ``rules``
    (the training layout), computed without allocating anything."""
    return sharding.tree_shardings(_abstract_boxed(config), mesh, rules)


def abstract_params(config: tfm.TransformerConfig, mesh=None, rules=None) -> PyTree:
    """``ShapeDtypeStruct``s of the parameters, with their shardings when ``mesh`` is given
    (restore targets: each process reads only its shards of an export)."""
    boxed = _abstract_boxed(config)
    shapes = sharding.unboxed(boxed)
    if mesh is None:
        return shapes
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        shapes, sharding.tree_shardings(boxed, mesh, rules))


def compile_sampler(config: tfm.TransformerConfig, mesh, rules, batch: int, *,
                    sampling: SamplingConfig = SamplingConfig(), prefix_len: int = 0,
                    param_dtype: str = "float32"):
    """The sampling program for ``batch`` sequences on ``mesh``, lowered and compiled from
    abstract inputs (nothing allocated); its ``memory_analysis()`` is what one device needs
    (`dalle_jax.plan.sampling_plan` estimates the same without compiling)."""
    rules = sharding.get_rules(rules)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, param_dtype,
                                                         sharding=a.sharding),
                          abstract_params(config, mesh, rules))
    rows = NamedSharding(mesh, sharding.batch_spec(mesh, rules, 2))
    ids = NamedSharding(mesh, sharding.batch_spec(mesh, rules, 1))
    args = (params, jax.ShapeDtypeStruct((batch, config.text_len), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=ids), jax.random.key(0),
            jax.ShapeDtypeStruct((batch, prefix_len), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((config.text_len,), jnp.int32,
                                 sharding=sharding.replicated(mesh)))
    fn = jax.jit(functools.partial(sample_tokens, config=config, sampling=sampling),
                 out_shardings=rows)
    with sharding.activation_rules(mesh, rules):
        return fn.lower(*args).compile()


class Sampler:
    """Captions in, image tokens and images out: a trained transformer, its text tokenizer
    and (optionally) its dVAE, with one jitted program per (batch, prefix length) shape.

    Args:
        config: the transformer's architecture.
        params: its parameters (e.g. `exports.load` of an export); on a mesh,
            arrays already placed there are used as they are, others are placed.
        text_tokenizer: the `TextTokenizer` the model was trained with.
        image_tokenizer: the dVAE `ImageTokenizer`; needed for images, not for tokens.
        sampling: token filtering.
        mesh: run on this mesh (`sharding.make_mesh`) with the logical-axis ``rules``
            (a preset name or rule pairs): parameters sharded as in training, each batch
            of candidates split over the mesh's batch axes. None: the default device.
        rules: required with ``mesh``.
    """

    def __init__(self, config: tfm.TransformerConfig, params: PyTree, text_tokenizer: Any,
                 image_tokenizer: Any = None, sampling: SamplingConfig = SamplingConfig(), *,
                 mesh=None, rules=None):
        self.config = config
        # Where the model came from (set by `load`; recorded in sampling reports).
        self.sources: dict[str, Any] = {}
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.sampling = sampling
        if text_tokenizer.text_vocab_size(config.text_len) != config.text_vocab:
            raise ValueError(
                f"text tokenizer gives {text_tokenizer.text_vocab_size(config.text_len)} text "
                f"ids at text_len={config.text_len}, the model has text_vocab={config.text_vocab}")
        if image_tokenizer is not None and (image_tokenizer.vocab_size != config.image_vocab
                                            or image_tokenizer.grid != config.grid):
            raise ValueError(
                f"dVAE ({image_tokenizer.vocab_size} codes, grid {image_tokenizer.grid}) does "
                f"not match the transformer (image_vocab={config.image_vocab}, grid={config.grid})")
        # The empty caption's slots: the text of the unconditional rows of guided sampling
        # (what caption dropout trains the model on).
        self.null_text = np.asarray(text_tokenizer.encode_batch_slots(
            [""], text_len=config.text_len)[0][0], np.int32)
        fn = functools.partial(sample_tokens, config=config, sampling=sampling)
        self.mesh = mesh
        if mesh is None:
            self.params = sharding.unboxed(params)
            self._sample = jax.jit(fn)
            self.batch_shards = 1
            return
        if rules is None:
            raise ValueError("a Sampler on a mesh needs the logical-axis rules")
        self.rules = sharding.get_rules(rules)
        param_sh = param_shardings(config, mesh, self.rules)
        self.params = jax.tree.map(
            lambda x, sh: x if getattr(x, "sharding", None) == sh else jax.device_put(x, sh),
            sharding.unboxed(params), param_sh)
        rows = NamedSharding(mesh, sharding.batch_spec(mesh, self.rules, 2))
        ids = NamedSharding(mesh, sharding.batch_spec(mesh, self.rules, 1))
        self._rows, self._ids = rows, ids
        self.batch_shards = sharding.batch_shards(dict(mesh.shape), self.rules)
        rep = sharding.replicated(mesh)
        jitted = jax.jit(fn, in_shardings=(param_sh, rows, ids, rep, rows, rep),
                         out_shardings=rows)

        def run(params, text, ids_, key, prefix, null_text):
            # Traced under the rules, so the model's activation constraints apply.
            with sharding.activation_rules(mesh, self.rules):
                return jitted(params, text, ids_, key, prefix, null_text)

        self._sample = run

    @classmethod
    def load(cls, transformer_export: str, bpe_model: str, dvae_export: str | None = None, *,
             sampling: SamplingConfig = SamplingConfig(), dtype: str = "float32",
             mesh=None, rules=None) -> Sampler:
        """A sampler from files: a transformer export (``exports/step_N`` of ``--job=train_transformer``),
        its BPE model and, for images, its dVAE export. Each is checked against the
        identities the transformer was trained with, so a tokenizer or dVAE from another
        run fails with the differing fields named instead of producing noise.

        With ``mesh`` (and ``rules``) the parameters are restored straight into their
        shardings: every process reads only the shards its devices hold.
        """
        from dalle_jax import exports
        from dalle_jax.tokenizers import bpe
        from dalle_jax.tokenizers.image_tokenizer import ImageTokenizer

        meta = exports.read_meta(transformer_export)
        ident = exports.identity_of(meta, "transformer", transformer_export)
        config = tfm.TransformerConfig(**ident["model"], dtype=dtype)
        # Restore targets carry the export's own dtype (a bfloat16 export stays bfloat16)
        # and where each array goes, so orbax reads every array straight into its device
        # buffer(s): no full float32 (or host) copy of the model is made on the way.
        if mesh is not None:
            if rules is None:
                raise ValueError("a Sampler on a mesh needs the logical-axis rules")
            target = abstract_params(config, mesh, sharding.get_rules(rules))
        else:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                  abstract_params(config))
        params, _ = exports.load(transformer_export,
                                 abstract=exports.in_stored_dtype(target, meta))
        text_tokenizer = bpe.TextTokenizer(bpe_model)
        text_tokenizer.check_identity(ident["tokenizer"])
        image_tokenizer = None
        if dvae_export:
            image_tokenizer = ImageTokenizer.load(dvae_export)
            found = exports.dvae_identity(image_tokenizer.config)
            exports.check_dvae_identity(ident["dvae"], found, dvae_export)
        sampler = cls(config, params, text_tokenizer, image_tokenizer, sampling, mesh=mesh,
                      rules=rules)
        sampler.sources = {
            "transformer": {"export": os.path.abspath(transformer_export),
                            "step": meta.get("step"), "ema": meta.get("ema"),
                            "export_dtype": meta.get("export_dtype"), "identity": ident},
            "bpe_model": os.path.abspath(bpe_model),
            "dvae": None if not dvae_export else {"export": os.path.abspath(dvae_export),
                                                  "identity": found},
        }
        return sampler

    def with_sampling(self, sampling: SamplingConfig) -> Sampler:
        """The same model, tokenizers and mesh with other token filtering or guidance (the
        parameters are shared, not copied)."""
        return Sampler(self.config, self.params, self.text_tokenizer, self.image_tokenizer,
                       sampling, mesh=self.mesh, rules=getattr(self, "rules", None))

    def with_params(self, params: PyTree) -> Sampler:
        """The same compiled sampler over other parameters of the same architecture (e.g.
        the current training parameters at each evaluation): nothing is recompiled."""
        other = copy.copy(self)
        if self.mesh is None:
            other.params = sharding.unboxed(params)
        else:
            param_sh = param_shardings(self.config, self.mesh, self.rules)
            other.params = jax.tree.map(
                lambda x, sh: x if getattr(x, "sharding", None) == sh else jax.device_put(x, sh),
                sharding.unboxed(params), param_sh)
        return other

    def encode_captions(self, captions: Sequence[str]) -> np.ndarray:
        """``(N, T)`` text slots of the captions (no BPE-dropout)."""
        slots, _ = self.text_tokenizer.encode_batch_slots(list(captions),
                                                          text_len=self.config.text_len)
        return slots

    def tokens(self, captions: Sequence[str], *, num_candidates: int = 1, seed: int = 0,
               batch_size: int = 64, prefix: np.ndarray | None = None,
               first_sample_index: int = 0, candidates: tuple[int, int] | None = None,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Image tokens ``(len(captions), num_candidates, G, G)``.

        Candidate ``j`` of caption ``i`` is global sample ``first_sample_index + i *
        num_candidates + j``; its tokens do not depend on ``batch_size``. ``prefix``
        (``(len(captions), P)`` tokens) keeps each caption's first ``P`` image tokens.
        ``candidates=(lo, hi)`` draws only candidates ``lo .. hi-1`` of every caption (the
        same tokens as in the full draw), returning ``(len(captions), hi - lo, G, G)``:
        best-of-N reranking streams the N candidates in such chunks. ``progress(n)`` is
        called after each batch with the number of sequences it drew.
        """
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lo, hi = (0, num_candidates) if candidates is None else candidates
        if not 0 <= lo < hi <= num_candidates:
            raise ValueError(f"candidates must be a range (lo, hi) with 0 <= lo < hi <= "
                             f"num_candidates={num_candidates}, got {candidates}")
        n, c = len(captions), hi - lo
        if n == 0:
            raise ValueError("no captions to sample for")
        text_NT = np.repeat(self.encode_captions(captions), c, axis=0)
        ids_N = (first_sample_index + np.arange(n, dtype=np.int64)[:, None] * num_candidates
                 + np.arange(lo, hi)[None, :]).reshape(-1)
        if ids_N.max() >= 2**31:
            raise ValueError("global sample indices must stay below 2**31")
        ids_N = ids_N.astype(np.int32)
        if prefix is None:
            prefix_NP = np.zeros((n * c, 0), np.int32)
        else:
            prefix = np.asarray(prefix)
            if prefix.ndim != 2 or prefix.shape[0] != n:
                raise ValueError(f"prefix must be (num_captions={n}, P), got {prefix.shape}")
            if prefix.size and (prefix.min() < 0 or prefix.max() >= self.config.image_vocab):
                raise ValueError(f"prefix tokens must lie in [0, {self.config.image_vocab})")
            prefix_NP = np.repeat(prefix.astype(np.int32), c, axis=0)
        key = jax.random.key(seed)
        null_T = self.null_text
        if self.mesh is not None:
            null_T = jax.device_put(null_T, sharding.replicated(self.mesh))
        # One compiled batch size: ``batch_size``, or all samples when fewer, rounded up to
        # a multiple of the mesh's batch shards so that every device gets whole rows.
        shards = self.batch_shards
        size = -(-min(batch_size, len(ids_N)) // shards) * shards
        out = []
        for start in range(0, len(ids_N), size):
            stop = min(start + size, len(ids_N))
            pad = size - (stop - start)
            # Pad the last batch to the compiled size; padded rows are dropped.
            rows = [np.concatenate([a[start:stop], np.repeat(a[stop - 1:stop], pad, 0)])
                    for a in (text_NT, ids_N, prefix_NP)]
            if self.mesh is not None:
                rows = [self._place(r, self._rows if r.ndim == 2 else self._ids) for r in rows]
            toks = self._sample(self.params, rows[0], rows[1], key, rows[2], null_T)
            out.append(self._fetch(toks)[: stop - start])
            if progress is not None:
                progress(stop - start)
        g = self.config.grid
        return np.concatenate(out).reshape(n, c, g, g)

    @staticmethod
    def _place(host: np.ndarray, sh) -> jax.Array:
        """A global array from a host array every process holds in full."""
        return jax.make_array_from_callback(host.shape, sh, lambda index: host[index])

    @staticmethod
    def _fetch(arr: jax.Array) -> np.ndarray:
        """The whole (batch-sharded) array on every process."""
        if arr.is_fully_addressable:
            return np.asarray(arr)
        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))

    def complete(self, captions: Sequence[str], *, keep_rows: int, images: Any = None,
                 image_tokens: Any = None, num_candidates: int = 1, seed: int = 0,
                 batch_size: int = 64) -> np.ndarray:
        """Image completion (paper Fig. 2): keep the top ``keep_rows`` token rows of each
        caption's image and sample the rest; returns tokens ``(N, num_candidates, G, G)``.

        Give either ``images`` (``(N, H, W, 3)``, encoded with the dVAE) or their
        ``image_tokens`` (``(N, G, G)`` or ``(N, G*G)``). The paper keeps 15 of 32 rows.
        """
        g = self.config.grid
        if not 0 <= keep_rows <= g:
            raise ValueError(f"keep_rows must be in [0, {g}], got {keep_rows}")
        if (images is None) == (image_tokens is None):
            raise ValueError("give exactly one of images= and image_tokens=")
        if images is not None:
            if self.image_tokenizer is None:
                raise ValueError("completing from images needs the dVAE (image_tokenizer)")
            image_tokens = np.asarray(self.image_tokenizer.encode(images))
        image_tokens = np.asarray(image_tokens).reshape(len(captions), -1)
        if image_tokens.shape[1] != g * g:
            raise ValueError(f"image tokens must hold {g * g} tokens per image, got "
                             f"{image_tokens.shape[1]}")
        return self.tokens(captions, num_candidates=num_candidates, seed=seed,
                           batch_size=batch_size, prefix=image_tokens[:, :keep_rows * g])

    def images(self, tokens_NCGG: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Decode ``(..., G, G)`` tokens to uint8 images ``(..., H, W, 3)`` with the dVAE."""
        if self.image_tokenizer is None:
            raise ValueError("this Sampler has no image tokenizer (dVAE) to decode with")
        lead = tokens_NCGG.shape[:-2]
        flat = tokens_NCGG.reshape((-1,) + tokens_NCGG.shape[-2:])
        out = [np.asarray(self.image_tokenizer.decode(flat[i:i + batch_size]))
               for i in range(0, len(flat), batch_size)]
        images = np.concatenate(out)
        images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
        return images.reshape(lead + images.shape[1:])

    def generate(self, captions: Sequence[str], *, num_candidates: int = 1, seed: int = 0,
                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, images)`` for each caption and candidate; see `tokens`."""
        toks = self.tokens(captions, num_candidates=num_candidates, seed=seed,
                           batch_size=batch_size)
        return toks, self.images(toks, batch_size=batch_size)
