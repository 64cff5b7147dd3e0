"""The MS-COCO 2014 validation files the ``eval_coco`` job reads: the captions file, the
images (each decoded once; missing and undecodable ones skipped with the reason) and the
seeded draw of captions of distinct images (`dalle_jax.evals.coco` describes the
protocol).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from dalle_jax import logs


@dataclasses.dataclass(frozen=True)
class CocoImage:
    """A validation image with its non-empty captions (whitespace collapsed), in the
    annotation file's order."""

    image_id: int
    file_name: str
    captions: tuple[str, ...]


def read_annotations(path: str) -> tuple[list[CocoImage], dict[str, int]]:
    """The images of a COCO captions file (sorted by id) that have at least one non-empty
    caption, and counts of what was left out (``images_without_captions``,
    ``empty_captions``, ``orphan_annotations`` naming an image id the file does not
    list)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO captions file {path!r} does not exist (expected the "
                                "raw layout: ROOT/annotations/captions_val2014.json)")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    files: dict[int, str] = {}
    for im in data["images"]:
        files[int(im["id"])] = str(im["file_name"])
    captions: dict[int, list[str]] = defaultdict(list)
    orphan = empty = 0
    for a in data["annotations"]:
        image_id = int(a["image_id"])
        text = " ".join(str(a.get("caption", "")).split())
        if image_id not in files:
            orphan += 1
        elif not text:
            empty += 1
        else:
            captions[image_id].append(text)
    images = [CocoImage(i, files[i], tuple(captions[i])) for i in sorted(files) if captions[i]]
    counts = {"images_listed": len(files), "annotations": len(data["annotations"]),
              "images_without_captions": len(files) - len(images), "empty_captions": empty,
              "orphan_annotations": orphan}
    return images, counts


def load_image(path: str):
    """A fully decoded RGB PIL image, any size and aspect ratio (`BadImage` otherwise)."""
    from dalle_jax.data import imageio

    return imageio.load_rgb(path, min_side=1, aspect_range=(0.0, math.inf)).image


def image_problem(path: str) -> str | None:
    """None for a usable image file, else why it is skipped: ``"missing"`` or a
    `dalle_jax.data.imageio.BadImage` reason (``"corrupt"``, ...)."""
    from dalle_jax.data import imageio

    if not os.path.isfile(path):
        return "missing"
    try:
        load_image(path)
    except imageio.BadImage as e:
        return e.reason
    return None


def workers_for(n: int) -> int:
    """``n`` threads, or when 0 one per CPU (at most 32)."""
    return n if n > 0 else min(32, os.cpu_count() or 1)


def check_images(images: Sequence[CocoImage], image_dir: str, *, workers: int = 0,
                 progress: bool = True) -> tuple[list[CocoImage], list[dict[str, Any]]]:
    """``(usable images, skipped)``: each image decoded once (threads); ``skipped`` lists
    ``{"image_id", "file_name", "reason"}`` of the missing and undecodable ones."""
    paths = [os.path.join(image_dir, im.file_name) for im in images]
    with concurrent.futures.ThreadPoolExecutor(workers_for(workers)) as pool:
        reasons = list(logs.progress(len(paths), "checking images",
                                     iterable=pool.map(image_problem, paths), enabled=progress))
    usable = [im for im, r in zip(images, reasons) if r is None]
    skipped = [{"image_id": im.image_id, "file_name": im.file_name, "reason": r}
               for im, r in zip(images, reasons) if r is not None]
    return usable, skipped


def draw_captions(usable: Sequence[CocoImage], num: int, seed: int) -> list[dict[str, Any]]:
    """``num`` captions of distinct images: ``np.random.default_rng(seed)`` permutes the
    images (in the given order, sorted by id) and takes the first ``num``, then picks one
    caption of each in turn with the same generator. Entries: ``index`` (the caption's
    position, which fixes its sample indices), ``image_id``, ``file_name``, ``caption``,
    ``caption_choice`` (which of the image's captions)."""
    if num < 1:
        raise ValueError(f"num_captions must be >= 1, got {num}")
    if num > len(usable):
        raise ValueError(f"asked for {num} captions of distinct images but only "
                         f"{len(usable)} are usable")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(usable))[:num]
    out = []
    for i, k in enumerate(order):
        im = usable[int(k)]
        j = int(rng.integers(len(im.captions)))
        out.append({"index": i, "image_id": im.image_id, "file_name": im.file_name,
                    "caption": im.captions[j], "caption_choice": j})
    return out


def list_images(spec: str) -> list[str]:
    """Image paths of ``spec``: a folder (searched recursively for `IMAGE_EXTENSIONS`,
    sorted), a ``.txt`` file with one path per line, or a comma-separated list."""
    from dalle_jax.data.imageio import IMAGE_EXTENSIONS

    spec = str(spec).strip()
    if os.path.isdir(spec):
        out = []
        for d, _, names in os.walk(spec):
            out += [os.path.join(d, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        return sorted(out)
    if spec.endswith(".txt") and os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [p.strip() for p in spec.split(",") if p.strip()]
