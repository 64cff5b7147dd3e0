"""Decoding and checking of single source images and captions (pure PIL/NumPy, no TFDS).

This module owns the per-example rules of dataset preparation: which bytes count as a
usable image (fully decodable, large enough, acceptable aspect ratio), how any PIL mode is
turned into 8-bit RGB, the optional preparation-time downscale, the JPEG re-encoding, and
how a caption file becomes a clean caption string. Rejections raise `BadImage` /
`BadCaption`, each carrying a short machine-readable `reason` so that callers can count
them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
from typing import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

# Extensions (lower case, with dot) recognised as images in folders and shards.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Reasons carried by `BadImage` and `BadCaption`.
IMAGE_REASONS = ("corrupt", "too_small", "aspect", "too_large", "unsupported_mode")
CAPTION_REASONS = ("empty", "not_utf8", "too_short")

# Alpha is composited on white: captioned web images with transparency are almost always
# logos or cut-outs shown on a light page background.
_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION_TAG = ExifTags.Base.Orientation


class BadImage(ValueError):
    """An image that is skipped; `reason` is one of `IMAGE_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class BadCaption(ValueError):
    """A caption that is skipped; `reason` is one of `CAPTION_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image and what was done to it.

    Attributes:
        image: fully loaded PIL image in mode "RGB".
        source_format: PIL format name of the source ("JPEG", "PNG", ...).
        source_mode: PIL mode of the source before any conversion.
        source_size: (width, height) after EXIF orientation, before any resize.
        converted_from: the source mode when a mode conversion happened, else None.
        transposed: whether an EXIF orientation was applied.
        resized: whether the image was downscaled (`max_short_side`).
    """

    image: Image.Image
    source_format: str | None
    source_mode: str
    source_size: tuple[int, int]
    converted_from: str | None
    transposed: bool
    resized: bool

    @property
    def pixels_unchanged(self) -> bool:
        """True when the decoded pixels are exactly those of the source file."""
        return self.converted_from is None and not self.transposed and not self.resized


# `ImageFile.LOAD_TRUNCATED_IMAGES` is process-global; other code may switch it on, and
# then a truncated JPEG decodes "successfully" with a grey lower part. Strict decoding is
# forced while any `load_rgb` call is decoding; the depth count keeps concurrent calls
# from restoring the flag while another thread still relies on it being off.
_strict_lock = threading.Lock()
_strict_depth = 0
_strict_saved = False


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    global _strict_depth, _strict_saved
    with _strict_lock:
        if _strict_depth == 0:
            _strict_saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _strict_saved


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels bad
        return 1
    return value if 1 <= value <= 8 else 1


def _scaled_size(width: int, height: int, max_short_side: int) -> tuple[int, int]:
    """Size with the short side exactly `max_short_side`, aspect kept (rounded)."""
    if width <= height:
        return max_short_side, max(1, round(height * max_short_side / width))
    return max(1, round(width * max_short_side / height)), max_short_side


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit grey to 8-bit "L" by scaling, not clipping.

    PIL's own conversion clips I;16 values at 255, which turns most 16-bit images white.
    "I;16*" modes are scaled from [0, 65535]. "I" and "F" carry no declared range: values
    up to 255 are taken as 8-bit, anything larger as 16-bit.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255.0):
        arr = arr / 257.0
    arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Converts any mode to RGB; returns (rgb, source mode or None when already RGB)."""
    mode = img.mode
    has_alpha = mode in _ALPHA_MODES or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    )
    if mode == "RGB" and not has_alpha:
        return img, None
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB"), mode
        if mode.startswith("I") or mode == "F":
            return _high_bit_depth_to_l(img).convert("RGB"), mode
        return img.convert("RGB"), mode
    except (ValueError, OSError) as e:
        raise BadImage("unsupported_mode", f"{mode}: {e}") from e


