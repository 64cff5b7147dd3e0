"""Golden sharding tables of the paper-size models: every parameter's shape, logical axes,
mesh axes and bytes per device on a named mesh, for each preset, computed from
`eval_shape` (nothing is allocated; the meshes' devices need not exist).

A change that moves a parameter to another mesh axis, or changes its shape, changes a table
and fails here until the table is regenerated and the diff reviewed:

    make golden      # = pytest tests/sharding_golden_test.py --update-golden
"""

import os

import pytest

from dalle_jax import sharding
from dalle_jax.models import transformer as tr
from dalle_jax.tokenizers import dvae

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")

# (model, preset, mesh degrees): one named mesh per preset and model.
CASES = [
    ("transformer_12b", "dp", dict(data=8, fsdp=1, tensor=1)),
    ("transformer_12b", "fsdp", dict(data=16, fsdp=64, tensor=1)),
    ("transformer_12b", "fsdp_tp", dict(data=8, fsdp=32, tensor=4)),
    ("dvae_paper", "dp", dict(data=8, fsdp=1, tensor=1)),
    ("dvae_paper", "fsdp", dict(data=8, fsdp=8, tensor=1)),
    ("dvae_paper", "fsdp_tp", dict(data=4, fsdp=4, tensor=4)),
]


def _abstract(model):
    if model == "transformer_12b":
        return tr.abstract_variables(tr.TransformerConfig.paper_12b(scan_layers=True))["params"]
    import jax
    import jax.numpy as jnp

    config = dvae.DVAEConfig()
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    return jax.eval_shape(lambda k, x: dvae.DVAE(config).init(k, x), jax.random.key(0),
                          x)["params"]


def _table(model, preset, mesh):
    rows = sharding.leaf_shardings(_abstract(model), mesh, sharding.get_rules(preset))
    assert not [r for r in rows if r.problems], "a golden mesh must shard every parameter"
    return sharding.format_table(rows, mesh, f"{model} parameters, sharding_rules={preset}")


def _name(model, preset, mesh):
    return f"{model}_{preset}_" + "_".join(f"{a}{d}" for a, d in mesh.items()) + ".txt"


@pytest.mark.parametrize("model,preset,mesh", CASES,
                         ids=[f"{m}-{p}" for m, p, _ in CASES])
def test_sharding_table_matches_golden(model, preset, mesh, update_golden):
    path = os.path.join(GOLDEN, _name(model, preset, mesh))
    table = _table(model, preset, mesh)
    if update_golden:
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(table)
    assert os.path.exists(path), f"no golden table {path}: run `make golden`"
    with open(path) as f:
        golden = f.read()
    assert table == golden, f"{path} is out of date; review the change, then `make golden`"


def test_every_golden_file_is_a_case():
    names = {_name(*c) for c in CASES}
    assert set(os.listdir(GOLDEN)) == names


@pytest.mark.parametrize("fsdp,tensor", [(8, 1), (16, 1), (64, 1), (128, 1), (8, 2), (8, 4),
                                         (32, 4), (16, 8), (4, 16)])
def test_documented_paper_meshes_shard_the_transformer(fsdp, tensor):
    preset = "fsdp_tp" if tensor > 1 else "fsdp"
    mesh = dict(data=2, fsdp=fsdp, tensor=tensor)
    sharding.check_shardable(_abstract("transformer_12b"), mesh, sharding.get_rules(preset))


def test_a_mesh_that_cannot_shard_fails_naming_parameter_dim_and_axis():
    # 3,968 = 2^7 * 31: an fsdp degree of 256 cannot split the model width.
    with pytest.raises(ValueError) as err:
        sharding.check_shardable(_abstract("transformer_12b"), dict(data=1, fsdp=256, tensor=1),
                                 sharding.get_rules("fsdp"))
    msg = str(err.value)
    assert "layers/qkv_kernel" in msg and "text_embed" in msg
    assert "dim 1 ('embed', size 3968) is not divisible by mesh fsdp=256" in msg


def test_unmatched_logical_name_fails_loudly():
    import flax.linen as nn
    import jax

    class Odd(nn.Module):
        @nn.compact
        def __call__(self):
            init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "bogus"))
            return self.param("w", init, (4, 4))

    abstract = jax.eval_shape(Odd().init, jax.random.key(0))["params"]
    with pytest.raises(KeyError, match="'bogus' has no sharding rule"):
        sharding.leaf_shardings(abstract, dict(data=1, fsdp=2, tensor=1),
                                sharding.get_rules("fsdp"))
