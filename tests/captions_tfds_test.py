"""Tests for the `captions` TFDS builder, the source readers and options it uses
(`caption_sources`), and the image/caption checks in `imageio`."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageFile

from dalle_jax import configlib
from dalle_jax.data import caption_sources, captions_tfds, imageio
from dalle_jax.data.caption_sources import CaptionsConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- helpers


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w: int, h: int, colour=(200, 40, 40)) -> Image.Image:
    # A gradient keeps JPEGs from being trivially small and checks orientation handling.
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = colour
    arr[:, :, 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    return Image.fromarray(arr, "RGB")


def _jpeg(w=96, h=80, **kw) -> bytes:
    return _encode(_rgb(w, h), "JPEG", quality=90, **kw)


def _write(path, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def _rgba_png() -> bytes:
    # Left half fully transparent (becomes white), right half opaque red.
    arr = np.zeros((80, 80, 4), np.uint8)
    arr[:, 40:] = (255, 0, 0, 255)
    return _encode(Image.fromarray(arr, "RGBA"), "PNG")


def _deep_png() -> bytes:
    arr = np.full((70, 90), 32896, np.uint16)  # 32896 / 257 = 128
    return _encode(Image.fromarray(arr), "PNG")


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    return _jpeg(120, 80, exif=exif.tobytes())


# Folder fixture: name -> (image bytes or None, caption or None); checked in the test.
def _make_folder(root) -> dict[str, str]:
    good = _jpeg()
    files = {
        "good/a.jpg": good,
        "good/a.txt": "A red  square\n on a\tblue gradient. ",
        "good/b.png": _encode(_rgb(80, 80), "PNG"),
        "good/b.txt": "Second Caption",
        "good/sub/c.webp": _encode(_rgb(100, 70), "WEBP", lossless=True),
        "good/sub/c.txt": "third",
        "good/d.jpg": _rotated_jpeg(),
        "good/d.txt": "rotated by exif",
        "bad/trunc.jpg": good[: len(good) // 2],
        "bad/trunc.txt": "truncated jpeg",
        "bad/empty.jpg": good,
        "bad/empty.txt": "  \n\t ",
        "bad/tiny.png": _encode(_rgb(10, 10), "PNG"),
        "bad/tiny.txt": "ten pixels",
        "bad/latin1.jpg": good,
        "bad/latin1.txt": "caf\xe9 au lait".encode("latin-1"),
        "bad/nocap.jpg": good,
        "bad/wide.png": _encode(_rgb(300, 100), "PNG"),
        "bad/wide.txt": "too wide",
        "bad/orphan.txt": "a caption with no image",
        "bad/short.jpg": good,
        "bad/short.txt": "ab",
        "bad/.hidden.jpg": b"not even an image",
        "modes/rgba.png": _rgba_png(),
        "modes/rgba.txt": "rgba on white",
        "modes/cmyk.jpg": _encode(Image.new("CMYK", (80, 80), (0, 255, 0, 0)), "JPEG"),
        "modes/cmyk.txt": "cmyk magenta",
        "modes/gray.png": _encode(Image.new("L", (80, 80), 77), "PNG"),
        "modes/gray.txt": "grey level",
        "modes/deep.png": _deep_png(),
        "modes/deep.txt": "sixteen bit",
    }
    for rel, data in files.items():
        _write(os.path.join(root, rel), data)
    return {
        "good/a.jpg": "A red square on a blue gradient.",
        "good/b.png": "Second Caption",
        "good/sub/c.webp": "third",
        "good/d.jpg": "rotated by exif",
        "modes/rgba.png": "rgba on white",
        "modes/cmyk.jpg": "cmyk magenta",
        "modes/gray.png": "grey level",
        "modes/deep.png": "sixteen bit",
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes | str) -> None:
    data = data.encode("utf-8") if isinstance(data, str) else data
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_shards(root) -> None:
    os.makedirs(root, exist_ok=True)
    good = _jpeg()
    with tarfile.open(os.path.join(root, "00000.tar"), "w") as t:
        _add(t, "000000000.jpg", good)
        _add(t, "000000000.txt", "first shard example")
        _add(t, "000000000.json", '{"url": "http://x/0.jpg", "width": 96}')
        _add(t, "000000001.jpg", good)
        _add(t, "000000001.txt", "no json here")
        _add(t, "000000002.jpg", good)  # no caption
        _add(t, "000000003.txt", "no image")
        _add(t, "000000003.json", "{}")
        _add(t, "000000004.jpg", good[:300])  # truncated
        _add(t, "000000004.txt", "broken image")
    with tarfile.open(os.path.join(root, "00001.tar"), "w") as t:
        _add(t, "000010000.png", _rgba_png())
        _add(t, "000010000.txt", "rgba in a shard")
        _add(t, "000010000.json", '{"caption": "rgba in a shard"}')
        _add(t, "000010000.cls", "3")  # unknown extension: ignored
        _add(t, "000010001.webp", _encode(_rgb(90, 90), "WEBP"))
        _add(t, "000010001.txt", "a webp image")
    # img2dataset writes these beside the shards; the glob must ignore them.
    _write(os.path.join(root, "00000.parquet"), b"PAR1")
    _write(os.path.join(root, "00000_stats.json"), "{}")


def _read_all(data_dir, name, split) -> dict[str, dict]:
    builder = captions_tfds.open_captions(data_dir, name)
    src = builder.as_data_source()[split]
    out = {}
    for i in range(len(src)):
        ex = src[i]
        out[ex["key"].decode()] = ex
    return out


def _nonzero(d: dict) -> dict:
    return {k: v for k, v in d.items() if v}


# --------------------------------------------------------------------------- imageio


def test_read_caption_cleans_and_rejects():
    raw = b"\xef\xbb\xbf  Two\n\nLines\t here "
    assert imageio.read_caption(raw, min_chars=3) == "Two Lines here"
    for raw, reason in [(b" \n ", "empty"), (b"\xff\xfe", "not_utf8"), (b"ab", "too_short")]:
        with pytest.raises(imageio.BadCaption) as e:
            imageio.read_caption(raw, min_chars=3)
        assert e.value.reason == reason


def test_skip_reasons_cover_every_image_and_caption_reason():
    # The preparation report counts skips under SKIP_REASONS; a rejection reason that
    # imageio adds must be listed there too.
    reasons = ({f"image_{r}" for r in imageio.IMAGE_REASONS}
               | {f"caption_{r}" for r in imageio.CAPTION_REASONS})
    assert reasons <= set(caption_sources.SKIP_REASONS)


def test_truncated_jpeg_is_corrupt_even_if_pil_tolerates_truncation(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _jpeg()
    with pytest.raises(imageio.BadImage) as e:
        imageio.load_rgb(data[: len(data) // 2])
    assert e.value.reason == "corrupt"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    with pytest.raises(imageio.BadImage) as e:
        imageio.load_rgb(b"definitely not an image")
    assert e.value.reason == "corrupt"


def test_load_rgb_resize_and_filters():
    loaded = imageio.load_rgb(_jpeg(400, 300), max_short_side=100)
    assert loaded.image.mode == "RGB" and loaded.image.size == (133, 100)
    assert loaded.resized and not loaded.pixels_unchanged
    small = imageio.load_rgb(_jpeg(96, 80), max_short_side=100)
    assert small.image.size == (96, 80) and small.pixels_unchanged
    with pytest.raises(imageio.BadImage, match="too_small"):
        imageio.load_rgb(_jpeg(96, 80), min_side=81)
    with pytest.raises(imageio.BadImage, match="aspect"):
        imageio.load_rgb(_jpeg(96, 80), aspect_range=(0.5, 1.1))
    # EXIF orientation 6 shows the 120x80 stored image as 80x120.
    rotated = imageio.load_rgb(_rotated_jpeg(), aspect_range=(0.5, 0.7))
    assert rotated.image.size == (80, 120) and rotated.transposed
    deep = imageio.load_rgb(_deep_png())
    assert deep.converted_from == "I;16"
    assert np.asarray(deep.image).min() == np.asarray(deep.image).max() == 128


# --------------------------------------------------------------------------- builder


def test_folder_preparation_counts_and_readback(tmp_path):
    src = tmp_path / "src"
    expected = _make_folder(src)
    data_dir = tmp_path / "data"
    report = captions_tfds.prepare_captions(
        data_dir, CaptionsConfig(name="folder_ds", sources=[str(src)], validation_fraction=0.0),
        num_workers=2)

    assert report["reused"] is False
    total = report["total"]
    assert total["candidates"] == 16
    assert total["kept"] == 8
    assert _nonzero(total["skipped"]) == {
        "image_corrupt": 1, "caption_empty": 1, "image_too_small": 1, "caption_not_utf8": 1,
        "caption_missing": 1, "image_aspect": 1, "image_missing": 1, "caption_too_short": 1,
    }
    assert total["converted"] == {"RGBA": 1, "CMYK": 1, "L": 1, "I;16": 1}
    assert total["resized"] == 0
    assert total["reencoded"] == 7  # every kept image except the clean RGB JPEG a.jpg
    assert report["splits"]["train"] == total
    assert report["splits"]["validation"]["candidates"] == 0
    assert set(report["skipped_examples"]) == set(_nonzero(total["skipped"]))
    assert report["options"]["aspect_range"] == [0.5, 2.0]

    dataset_dir = os.path.join(data_dir, "captions", "folder_ds", captions_tfds.VERSION)
    with open(os.path.join(dataset_dir, captions_tfds.REPORT_FILENAME)) as f:
        stored = json.load(f)
    assert stored["total"] == total
    assert captions_tfds.load_report(data_dir, "folder_ds") == stored

    rows = _read_all(data_dir, "folder_ds", "train")
    assert {os.path.relpath(k, src) for k in rows} == set(expected)
    for key, ex in rows.items():
        img = ex["image"]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert ex["caption"].decode() == expected[os.path.relpath(key, src)]
        assert ex["json"] == b""

    by_rel = {os.path.relpath(k, src): ex for k, ex in rows.items()}
    # The clean JPEG is stored byte for byte, so it decodes to exactly the source pixels.
    source_a = np.asarray(Image.open(src / "good" / "a.jpg").convert("RGB"))
    np.testing.assert_array_equal(by_rel["good/a.jpg"]["image"], source_a)
    assert by_rel["good/d.jpg"]["image"].shape == (120, 80, 3)
    rgba = by_rel["modes/rgba.png"]["image"].astype(int)
    assert np.all(rgba[:, :30] > 240)  # transparent -> white
    assert np.all(np.abs(rgba[:, 50:] - [255, 0, 0]) < 16)  # opaque red stays red
    cmyk = by_rel["modes/cmyk.jpg"]["image"].astype(int)
    assert np.all(np.abs(cmyk - [255, 0, 255]) < 16)
    assert np.all(np.abs(by_rel["modes/deep.png"]["image"].astype(int) - 128) <= 2)
    assert np.all(np.abs(by_rel["modes/gray.png"]["image"].astype(int) - 77) <= 2)

    info_splits = captions_tfds.open_captions(data_dir, "folder_ds").info.splits
    assert set(info_splits) == {"train"} and info_splits["train"].num_examples == 8


def test_webdataset_shards_grouping_and_json(tmp_path):
    shards = tmp_path / "shards"
    _make_shards(shards)
    data_dir = tmp_path / "data"
    report = captions_tfds.prepare_captions(
        data_dir,
        CaptionsConfig(name="wds", sources=[str(shards / "*.tar")], validation_fraction=0.0),
        num_workers=1)
    total = report["total"]
    assert total["candidates"] == 7
    assert total["kept"] == 4
    assert _nonzero(total["skipped"]) == {
        "caption_missing": 1, "image_missing": 1, "image_corrupt": 1}
    assert total["converted"] == {"RGBA": 1}
    assert report["source_errors"] == []

    rows = _read_all(data_dir, "wds", "train")
    shard0, shard1 = str(shards / "00000.tar"), str(shards / "00001.tar")
    assert set(rows) == {f"{shard0}/000000000", f"{shard0}/000000001",
                         f"{shard1}/000010000", f"{shard1}/000010001"}
    first = rows[f"{shard0}/000000000"]
    assert first["caption"] == b"first shard example"
    assert json.loads(first["json"]) == {"url": "http://x/0.jpg", "width": 96}
    assert first["image"].shape == (80, 96, 3)
    assert rows[f"{shard0}/000000001"]["json"] == b""
    assert json.loads(rows[f"{shard1}/000010000"]["json"]) == {"caption": "rgba in a shard"}
    assert rows[f"{shard1}/000010001"]["image"].shape == (90, 90, 3)


def test_split_assignment_is_deterministic(tmp_path):
    src = tmp_path / "src"
    names = [f"img{i:03d}" for i in range(40)]
    data = _jpeg(64, 64)
    for n in names:
        _write(str(src / f"{n}.jpg"), data)
        _write(str(src / f"{n}.txt"), f"caption {n}")
    expected = {s: {f"{n}.jpg" for n in names
                    if caption_sources.assign_split(f"{n}.jpg", 0.3) == s}
                for s in caption_sources.SPLITS}
    assert expected["train"] and expected["validation"]

    # A second run from a copy elsewhere: split keys are source-relative, so the split
    # does not depend on where the data lives.
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(src, moved)
    for run, root in (("run1", src), ("run2", moved)):
        report = captions_tfds.prepare_captions(
            tmp_path / run,
            CaptionsConfig(name="split_ds", sources=str(root), validation_fraction=0.3))
        got = {s: {os.path.relpath(k, root) for k in _read_all(tmp_path / run, "split_ds", s)}
               for s in caption_sources.SPLITS}
        assert got == expected
        assert report["splits"]["validation"]["kept"] == len(expected["validation"])


def test_several_configs_share_a_data_dir(tmp_path):
    src = tmp_path / "src"
    _make_folder(src)
    shards = tmp_path / "shards"
    _make_shards(shards)
    data_dir = tmp_path / "data"
    alpha = CaptionsConfig(name="alpha", sources=[str(src)], validation_fraction=0.0)
    a = captions_tfds.prepare_captions(data_dir, alpha)
    b = captions_tfds.prepare_captions(data_dir, CaptionsConfig(
        name="beta", sources=[str(src / "good"), str(shards / "00000.tar")],
        validation_fraction=0.0, max_short_side=64))
    assert a["total"]["kept"] == 8
    assert b["total"]["kept"] == 4 + 2 and b["total"]["resized"] == 6
    assert sorted(os.listdir(data_dir / "captions")) == ["alpha", "beta"]
    assert len(_read_all(data_dir, "alpha", "train")) == 8
    for ex in _read_all(data_dir, "beta", "train").values():
        assert min(ex["image"].shape[:2]) == 64

    # Preparing again reuses the data and returns the stored counts.
    again = captions_tfds.prepare_captions(data_dir, alpha)
    assert again["reused"] is True and again["total"] == a["total"]
    # The normal builder reads the prepared data (even without the sources).
    builder = captions_tfds.captions_builder(data_dir, CaptionsConfig(
        name="beta", sources=["/moved/away"], validation_fraction=0.0, max_short_side=64))
    assert len(builder.as_data_source()["train"]) == 6
    # Other filters under an existing name are refused.
    with pytest.raises(ValueError, match="min_side"):
        captions_tfds.captions_builder(data_dir, dataclasses.replace(alpha, min_side=100))


def test_split_with_every_example_skipped_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    _write(str(src / "x.jpg"), _jpeg(20, 20))
    _write(str(src / "x.txt"), "too small")
    with pytest.raises(ValueError, match="image_too_small"):
        captions_tfds.prepare_captions(tmp_path / "data", CaptionsConfig(
            name="none", sources=[str(src)], validation_fraction=0.0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(aspect_range=(2.0, 0.5)), "aspect_range"),
    (dict(aspect_range=(0.0, 2.0)), "aspect_range"),
    (dict(sources=[]), "sources"),
    (dict(sources="MISSING"), "does not exist"),
    (dict(sources="MISSING/*.tar"), "matches no .tar"),
    (dict(name="cc 3m"), "name"),
    (dict(name=""), "name"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(min_side=-1), "min_side"),
    (dict(min_caption_chars=1.5), "min_caption_chars"),
    (dict(max_short_side=0), "max_short_side"),
    (dict(jpeg_quality=0), "jpeg_quality"),
])
def test_invalid_options_raise_value_error(tmp_path, kwargs, message):
    src = tmp_path / "src"
    _write(str(src / "x.jpg"), _jpeg())
    _write(str(src / "x.txt"), "a caption")
    args = dict(name="ok", sources=[str(src)])
    args.update(kwargs)
    if isinstance(args["sources"], str):  # a path below tmp_path that does not exist
        args["sources"] = str(tmp_path / args["sources"])
    with pytest.raises(ValueError, match=message):
        captions_tfds.prepare_captions(tmp_path / "data", CaptionsConfig(**args))


def test_overlapping_folders_and_non_tar_files_are_rejected(tmp_path):
    src = tmp_path / "src"
    _write(str(src / "sub" / "x.jpg"), _jpeg())
    _write(str(src / "notes.csv"), "a,b")
    with pytest.raises(ValueError, match="overlap"):
        caption_sources.resolve_sources([str(src), str(src / "sub")])
    with pytest.raises(ValueError, match="not a tar shard"):
        caption_sources.resolve_sources([str(src / "notes.csv")])


def test_captions_config_from_config_section():
    cfg = configlib.load_config(os.path.join(_ROOT, "configs", "captions.py") + ":name=cc3m")
    section = cfg.data.captions
    section.sources = " /data/pairs, /data/shards/*.tar ,"
    config = CaptionsConfig.from_config(section)
    assert config == CaptionsConfig(name="cc3m", sources=("/data/pairs", "/data/shards/*.tar"))
    assert config.max_short_side is None  # 0 in the config keeps the source resolution
    section.max_short_side = 128
    section.min_aspect = 1.0
    config = CaptionsConfig.from_config(section)
    assert config.max_short_side == 128 and config.aspect_range == (1.0, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.min_side = 1
    section.max_aspect = 0.5
    with pytest.raises(ValueError, match="data.captions: aspect_range"):
        CaptionsConfig.from_config(section)
    section.name = ""
    with pytest.raises(ValueError, match="data.captions.name is empty"):
        CaptionsConfig.from_config(section)


def test_prepare_and_read_through_the_data_config(tmp_path):
    from dalle_jax.data import sources

    src = tmp_path / "src"
    _make_folder(src)
    cfg = configlib.load_config(os.path.join(_ROOT, "configs", "captions.py") + ":name=mine")
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.data.captions.sources = f"{src / 'good'},{src / 'modes'}"
    cfg.data.captions.validation_fraction = 0.0
    report = sources.prepare(cfg.data)
    assert report["name"] == "mine" and report["total"]["kept"] == 8
    assert report["options"]["sources"] == [str(src / "good"), str(src / "modes")]
    assert len(sources.load_split(cfg.data, "train")) == 8


def test_source_readers_do_not_import_tfds():
    code = ("import sys, dalle_jax.data.caption_sources; "
            "sys.exit('tensorflow_datasets' in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_ROOT)