def load_rgb(
    data_or_path: bytes | str | os.PathLike,
    *,
    min_side: int = 0,
    aspect_range: tuple[float, float] = (0.5, 2.0),
    max_short_side: int | None = None,
) -> LoadedImage:
    """Decodes one image fully and returns it as RGB, or raises `BadImage`.

    Size filters use the EXIF-oriented size of the source (before `max_short_side`), and
    run before the pixel data is decoded, so rejected large files cost little.

    Args:
        data_or_path: encoded image bytes, or a path to an image file.
        min_side: reject ("too_small") when the shorter side is below this many pixels.
        aspect_range: inclusive (min, max) of width / height; outside it is "aspect".
        max_short_side: if set, downscale (Lanczos, which averages like an area filter
            when shrinking) so the shorter side is at most this many pixels.

    Returns:
        A `LoadedImage` whose `image` is loaded, in mode "RGB", EXIF orientation applied,
        alpha composited on white, 16-bit grey scaled to 8 bits.

    Raises:
        BadImage: reason "corrupt" (unreadable, unidentified, truncated or otherwise
            undecodable), "too_large" (PIL decompression-bomb limit), "too_small",
            "aspect" or "unsupported_mode".
    """
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    try:
        img = Image.open(source)
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from e
    except Exception as e:  # noqa: BLE001 - PIL signals bad input with many exception types
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from e
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise BadImage("corrupt", f"size {width}x{height}")
        orientation = _orientation(img)
        # Orientations 5..8 rotate by 90 degrees, so the displayed image is h x w.
        shown_w, shown_h = (height, width) if orientation >= 5 else (width, height)
        if min(shown_w, shown_h) < min_side:
            raise BadImage("too_small", f"{shown_w}x{shown_h} < {min_side}")
        ratio = shown_w / shown_h
        if not aspect_range[0] <= ratio <= aspect_range[1]:
            raise BadImage("aspect", f"{shown_w}x{shown_h}")

        target = None
        if max_short_side is not None and min(shown_w, shown_h) > max_short_side:
            target = _scaled_size(shown_w, shown_h, max_short_side)
            if img.format == "JPEG":
                # DCT-domain downscaling to at least the target size: much faster decode
                # of big JPEGs, and the Lanczos pass below does the rest.
                stored = (target[1], target[0]) if orientation >= 5 else target
                img.draft(None, stored)

        source_format, source_mode = img.format, img.mode
        try:
            with _strict_decoding():
                img.load()
        except Image.DecompressionBombError as e:
            raise BadImage("too_large", str(e)) from e
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ...
            raise BadImage("corrupt", f"{type(e).__name__}: {e}") from e

        out = img
        transposed = orientation != 1
        if transposed:
            out = ImageOps.exif_transpose(out)
        out, converted_from = _to_rgb(out)
        resized = target is not None
        if resized and out.size != target:
            out = out.resize(target, Image.Resampling.LANCZOS)
        if out is img:
            # Detach from the file object, which the `with` block closes.
            out = img.copy()
    return LoadedImage(
        image=out,
        source_format=source_format,
        source_mode=source_mode,
        source_size=(shown_w, shown_h),
        converted_from=converted_from,
        transposed=transposed,
        resized=resized,
    )


def encode_jpeg(img: Image.Image, *, quality: int = 95) -> bytes:
    """Encodes an RGB image as baseline JPEG bytes (no metadata)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def read_caption(raw: bytes | str, *, min_chars: int = 1) -> str:
    """Decodes and cleans one caption, or raises `BadCaption`.

    Bytes must be valid UTF-8 (a leading byte-order mark is dropped). Non-UTF-8 captions
    are rejected rather than decoded with replacement characters, because a mis-decoded
    caption teaches the text model garbage. Runs of whitespace (including newlines) become
    single spaces and the ends are stripped. Case is kept: lowercasing is the tokenizer's
    job.

    Args:
        raw: caption file contents.
        min_chars: minimum length in characters after cleaning.

    Returns:
        The cleaned caption.

    Raises:
        BadCaption: reason "not_utf8", "empty" or "too_short".
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadCaption("not_utf8", str(e)) from e
    else:
        text = raw
    text = " ".join(text.lstrip("\ufeff").split())
    if not text:
        raise BadCaption("empty")
    if len(text) < min_chars:
        raise BadCaption("too_short", f"{len(text)} < {min_chars} chars")
    return text
