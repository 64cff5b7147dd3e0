"""A contrastive image/caption scorer (CLIP-style) on the built-in `shapes` dataset.

  python -m dalle_jax.main --job=prepare    --config=configs/clip_shapes.py --workdir=runs/clip
  python -m dalle_jax.main --job=train_clip --config=configs/clip_shapes.py --workdir=runs/clip

Args: size=tiny (a ViT of width 64 over 8x8 patches and a text transformer of width 64,
2 layers each), steps=<override total steps>, batch=<global batch>, bpe=<the caption BPE
model; default runs/demo/transformer/bpe.model, which --job=train_bpe of the demo writes>.

Stage 2 draws several candidate images per caption; the paper keeps the ones a
contrastive model (CLIP) scores highest. This config trains such a scorer on `shapes`, so
that reranking can be measured end to end without downloading anything. Its text tower
reads the caption BPE of the transformer, and it reads the prepared dataset of
configs/dvae_shapes.py (the same ``data`` section, so `prepare` runs once).

It must tell apart what the caption checker grades: colours, shapes, how many objects
and where they are. In-batch captions almost never differ only in arrangement, so on top
of CLIP's recipe:

* hard negatives (``contrastive.negatives`` per image, `dalle_jax.data.shapes_negatives`,
  never naming a held-out object): the same scene's caption with the relation reversed,
  the other axis, the colours or shapes swapped between the objects (these kinds first,
  ``structural_first``), one attribute changed, an object dropped or added;
* a paraphrase term (``contrastive.paraphrase_weight``): a caption must be nearer another
  wording of its own meaning than its hard negatives, which teaches the text tower the
  arrangement; the image tower follows;
* the image tower's positional embedding starts 8x larger than CLIP's
  (``model.position_init_scale``), so that positions compete with a patch's colour from
  the start;
* batch captions with the same meaning as an image's own are masked out of its
  candidates instead of counting as wrong answers (a third of the scenes are single
  objects, 15 kinds, so a batch holds several copies of each).

The images are not augmented (``data.augment = "none"``): a random flip would swap left
and right, and the scenes need no crops. The rest is CLIP's recipe (symmetric InfoNCE,
learned temperature capped at 100, AdamW with linear warm-up and cosine decay, no weight
decay on gains, biases and embeddings), sized to train in about 5 minutes on 2 CPU cores:
1,200 steps, where 600 reranked 4-6 points worse on the same candidates (two scorer
seeds, docs/experiments.md).

Evaluation (``evals.clip``; every ``eval_every`` steps and at the end, on the first
``evals.clip.num_examples`` images of ``validation`` and ``test_compositional``): the
share of images whose own caption scores above all ``evals.clip.negatives`` hard
negatives, the accuracy against each kind of negative, and top-1 retrieval of the
image's meaning among the canonical captions of every meaning of the split.

Results land in WORKDIR/metrics.jsonl (train/… and eval/…) and WORKDIR/exports/step_N
(the EMA params, the tower config, the BPE model file under tokenizer/ and the final
evaluation), which `dalle_jax.rerank.scorer.ClipScorer.load` reads. The measurements
behind these choices are in docs/experiments.md.
"""

import common  # noqa: I001


VARIANTS = {
    "tiny": dict(data="tiny", embed_dim=64, patch_size=8, vision_width=64, vision_layers=2,
                 vision_heads=4, context_length=16, text_width=64, text_layers=2,
                 text_heads=4, steps=1200, batch=64, lr=2e-3, negatives=4, position_scale=8.0),
}


def get_config(arg=None):
    arg, v, c = common.sized_run(arg, VARIANTS, evaluations=2,
                                 bpe="runs/demo/transformer/bpe.model")
    steps = c.total_steps
    c.data = common.shapes_data(v["data"], batch_size=arg.batch or v["batch"], augment="none")
    c.model = dict(embed_dim=v["embed_dim"], image_size=c.data.image_size,
                   patch_size=v["patch_size"], vision_width=v["vision_width"],
                   vision_layers=v["vision_layers"], vision_heads=v["vision_heads"],
                   context_length=v["context_length"], text_width=v["text_width"],
                   text_layers=v["text_layers"], text_heads=v["text_heads"],
                   activation="gelu", position_init_scale=v["position_scale"])
    # The caption BPE (--job=train_bpe); its vocabulary sizes the text tower.
    c.text = dict(bpe_model=arg.bpe)
    # Hard negative captions per training image (0: in-batch negatives only), the
    # arrangement kinds first, the weight of the caption-paraphrase term (0: off) and the
    # cap on the learned logit scale (CLIP's 100).
    c.contrastive = dict(negatives=v["negatives"], structural_first=True, paraphrase_weight=1.0,
                         max_logit_scale=100.0)
    c.optim = common.transformer_optim(peak=v["lr"], steps=steps, warmup=max(1, steps // 10),
                                       end_value=v["lr"] / 10)
    c.optim.update(b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, clip_global_norm=1.0,
                   ema_decay=0.99, ema_every=1)
    c.mesh = common.mesh()
    c.sharding_rules = "dp"
    c.precision = common.precision()
    c.ckpt = common.checkpointing(every=max(1, steps // 2))
    c.log = common.logging(every=50)
    # Hard-negative accuracy and caption retrieval (dalle_jax.evals.clip_retrieval), every
    # eval_every steps and at the end; --job=evaluate runs it on any scorer export.
    c.evals = dict(clip=dict(splits="validation,test_compositional", num_examples=500,
                             negatives=8, batch_size=250, seed=0))
    c.evaluate = common.evaluate()
    return c
