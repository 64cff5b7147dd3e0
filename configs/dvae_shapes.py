"""Stage 1 on the built-in `shapes` dataset: a small Gumbel-softmax dVAE, 64x64 -> 8x8 tokens.

  python -m dalle_jax.main --job=prepare    --config=configs/dvae_shapes.py --workdir=runs/dvae
  python -m dalle_jax.main --job=train_dvae --config=configs/dvae_shapes.py --workdir=runs/dvae

Args: size=tiny|small (tiny: the README demo, a few CPU minutes; small: longer, better
reconstructions), steps=<override total steps>, batch=<global batch>.
The paper's recipe (App. A.2) with its step counts scaled down: cosine KL-weight warm-up
to 6.6, temperature 1 -> 1/16, cosine learning-rate decay, AdamW, EMA of the parameters.
Results land in WORKDIR/metrics.jsonl, WORKDIR/eval/recon_latest.png and
WORKDIR/exports/step_N (params for encoding and sampling).
"""

import common  # noqa: I001

from dalle_jax import configlib

# size -> (dataset size, model widths, steps, global batch)
VARIANTS = {
    "tiny": dict(data="tiny", n_hid=32, n_blk_per_group=1, n_init=64, vocab_size=512, steps=1500,
                 batch=32),
    "small": dict(data="small", n_hid=64, n_blk_per_group=2, n_init=128, vocab_size=1024,
                  steps=20000, batch=64),
}


def get_config(arg=None):
    arg = configlib.parse_arg(arg, size="tiny", steps=0, batch=0)
    configlib.check_choice("size", arg.size, VARIANTS)
    v = VARIANTS[arg.size]
    steps = arg.steps or v["steps"]
    c = common.mlc.ConfigDict()
    c.seed = 0
    c.total_steps = steps
    c.eval_every = max(1, steps // 3)
    c.data = common.shapes_data(v["data"], batch_size=arg.batch or v["batch"], augment="dvae")
    c.model = dict(image_size=64, input_channels=3, group_count=4, n_hid=v["n_hid"],
                   n_blk_per_group=v["n_blk_per_group"], n_init=v["n_init"],
                   vocab_size=v["vocab_size"])
    # The paper's schedules compressed to this run: β warm-up over the first 5%, τ
    # annealed over the first half, lr decayed by 80x over the whole run.
    c.schedules = common.dvae_paper_schedules()
    c.schedules.beta.steps = max(1, steps // 20)
    c.schedules.tau.steps = max(1, steps // 2)
    c.optim = common.dvae_optim()
    c.optim.lr.update(start_value=1e-3, end_value=1.25e-5, steps=steps)
    c.optim.ema_decay = 0.99
    c.mesh = common.mesh()
    c.sharding_rules = "dp"
    c.precision = common.precision()
    c.ckpt = common.checkpointing(every=max(1, steps // 4))
    c.log = common.logging(every=50)
    # Pre-encoding for stage 2 (--job=encode): dVAE export (default: this workdir's newest),
    # output directory (default: WORKDIR/tokens), splits, examples per shard.
    c.encode = dict(params="", out_dir="", splits="train,validation,test_compositional", shard_size=5000, batch_size=64)
    c.evals = dict(recon=dict(num_batches=8, grid_examples=16))
    return c
