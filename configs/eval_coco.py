"""Zero-shot MS-COCO evaluation of a stage-2 model (paper §3.1): FID and IS against blur
radius and reranking size, the CLIP score, and an optional training-set overlap check.

  python -m dalle_jax.main --job=eval_coco --workdir=runs/eval_coco \\
    --config=configs/eval_coco.py:coco=/data/coco,transformer=runs/transformer/exports/step_N,\\
dvae=runs/dvae/exports/step_M,bpe=runs/transformer/bpe.model,scorer=runs/clip,n=512 \\
    --config.metrics.inception_weights=/weights/pt_inception-2015-12-05-6726825d.pth

Args: coco=<dir holding annotations/captions_val2014.json and val2014/>,
transformer=<a transformer export, or its run dir: the newest export>, dvae=<the dVAE
export (or run dir) the transformer's tokens came from>, bpe=<its BPE model file, or the
run dir holding bpe.model>, scorer=<a scorer export or run dir (--job=train_clip /
--job=import_clip); "" = none, only with n=1>, n=<candidates per caption>,
captions=<number of captions, default the paper's 30,000>, batch=<sequences per sampling
call>, weights=<the FID Inception weights file>.

Fields (each can be overridden, e.g. ``--config.sample.temperature=0.85``;
`dalle_jax.evals.coco` describes what the job does with them):

* ``coco``: ``root``, ``annotations`` and ``images`` (relative to root), ``num_captions``,
  ``seed`` of the caption draw (one caption per distinct image), ``workers`` (threads
  decoding images; 0 = one per CPU, at most 32).
* ``sample``: the exports (``transformer``, ``dvae``, ``bpe``, ``scorer``),
  ``num_candidates`` N, ``rerank_sizes`` (comma-separated; "" = 1, 2, 4, ... below N; N is
  always reported), ``seed`` (sample i*N+j of caption i, candidate j), ``temperature``
  (the paper samples at 1), ``top_k`` (0 = off), ``top_p`` (1 = off), ``guidance`` (1 =
  none; the paper has no guidance), ``batch_size`` (sequences per sampling call, also
  images per scorer call), ``chunk`` (candidates per caption drawn at a time),
  ``shard_captions`` (captions per output shard: the unit of resumption).
* ``metrics``: ``inception_weights`` ("" = ``$DALLE_JAX_INCEPTION_WEIGHTS``),
  ``inception_resize`` (the network's input resize, ``tf1x`` as torch-fidelity),
  ``real_resize`` (PIL filter resizing the real images' shorter side to the model's size,
  then centre crop: ``lanczos``, as the DALL·E reference preprocessing), ``blur_radii``
  (comma-separated, paper Fig. 9: 0, 1, 2, 4, 8), ``batch_size`` (images per Inception
  step, over the mesh), ``is_splits`` (10, fewer when there are fewer images),
  ``real_stats_dir`` ("" = WORKDIR/eval_coco/real_stats; point several evaluations at one
  directory to share the real statistics).
* ``overlap``: ``train_images`` ("" = no check; a folder, a .txt list or comma-separated
  paths), ``threshold`` (cosine similarity of Inception pool features from which a
  validation image counts as a near-duplicate of a training image; 0.95 is a heuristic
  of this implementation, not the paper's), ``chunk`` (training images per step).
* ``mesh``, ``sharding_rules``, ``precision``: where the transformer and the Inception
  network run (as in the sample job) and the compute dtype of sampling.
"""

import common  # noqa: I001

from dalle_jax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, coco="data/coco", transformer="", dvae="", bpe="",
                              scorer="", n=1, captions=30_000, batch=64, weights="")
    c = common.mlc.ConfigDict()
    c.coco = dict(root=arg.coco, annotations="annotations/captions_val2014.json",
                  images="val2014", num_captions=arg.captions, seed=0, workers=0)
    c.sample = dict(transformer=arg.transformer, dvae=arg.dvae, bpe=arg.bpe,
                    scorer=arg.scorer, num_candidates=arg.n, rerank_sizes="", seed=0,
                    temperature=1.0, top_k=0, top_p=1.0, guidance=1.0, batch_size=arg.batch,
                    chunk=32, shard_captions=64)
    c.metrics = dict(inception_weights=arg.weights, inception_resize="tf1x",
                     real_resize="lanczos", blur_radii="0,1,2,4,8", batch_size=64,
                     is_splits=10, real_stats_dir="")
    c.overlap = dict(train_images="", threshold=0.95, chunk=1024)
    c.mesh = common.mesh()
    c.sharding_rules = "dp"
    c.precision = common.precision()
    return c
