"""Reading image-caption sources: folders and webdataset shards (no TFDS).

Sources are folders (searched recursively; `a/b.jpg` is captioned by `a/b.txt`, with an
optional `a/b.json`) and img2dataset-style webdataset `.tar` shards (members `KEY.jpg`,
`KEY.txt`, optional `KEY.json`, grouped by KEY = member path up to the first dot of its
file name; image extensions jpg, jpeg, png, webp).

Filters follow the DALL·E data section: captions that are too short and images whose
aspect ratio lies outside [1/2, 2] are dropped, plus images with a tiny shorter side. The
paper's non-English filter (cld3) and its boilerplate-caption filter are not implemented.
Any bad example (unreadable, truncated or undecodable image, non-UTF-8 or empty caption,
missing partner file, unexpected error) becomes an `Outcome` with a skip reason from
`SKIP_REASONS` instead of an exception, so a caller can count it and carry on.

`CaptionsConfig` holds one dataset's name, sources and filter options;
`iter_candidates` lists the examples-to-be of resolved sources, `assign_split` puts each
in "train" or "validation", and `build_example` checks and converts one. The TFDS
builder that stores the results is `dalle_jax.data.captions_tfds`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import math
import os
import posixpath
import re
import tarfile
from typing import Any, Callable, Iterable, Iterator, Sequence

from dalle_jax import configlib
from dalle_jax.data import imageio

SPLITS = ("train", "validation")

# The paper filters "captions that are too short" without giving a length; 3 characters
# only removes captions that cannot describe anything ("a", "ok"). Raise it for web data.
DEFAULT_MIN_CAPTION_CHARS = 3
# Images with a shorter side under 64 px would be blown up 4x for 256x256 training crops.
DEFAULT_MIN_SIDE = 64
DEFAULT_ASPECT_RANGE = (0.5, 2.0)
DEFAULT_VALIDATION_FRACTION = 0.01
DEFAULT_JPEG_QUALITY = 95

# Why an example was skipped, in the order the checks run (the first failing check wins).
SKIP_REASONS = (
    "read_error",
    "image_missing",
    "caption_missing",
    "caption_not_utf8",
    "caption_empty",
    "caption_too_short",
    "image_corrupt",
    "image_too_large",
    "image_too_small",
    "image_aspect",
    "image_unsupported_mode",
    "error",
)

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = re.compile(r"[*?\[]")
# Dataset names become a directory and the `captions/<name>` TFDS id, so keep TFDS's
# alphabet.
_NAME_RE = re.compile(r"[A-Za-z0-9][\w.+-]*")


# --------------------------------------------------------------------------- config


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptionsConfig:
    """One real dataset: its name, where its files are and how they are filtered.

    Construction checks every field and normalises its type (a single source string
    becomes a 1-tuple, numbers become floats where floats are meant); a bad value raises
    ValueError naming the field.

    Attributes:
        name: dataset name chosen by the user ("cc3m", "yfcc_subset", ...): letters,
            digits and _ . + -. Several datasets share one data directory by name.
        sources: folder paths, `.tar` shard paths and/or glob patterns of shards (e.g.
            "/data/cc3m/*.tar"; "**" is recursive). Patterns ignore matched files that
            are not tar shards (img2dataset writes `.parquet` / `_stats.json` beside them).
        min_caption_chars: minimum caption length in characters after whitespace
            normalisation (default 3; the paper only says "too short").
        aspect_range: inclusive (min, max) of width / height (default [1/2, 2], as in
            the paper).
        min_side: minimum shorter side of the source image in pixels (default 64).
        max_short_side: if set, images are downscaled at preparation time so the shorter
            side is at most this (bounds storage); None keeps source resolution.
        validation_fraction: share of examples, chosen by a hash of their source-relative
            key, that go to "validation" (default 0.01).
        jpeg_quality: quality of re-encoded JPEGs (default 95).
    """

    name: str
    sources: tuple[str, ...]
    min_caption_chars: int = DEFAULT_MIN_CAPTION_CHARS
    aspect_range: tuple[float, float] = DEFAULT_ASPECT_RANGE
    min_side: int = DEFAULT_MIN_SIDE
    max_short_side: int | None = None
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def __post_init__(self):
        def store(field: str, value: Any) -> None:
            object.__setattr__(self, field, value)

        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"name={self.name!r} is not a valid dataset name: use letters, digits and "
                "_ . + - (for example 'cc3m')")
        sources = self.sources
        if isinstance(sources, (str, os.PathLike)):
            sources = (sources,)
        sources = tuple(os.fspath(s) for s in (sources or ()))
        if not sources or any(not s.strip() for s in sources):
            raise ValueError(
                f"sources={list(sources)!r}: give at least one folder, .tar shard or shard "
                "glob pattern, and no empty entries")
        store("sources", sources)
        if not _is_int(self.min_caption_chars) or self.min_caption_chars < 0:
            raise ValueError(f"min_caption_chars={self.min_caption_chars!r} must be an int >= 0")
        try:
            lo, hi = (float(v) for v in self.aspect_range)
        except (TypeError, ValueError):
            raise ValueError(
                f"aspect_range={self.aspect_range!r} must be a (min, max) pair of numbers"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(
                f"aspect_range={self.aspect_range!r} needs 0 < min <= max (width / height)")
        store("aspect_range", (lo, hi))
        if not _is_int(self.min_side) or self.min_side < 0:
            raise ValueError(f"min_side={self.min_side!r} must be an int >= 0")
        if self.max_short_side is not None and (
                not _is_int(self.max_short_side) or self.max_short_side < 1):
            raise ValueError(
                f"max_short_side={self.max_short_side!r} must be None or an int >= 1")
        try:
            fraction = float(self.validation_fraction)
        except (TypeError, ValueError):
            fraction = math.nan
        if not 0.0 <= fraction < 1.0:
            raise ValueError(
                f"validation_fraction={self.validation_fraction!r} must be in [0, 1)")
        store("validation_fraction", fraction)
        if not _is_int(self.jpeg_quality) or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality!r} must be an int in [1, 100]")

    @classmethod
    def from_config(cls, c: Any) -> "CaptionsConfig":
        """From a config's ``data.captions`` section (``configs/common.py:captions_source``).

        There ``sources`` is one comma-separated string (so it can be given on the
        command line), the aspect range is ``min_aspect`` / ``max_aspect``, and
        ``max_short_side=0`` keeps the source resolution. The JPEG quality keeps its
        default.

        Raises:
            ValueError: an empty name, or naming the field that fails the checks above.
        """
        if not c.name:
            raise ValueError("data.captions.name is empty: name the dataset (e.g. :name=cc3m)")
        sources = tuple(configlib.comma_list(c.sources))
        try:
            return cls(
                name=c.name,
                sources=sources,
                min_caption_chars=int(c.min_caption_chars),
                aspect_range=(float(c.min_aspect), float(c.max_aspect)),
                min_side=int(c.min_side),
                max_short_side=int(c.max_short_side) or None,
                validation_fraction=float(c.validation_fraction),
            )
        except ValueError as e:
            raise ValueError(f"data.captions: {e}") from None

    def options(self) -> dict[str, Any]:
        """The options as plain JSON values, without the name (what a report records)."""
        return {
            "sources": list(self.sources),
            "min_caption_chars": self.min_caption_chars,
            "aspect_range": list(self.aspect_range),
            "min_side": self.min_side,
            "max_short_side": self.max_short_side,
            "validation_fraction": self.validation_fraction,
            "jpeg_quality": self.jpeg_quality,
        }


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
    """One resolved source: kind "folder" or "tar", and an absolute path."""

    kind: str
    path: str


def resolve_sources(sources: Sequence[str]) -> list[Source]:
    """Expands shard patterns and checks that every source exists.

    Shards matched more than once are kept once. Folders must not contain one another,
    since their files would then be read twice.

    Raises:
        ValueError: naming a source that does not exist, a pattern that matches no shard,
            a file that is not a tar shard, or two nested folders.
    """
    folders: list[str] = []
    tars: list[str] = []
    for s in sources:
        expanded = os.path.expanduser(os.fspath(s))
        if _GLOB_CHARS.search(expanded):
            matches = sorted(
                m for m in glob.glob(expanded, recursive=True)
                if os.path.isfile(m) and m.lower().endswith(_TAR_SUFFIXES))
            if not matches:
                raise ValueError(f"source pattern {s!r} matches no .tar shard")
            tars.extend(matches)
        elif os.path.isdir(expanded):
            folders.append(expanded)
        elif os.path.isfile(expanded):
            if not expanded.lower().endswith(_TAR_SUFFIXES):
                raise ValueError(
                    f"source {s!r} is a file but not a tar shard (.tar, .tar.gz, .tgz); "
                    "give its folder instead")
            tars.append(expanded)
        else:
            raise ValueError(f"source path {s!r} does not exist")

    out: list[Source] = []
    seen: dict[str, str] = {}
    for path in folders:
        real = os.path.realpath(path)
        if real in seen:
            continue
        for other_real, other in seen.items():
            if os.path.commonpath([real, other_real]) in (real, other_real):
                raise ValueError(f"source folders {other!r} and {path!r} overlap (one contains "
                                 "the other); give only one of them")
        seen[real] = path
        out.append(Source("folder", os.path.abspath(path)))
    seen_tars = set()
    for path in tars:
        real = os.path.realpath(path)
        if real not in seen_tars:
            seen_tars.add(real)
            out.append(Source("tar", os.path.abspath(path)))
    return out


def assign_split(split_key: str, validation_fraction: float) -> str:
    """The split ("train" or "validation") of a source-relative example key; stable.

    The first 8 bytes of a BLAKE2b digest of the key, read as a fraction of 2**64, are
    compared with `validation_fraction`; keys do not depend on where the data lives.
    """
    digest = hashlib.blake2b(split_key.encode("utf-8"), digest_size=8).digest()
    if int.from_bytes(digest, "big") < validation_fraction * 2.0**64:
        return "validation"
    return "train"


@dataclasses.dataclass
class Candidate:
    """One example-to-be; `read` returns (image, caption, json) bytes, None if absent."""

    key: str  # stored `key` feature and TFDS example key (unique)
    split_key: str  # source-relative key hashed by `assign_split`
    where: str  # for log lines
    read: Callable[[], tuple[bytes | None, bytes | None, bytes | None]]


_OnError = Callable[[str, BaseException], None]


def _read_files(*paths: str | None) -> tuple[bytes | None, ...]:
    out = []
    for p in paths:
        if p is None:
            out.append(None)
        else:
            with open(p, "rb") as f:
                out.append(f.read())
    return tuple(out)


def _iter_folder(root: str, on_error: _OnError | None) -> Iterator[Candidate]:
    """Candidates of one folder, in sorted walk order.

    Dot-files and dot-directories are ignored (for instance macOS `._x.jpg` forks), and
    symlinked directories are not followed. A caption without any image is a candidate
    that is then skipped as "image_missing".
    """
    def walk_error(e: OSError) -> None:
        if on_error is not None:
            on_error(getattr(e, "filename", None) or root, e)

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        groups: dict[str, dict[str, Any]] = {}
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            stem, ext = os.path.splitext(fn)
            ext = ext.lower()
            if ext in imageio.IMAGE_EXTENSIONS:
                groups.setdefault(stem, {}).setdefault("images", []).append(fn)
            elif ext in (".txt", ".json"):
                groups.setdefault(stem, {}).setdefault(ext, fn)
        for g in groups.values():
            txt, meta = g.get(".txt"), g.get(".json")
            txt_path = os.path.join(dirpath, txt) if txt else None
            meta_path = os.path.join(dirpath, meta) if meta else None
            images = g.get("images") or ([None] if txt else [])
            for image in images:
                path = os.path.join(dirpath, image if image else txt)
                image_path = path if image else None
                yield Candidate(
                    key=path,
                    split_key=os.path.relpath(path, root).replace(os.sep, "/"),
                    where=path,
                    read=lambda a=image_path, b=txt_path, c=meta_path: _read_files(a, b, c),
                )


def _iter_tar(path: str, on_error: _OnError | None) -> Iterator[Candidate]:
    """Candidates of one webdataset shard, in member order.

    A shard that cannot be opened yields nothing; one that breaks part-way yields the
    members listed before the break. Both are reported through `on_error`.
    """
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        if on_error is not None:
            on_error(path, e)
        return
    with tf:
        try:
            tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            if on_error is not None:
                on_error(path, e)
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in list(tf.members):
            if not m.isfile():
                continue
            dirname, base = posixpath.split(m.name)
            if base.startswith("."):
                continue
            stem, _, ext = base.partition(".")
            groups.setdefault(posixpath.join(dirname, stem), {}).setdefault(ext.lower(), m)

        def read(*members: tarfile.TarInfo | None) -> tuple[bytes | None, ...]:
            out = []
            for m in members:
                f = tf.extractfile(m) if m is not None else None
                out.append(f.read() if f is not None else None)
            return tuple(out)

        shard = os.path.basename(path)
        for key, g in groups.items():
            image = next((g[e[1:]] for e in imageio.IMAGE_EXTENSIONS if e[1:] in g), None)
            txt, meta = g.get("txt"), g.get("json")
            if image is None and txt is None:
                continue
            yield Candidate(
                key=f"{path}/{key}",
                split_key=f"{shard}/{key}",
                where=f"{path}:{(image or txt).name}",
                read=lambda a=image, b=txt, c=meta: read(a, b, c),
            )


def iter_candidates(sources: Iterable[Source], on_error: _OnError | None) -> Iterator[Candidate]:
    """Candidates of `resolve_sources` results, source by source, in a stable order.

    Problems with a source itself (an unreadable folder, a broken shard) go to
    `on_error(path, exception)` when given, and reading carries on. A tar candidate's
    `read` must be called before the iteration moves past its shard, in the iterating
    thread: tarfile objects are not thread-safe.
    """
    for s in sources:
        if s.kind == "folder":
            yield from _iter_folder(s.path, on_error)
        else:
            yield from _iter_tar(s.path, on_error)


# --------------------------------------------------------------------------- examples


@dataclasses.dataclass
class Outcome:
    """Result of turning one candidate into a stored example, or a skip whose `reason` is
    one of `SKIP_REASONS`."""

    candidate: Candidate
    example: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""
    converted_from: str | None = None
    resized: bool = False
    reencoded: bool = False


def build_example(candidate: Candidate, raw: tuple | BaseException,
                  c: CaptionsConfig) -> Outcome:
    """Checks and converts one candidate; runs in worker threads (pure, no shared state)."""
    out = Outcome(candidate)
    try:
        if isinstance(raw, BaseException):
            out.reason, out.detail = "read_error", f"{type(raw).__name__}: {raw}"
            return out
        image_bytes, caption_bytes, meta_bytes = raw
        if image_bytes is None:
            out.reason = "image_missing"
            return out
        if caption_bytes is None:
            out.reason = "caption_missing"
            return out
        try:
            caption = imageio.read_caption(caption_bytes, min_chars=c.min_caption_chars)
        except imageio.BadCaption as e:
            out.reason, out.detail = f"caption_{e.reason}", str(e)
            return out
        try:
            loaded = imageio.load_rgb(
                image_bytes, min_side=c.min_side, aspect_range=c.aspect_range,
                max_short_side=c.max_short_side)
        except imageio.BadImage as e:
            out.reason, out.detail = f"image_{e.reason}", str(e)
            return out
        # A clean RGB JPEG is stored byte for byte: re-encoding would only add loss.
        if loaded.source_format == "JPEG" and loaded.pixels_unchanged:
            stored = image_bytes
        else:
            stored = imageio.encode_jpeg(loaded.image, quality=c.jpeg_quality)
            out.reencoded = True
        # Sidecar metadata is informational, so undecodable bytes are replaced, not fatal.
        meta = meta_bytes.decode("utf-8", errors="replace") if meta_bytes is not None else ""
        out.example = {"image": stored, "caption": caption, "key": candidate.key, "json": meta}
        out.converted_from, out.resized = loaded.converted_from, loaded.resized
    except Exception as e:  # noqa: BLE001 - one bad example must not stop the preparation
        out.example, out.reason, out.detail = None, "error", f"{type(e).__name__}: {e}"
    return out


def ordered_map(fn: Callable[[Any], Any], items: Iterator[Any], num_workers: int) -> Iterator[Any]:
    """`map(fn, items)` on a thread pool, in order, with a bounded number in flight.

    PIL releases the GIL while decoding, resizing and encoding, so threads scale.
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
