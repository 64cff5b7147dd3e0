"""The built-in `shapes` dataset: preparation and a preview of the input pipeline.

Prepare the tiny variant and save a grid of augmented training examples:

  python -m dalle_jax.main --job=prepare --config=configs/shapes.py:size=tiny --workdir=runs/shapes
  python -m dalle_jax.main --job=preview --config=configs/shapes.py:size=tiny --workdir=runs/shapes

Args (after the colon): size=tiny|small|paper (tiny: 64px, 20k train examples;
small: 64px, 100k; paper: 256px, 100k), batch=<global batch>, augment=dvae|transformer|none.
Preparing `tiny` takes well under a minute on 2 CPU cores.
"""

import common  # noqa: I001  (configs/ is on sys.path when a config file is loaded)

from dalle_jax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, size="tiny", batch=32, augment="dvae")
    configlib.check_choice("augment", arg.augment, ("dvae", "transformer", "none"))
    c = common.mlc.ConfigDict()
    c.seed = 0
    c.data = common.shapes_data(arg.size, batch_size=arg.batch, augment=arg.augment)
    c.mesh = common.mesh()
    c.sharding_rules = "dp"
    c.precision = common.precision()
    c.preview = dict(num_batches=4, grid_examples=32)
    return c
