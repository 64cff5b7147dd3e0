"""Stage 2 on the built-in `shapes` dataset: a small transformer over pre-encoded tokens.

  python -m dalle_jax.main --job=train_bpe --config=configs/transformer_shapes.py --workdir=runs/transformer
  python -m dalle_jax.main --job=train_transformer     --config=configs/transformer_shapes.py --workdir=runs/transformer
  python -m dalle_jax.main --job=sample    --config=configs/transformer_shapes.py --workdir=runs/transformer

Args: size=tiny (width 128, depth 4, heads 4), steps=<override total steps>,
batch=<global batch>, tokens=<token directory written by --job=encode; default
runs/demo/dvae/tokens>.

The paper's recipe (§2.2, App. B.2) scaled down: caption BPE, text loss weight 1/8 and
image loss weight 7/8, the paper's attention-mask pattern, AdamW(0.9, 0.96) with weight
decay 4.5e-2 on the weight matrices (`dalle_jax.train.optim.decays`), gradient clipping at
global norm 4 and an EMA of the parameters. Because this run is a few thousand updates on
synthetic captions:

* a BPE vocabulary of 512 instead of 16,384 (the captions use a few dozen words) and 16
  text slots instead of 256;
* no BPE-dropout (`text.dropout`, the paper: 0.1) and no resblock dropout: on a run this
  short the split words are noise rather than regularisation, and the 20k training pairs
  are seen about 5 times;
* a peak learning rate of 2e-3 with cosine decay instead of 4.5e-4 halved on plateaus;
* an EMA decay of 0.995 every step instead of 0.99 every 25 steps (the paper's EMA
  averages over ~2,500 updates, most of this run);
* initial weights N(0, 1/sqrt(d_in)) instead of the Sparse Transformer's
  N(0, 0.125/sqrt(d_in)) (`model.init_scale`): with the small init, how soon the image
  starts to follow the caption varied by hundreds of steps between seeds.

The run is 3,200 steps at batch 32 (about 13-14 minutes on 2 CPU cores). The image loss
is still falling steeply at 2,000 steps, and the samples follow their captions far more
often after 3,200: seed 0's single samples matched 41% / 21% of their captions at 2,000
steps (in-distribution / held-out objects) and 81% / 40% at 3,200 (docs/experiments.md).

Not in the paper: a tenth of the captions are dropped in training
(`text.caption_dropout`), so that sampling can use classifier-free guidance; the caption
match reranks guided candidates (`eval_rerank_guidance`).

Sampling uses temperature 0.7 (`sample.temperature`; no top-k / top-p): a model this
small spreads probability over codes it has not learned to place, and sharpening the
distribution removes most of those stray cells. The recipe's alternatives and the
caption-match figures behind these choices are in docs/experiments.md.

Results land in WORKDIR/metrics.jsonl and WORKDIR/exports/step_N; `sample` writes
WORKDIR/samples/ (a grid for DEMO_CAPTIONS and the caption-match rates for validation
captions (in-distribution objects) and test_compositional captions (held-out objects):
single samples, best of `eval_rerank` guided candidates reranked by `sample.rerank`,
single samples guided at `eval_guidance`).
"""

import common  # noqa: I001


# The demo grid's captions: in-distribution singles and pairs, then captions naming the
# held-out objects (yellow triangle, cyan circle, magenta square), never seen in training.
DEMO_CAPTIONS = (
    "a red circle",
    "a green triangle",
    "a blue square",
    "a red square to the left of a blue circle",
    "a green circle above a magenta triangle",
    "a yellow square below a cyan triangle",
    "a yellow triangle",
    "a cyan circle",
    "a magenta square",
    "a cyan circle to the left of a red square",
)

# size -> (model shape, steps, global batch, peak learning rate)
VARIANTS = {
    "tiny": dict(width=128, depth=4, heads=4, steps=3200, batch=32, lr=2e-3),
}


def get_config(arg=None):
    arg, v, c = common.sized_run(arg, VARIANTS, evaluations=5, tokens="runs/demo/dvae/tokens")
    steps = c.total_steps
    c.data = dict(tokens_dir=arg.tokens, train_split="train", eval_split="validation",
                  global_batch_size=arg.batch or v["batch"], seed=0, worker_count=0)
    # bpe_model "": WORKDIR/bpe.model, written by --job=train_bpe.
    # caption_dropout: a tenth of the captions are dropped (the empty caption's slots), so
    # the model also learns the unconditional image distribution that classifier-free
    # guidance (sample.guidance) contrasts with the captioned one.
    c.text = dict(vocab_size=512, text_len=16, dropout=0.0, bpe_model="", caption_dropout=0.1)
    c.model = dict(width=v["width"], depth=v["depth"], heads=v["heads"], mlp_ratio=4, dropout=0.0,
                   init_scale=1.0, attention="structured",
                   attn_pattern="paper", conv_kernel=11, conv_kind="raster", remat="none",
                   scan_layers=False, loss_text_weight=1 / 8)
    c.optim = common.transformer_optim(peak=v["lr"], steps=steps, warmup=max(1, steps // 20),
                                       end_value=v["lr"] / 50)
    c.optim.update(ema_decay=0.995, ema_every=1)
    c.mesh = common.mesh()
    c.sharding_rules = "dp"
    c.precision = common.precision()
    c.plan = common.plan(image_vocab=256, grid=8)
    c.ckpt = common.checkpointing(every=max(1, steps // 4))
    c.export = common.export()
    c.log = common.logging(every=50)
    # Run by the loop every eval_every steps: the validation loss. The caption match
    # (sampling; best of 1, best of `rerank` reranked by `scorer`, guided at `guidance`)
    # and the FID of samples against real images (Inception with `inception_weights` or
    # $DALLE_JAX_INCEPTION_WEIGHTS, else the scorer's features) have every=0: they run in
    # --job=evaluate and launch/benchmark_shapes.sh (set every > 0 to run them in training).
    c.evals = dict(
        val=dict(type="val_loss", num_batches=8),
        caption_match=dict(type="caption_match", every=0, captions=200,
                           splits="validation,test_compositional", seed=0, batch_size=64,
                           temperature=0.7, rerank=16, rerank_chunk=64, scorer="",
                           guidance=2.0, rerank_guidance=2.0, grid_examples=32),
        fid=dict(type="shapes_fid", every=0, split="validation", num_images=500, seed=0,
                 batch_size=64, temperature=0.7, features="auto", inception_weights="",
                 scorer=""),
    )
    c.evaluate = common.evaluate()
    # eval_rerank: with a scorer (sample.rerank), the caption match of the best of 16
    # candidates, drawn with guidance eval_rerank_guidance (guided candidates match their
    # caption more often, and the scorer then picks among better ones); eval_guidance: of
    # single samples with classifier-free guidance.
    # The demo grid's candidates are guided too (guidance), as the reranked ones are.
    c.sample = common.sample(DEMO_CAPTIONS, temperature=0.7, guidance=2.0, eval_captions=200,
                             eval_splits="validation,test_compositional", eval_rerank=16,
                             eval_guidance=2.0, eval_rerank_guidance=2.0)
    return c
