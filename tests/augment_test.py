"""Tests for dalle_jax.data.augment: resize exactness, listing semantics, shapes and RNG use."""

import numpy as np
import pytest

from dalle_jax.data import augment


def _column_coded(height: int, width: int) -> np.ndarray:
    """Returns a uint8 image whose red channel is the column index (width <= 256)."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    image[:, :, 1] = np.arange(height, dtype=np.uint8)[:, None]
    return image


def _random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_area_resize_integer_factor_is_block_mean():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(8, 12, 3)).astype(np.float32)
    out = augment.resize(image, 4, 3)
    block_mean = image.reshape(4, 2, 3, 4, 3).mean(axis=(1, 3))
    assert out.dtype == np.float32 and out.shape == (4, 3, 3)
    np.testing.assert_allclose(out, block_mean, rtol=1e-5, atol=1e-4)


def test_area_resize_fractional_ratio_matches_overlaps():
    # 3 -> 2: output pixel 0 covers [0, 1.5), i.e. all of pixel 0 and half of pixel 1.
    column = np.array([10.0, 40.0, 100.0], dtype=np.float32).reshape(3, 1, 1)
    image = np.broadcast_to(column, (3, 1, 3))
    out = augment.resize(image, 2, 1)[:, 0, 0]
    np.testing.assert_allclose(out, [(10 + 0.5 * 40) / 1.5, (0.5 * 40 + 100) / 1.5], rtol=1e-6)


def test_area_resize_preserves_mean_and_constants():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, size=(37, 29, 3))
    out = augment.resize(image, 10, 7)
    # Every input pixel spreads exactly out/in of its weight, so the mean is kept.
    np.testing.assert_allclose(out.mean(axis=(0, 1)), image.mean(axis=(0, 1)), rtol=1e-5)
    constant = np.full((37, 29, 3), 123, dtype=np.uint8)
    for height, width in [(10, 7), (37, 29), (50, 61)]:
        np.testing.assert_array_equal(
            augment.to_uint8(augment.resize(constant, height, width)), 123
        )


def test_upscale_is_bilinear_and_bounded():
    image = np.array([[0.0, 100.0]], dtype=np.float32).reshape(1, 2, 1)
    out = augment.resize(image, 1, 4)[0, :, 0]
    # Half-pixel centres: outputs sit at input coordinates -0.25, 0.25, 0.75, 1.25.
    np.testing.assert_allclose(out, [0.0, 25.0, 75.0, 100.0], atol=1e-4)


@pytest.mark.parametrize("name", sorted(augment.AUGMENTATIONS))
@pytest.mark.parametrize("shape", [(40, 40), (48, 33), (33, 70), (300, 200)])
def test_output_shape_and_dtype(name, shape):
    rng = np.random.default_rng(2)
    image = _random_image(rng, *shape)
    out = augment.AUGMENTATIONS[name](image, rng, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous


@pytest.mark.parametrize("name", sorted(augment.AUGMENTATIONS))
def test_small_images_are_upscaled(name):
    rng = np.random.default_rng(3)
    out = augment.AUGMENTATIONS[name](_random_image(rng, 10, 14), rng, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    constant = np.full((10, 14, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(augment.AUGMENTATIONS[name](constant, rng, 32), 77)


@pytest.mark.parametrize("name", ["dvae", "transformer"])
def test_same_seed_same_output_different_seed_differs(name):
    image = _random_image(np.random.default_rng(4), 90, 70)
    fn = augment.AUGMENTATIONS[name]
    a = fn(image, np.random.default_rng(123), 32)
    b = fn(image, np.random.default_rng(123), 32)
    np.testing.assert_array_equal(a, b)
    others = [fn(image, np.random.default_rng(seed), 32) for seed in range(8)]
    assert any(not np.array_equal(a, other) for other in others)


def test_greyscale_and_rgba_inputs():
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, size=(20, 20), dtype=np.uint8)
    out = augment.center_crop_resize(grey, None, 20)
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))
    rgba = rng.integers(0, 256, size=(20, 20, 4), dtype=np.uint8)
    np.testing.assert_array_equal(augment.center_crop_resize(rgba, None, 20), rgba[:, :, :3])
    with pytest.raises(ValueError):
        augment.center_crop_resize(grey.astype(np.float32), None, 20)


def test_center_crop_resize_is_centre_block_mean():
    rng = np.random.default_rng(6)
    image = _random_image(rng, 16, 24)
    out = augment.center_crop_resize(image, None, 8)
    centre = image[:, 4:20].astype(np.float64)
    expected = np.rint(centre.reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
    # float32 sums may land on the other side of a .5 tie.
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(out, augment.center_crop_resize(image, None, 8))


def test_near_center_offset_range_formula():
    assert augment.near_center_offset_range(100, 60) == (15, 25)
    assert augment.near_center_offset_range(64, 64) == (0, 1)
    assert augment.near_center_offset_range(65, 64) == (0, 1)
    assert augment.near_center_offset_range(72, 64) == (3, 5)


def test_transformer_crop_stays_near_centre():
    # With s_min == target, t is forced to target and the final crop is the identity,
    # so the output's first column is exactly the horizontal crop offset.
    target, width = 64, 144
    image = _column_coded(target, width)
    lo, hi = augment.near_center_offset_range(width, target)
    assert (lo, hi) == (30, 50)
    offsets = {
        int(augment.transformer_augment(image, np.random.default_rng(seed), target)[0, 0, 0])
        for seed in range(60)
    }
    assert offsets <= set(range(lo, hi)) and len(offsets) > 5


def test_dvae_crop_covers_whole_slack():
    target, width = 32, 64
    image = _column_coded(target, width)
    firsts = set()
    for seed in range(80):
        out = augment.dvae_augment(image, np.random.default_rng(seed), target)
        firsts.add(int(min(out[0, 0, 0], out[0, -1, 0])))
    assert firsts <= set(range(0, width - target + 1))
    assert min(firsts) < 8 and max(firsts) > 24


def test_flip_only_in_dvae_mode():
    # A target-sized square passes through both listings unscaled and uncropped.
    image = _column_coded(32, 32)
    flipped = image[:, ::-1]
    dvae_flips = 0
    for seed in range(40):
        out = augment.dvae_augment(image, np.random.default_rng(seed), 32)
        assert np.array_equal(out, image) or np.array_equal(out, flipped)
        dvae_flips += np.array_equal(out, flipped)
        out = augment.transformer_augment(image, np.random.default_rng(seed), 32)
        np.testing.assert_array_equal(out, image)
    assert 5 < dvae_flips < 35


def test_dvae_rescale_range_is_used():
    # A constant-gradient image lets the output's horizontal step reveal the scale t.
    target = 16
    s_min = 40
    image = np.zeros((s_min, s_min, 3), dtype=np.uint8)
    image[:, :, 0] = (np.arange(s_min) * 6).astype(np.uint8)[None, :]
    steps = set()
    for seed in range(60):
        out = augment.dvae_augment(image, np.random.default_rng(seed), target)
        row = out[0, :, 0].astype(float)
        step = abs(row[-1] - row[0]) / (target - 1)
        steps.add(round(s_min * 6 / step))  # equals t up to rounding
    t_min, t_max = round(9 / 8 * target), round(12 / 8 * target)
    assert steps == set(range(t_min, t_max + 1))
