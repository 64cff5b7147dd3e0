"""Mesh construction and logical-axis rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from dalle_jax import sharding


def test_mesh_shape_resolves_minus_one():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


@pytest.mark.parametrize("degrees,err", [
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3, "fsdp": -1}, "does not divide"),
    ({"data": 2, "fsdp": 2}, "needs 4 devices"),
    ({"model": 2}, "unknown axes"),
    ({"data": 0}, "positive"),
])
def test_mesh_shape_errors(degrees, err):
    with pytest.raises(ValueError, match=err):
        sharding.mesh_shape(degrees, 8)


def test_make_mesh_uses_auto_axes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_every_preset_covers_the_vocabulary():
    for name, rules in sharding.RULES.items():
        assert [k for k, _ in rules] == list(sharding.LOGICAL_AXES), name


def test_unknown_logical_name_raises():
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec(("embed", "bogus"), sharding.RULES["dp"])


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown sharding_rules preset"):
        sharding.get_rules("zero3")


def test_mesh_axis_used_once_per_array():
    # heads and mlp both map to "tensor"; an array may use a mesh axis only once.
    rules = sharding.RULES["fsdp_tp"]
    assert sharding.logical_to_spec(("heads", "mlp"), rules) == P("tensor", None)
    assert sharding.logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), None)


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        h = nn.Dense(16, kernel_init=init, use_bias=False)(x)
        init2 = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
        return nn.Dense(8, kernel_init=init2, use_bias=False)(h)


@pytest.mark.parametrize("preset,expected", [
    ("dp", P(None, None)),
    ("fsdp", P("fsdp", None)),
    ("fsdp_tp", P("fsdp", "tensor")),
])
def test_tree_shardings_and_sharded_init(preset, expected):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.get_rules(preset)
    model = _Mlp()
    x = jnp.ones((4, 8))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    shard = sharding.tree_shardings(abstract, mesh, rules)
    assert shard["params"]["Dense_0"]["kernel"].spec == expected
    params = jax.jit(model.init, out_shardings=shard)(jax.random.key(0), x)
    assert params["params"]["Dense_0"]["kernel"].value.sharding.spec == expected


def test_batch_spec():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    assert sharding.batch_spec(mesh, sharding.RULES["dp"], 4) == P(("data", "fsdp"), None, None, None)
    # Batch axes missing from the mesh are skipped.
    data_only = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert sharding.batch_spec(data_only, sharding.RULES["dp"]) == P(("data",))
