"""OpenAI's released CLIP (ViT-B/32) as a reranking scorer: converts local weight files.

  python -m dalle_jax.main --job=import_clip \
      --config=configs/clip_openai.py:checkpoint=ViT-B-32.pt,vocab=bpe_simple_vocab_16e6.txt.gz \
      --workdir=runs/clip_openai

Args: checkpoint=<OpenAI's ViT-B-32.pt (a TorchScript archive), a state dict with the same
key names, or a Hugging Face CLIP checkpoint>, vocab=<OpenAI's bpe_simple_vocab_16e6.txt.gz,
the CLIP tokenizer's merges>. Nothing is downloaded: both files must be on local disk
(reading the checkpoint needs torch, CPU build is enough). The export lands in
WORKDIR/exports/openai_clip and is what ``--config.sample.rerank`` takes.
"""

import common  # noqa: I001

from dalle_jax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, checkpoint="", vocab="")
    c = common.mlc.ConfigDict()
    c.seed = 0
    c.openai_clip = dict(checkpoint=arg.checkpoint, vocab=arg.vocab)
    c.mesh = common.mesh()
    c.sharding_rules = "dp"
    return c
