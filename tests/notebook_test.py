"""The Colab notebook runs headlessly against exports written here, so it cannot rot."""

import dataclasses
import os
import shutil

import jax
import nbformat
import pytest
from nbclient import NotebookClient

from dalle_jax import configlib, exports, jobs
from dalle_jax.models import clip
from dalle_jax.train import clip_task

from train_transformer_test import _cfg, dvae_export, token_dir, tokenizer  # noqa: F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "sample.ipynb")


def _tiny_scorer_export(out: str, bpe_path: str) -> str:
    """A randomly initialised CLIP scorer export in the format `--job=train_clip` writes."""
    tok = clip_task.BpeClipTokenizer(bpe_path)
    config = clip.ClipConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=32,
                             vision_layers=1, vision_heads=2, vocab_size=tok.vocab_size,
                             context_length=8, text_width=32, text_layers=1, text_heads=2,
                             activation="gelu")
    meta = {"identity": {"kind": "clip", "model": dataclasses.asdict(config),
                         "tokenizer": tok.identity()}, "source": "trained", "step": 0}
    exports.write(out, clip.init_params(config, jax.random.key(0)), meta)
    os.makedirs(os.path.join(out, "tokenizer"))
    shutil.copyfile(bpe_path, os.path.join(out, "tokenizer", tok.identity()["file"]))
    return out


def _parameters_cell(nb) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return cells[0]


def test_sample_notebook_runs_end_to_end(token_dir, tokenizer, dvae_export, tmp_path):  # noqa: F811
    cfg = _cfg(token_dir, tokenizer)
    workdir = str(tmp_path / "run")
    jobs.train_transformer(cfg, workdir)
    jobs.export(cfg, workdir)  # bfloat16, as a user would download it into Colab
    transformer = jobs.latest_export(workdir) + "_bfloat16"
    scorer = _tiny_scorer_export(str(tmp_path / "scorer"), tokenizer.path)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = _parameters_cell(nb)
    # The notebook's own defaults must be the demo's paths (what a CPU runtime loads).
    def demo_steps(config):
        return configlib.load_config(os.path.join(ROOT, "configs", config)).total_steps

    assert (f"runs/demo/transformer/exports/step_{demo_steps('transformer_shapes.py'):07d}"
            in cell.source)
    assert f"runs/demo/clip/exports/step_{demo_steps('clip_shapes.py'):07d}" in cell.source
    cell.source = "\n".join([
        'REPO = ""',
        f"TRANSFORMER_EXPORT = {transformer!r}",
        f"DVAE_EXPORT = {dvae_export!r}",
        f"BPE_MODEL = {tokenizer.path!r}",
        f"SCORER_EXPORT = {scorer!r}",
        'PROMPTS = ["a red circle", "a blue square"]',
        "NUM_CANDIDATES = 4", "KEEP = 2", "TEMPERATURE = 1.0", "GUIDANCE = 1.0", "SEED = 0",
    ])
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "8 images drawn" in text and "scorer: trained" in text
    assert any("image/png" in o.get("data", {}) for o in outputs
               if o.get("output_type") == "display_data"), "the grid was not shown"


def test_notebook_parameters_are_documented_in_order():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = _parameters_cell(nb).source
    names = [line.split("=")[0].strip() for line in source.splitlines()
             if "=" in line and not line.startswith((" ", "#"))]
    assert names[:6] == ["REPO", "TRANSFORMER_EXPORT", "DVAE_EXPORT", "BPE_MODEL",
                         "SCORER_EXPORT", "PROMPTS"]
    with pytest.raises(StopIteration):  # the notebook has no stored outputs (kept small)
        next(o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
