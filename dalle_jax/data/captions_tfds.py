"""TFDS builder `captions`: real image–caption pairs written to array_record.

Each dataset is one `caption_sources.CaptionsConfig` whose `name` the user picks ("cc3m",
"yfcc_subset", ...), so several datasets share one `data_dir` as
`<data_dir>/captions/<name>/<version>/`. The sources (folders and webdataset shards), the
filters and the skip reasons are those of `dalle_jax.data.caption_sources`, which reads
and checks the examples; this module stores the kept ones and counts the rest. Nothing
aborts a preparation except a problem with the options or sources themselves. Every count
is in a report returned by `prepare_captions` and stored as `prepare_report.json` in the
dataset directory.

Stored features: `image` (JPEG, RGB uint8 when read back), `caption` (cleaned text, case
kept), `key` (source file path, or `<shard path>/<member key>`), `json` (the sidecar
metadata text, "" when there is none). `as_data_source()` returns text features as bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import tensorflow_datasets as tfds
import tqdm
from absl import logging
from etils import epath

from dalle_jax.data.caption_sources import (
    SKIP_REASONS,
    SPLITS,
    Candidate,
    CaptionsConfig,
    Outcome,
    Source,
    assign_split,
    build_example,
    iter_candidates,
    ordered_map,
    resolve_sources,
)

VERSION = "1.0.0"
REPORT_FILENAME = "prepare_report.json"

_LOGGED_SKIPS = 20  # first skipped examples logged one by one
_EXAMPLES_PER_REASON = 5  # first skipped examples kept in the report, per reason


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

    def record(self, split: str, o: Outcome) -> None:
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


@dataclasses.dataclass(eq=False)
class CaptionsBuilderConfig(tfds.core.BuilderConfig):
    """The TFDS config of one dataset: its name, plus the `CaptionsConfig` it is built from."""

    captions: CaptionsConfig | None = None


class Captions(tfds.core.GeneratorBasedBuilder):
    """Image–caption pairs from folders and webdataset shards (see the module docstring).

    Always pass a `CaptionsBuilderConfig` holding the dataset's `CaptionsConfig` (the
    builder has no predefined configs; `captions_builder` makes one). Read a prepared
    dataset with `as_data_source()`; `report` holds the counts of the last preparation
    made by this instance.
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
        c = getattr(self.builder_config, "captions", None)
        description = "Image-caption pairs."
        if c is not None:
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
        c = getattr(self.builder_config, "captions", None)
        if not isinstance(c, CaptionsConfig):
            raise ValueError(
                "the captions builder needs a CaptionsBuilderConfig holding a CaptionsConfig "
                "(use captions_builder)")
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
            for cand in iter_candidates(sources, self._tally.source_error):
                per_split[assign_split(cand.split_key, c.validation_fraction)] += 1
                bar.update()
        logging.info("captions/%s: candidates per split %s", c.name, per_split)
        if not any(per_split.values()):
            raise ValueError(f"sources {list(c.sources)!r} hold no image or caption files")
        return {s: self._generate_examples(s, sources) for s in SPLITS if per_split[s]}

    def _generate_examples(self, split: str, sources: list[Source]):
        c = self._config()
        counts = self._tally

        def fetch(cand: Candidate) -> tuple[Candidate, Any]:
            # Reading happens in this thread: tarfile objects are not thread-safe.
            try:
                return cand, cand.read()
            except Exception as e:  # noqa: BLE001 - counted as read_error
                return cand, e

        mine = (cand for cand in iter_candidates(sources, None)
                if assign_split(cand.split_key, c.validation_fraction) == split)
        outcomes = ordered_map(lambda item: build_example(item[0], item[1], c),
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


def _make_builder(data_dir: str | os.PathLike, config: CaptionsConfig,
                  num_workers: int | None) -> Captions:
    if not isinstance(config, CaptionsConfig):
        raise TypeError(f"expected a CaptionsConfig, got {type(config).__name__}")
    builder_config = CaptionsBuilderConfig(
        name=config.name,
        description="Image-caption pairs from folders and/or webdataset shards.",
        captions=config,
    )
    return Captions(config=builder_config, data_dir=os.fspath(data_dir),
                    file_format="array_record", num_workers=num_workers)


def _is_prepared(builder: Captions) -> bool:
    return (epath.Path(builder.data_dir) / "dataset_info.json").exists()


def _check_same_options(builder: Captions) -> None:
    """Raises ValueError when a prepared dataset of this name used other filters."""
    config = builder.builder_config.captions
    report = load_report(builder.data_dir_root, config.name, str(builder.version))
    if report is None:
        return
    wanted = json.loads(json.dumps(config.options()))
    stored = dict(report.get("options", {}))
    if stored.pop("sources", None) != wanted.pop("sources"):
        logging.info("captions/%s: sources differ from the prepared dataset's; reusing it",
                     config.name)
    if stored != wanted:
        diff = {k: (stored.get(k), wanted.get(k)) for k in wanted if stored.get(k) != wanted.get(k)}
        raise ValueError(
            f"captions/{config.name} at {builder.data_dir} was prepared with "
            f"other options (prepared, requested): {diff}; use another name, or "
            "prepare_captions(..., overwrite=True) to rebuild it")


def captions_builder(data_dir: str | os.PathLike, config: CaptionsConfig, *,
                     num_workers: int | None = None) -> Captions:
    """A `Captions` builder for dataset `config.name` under `<data_dir>/captions/<name>/`.

    Args:
        data_dir: TFDS data directory; several named datasets can share it.
        config: the dataset's name, sources and filter options.
        num_workers: decoding threads during preparation (default min(8, CPUs)).

    Returns:
        The builder; `download_and_prepare()` writes array_record files (prefer
        `prepare_captions`, which also returns the report), `as_data_source()` reads them.

    Raises:
        ValueError: sources that do not exist (checked only while the dataset is not
            prepared yet), or a prepared dataset of this name whose filter options differ.
    """
    builder = _make_builder(data_dir, config, num_workers)
    if _is_prepared(builder):
        _check_same_options(builder)
    else:
        resolve_sources(config.sources)
    return builder


def prepare_captions(data_dir: str | os.PathLike, config: CaptionsConfig, *,
                     num_workers: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Prepares dataset `config.name` (a no-op when it exists) and returns its report.

    Arguments are those of `captions_builder`; `overwrite=True` deletes and rebuilds an
    existing dataset of this name.

    Returns:
        The report also stored as `<data_dir>/captions/<name>/<version>/prepare_report.json`:
        `name`, `version`, `options`, `splits` and `total` (each with `candidates`, `kept`,
        `skipped` per reason, `converted` per source mode, `resized`, `reencoded`),
        `skipped_examples` (first paths per reason), `source_errors`, `seconds`; plus, in
        the returned dict only, `dataset_dir` and `reused` (True when nothing was built).
    """
    name = config.name
    if overwrite:
        builder = _make_builder(data_dir, config, num_workers)
        resolve_sources(config.sources)
    else:
        builder = captions_builder(data_dir, config, num_workers=num_workers)
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
