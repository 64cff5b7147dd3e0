"""Image preparation shared by the real and generated sides of an FID evaluation.

The DALL·E paper (§3.1, Fig. 9) reports FID and IS on MS-COCO after a Gaussian blur of
increasing radius applied to *both* the validation images and the samples: the dVAE
loses high-frequency detail, and blurring both sides shows how the comparison changes
once such detail is removed everywhere. `gaussian_blur` is PIL's
``ImageFilter.GaussianBlur(radius)`` on each uint8 image at the model's resolution
(radius 0 returns the images unchanged).

Real images come in every size, the samples at the model's resolution; `resize_center_crop`
makes a real image comparable: its shorter side is resized to the model's size with a
PIL filter (``"lanczos"`` by default, the antialiasing resize of the DALL·E reference
preprocessing), then the centre square is cropped.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}


def check_radius(radius: float) -> float:
    radius = float(radius)
    if not radius >= 0:
        raise ValueError(f"blur radius must be >= 0, got {radius}")
    return radius


def gaussian_blur(images_NHWC: np.ndarray, radius: float) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images blurred with PIL's ``GaussianBlur(radius)``; radius 0
    returns the input as it is."""
    radius = check_radius(radius)
    images = np.asarray(images_NHWC)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} "
                         f"{images.shape}")
    if radius == 0:
        return images
    f = ImageFilter.GaussianBlur(radius)
    return np.stack([np.asarray(Image.fromarray(im).filter(f), np.uint8) for im in images]) \
        if len(images) else images


def resize_center_crop(image: Image.Image, size: int, resample: str = "lanczos") -> np.ndarray:
    """A ``(size, size, 3)`` uint8 array of an RGB image: shorter side resized to ``size``
    with the ``resample`` filter (aspect kept, the longer side rounded), centre crop."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), RESAMPLE[resample])
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)).convert("RGB"), np.uint8)
