"""Tests for dalle_jax.data.pipeline: sharding, shuffling, seeding, state and global arrays."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dalle_jax import sharding as sharding_lib
from dalle_jax.data import augment
from dalle_jax.data import pipeline as pl

IMAGE_SIZE = 16


def _source(num_records: int = 20) -> list[dict]:
    """In-memory records of varying, non-square sizes that know their own index."""
    rng = np.random.default_rng(1234)
    return [
        {
            "image": rng.integers(0, 256, size=(20 + i % 7, 17 + i % 5, 3), dtype=np.uint8),
            "caption": f"record number {i}".encode(),
            "index": np.int64(i),
            "score": np.float32(i / 2),
        }
        for i in range(num_records)
    ]


def _cfg(**overrides) -> pl.PipelineConfig:
    settings = dict(global_batch_size=4, image_size=IMAGE_SIZE, seed=7, read_threads=0)
    settings.update(overrides)
    return pl.PipelineConfig(**settings)


def _take(pipeline, count: int) -> list[dict]:
    return [next(pipeline) for _ in range(count)]


def _images_by_index(batches) -> dict[int, np.ndarray]:
    return {
        int(i): image
        for batch in batches
        for i, image in zip(batch["index"], batch["image"])
    }


def _assert_batches_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert batch_a.keys() == batch_b.keys()
        for key in batch_a:
            np.testing.assert_array_equal(batch_a[key], batch_b[key])


def test_batch_format():
    pipeline = pl.make_pipeline(_source(), _cfg(), shard_options=grain.sharding.NoSharding())
    batch = next(pipeline)
    assert set(batch) == {"image", "caption", "index", "score"}
    assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["image"].dtype == np.uint8
    assert batch["caption"].shape == (4,) and batch["caption"].dtype == object
    assert all(type(c) is str for c in batch["caption"])
    assert [c for c in batch["caption"]] == [f"record number {i}" for i in batch["index"]]
    assert batch["index"].dtype == np.int64 and batch["score"].dtype == np.float32
    assert pipeline.local_batch_size == 4 and pipeline.num_batches is None


def test_default_sharding_is_by_jax_process():
    pipeline = pl.make_pipeline(_source(), _cfg())
    assert pipeline.shard_options.shard_count == jax.process_count() == 1
    assert pipeline.shard_options.drop_remainder


@pytest.mark.parametrize("num_records", [20, 21])
def test_two_processes_split_the_one_process_batches(num_records):
    # Process p of P reads rows [p * L, (p + 1) * L) of every global batch, so the global
    # batches do not depend on the number of processes.
    cfg = _cfg(num_epochs=1)
    whole = list(pl.make_pipeline(_source(num_records), cfg,
                                  shard_options=grain.sharding.NoSharding()))
    assert len(whole) == 5 and all(b["image"].shape[0] == 4 for b in whole)
    halves = []
    for shard_index in range(2):
        shard = grain.sharding.ShardOptions(shard_index, 2, drop_remainder=True)
        pipeline = pl.make_pipeline(_source(num_records), cfg, shard_options=shard)
        batches = list(pipeline)
        assert len(batches) == pipeline.num_batches == 5
        assert all(b["image"].shape[0] == 2 for b in batches)
        halves.append(batches)
    for b, (first, second) in enumerate(zip(*halves)):
        for key in ("image", "index", "caption"):
            np.testing.assert_array_equal(
                np.concatenate([first[key], second[key]]), whole[b][key])
    # With 21 records one epoch of 5 global batches leaves one record unread.
    seen = {int(i) for b in whole for i in b["index"]}
    assert len(seen) == 20 and seen <= set(range(num_records))


def test_several_processes_drop_a_final_partial_global_batch():
    cfg = _cfg(shuffle=False, num_epochs=1, drop_remainder=False, global_batch_size=8)
    sizes = [len(b["index"]) for b in pl.make_pipeline(
        _source(), cfg, shard_options=grain.sharding.NoSharding())]
    assert sizes == [8, 8, 4]
    for shard_index in range(2):
        shard = grain.sharding.ShardOptions(shard_index, 2)
        batches = list(pl.make_pipeline(_source(), cfg, shard_options=shard))
        assert [len(b["index"]) for b in batches] == [4, 4]
        assert [int(i) for b in batches for i in b["index"]] == (
            list(range(4 * shard_index, 4 * shard_index + 4))
            + list(range(8 + 4 * shard_index, 12 + 4 * shard_index)))


def test_each_epoch_is_a_new_permutation():
    pipeline = pl.make_pipeline(_source(), _cfg(), shard_options=grain.sharding.NoSharding())
    epochs = [[int(i) for b in _take(pipeline, 5) for i in b["index"]] for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(20))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_unshuffled_order_and_finite_epochs_keep_remainder():
    cfg = _cfg(shuffle=False, num_epochs=2, drop_remainder=False, global_batch_size=8)
    batches = list(pl.make_pipeline(_source(), cfg, shard_options=grain.sharding.NoSharding()))
    order = [int(i) for b in batches for i in b["index"]]
    assert order == list(range(20)) * 2
    assert [b["image"].shape[0] for b in batches] == [8, 8, 8, 8, 8]
    cfg = _cfg(shuffle=False, num_epochs=1, drop_remainder=False, global_batch_size=8)
    pipeline = pl.make_pipeline(_source(), cfg, shard_options=grain.sharding.NoSharding())
    sizes = [b["image"].shape[0] for b in pipeline]
    assert sizes == [8, 8, 4]


def test_same_seed_same_batches_other_seed_differs():
    no_shard = grain.sharding.NoSharding()
    a = _take(pl.make_pipeline(_source(), _cfg(seed=3), shard_options=no_shard), 6)
    b = _take(pl.make_pipeline(_source(), _cfg(seed=3), shard_options=no_shard), 6)
    _assert_batches_equal(a, b)
    # Reader threads build batches ahead of time but do not reorder them.
    with pl.make_pipeline(
        _source(), _cfg(seed=3, read_threads=2, prefetch_batches=3), shard_options=no_shard
    ) as threaded:
        _assert_batches_equal(_take(threaded, 6), a)
    c = _take(pl.make_pipeline(_source(), _cfg(seed=4), shard_options=no_shard), 6)
    assert [list(x["index"]) for x in a] != [list(x["index"]) for x in c]
    # Even in the same order, another seed augments differently.
    d = _take(pl.make_pipeline(_source(), _cfg(seed=3, shuffle=False), shard_options=no_shard), 5)
    e = _take(pl.make_pipeline(_source(), _cfg(seed=4, shuffle=False), shard_options=no_shard), 5)
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(d, e))


def test_augmentation_depends_only_on_seed_epoch_and_record():
    reference = _images_by_index(
        _take(pl.make_pipeline(_source(), _cfg(), shard_options=grain.sharding.NoSharding()), 5)
    )
    assert len(reference) == 20
    bigger = pl.make_pipeline(
        _source(), _cfg(global_batch_size=10), shard_options=grain.sharding.NoSharding()
    )
    unshuffled = pl.make_pipeline(
        _source(), _cfg(shuffle=False), shard_options=grain.sharding.NoSharding()
    )
    sharded = {}
    for shard_index in range(2):
        shard = grain.sharding.ShardOptions(shard_index, 2, drop_remainder=True)
        pipeline = pl.make_pipeline(_source(), _cfg(), shard_options=shard)
        sharded.update(_images_by_index(_take(pipeline, 5)))
    others = [_images_by_index(_take(bigger, 2)), _images_by_index(_take(unshuffled, 5)), sharded]
    for other in others:
        assert other.keys() == reference.keys()
        for index, image in reference.items():
            np.testing.assert_array_equal(other[index], image)
    # The next epoch augments the same record differently.
    pipeline = pl.make_pipeline(_source(), _cfg(), shard_options=grain.sharding.NoSharding())
    _take(pipeline, 5)
    second_epoch = _images_by_index(_take(pipeline, 5))
    assert any(not np.array_equal(second_epoch[i], reference[i]) for i in reference)


def test_state_round_trip_resumes_exactly():
    no_shard = grain.sharding.NoSharding()
    pipeline = pl.make_pipeline(_source(), _cfg(), shard_options=no_shard)
    _take(pipeline, 3)
    state = pipeline.get_state()
    # Crosses the epoch boundary at batch 5.
    expected = _take(pipeline, 4)
    saved = json.dumps(state)

    restored = pl.make_pipeline(_source(), _cfg(), shard_options=no_shard)
    restored.set_state(json.loads(saved))
    _assert_batches_equal(_take(restored, 4), expected)

    # A pipeline that already ran elsewhere can be rewound, and str states work too.
    rewound = pl.make_pipeline(_source(), _cfg(), shard_options=no_shard)
    _take(rewound, 7)
    rewound.set_state(saved)
    _assert_batches_equal(_take(rewound, 4), expected)
    assert rewound.get_state()["next_batch"] == 7


def test_state_of_a_finished_finite_pipeline():
    cfg = _cfg(num_epochs=1)
    pipeline = pl.make_pipeline(_source(), cfg, shard_options=grain.sharding.NoSharding())
    assert len(list(pipeline)) == 5
    restored = pl.make_pipeline(_source(), cfg, shard_options=grain.sharding.NoSharding())
    restored.set_state(pipeline.get_state())
    assert list(restored) == []


def test_state_mismatch_raises():
    pipeline = pl.make_pipeline(_source(), _cfg(), shard_options=grain.sharding.NoSharding())
    state = pipeline.get_state()
    other = pl.make_pipeline(_source(), _cfg(seed=8), shard_options=grain.sharding.NoSharding())
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)
    other = pl.make_pipeline(_source(), _cfg(global_batch_size=8),
                             shard_options=grain.sharding.NoSharding())
    with pytest.raises(ValueError, match="global_batch_size"):
        other.set_state(state)


@pytest.mark.parametrize("saved_by,restored_on", [((0, 2), (1, 2)), ((1, 2), (0, 1)),
                                                   ((0, 1), (1, 2))])
def test_state_restores_on_any_process_and_process_count(saved_by, restored_on):
    # Checkpoints keep one copy of the state: any process's copy, saved by a run with any
    # number of processes, resumes any process of a run with any number of processes.
    first = pl.make_pipeline(_source(), _cfg(), shard_options=grain.sharding.ShardOptions(
        *saved_by, drop_remainder=True))
    _take(first, 4)
    state = json.loads(json.dumps(first.get_state()))
    shard = grain.sharding.ShardOptions(*restored_on, drop_remainder=True)
    expected = _take(pl.make_pipeline(_source(), _cfg(), shard_options=shard), 7)[4:]
    restored = pl.make_pipeline(_source(), _cfg(), shard_options=shard)
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 3), expected)


def test_bad_settings_raise():
    shard = grain.sharding.ShardOptions(0, 2, drop_remainder=True)
    with pytest.raises(ValueError, match="divisible"):
        pl.make_pipeline(_source(), _cfg(global_batch_size=5), shard_options=shard)
    with pytest.raises(ValueError, match="augment"):
        _cfg(augment="nope")
    with pytest.raises(ValueError):
        _cfg(global_batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        pl.make_pipeline(_source(0), _cfg(), shard_options=shard)


def _mesh():
    return jax.make_mesh(
        (8, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )


def _batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, sharding_lib.batch_spec(mesh, sharding_lib.RULES["dp"]))


def test_to_global_on_eight_devices():
    mesh = _mesh()
    sharding = _batch_sharding(mesh)
    pipeline = pl.make_pipeline(
        _source(), _cfg(global_batch_size=8), shard_options=grain.sharding.NoSharding()
    )
    batch = next(pipeline)
    out = pl.to_global(batch, sharding)
    assert isinstance(out["caption"], np.ndarray)
    np.testing.assert_array_equal(out["caption"], batch["caption"])
    for key in ["image", "index", "score"]:
        assert isinstance(out[key], jax.Array)
        assert out[key].shape == batch[key].shape
        assert out[key].dtype == jax.dtypes.canonicalize_dtype(batch[key].dtype)
        assert out[key].sharding == NamedSharding(mesh, P(("data", "fsdp")))
        np.testing.assert_array_equal(np.asarray(out[key]), batch[key])
    assert len(out["image"].addressable_shards) == 8
    assert out["image"].addressable_shards[0].data.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_tfds_array_record_source(tmp_path):
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    class PipelineTestCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Twelve small PNG images with captions and ids."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "caption": tfds.features.Text(),
                        "id": tfds.features.Scalar(dtype=np.int64),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(12)}

        def _generate_examples(self, count):
            rng = np.random.default_rng(0)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(24 + i, 20, 3), dtype=np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels).save(png, format="PNG")
                yield str(i), {"image": png.getvalue(), "caption": f"picture {i}", "id": i}

    builder = PipelineTestCaptions(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source = builder.as_data_source()["train"]
    assert len(source) == 12

    by_id = {int(source[i]["id"]): source[i] for i in range(len(source))}
    assert sorted(by_id) == list(range(12))

    cfg = _cfg(num_epochs=1, augment="none")
    seen = []
    for shard_index in range(2):
        shard = grain.sharding.ShardOptions(shard_index, 2, drop_remainder=True)
        batches = list(pl.make_pipeline(source, cfg, shard_options=shard))
        assert len(batches) == 3
        for batch in batches:
            assert batch["image"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
            assert batch["image"].dtype == np.uint8
            assert list(batch["caption"]) == [f"picture {i}" for i in batch["id"]]
            for i, image in zip(batch["id"], batch["image"]):
                expected = augment.center_crop_resize(by_id[int(i)]["image"], None, IMAGE_SIZE)
                np.testing.assert_array_equal(image, expected)
        seen.append({int(i) for b in batches for i in b["id"]})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))


@pytest.mark.slow
def test_worker_count_does_not_change_batches():
    no_shard = grain.sharding.NoSharding()
    expected = _take(pl.make_pipeline(_source(), _cfg(), shard_options=no_shard), 8)
    with pl.make_pipeline(_source(), _cfg(worker_count=2), shard_options=no_shard) as workers:
        _assert_batches_equal(_take(workers, 8), expected)
    # A state saved without workers restores into a pipeline with workers.
    single = pl.make_pipeline(_source(), _cfg(), shard_options=no_shard)
    _take(single, 3)
    with pl.make_pipeline(_source(), _cfg(worker_count=2), shard_options=no_shard) as workers:
        workers.set_state(single.get_state())
        _assert_batches_equal(_take(workers, 5), expected[3:])


_TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[2]}",
                               num_processes=2, process_id=int(sys.argv[1]),
                               initialization_timeout=60)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from dalle_jax import sharding
    from dalle_jax.data import pipeline as pl

    source = [{"image": np.full((20, 20, 3), i, np.uint8), "caption": f"c{i}".encode(),
               "index": np.int64(i)} for i in range(16)]
    cfg = pl.PipelineConfig(global_batch_size=8, image_size=8, augment="none",
                            num_epochs=1, shuffle=False, read_threads=0)
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    pipeline = pl.make_pipeline(source, cfg)
    batch = pl.to_global(
        next(pipeline), NamedSharding(mesh, sharding.batch_spec(mesh, sharding.RULES["dp"])))
    assert batch["index"].shape == (8,) and batch["image"].shape == (8, 8, 8, 3)
    everything = multihost_utils.process_allgather(batch["index"], tiled=True)
    print("GLOBAL", jax.process_index(), sorted(np.asarray(everything).tolist()),
          flush=True)
    jax.distributed.shutdown()
    """
)


@pytest.mark.slow
def test_two_jax_processes_build_one_global_batch(tmp_path):
    script = tmp_path / "two_process.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output
    # The first global batch is records 0..7, as on one process: process 0 reads rows
    # 0..3 of it and process 1 rows 4..7.
    for pid, output in enumerate(outputs):
        assert f"GLOBAL {pid} [0, 1, 2, 3, 4, 5, 6, 7]" in output, output
