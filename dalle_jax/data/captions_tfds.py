"""TFDS builder `captions`: real image–caption pairs written to array_record.

Sources are folders (searched recursively; `a/b.jpg` is captioned by `a/b.txt`, with an
optional `a/b.json`) and img2dataset-style webdataset `.tar` shards (members `KEY.jpg`,
`KEY.txt`, optional `KEY.json`, grouped by KEY = member path up to the first dot of its
file name; image extensions jpg, jpeg, png, webp). Each dataset is one `CaptionsConfig`
whose `name` the user picks ("cc3m", "yfcc_subset", ...), so several datasets share one
`data_dir` as `<data_dir>/captions/<name>/<version>/`.

Filters follow the DALL·E data section: captions that are too short and images whose
aspect ratio lies outside [1/2, 2] are dropped, plus images with a tiny shorter side. The
paper's non-English filter (cld3) and its boilerplate-caption filter are not implemented.
Any bad example (unreadable, truncated or undecodable image, non-UTF-8 or empty caption,
missing partner file, unexpected error) is skipped and counted by reason; nothing aborts a
preparation except a problem with the options or sources themselves. Every count is in a
report returned by `prepare_captions` and stored as `prepare_report.json` in the dataset
directory.

Stored features: `image` (JPEG, RGB uint8 when read back), `caption` (cleaned text, case
kept), `key` (source file path, or `<shard path>/<member key>`), `json` (the sidecar
metadata text, "" when there is none). `as_data_source()` returns text features as bytes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import math
import os
import posixpath
import re
import tarfile
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
import tqdm
from absl import logging
from etils import epath

from dalle_jax.data import imageio

VERSION = "1.0.0"
SPLITS = ("train", "validation")
REPORT_FILENAME = "prepare_report.json"

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
# Config names become a directory and the `captions/<name>` id, so keep TFDS's alphabet.
_NAME_RE = re.compile(r"[A-Za-z0-9][\w.+-]*")
_LOGGED_SKIPS = 20  # first skipped examples logged one by one
_EXAMPLES_PER_REASON = 5  # first skipped examples kept in the report, per reason


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(eq=False)
class CaptionsConfig(tfds.core.BuilderConfig):
    """One real dataset: where its files are and how they are filtered.

    Attributes:
        sources: folder paths, `.tar` shard paths and/or glob patterns of shards (e.g.
            "/data/cc3m/*.tar"; "**" is recursive). Patterns ignore matched files that
            are not tar shards (img2dataset writes `.parquet` / `_stats.json` beside them).
        min_caption_chars: minimum caption length in characters after whitespace
            normalisation.
        aspect_range: inclusive (min, max) of width / height.
        min_side: minimum shorter side of the source image in pixels.
        max_short_side: if set, images are downscaled at preparation time so the shorter
            side is at most this (bounds storage); None keeps source resolution.
        validation_fraction: share of examples, chosen by a hash of their source-relative
            key, that go to "validation".
        jpeg_quality: quality of re-encoded JPEGs.
    """

    sources: tuple[str, ...] = ()
    min_caption_chars: int = DEFAULT_MIN_CAPTION_CHARS
    aspect_range: tuple[float, float] = DEFAULT_ASPECT_RANGE
    min_side: int = DEFAULT_MIN_SIDE
    max_short_side: int | None = None
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def __post_init__(self):
        _check_options(self)

    def options(self) -> dict[str, Any]:
        """The options as plain JSON values (what the report records)."""
        return {
            "sources": list(self.sources),
            "min_caption_chars": self.min_caption_chars,
            "aspect_range": list(self.aspect_range),
            "min_side": self.min_side,
            "max_short_side": self.max_short_side,
            "validation_fraction": self.validation_fraction,
            "jpeg_quality": self.jpeg_quality,
        }


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_options(c: CaptionsConfig) -> None:
    """Normalises option types in place and raises ValueError naming any bad option."""
    if not isinstance(c.name, str) or not _NAME_RE.fullmatch(c.name):
        raise ValueError(
            f"name={c.name!r} is not a valid dataset name: use letters, digits and _ . + - "
            "(for example 'cc3m')")
    sources = c.sources
    if isinstance(sources, (str, os.PathLike)):
        sources = (sources,)
    sources = tuple(os.fspath(s) for s in (sources or ()))
    if not sources or any(not s.strip() for s in sources):
        raise ValueError(
            f"sources={list(sources)!r}: give at least one folder, .tar shard or shard glob "
            "pattern, and no empty entries")
    c.sources = sources
    if not _is_int(c.min_caption_chars) or c.min_caption_chars < 0:
        raise ValueError(f"min_caption_chars={c.min_caption_chars!r} must be an int >= 0")
    try:
        lo, hi = (float(v) for v in c.aspect_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"aspect_range={c.aspect_range!r} must be a (min, max) pair of numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(
            f"aspect_range={c.aspect_range!r} needs 0 < min <= max (width / height)")
    c.aspect_range = (lo, hi)
    if not _is_int(c.min_side) or c.min_side < 0:
        raise ValueError(f"min_side={c.min_side!r} must be an int >= 0")
    if c.max_short_side is not None and (not _is_int(c.max_short_side) or c.max_short_side < 1):
        raise ValueError(f"max_short_side={c.max_short_side!r} must be None or an int >= 1")
    try:
        fraction = float(c.validation_fraction)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 <= fraction < 1.0:
        raise ValueError(
            f"validation_fraction={c.validation_fraction!r} must be in [0, 1)")
    c.validation_fraction = fraction
    if not _is_int(c.jpeg_quality) or not 1 <= c.jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={c.jpeg_quality!r} must be an int in [1, 100]")


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
class _Candidate:
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


def _iter_folder(root: str, on_error: _OnError | None) -> Iterator[_Candidate]:
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
                yield _Candidate(
                    key=path,
                    split_key=os.path.relpath(path, root).replace(os.sep, "/"),
                    where=path,
                    read=lambda a=image_path, b=txt_path, c=meta_path: _read_files(a, b, c),
                )


def _iter_tar(path: str, on_error: _OnError | None) -> Iterator[_Candidate]:
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
            yield _Candidate(
                key=f"{path}/{key}",
                split_key=f"{shard}/{key}",
                where=f"{path}:{(image or txt).name}",
                read=lambda a=image, b=txt, c=meta: read(a, b, c),
            )


def _iter_candidates(sources: Iterable[Source], on_error: _OnError | None) -> Iterator[_Candidate]:
    for s in sources:
        if s.kind == "folder":
            yield from _iter_folder(s.path, on_error)
        else:
            yield from _iter_tar(s.path, on_error)


# --------------------------------------------------------------------------- examples


@dataclasses.dataclass
class _Outcome:
    """Result of turning one candidate into a stored example (or a skip)."""

    candidate: _Candidate
    example: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""
    converted_from: str | None = None
    resized: bool = False
    reencoded: bool = False


def _build_example(candidate: _Candidate, raw: tuple | BaseException,
                   c: CaptionsConfig) -> _Outcome:
    """Checks and converts one candidate; runs in worker threads (pure, no shared state)."""
    out = _Outcome(candidate)
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


def _ordered_map(fn: Callable[[Any], Any], items: Iterator[Any], num_workers: int) -> Iterator[Any]:
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


# --------------------------------------------------------------------------- counting


def _empty_counts() -> dict[str, Any]:
    return {
        "candidates": 0,
        "kept": 0,
        "skipped": {r: 0 for r in SKIP_REASONS},
        "converted": {},
        "resized": 0,
        "reencoded": 0,
    }


def _add_counts(total: dict[str, Any], part: dict[str, Any]) -> None:
    for k in ("candidates", "kept", "resized", "reencoded"):
        total[k] += part[k]
    for r, n in part["skipped"].items():
        total["skipped"][r] = total["skipped"].get(r, 0) + n
    for m, n in part["converted"].items():
        total["converted"][m] = total["converted"].get(m, 0) + n


class _Tally:
    """Per-split counts plus the first few skipped paths; lives on the builder instance.

    TFDS runs non-Beam generators in this process, so counting from inside
    `_generate_examples` sees every example.
    """

    def __init__(self):
        self.splits = {s: _empty_counts() for s in SPLITS}
        self.skipped_examples: dict[str, list[str]] = {}
        self.source_errors: list[dict[str, str]] = []
        self._logged = 0

    def source_error(self, path: str, error: BaseException) -> None:
        self.source_errors.append({"path": path, "error": f"{type(error).__name__}: {error}"})
        logging.warning("captions: source problem in %s: %s", path, error)

    def record(self, split: str, o: _Outcome) -> None:
        counts = self.splits[split]
        counts["candidates"] += 1
        if o.example is None:
            counts["skipped"][o.reason] = counts["skipped"].get(o.reason, 0) + 1
            examples = self.skipped_examples.setdefault(o.reason, [])
            line = f"{o.candidate.where} ({o.detail})" if o.detail else o.candidate.where
            if len(examples) < _EXAMPLES_PER_REASON:
                examples.append(line)
            if self._logged < _LOGGED_SKIPS:
                self._logged += 1
                more = "; further skips are only counted" if self._logged == _LOGGED_SKIPS else ""
                logging.warning("captions: skipped [%s] %s%s", o.reason, line, more)
            return
        counts["kept"] += 1
        if o.converted_from is not None:
            conv = counts["converted"]
            conv[o.converted_from] = conv.get(o.converted_from, 0) + 1
        counts["resized"] += int(o.resized)
        counts["reencoded"] += int(o.reencoded)


# --------------------------------------------------------------------------- builder


class Captions(tfds.core.GeneratorBasedBuilder):
    """Image–caption pairs from folders and webdataset shards (see the module docstring).

    Always pass a `CaptionsConfig` (the builder has no predefined configs). Read a
    prepared dataset with `as_data_source()`; `report` holds the counts of the last
    preparation made by this instance.
    """

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {
        str(VERSION): "Folders and webdataset shards; JPEG images; splits by key hash.",
    }

    def __init__(self, *, num_workers: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.report: dict[str, Any] | None = None
        self._tally = _Tally()

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        description = "Image-caption pairs."
        if isinstance(c, CaptionsConfig):
            description = (
                f"Image-caption pairs '{c.name}': captions >= {c.min_caption_chars} chars, "
                f"aspect (w/h) in [{c.aspect_range[0]:g}, {c.aspect_range[1]:g}], shorter side "
                f">= {c.min_side} px, max short side {c.max_short_side}, validation fraction "
                f"{c.validation_fraction:g}.")
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "caption": tfds.features.Text(),
                "key": tfds.features.Text(),
                "json": tfds.features.Text(),
            }),
        )

    def _config(self) -> CaptionsConfig:
        c = self.builder_config
        if not isinstance(c, CaptionsConfig):
            raise ValueError("the captions builder needs a CaptionsConfig (use captions_builder)")
        return c

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing is downloaded
        c = self._config()
        sources = resolve_sources(c.sources)
        # A first listing pass (headers only, no decoding) finds which splits get any
        # candidate: TFDS cannot write a split that yields no example, so empty ones
        # (e.g. validation of a tiny dataset) are left out.
        per_split = dict.fromkeys(SPLITS, 0)
        with tqdm.tqdm(desc=f"Scanning sources of captions/{c.name}", unit=" examples",
                       disable=None) as bar:
            for cand in _iter_candidates(sources, self._tally.source_error):
                per_split[assign_split(cand.split_key, c.validation_fraction)] += 1
                bar.update()
        logging.info("captions/%s: candidates per split %s", c.name, per_split)
        if not any(per_split.values()):
            raise ValueError(f"sources {list(c.sources)!r} hold no image or caption files")
        return {s: self._generate_examples(s, sources) for s in SPLITS if per_split[s]}

    def _generate_examples(self, split: str, sources: list[Source]):
        c = self._config()
        counts = self._tally

        def fetch(cand: _Candidate) -> tuple[_Candidate, Any]:
            # Reading happens in this thread: tarfile objects are not thread-safe.
            try:
                return cand, cand.read()
            except Exception as e:  # noqa: BLE001 - counted as read_error
                return cand, e

        mine = (cand for cand in _iter_candidates(sources, None)
                if assign_split(cand.split_key, c.validation_fraction) == split)
        outcomes = _ordered_map(lambda item: _build_example(item[0], item[1], c),
                                map(fetch, mine), self.num_workers)
        for outcome in outcomes:
            counts.record(split, outcome)
            if outcome.example is not None:
                yield outcome.candidate.key, outcome.example

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        self._tally = _Tally()
        start = time.time()
        try:
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        except Exception as e:
            emptied = {s: v["skipped"] for s, v in self._tally.splits.items()
                       if v["candidates"] and not v["kept"]}
            if emptied:
                skipped = {s: {r: n for r, n in v.items() if n} for s, v in emptied.items()}
                raise ValueError(
                    f"captions/{self.builder_config.name}: every example of split(s) "
                    f"{sorted(emptied)} was skipped {skipped}; nothing to write. Check the "
                    "sources and filter options.") from e
            raise
        self.report = self._make_report(time.time() - start)
        # self.data_dir is still the temporary directory here, so the report is renamed
        # into place together with the dataset files.
        (epath.Path(self.data_dir) / REPORT_FILENAME).write_text(
            json.dumps(self.report, indent=2, sort_keys=True))
        _log_report(self.report)

    def _make_report(self, seconds: float) -> dict[str, Any]:
        c = self._config()
        total = _empty_counts()
        for s in SPLITS:
            _add_counts(total, self._tally.splits[s])
        return {
            "name": c.name,
            "version": str(self.version),
            "options": c.options(),
            "splits": self._tally.splits,
            "total": total,
            "skipped_examples": self._tally.skipped_examples,
            "source_errors": self._tally.source_errors,
            "seconds": round(seconds, 3),
        }


def _log_report(report: dict[str, Any]) -> None:
    t = report["total"]
    skipped = {r: n for r, n in t["skipped"].items() if n}
    logging.info(
        "captions/%s: kept %d of %d (%s); skipped %s; converted %s; resized %d; re-encoded %d",
        report["name"], t["kept"], t["candidates"],
        ", ".join(f"{s} {v['kept']}" for s, v in report["splits"].items()),
        skipped or "none", t["converted"] or "none", t["resized"], t["reencoded"])
    if report.get("source_errors"):
        logging.warning("captions/%s: %d source problems, first: %s", report["name"],
                        len(report["source_errors"]), report["source_errors"][0])


# --------------------------------------------------------------------------- public API


def _dataset_dir(data_dir: str | os.PathLike, name: str, version: str = VERSION) -> epath.Path:
    return epath.Path(os.fspath(data_dir)) / "captions" / name / version


def load_report(data_dir: str | os.PathLike, name: str, version: str = VERSION
                ) -> dict[str, Any] | None:
    """The stored preparation report of dataset `name`, or None if there is none."""
    path = _dataset_dir(data_dir, name, version) / REPORT_FILENAME
    return json.loads(path.read_text()) if path.exists() else None


def open_captions(data_dir: str | os.PathLike, name: str, version: str = VERSION
                  ) -> tfds.core.DatasetBuilder:
    """A read-only builder of a prepared dataset; needs neither the sources nor options."""
    path = _dataset_dir(data_dir, name, version)
    if not (path / "dataset_info.json").exists():
        raise FileNotFoundError(f"no prepared captions dataset {name!r} at {path}")
    return tfds.builder_from_directory(os.fspath(path))


def _make_builder(data_dir: str | os.PathLike, *, name: str, sources: Sequence[str] | str,
                  min_caption_chars: int, aspect_range: tuple[float, float], min_side: int,
                  max_short_side: int | None, validation_fraction: float, jpeg_quality: int,
                  num_workers: int | None) -> Captions:
    config = CaptionsConfig(
        name=name,
        description="Image-caption pairs from folders and/or webdataset shards.",
        sources=sources,
        min_caption_chars=min_caption_chars,
        aspect_range=aspect_range,
        min_side=min_side,
        max_short_side=max_short_side,
        validation_fraction=validation_fraction,
        jpeg_quality=jpeg_quality,
    )
    return Captions(config=config, data_dir=os.fspath(data_dir), file_format="array_record",
                    num_workers=num_workers)


def _is_prepared(builder: Captions) -> bool:
    return (epath.Path(builder.data_dir) / "dataset_info.json").exists()


def _check_same_options(builder: Captions) -> None:
    """Raises ValueError when a prepared dataset of this name used other filters."""
    report = load_report(builder.data_dir_root, builder.builder_config.name, str(builder.version))
    if report is None:
        return
    wanted = json.loads(json.dumps(builder.builder_config.options()))
    stored = dict(report.get("options", {}))
    if stored.pop("sources", None) != wanted.pop("sources"):
        logging.info("captions/%s: sources differ from the prepared dataset's; reusing it",
                     builder.builder_config.name)
    if stored != wanted:
        diff = {k: (stored.get(k), wanted.get(k)) for k in wanted if stored.get(k) != wanted.get(k)}
        raise ValueError(
            f"captions/{builder.builder_config.name} at {builder.data_dir} was prepared with "
            f"other options (prepared, requested): {diff}; use another name, or "
            "prepare_captions(..., overwrite=True) to rebuild it")


def captions_builder(
    data_dir: str | os.PathLike,
    *,
    name: str,
    sources: Sequence[str] | str,
    min_caption_chars: int = DEFAULT_MIN_CAPTION_CHARS,
    aspect_range: tuple[float, float] = DEFAULT_ASPECT_RANGE,
    min_side: int = DEFAULT_MIN_SIDE,
    max_short_side: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    num_workers: int | None = None,
) -> Captions:
    """A `Captions` builder for dataset `name` under `<data_dir>/captions/<name>/`.

    Args:
        data_dir: TFDS data directory; several named datasets can share it.
        name: dataset (config) name chosen by the user, e.g. "cc3m".
        sources: folders, `.tar` shards and/or shard glob patterns.
        min_caption_chars: minimum caption length after whitespace normalisation
            (default 3; the paper only says "too short").
        aspect_range: inclusive width / height range (default [1/2, 2], as in the paper).
        min_side: minimum shorter image side in pixels (default 64).
        max_short_side: downscale so the shorter side is at most this (default: keep).
        validation_fraction: share of examples hashed into "validation" (default 0.01).
        jpeg_quality: quality of re-encoded JPEGs (default 95).
        num_workers: decoding threads during preparation (default min(8, CPUs)).

    Returns:
        The builder; `download_and_prepare()` writes array_record files (prefer
        `prepare_captions`, which also returns the report), `as_data_source()` reads them.

    Raises:
        ValueError: an invalid option; sources that do not exist (checked only while the
            dataset is not prepared yet); or a prepared dataset of this name whose filter
            options differ.
    """
    builder = _make_builder(
        data_dir, name=name, sources=sources, min_caption_chars=min_caption_chars,
        aspect_range=aspect_range, min_side=min_side, max_short_side=max_short_side,
        validation_fraction=validation_fraction, jpeg_quality=jpeg_quality,
        num_workers=num_workers)
    if _is_prepared(builder):
        _check_same_options(builder)
    else:
        resolve_sources(builder.builder_config.sources)
    return builder


def prepare_captions(
    data_dir: str | os.PathLike,
    *,
    name: str,
    sources: Sequence[str] | str,
    min_caption_chars: int = DEFAULT_MIN_CAPTION_CHARS,
    aspect_range: tuple[float, float] = DEFAULT_ASPECT_RANGE,
    min_side: int = DEFAULT_MIN_SIDE,
    max_short_side: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    num_workers: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepares dataset `name` (a no-op when it exists) and returns its report.

    Arguments are those of `captions_builder`; `overwrite=True` deletes and rebuilds an
    existing dataset of this name.

    Returns:
        The report also stored as `<data_dir>/captions/<name>/<version>/prepare_report.json`:
        `name`, `version`, `options`, `splits` and `total` (each with `candidates`, `kept`,
        `skipped` per reason, `converted` per source mode, `resized`, `reencoded`),
        `skipped_examples` (first paths per reason), `source_errors`, `seconds`; plus, in
        the returned dict only, `dataset_dir` and `reused` (True when nothing was built).
    """
    kwargs = dict(
        name=name, sources=sources, min_caption_chars=min_caption_chars,
        aspect_range=aspect_range, min_side=min_side, max_short_side=max_short_side,
        validation_fraction=validation_fraction, jpeg_quality=jpeg_quality,
        num_workers=num_workers)
    if overwrite:
        builder = _make_builder(data_dir, **kwargs)
        resolve_sources(builder.builder_config.sources)
    else:
        builder = captions_builder(data_dir, **kwargs)
    if _is_prepared(builder) and not overwrite:
        report = load_report(data_dir, name, str(builder.version))
        if report is None:  # prepared by direct download_and_prepare of an older run
            splits = {s: {"kept": v.num_examples} for s, v in builder.info.splits.items()}
            report = {"name": name, "version": str(builder.version), "splits": splits}
        logging.info("captions/%s: already prepared at %s", name, builder.data_dir)
        return {**report, "dataset_dir": builder.data_dir, "reused": True}
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return {**builder.report, "dataset_dir": builder.data_dir, "reused": False}
