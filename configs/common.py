"""Shared pieces of the `get_config(arg)` files: data, mesh, checkpoint and logging sections.

Config files compose these sections and then apply their own variants. Keeping the
sections here means the dVAE and transformer configs read their data the same way
and a new dataset option appears everywhere at once.
"""

import os

import ml_collections as mlc

from dalle_jax import configlib

# Where prepared datasets live unless a config or --config.data.data_dir says otherwise.
DEFAULT_DATA_DIR = os.environ.get("DALLE_JAX_DATA_DIR", os.path.join(os.getcwd(), "data"))

# Sizes of the built-in `shapes` dataset per variant: (image_size, train, validation, test).
SHAPES_SIZES = {
    "tiny": (64, 20_000, 1_000, 1_000),
    "small": (64, 100_000, 5_000, 5_000),
    "paper": (256, 100_000, 5_000, 5_000),
}


def sized_run(arg, variants: dict, *, evaluations: int, **defaults):
    """The start of a config with ``size=`` variants: parses ``arg`` (``size`` (default
    "tiny"), ``steps``, ``batch`` and the config's own ``defaults``), checks the size and
    begins the config with the seed (0), the step count (``steps=`` or the variant's) and
    ``eval_every`` (``evaluations`` evaluations per run).

    Returns ``(arg, variant, config)``; a variant needs ``steps`` and ``batch``, and the
    global batch is ``arg.batch or variant["batch"]``.
    """
    arg = configlib.parse_arg(arg, size="tiny", steps=0, batch=0, **defaults)
    configlib.check_choice("size", arg.size, variants)
    v = variants[arg.size]
    c = mlc.ConfigDict()
    c.seed = 0
    c.total_steps = int(arg.steps or v["steps"])
    c.eval_every = max(1, c.total_steps // evaluations)
    return arg, v, c


def shapes_data(size: str = "small", *, batch_size: int = 32, augment: str = "dvae") -> mlc.ConfigDict:
    """Data section for the built-in `shapes` dataset."""
    if size not in SHAPES_SIZES:
        raise ValueError(f"shapes size {size!r} is not one of {sorted(SHAPES_SIZES)}")
    image_size, n_train, n_val, n_test = SHAPES_SIZES[size]
    c = mlc.ConfigDict()
    c.source = "shapes"
    c.data_dir = DEFAULT_DATA_DIR
    c.shapes = dict(image_size=image_size, num_train=n_train, num_validation=n_val, num_test=n_test)
    c.captions = captions_source()
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_size = image_size  # model resolution; augmentations crop/resize to it
    c.global_batch_size = batch_size
    c.augment = augment  # dvae (paper Listing 1) | transformer (Listing 2) | none
    c.seed = 0
    c.worker_count = 0
    return c


def captions_source(name: str = "", sources: str = "") -> mlc.ConfigDict:
    """Options of the real image-caption builder (folders and/or webdataset tar globs).

    `sources` is a comma-separated list so it can be given on the command line.
    """
    return mlc.ConfigDict(
        dict(
            name=name,
            sources=sources,
            min_caption_chars=3,
            min_side=64,
            min_aspect=0.5,
            max_aspect=2.0,
            max_short_side=0,  # 0 keeps the original resolution
            validation_fraction=0.01,
        )
    )


def captions_data(name: str, sources: str, *, image_size: int = 256, batch_size: int = 32,
                  augment: str = "dvae") -> mlc.ConfigDict:
    """Data section for a real image-caption dataset prepared from folders or tar shards."""
    c = shapes_data("small", batch_size=batch_size, augment=augment)
    c.source = "captions"
    c.captions = captions_source(name, sources)
    c.image_size = image_size
    return c


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> mlc.ConfigDict:
    """Mesh degrees over ("data", "fsdp", "tensor"); one may be -1 (all remaining devices)."""
    return mlc.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def precision(compute_dtype: str = "float32") -> mlc.ConfigDict:
    """Parameters and optimizer state stay fp32; `compute_dtype` is bf16 on TPU/GPU runs.

    ``float16`` turns on the paper's per-resblock gradient scaling (stage 2 only), with the
    rule of ``grad_scaling`` (App. D): every scale starts at M * 2^init_log2, doubles every
    ``doubling_updates`` finite updates, is divided by 2^backoff_log2 on a non-finite
    gradient at most once per ``window`` updates, and stays within M * [2^min_log2,
    2^max_log2], where M = ``replicas`` or, when 0, the number of batch shards of the mesh.
    """
    scaling = dict(init_log2=13.0, min_log2=7.0, max_log2=24.0, doubling_updates=1000,
                   backoff_log2=0.5, window=125, replicas=0)
    return mlc.ConfigDict(dict(param_dtype="float32", compute_dtype=compute_dtype,
                               grad_scaling=scaling))


def plan(device_memory_gib: float = 16.0, **model_sizes) -> mlc.ConfigDict:
    """Options of ``--job=plan`` (the memory planner): the device count the mesh is resolved
    for (0: the devices present; they need not exist), one device's memory, and the fraction
    of it a plan may use. A stage-2 config also gives the dVAE's ``image_vocab`` and
    ``grid``, used when its token directory does not exist yet."""
    return mlc.ConfigDict(dict(num_devices=0, device_memory_gib=float(device_memory_gib),
                               margin=0.9, **model_sizes))


def checkpointing(every: int = 1000, keep: int = 3) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(every_steps=every, max_to_keep=keep, async_save=True, resume_from="",
                               init_params=""))


