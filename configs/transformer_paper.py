"""Stage 2 at the paper's size: the 12-billion-parameter transformer (paper §2.2-2.4, App. B).

  python -m dalle_jax.main --job=plan      --config=configs/transformer_paper.py:fsdp=F,tensor=T --workdir=W \
    --config.plan.num_devices=N --config.plan.device_memory_gib=M
  python -m dalle_jax.main --job=train_bpe --config=configs/transformer_paper.py:tokens=DIR --workdir=W
  python -m dalle_jax.main --job=train_transformer     --config=configs/transformer_paper.py:tokens=DIR,fsdp=F,tensor=T --workdir=W
  python -m dalle_jax.main --job=sample    --config=configs/transformer_paper.py:tokens=DIR --workdir=W

DIR is the token directory that ``--job=encode`` of ``configs/dvae_paper.py`` wrote (its
dVAE fixes the image grid, 32x32, and the codebook, 8192). Args: tokens=DIR,
fsdp=<mesh degree> and tensor=<mesh degree> (the data degree takes the remaining
devices; the sharding rules follow: fsdp_tp when tensor > 1, else fsdp), batch=<global
batch>, runlocal (the same recipe at width 64 / depth 4 and batch 8 for a few steps: a
smoke test of the set-up on CPU).

The paper's recipe: 64 layers, width 3,968, 62 heads of 64 (12.3B parameters with the
embeddings and heads, the paper's "12 billion"); 256 text slots, BPE vocabulary 16,384
with BPE-dropout 0.1; the row/column/row/row mask pattern with a convolutional last
layer (window 11, raster reading); loss 1/8 text + 7/8 image; AdamW(0.9, 0.96, 1e-8,
weight decay 4.5e-2 on the weight matrices) with the running variance clipped by value
at 5, gradient clipping at global norm 4; learning rate warmed up linearly to 4.5e-4 over
5,000 updates, then halved five times; EMA 0.99 every 25 updates; batch 1,024; 430,000
updates. No caption dropout: the paper trains no unconditional model.

Two choices of this config: the paper halved the learning rate by hand whenever the loss
plateaued, and when is not published, so the halvings come at fixed updates
(``optim.lr.halve_at``) spread over the second half of the run (override them to follow
your own plateaus); and every layer is rematerialised in the backward pass, the stack
running as one scanned layer, so that activations fit.

Precision: bfloat16 compute with float32 parameters and optimizer state by default (GPUs
and TPUs with bf16). ``--config.precision.compute_dtype=float16`` is the paper's own
scheme for GPUs without bf16: float16 resblocks with one gradient scale per resblock,
kept and updated by the optimizer (``precision.grad_scaling``).

Meshes: ``fsdp`` splits the model width (3,968 = 2^7 * 31), so the fsdp degree must be a
power of two up to 128; ``fsdp_tp`` also splits the MLP (15,872), the fused attention
projections (62 heads x 64) and the vocabularies (padded to multiples of 128) over
``tensor``, any power of two up to 128. A mesh that cannot shard a parameter stops the
job before anything is allocated, naming the parameter, dim and mesh axis. Per-device
tables for data 16 x fsdp 64 and data 8 x fsdp 32 x tensor 4 are checked in
(tests/golden/). ``--job=plan`` says what fits on given devices; docs/experiments.md
lists plans for the paper's 1,024 GPUs, 64 large GPUs and a TPU slice.
"""
import common  # noqa: I001

from dalle_jax import configlib

# Updates at which the learning rate halves (five times: 4.5e-4 -> 1.4e-5).
HALVE_AT = "215000,275000,325000,365000,400000"


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tokens="", fsdp=8, tensor=1, batch=1024, runlocal=False)
    c = common.mlc.ConfigDict()
    c.seed = 0
    c.total_steps = 430_000
    c.eval_every = 5_000
    c.data = dict(tokens_dir=arg.tokens, train_split="train", eval_split="validation",
                  global_batch_size=arg.batch, seed=0, worker_count=8)
    # caption_dropout 0: the paper trains no unconditional model (no guidance).
    c.text = dict(vocab_size=16384, text_len=256, dropout=0.1, bpe_model="", caption_dropout=0.0)
    c.model = dict(width=3968, depth=64, heads=62, mlp_ratio=4, dropout=0.0,
                   attention="structured", attn_pattern="paper", conv_kernel=11,
                   conv_kind="raster", remat="full", scan_layers=True, loss_text_weight=1 / 8)
    c.optim = common.transformer_optim(peak=4.5e-4, steps=c.total_steps, warmup=5_000)
    c.optim.lr = dict(kind="warmup_halving", peak=4.5e-4, warmup=5_000, halve_at=HALVE_AT)
    c.optim.max_variance = 5.0  # App. B.2: Adam's running variance clipped by value to 5
    c.mesh = common.mesh(data=-1, fsdp=arg.fsdp, tensor=arg.tensor)
    c.sharding_rules = "fsdp_tp" if arg.tensor > 1 else "fsdp"
    c.precision = common.precision("bfloat16")
    c.plan = common.plan(image_vocab=8192, grid=32)
    c.ckpt = common.checkpointing(every=2_500)
    c.export = common.export()
    c.evaluate = common.evaluate()
    c.log = common.logging(every=100)
    c.evals = dict(val=dict(type="val_loss", num_batches=16))
    # params / dvae_params "": the newest export of WORKDIR / of the dVAE run that wrote
    # the tokens. The paper draws 512 candidates per caption at temperature 1 and reranks.
    c.sample = common.sample(("a painting of a fox sitting in a field",), batch_size=8)
    if arg.runlocal:
        c.total_steps = 4
        c.eval_every = 4
        c.data.global_batch_size = 8
        c.data.worker_count = 0
        c.text.vocab_size = 512
        c.model.update(width=64, depth=4, heads=2)
        c.optim.lr = dict(kind="warmup_halving", peak=4.5e-4, warmup=2, halve_at="3")
        c.mesh = common.mesh()
        c.sharding_rules = "dp"
        c.precision.compute_dtype = "float32"
        c.ckpt.every_steps = 4
        c.log.every_steps = 1
        c.evals.val.num_batches = 1
    return c
