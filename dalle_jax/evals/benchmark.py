"""The `shapes` quality table: ``--job=evaluate`` results of several training seeds, in one
Markdown table and one JSON file.

``launch/benchmark_shapes.sh`` trains what is missing, runs ``--job=evaluate`` on the
dVAE and on each seed's transformer, then calls::

    python -m dalle_jax.evals.benchmark OUT_PREFIX DVAE_RESULTS SEED=RESULTS...

with the ``results.json`` files those jobs wrote (``SEED=`` names each column; ``-``
for DVAE_RESULTS leaves the dVAE rows out). ``OUT_PREFIX.md`` and
``OUT_PREFIX.json`` get one row per measurement and one column per seed plus their mean.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

SPLITS = (("validation", "in-distribution objects"),
          ("test_compositional", "held-out objects"))
CAPTION_ENTRIES = (("best_of_1", "caption match, single samples"),
                   ("reranked", "caption match, best of N reranked by the scorer"),
                   ("guided", "caption match, single guided samples"),
                   ("dvae_reconstruction", "caption match, dVAE reconstructions (ceiling)"))


def _rows(dvae: dict[str, Any], seeds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"what", "unit", "values": [per seed], "higher_is_better"}]``."""
    rows = []

    def add(what: str, unit: str, key: str, src: Sequence[dict[str, Any]], scale: float = 1.0,
            higher: bool = True) -> None:
        vals = [r["metrics"].get(key) for r in src]
        if any(v is not None for v in vals):
            rows.append({"what": what, "unit": unit, "key": key, "higher_is_better": higher,
                         "values": [None if v is None else float(v) * scale for v in vals]})

    if dvae:  # one dVAE under every seed's transformer: the same value in each column
        same = [dvae] * len(seeds)
        add("dVAE reconstruction PSNR (validation; one dVAE for all seeds)", "dB", "psnr", same)
        add("dVAE codebook usage (validation; one dVAE for all seeds)", "%", "codebook_usage",
            same, 100.0)
    add("stage-2 validation loss (image tokens)", "nats", "loss_image", seeds, higher=False)
    add("stage-2 validation loss (text tokens)", "nats", "loss_text", seeds, higher=False)
    for split, split_name in SPLITS:
        for entry, what in CAPTION_ENTRIES:
            add(f"{what}: {split_name}", "%", f"caption_match/{split}/{entry}", seeds, 100.0)
    keys = sorted({k for r in seeds for k in r["metrics"] if k.startswith("shapes_fid/")})
    for key in keys:
        _, split, *rest = key.split("/")
        features = rest[-1]
        label = ("Inception features" if features == "inception"
                 else "features of the scorer trained here, not Inception")
        what = ("FID, dVAE reconstructions vs real" if rest[0] == "dvae_reconstruction"
                else "FID, single samples vs real")
        add(f"{what} ({split}; {label})", "", key, seeds, higher=False)
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "%":
        return f"{v:.1f}%"
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.4f}"


def table(dvae: dict[str, Any], seeds: Sequence[dict[str, Any]],
          seed_names: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``(markdown, record)`` of the results (see the module doc)."""
    if len(seeds) != len(seed_names):
        raise ValueError(f"{len(seeds)} seed results but {len(seed_names)} seed names")
    if not seeds:
        raise ValueError("the table needs the results of at least one seed")
    rows = _rows(dvae, seeds)
    header = ["measurement"] + [f"seed {s}" for s in seed_names]
    if len(seeds) > 1:
        header.append("mean")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        vals = r["values"]
        cells = [_fmt(v, r["unit"]) for v in vals]
        if len(seeds) > 1:
            r["mean"] = _mean(vals)
            cells.append(f"**{_fmt(r['mean'], r['unit'])}**")
        unit = f" ({r['unit']})" if r["unit"] not in ("", "%") else ""
        lines.append("| " + " | ".join([r["what"] + unit] + cells) + " |")
    notes = []
    for r in seeds[:1]:
        settings = r.get("settings", {}).get("evals", {})
        cm = next((v for v in settings.values() if v.get("type") == "caption_match"), None)
        if cm:
            rg = float(cm.get("rerank_guidance", 1.0))
            drawn = "unguided" if rg == 1.0 else f"drawn with guidance scale {rg:g}"
            notes.append(f"Caption match: the first {cm.get('captions')} captions of each split, "
                         f"temperature {cm.get('temperature')}, best of {cm.get('rerank')} "
                         f"reranked (candidates {drawn}), guidance scale "
                         f"{cm.get('guidance')} for single guided samples.")
        fd = next((v for v in settings.values() if v.get("type") == "shapes_fid"), None)
        if fd:
            notes.append(f"FID: {fd.get('num_images')} images of {fd.get('split')}.")
    skipped = {k: v for r in seeds for k, v in r.get("skipped", {}).items()}
    for name, why in sorted(skipped.items()):
        notes.append(f"Not measured: evals.{name} ({why}).")
    md = "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"
    record = {"seeds": list(seed_names), "rows": rows, "notes": notes,
              "sources": {"dvae": dvae.get("export"),
                          "transformers": [r.get("export") for r in seeds]}}
    return md, record


def _read(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    out, dvae_path, *seed_paths = argv
    dvae = _read(dvae_path) if dvae_path not in ("", "-") else {}
    seeds = [_read(p.split("=", 1)[1] if "=" in p else p) for p in seed_paths]
    names = [p.split("=", 1)[0] if "=" in p else str(i) for i, p in enumerate(seed_paths)]
    md, record = table(dvae, seeds, names)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(md)
    with open(out + ".json", "w") as f:
        json.dump(record, f, indent=2)
    print(md)
    print(f"written: {out}.md, {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