def logging(every: int = 50) -> mlc.ConfigDict:
    """Training logs: metrics every ``every`` steps to ``metrics.jsonl``; ``tensorboard``:
    also to TensorBoard event files when tensorboardX is installed (`dalle_jax.metrics`)."""
    return mlc.ConfigDict(dict(every_steps=every, progress_bar=True, tensorboard=True))


def dvae_paper_schedules() -> mlc.ConfigDict:
    """The paper's dVAE loss schedules (App. A.2), all cosine, then held.

    KL weight β: 0 → 6.6 over 5k updates. Temperature τ: 1 → 1/16 over 150k updates.
    """
    return mlc.ConfigDict(dict(
        beta=dict(kind="cosine", start_value=0.0, end_value=6.6, steps=5_000, warmup=0,
                  shape="half"),
        tau=dict(kind="cosine", start_value=1.0, end_value=1.0 / 16, steps=150_000, warmup=0,
                 shape="half"),
    ))


def dvae_loss(recon: str = "logit_laplace", ln_b_min: float = float("-inf"),
              mse_sigma: float = 0.1) -> mlc.ConfigDict:
    """The dVAE's reconstruction term (see `dvae_objective.recon_nll`); the defaults are the paper's
    unclamped logit-Laplace likelihood (App. A.3). ``mse_sigma`` only matters for "mse"."""
    return mlc.ConfigDict(dict(recon=recon, ln_b_min=float(ln_b_min), mse_sigma=float(mse_sigma)))


def dvae_optim() -> mlc.ConfigDict:
    """AdamW(0.9, 0.999, 1e-8, wd 1e-4), lr 1e-4 → 1.25e-6 (cosine over 1.2M updates) and
    a parameter EMA with decay 0.999 every step (App. A.2)."""
    lr = dict(kind="cosine", start_value=1e-4, end_value=1.25e-6, steps=1_200_000, warmup=0,
              shape="half")
    return mlc.ConfigDict(dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
                               max_variance=0.0, clip_global_norm=0.0, grad_accum=1,
                               ema_decay=0.999, ema_every=1, lr=lr))


def transformer_optim(peak: float = 4.5e-4, steps: int = 1_000_000, warmup: int = 5_000,
                      end_value: float = 0.0) -> mlc.ConfigDict:
    """AdamW(0.9, 0.96, 1e-8, wd 4.5e-2), global-norm clipping at 4 and a parameter EMA
    (paper §B.2). The paper's learning rate warms up linearly to 4.5e-4 over 5k updates
    and is then halved on plateaus; configs with a fixed step count use cosine decay.
    ``max_variance`` clips Adam's running variance by value (the paper: 5; 0 = off)."""
    lr = dict(kind="warmup_cosine", peak=peak, end_value=end_value, warmup=warmup, steps=steps,
              shape="half")
    return mlc.ConfigDict(dict(name="adamw", b1=0.9, b2=0.96, eps=1e-8, weight_decay=4.5e-2,
                               max_variance=0.0, clip_global_norm=4.0, grad_accum=1,
                               ema_decay=0.99, ema_every=25, lr=lr))


def sample(captions, **overrides) -> mlc.ConfigDict:
    """The ``sample`` job's section (`dalle_jax.sample.job` documents every field).

    params / dvae_params "": the newest export of WORKDIR / of the dVAE run that wrote the
    token directory. keep 0: write all candidates. rerank "": no scorer (else a
    `--job=train_clip` / `--job=import_clip` export). keep_rows -1: the paper's 15 of 32
    token rows, scaled to the grid. eval_*: the `shapes` caption match (eval_rerank N for
    best-of-N reranked, eval_guidance s for guided; 0 / 1 leave them out;
    eval_rerank_guidance s draws the reranked candidates with guidance s, 1: unguided).
    """
    c = mlc.ConfigDict(dict(
        params="", dvae_params="", captions=tuple(captions), prompts_file="",
        num_candidates=8, keep=0, seed=0, temperature=1.0, top_k=0, top_p=1.0, guidance=1.0,
        rerank="", rerank_chunk=64, batch_size=64, complete_image="", keep_rows=-1,
        out_dir="", eval_captions=0, eval_splits="validation", eval_rerank=0,
        eval_guidance=1.0, eval_rerank_guidance=1.0))
    for k, v in overrides.items():
        if k not in c:
            raise KeyError(f"sample has no field {k!r}")
        c[k] = v
    return c


def evaluate() -> mlc.ConfigDict:
    """The ``evaluate`` job's section: params "" = the newest WORKDIR/exports/step_N (or an
    export / run directory to evaluate), only "" = every ``evals`` section of that model
    (else comma-separated section names), out_dir "" = WORKDIR/evaluate/step_N."""
    return mlc.ConfigDict(dict(params="", only="", out_dir=""))


def export(dtype: str = "bfloat16") -> mlc.ConfigDict:
    """The ``export`` job's section: source "" = the newest WORKDIR/exports/step_N (or a
    params export, or a training checkpoint), out "" = the source's path + "_<dtype>"."""
    return mlc.ConfigDict(dict(source="", dtype=dtype, out=""))
