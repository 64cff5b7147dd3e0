"""TFDS builder for the built-in `shapes` dataset, written as array_record.

This module owns the TFDS wrapping of `dalle_jax.data.shapes`: the `Shapes` builder (TFDS
name "shapes"), its `ShapesConfig` (image size and split sizes, encoded in the config name
so different sizes never share a directory) and `shapes_builder`, which returns a builder
ready for `download_and_prepare()` / `as_data_source()`. It needs no TensorFlow: images are
yielded as PNG bytes, and the data is read back with `as_data_source()`, where `caption`
comes back as `bytes`.

Records are written in index order (shuffling disabled), so record `i` of a split is
`shapes.example(split, i, image_size)`; the `index` feature states it explicitly.
"""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dalle_jax.data import shapes

_CONFIG_NAME = re.compile(r"s(\d+)_(\d+)_(\d+)_(\d+)")


def config_name(image_size: int, num_train: int, num_validation: int, num_test: int) -> str:
    """Config name encoding every parameter, e.g. `s64_100000_5000_5000`."""
    return f"s{int(image_size)}_{int(num_train)}_{int(num_validation)}_{int(num_test)}"


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """`shapes` configuration: canvas size and number of examples per split."""

    image_size: int = 64
    num_train: int = 100_000
    num_validation: int = 5_000
    num_test: int = 5_000

    @classmethod
    def make(cls, image_size: int = 64, num_train: int = 100_000,
             num_validation: int = 5_000, num_test: int = 5_000) -> "ShapesConfig":
        """Builds a config whose name is `config_name(...)` of its parameters."""
        if image_size < 1 or min(num_train, num_validation, num_test) < 0:
            raise ValueError("image_size must be positive and split sizes non-negative")
        return cls(
            name=config_name(image_size, num_train, num_validation, num_test),
            description=(
                f"{image_size}x{image_size} images; {num_train} train, {num_validation} "
                f"validation and {num_test} test_compositional examples."
            ),
            image_size=int(image_size),
            num_train=int(num_train),
            num_validation=int(num_validation),
            num_test=int(num_test),
        )

    def split_sizes(self) -> dict[str, int]:
        """Number of examples per split name."""
        return {
            "train": self.num_train,
            "validation": self.num_validation,
            "test_compositional": self.num_test,
        }


def _png(image: np.ndarray) -> bytes:
    # tfds encodes NumPy images with TensorFlow, which is not installed; PNG bytes bypass it.
    # Level 1 is far faster than the default and costs little size on flat synthetic images.
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Coloured circles, squares and triangles on black, with templated captions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [ShapesConfig.make()]

    @classmethod
    def get_builder_config(cls, name: str, version=None) -> tfds.core.BuilderConfig | None:
        """Returns the named config; names like `s32_1000_100_100` build one on demand."""
        config = super().get_builder_config(name, version)
        if config is None:
            match = _CONFIG_NAME.fullmatch(name)
            if match is not None:
                config = ShapesConfig.make(*(int(g) for g in match.groups()))
        return config

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        n = shapes.MAX_OBJECTS
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Synthetic scenes of one object or two objects side by side / one above "
                "the other, from 6 colours x 3 shapes, with templated captions. The "
                f"objects {sorted(shapes.HELD_OUT)} appear only in test_compositional. "
                "colors index "
                f"{list(shapes.COLOR_NAMES)}, shapes index {list(shapes.SHAPES)}, -1 "
                "marks an absent second object; boxes are (x0, y0, side) in a 64-unit "
                "frame, left/top object first."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
                "num_objects": tfds.features.Scalar(dtype=np.int32),
                "colors": tfds.features.Tensor(shape=(n,), dtype=np.int32),
                "shapes": tfds.features.Tensor(shape=(n,), dtype=np.int32),
                "boxes": tfds.features.Tensor(shape=(n, 3), dtype=np.int32),
                "relation": tfds.features.ClassLabel(names=list(shapes.RELATIONS)),
            }),
            # Record i must stay example i, so evaluations can index a split directly.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: every example is generated.
        return {
            split: self._generate_examples(split, num)
            for split, num in self.builder_config.split_sizes().items()
        }

    def _generate_examples(self, split: str, num_examples: int):
        size = self.builder_config.image_size
        for i in range(num_examples):
            scene, caption = shapes.sample_scene(split, i)
            record = shapes.scene_labels(scene)
            record["relation"] = int(record["relation"])
            yield i, {
                "image": _png(shapes.render(scene, size)),
                "caption": caption,
                "index": i,
                **record,
            }


def shapes_builder(data_dir: str, *, image_size: int = 64, num_train: int = 100_000,
                   num_validation: int = 5_000, num_test: int = 5_000
                   ) -> tfds.core.DatasetBuilder:
    """A `Shapes` builder writing array_record under `data_dir`.

    Call `download_and_prepare()` on it (a no-op once prepared) and read the splits with
    `as_data_source()`.
    """
    name = ShapesConfig.make(image_size, num_train, num_validation, num_test).name
    # Passing the name (not a fresh config object) lets the predefined default config match
    # itself; tfds rejects a new object that shares a predefined config's name.
    return Shapes(config=name, data_dir=str(data_dir), file_format="array_record")
