"""Stage 1 at the paper's size: 256x256 images -> 32x32 tokens from 8192 codes (App. A.2).

  python -m dalle_jax.main --job=train_dvae --config=configs/dvae_paper.py:name=cc3m \
      --workdir=gs://.../dvae --config.data.captions.sources=/data/cc3m/*.tar

Encoder 53,786,240 and decoder 43,829,766 parameters; AdamW(0.9, 0.999, 1e-8, wd 1e-4);
β 0 -> 6.6 over 5k updates; τ 1 -> 1/16 over 150k; lr 1e-4 -> 1.25e-6 over 1.2M; EMA
0.999; batch 512; 3M updates; bf16 compute on accelerators, data parallel.
Args: name=<prepared captions dataset> (default: the shapes dataset at 256px),
runlocal (a few steps at batch 8 to smoke-test the set-up on CPU).
"""

import common  # noqa: I001

from dalle_jax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, name="", runlocal=False, batch=512)
    c = common.mlc.ConfigDict()
    c.seed = 0
    c.total_steps = 3_000_000
    c.eval_every = 10_000
    if arg.name:
        c.data = common.captions_data(arg.name, "", image_size=256, batch_size=arg.batch,
                                      augment="dvae")
    else:
        c.data = common.shapes_data("paper", batch_size=arg.batch, augment="dvae")
    c.model = dict(image_size=256, input_channels=3, group_count=4, n_hid=256, n_blk_per_group=2,
                   n_init=128, vocab_size=8192)
    c.schedules = common.dvae_paper_schedules()
    c.loss = common.dvae_loss()
    c.optim = common.dvae_optim()
    c.mesh = common.mesh()
    c.sharding_rules = "dp"
    c.precision = common.precision("bfloat16")
    c.plan = common.plan()
    c.ckpt = common.checkpointing(every=5000)
    c.export = common.export()
    c.evaluate = common.evaluate()
    c.log = common.logging(every=100)
    # Pre-encoding for stage 2 (--job=encode): dVAE export (default: this workdir's newest),
    # output directory (default: WORKDIR/tokens), splits, examples per shard.
    c.encode = dict(params="", out_dir="", splits="train,validation", shard_size=10_000, batch_size=64)
    # --job=import_openai_dvae: local paths of OpenAI's released encoder.pkl / decoder.pkl.
    c.openai = dict(encoder_pkl="", decoder_pkl="")
    c.evals = dict(recon=dict(type="recon", num_batches=16, grid_examples=16))
    if arg.runlocal:
        c.total_steps = 2
        c.eval_every = 2
        c.data.global_batch_size = 8
        c.precision.compute_dtype = "float32"
        c.log.every_steps = 1
        c.evals.recon.num_batches = 1
    return c
