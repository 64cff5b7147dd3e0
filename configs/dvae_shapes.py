"""Stage 1 on the built-in `shapes` dataset: a small Gumbel-softmax dVAE, 64x64 -> 8x8 tokens.

  python -m dalle_jax.main --job=prepare    --config=configs/dvae_shapes.py --workdir=runs/dvae
  python -m dalle_jax.main --job=train_dvae --config=configs/dvae_shapes.py --workdir=runs/dvae
  python -m dalle_jax.main --job=encode     --config=configs/dvae_shapes.py --workdir=runs/dvae

Args: size=tiny|small (tiny: the README demo, about 6 minutes on 2 CPU cores; small:
wider, about 20-30 CPU minutes), steps=<override total steps>, batch=<global batch>.

The paper's recipe (App. A.2) with its step counts scaled down: soft Gumbel-softmax
relaxation, KL to the uniform prior, a cosine KL-weight warm-up over the first 5% of the
run, temperature 1 -> 1/16, cosine learning-rate decay, AdamW and an EMA of the
parameters. Because the run is a few thousand updates on synthetic images instead of 3M:

* loss.recon = "mse" (Gaussian, std 0.1 on the mapped scale) instead of the logit-Laplace
  likelihood: the background is exactly black, so the logit-Laplace NLL keeps improving by
  shrinking b there while the objects (15% of the pixels) are fitted as outliers at the
  background colour, and reconstructions never leave black;
* KL weight beta -> 1 instead of 6.6: in units of the "mse" term 6.6 pulls the codes
  towards uniform before they carry any information;
* model.post_gain = 1 instead of 1/n_layers^2: the paper's constant keeps the residual
  branches near zero for far longer than this run lasts;
* learning rate 2e-3 after a linear warm-up over the first 10% (the paper: 1e-4, no
  warm-up): without the warm-up the first Adam steps at this rate often kill the
  decoder's last ReLU layer and reconstructions stay black;
* the temperature is annealed over the whole run rather than the first half, 256 codes
  rather than 512, global-norm gradient clipping at 1 (the paper clips nothing) and batch
  16: with the alternatives the codebook froze early, was used more sparsely, or some
  seeds collapsed onto a few codes (docs/experiments.md has the runs).

Results land in WORKDIR/metrics.jsonl, WORKDIR/eval/recon_latest.png and
WORKDIR/exports/step_N (params for encoding and sampling); --job=encode writes the token
directory stage 2 trains on (WORKDIR/tokens).
"""

import common  # noqa: I001


# size -> (dataset size, model widths, steps, global batch, peak learning rate)
VARIANTS = {
    "tiny": dict(data="tiny", n_hid=16, n_blk_per_group=1, n_init=64, vocab_size=256, steps=1500,
                 batch=16, lr=2e-3),
    "small": dict(data="small", n_hid=32, n_blk_per_group=1, n_init=128, vocab_size=512,
                  steps=3000, batch=16, lr=2e-3),
}


def get_config(arg=None):
    arg, v, c = common.sized_run(arg, VARIANTS, evaluations=3)
    steps = c.total_steps
    c.data = common.shapes_data(v["data"], batch_size=arg.batch or v["batch"], augment="dvae")
    c.model = dict(image_size=64, input_channels=3, group_count=4, n_hid=v["n_hid"],
                   n_blk_per_group=v["n_blk_per_group"], n_init=v["n_init"],
                   vocab_size=v["vocab_size"], post_gain=1.0)
    c.loss = common.dvae_loss("mse", mse_sigma=0.1)
    # The paper's schedules compressed to this run: β warm-up over the first 5%, τ
    # annealed over the whole run, lr warmed up over 10% then decayed by 80x.
    c.schedules = common.dvae_paper_schedules()
    c.schedules.beta.update(end_value=1.0, steps=max(1, steps // 20))
    c.schedules.tau.steps = steps
    c.optim = common.dvae_optim()
    # Global-norm clipping at 1: without it some seeds collapse onto one or two codes
    # within the first 100 updates (docs/experiments.md).
    c.optim.clip_global_norm = 1.0
    c.optim.lr = dict(kind="warmup_cosine", peak=v["lr"], end_value=v["lr"] / 80,
                      warmup=max(1, steps // 10), steps=steps)
    c.optim.ema_decay = 0.99
    c.mesh = common.mesh()
    c.sharding_rules = "dp"
    c.precision = common.precision()
    c.plan = common.plan()
    c.ckpt = common.checkpointing(every=max(1, steps // 4))
    c.export = common.export()
    c.evaluate = common.evaluate()
    c.log = common.logging(every=50)
    # Pre-encoding for stage 2 (--job=encode): dVAE export (default: this workdir's newest),
    # output directory (default: WORKDIR/tokens), splits, examples per shard.
    c.encode = dict(params="", out_dir="", splits="train,validation,test_compositional", shard_size=5000, batch_size=64)
    c.evals = dict(recon=dict(type="recon", num_batches=8, grid_examples=16))
    return c
