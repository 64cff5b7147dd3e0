"""A real image-caption dataset (folders of image + .txt pairs, or img2dataset tar shards).

Prepare it once, then preview the input pipeline:

  python -m dalle_jax.main --job=prepare --config=configs/captions.py:name=mydata \
      --config.data.captions.sources=/data/pairs,/data/shards/*.tar --workdir=runs/mydata
  python -m dalle_jax.main --job=preview --config=configs/captions.py:name=mydata --workdir=runs/mydata

`sources` is a comma-separated list of folders (searched recursively for images with a
same-stem .txt caption) and glob patterns of webdataset .tar shards. The paper's filters
are options under data.captions (min caption length, aspect ratio in [1/2, 2], min side).
Args: name=<dataset name in data_dir>, image_size=<model resolution>, batch, augment.
"""

import common  # noqa: I001

from dalle_jax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, name="", image_size=256, batch=32, augment="dvae")
    if not arg.name:
        raise ValueError("configs/captions.py needs a dataset name: --config=configs/captions.py:name=NAME")
    configlib.check_choice("augment", arg.augment, ("dvae", "transformer", "none"))
    c = common.mlc.ConfigDict()
    c.seed = 0
    c.data = common.captions_data(arg.name, "", image_size=arg.image_size, batch_size=arg.batch,
                                  augment=arg.augment)
    c.mesh = common.mesh()
    c.sharding_rules = "dp"
    c.precision = common.precision()
    c.preview = dict(num_batches=4, grid_examples=32)
    return c
