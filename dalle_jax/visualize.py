"""PNG grids of images with optional captions (inputs, reconstructions, samples)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Accepts uint8 or float images in [0, 1] and returns uint8."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def image_grid(
    images_NHWC: np.ndarray,
    captions: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    scale: int = 1,
    pad: int = 2,
    caption_lines: int = 3,
) -> Image.Image:
    """Lays images out in rows of ``ncols``; each caption is wrapped under its image."""
    images = to_uint8(images_NHWC)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"image_grid expects N x H x W x 3 images, got shape {images.shape}")
    n, h, w, _ = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    font = ImageFont.load_default()
    chars = max(8, w // 6)
    line_h = 11
    text_h = caption_lines * line_h + 2 if captions is not None else 0
    canvas = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, ncols)
        x, y = pad + c * (w + pad), pad + r * (h + text_h + pad)
        canvas.paste(Image.fromarray(images[i]), (x, y))
        if captions is not None:
            lines = textwrap.wrap(str(captions[i]), chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + h + 1 + j * line_h), line, fill="black", font=font)
    return canvas


def save_grid(path: str, images_NHWC: np.ndarray, captions: Sequence[str] | None = None, **kw) -> str:
    """Writes ``image_grid(...)`` as PNG (via a temporary file, so a crash never leaves half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    image_grid(images_NHWC, captions, **kw).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
