"""Importing OpenAI's CLIP ViT weights into `dalle_jax.models.clip`.

The paper reranks its samples with a contrastive model; OpenAI's released CLIP is one such
model. This module reads a CLIP checkpoint from a local file, maps every tensor onto the
`CLIP` parameter tree, and writes a self-contained scorer export (parameters, model
config, tokenizer file) that `dalle_jax.rerank.scorer.ClipScorer.load` reads.

Accepted checkpoints (`load_state_dict`):

* OpenAI's release (``ViT-B-32.pt`` and the other ViT files): TorchScript archives, read
  with ``torch.jit.load``; their weights are float16 and are widened to float32;
* a ``torch.save``'d state dict with OpenAI's key names (``visual.conv1.weight``,
  ``transformer.resblocks.0.attn.in_proj_weight``, ...);
* a Hugging Face ``transformers`` CLIP checkpoint: a directory holding
  ``model.safetensors`` or ``pytorch_model.bin``, or one of those files
  (``vision_model.*`` / ``text_model.*`` keys, separate q/k/v projections).

`convert` infers the architecture from the tensor shapes as OpenAI's own loader does
(widths from the patch kernel and the final layer norm, depths from the block count, the
image size from the positional table, ``heads = width // 64``) and checks every key and
shape, so a checkpoint that does not fit fails with the names of what is missing,
unexpected or mis-shaped. OpenAI's ResNet image towers are a different architecture and
are refused.

torch is only needed to read ``.pt``/``.bin`` files and is imported when one is read
(it is a test extra, not a core dependency).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
import zipfile
from typing import Any

import numpy as np

from dalle_jax.models import clip

PyTree = Any

# Keys of OpenAI's TorchScript state dict that hold settings rather than weights.
_IGNORED = ("input_resolution", "context_length", "vocab_size")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
OPENAI_HEAD_DIM = 64


# ----------------------------------------------------------------------------- reading


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading a PyTorch CLIP checkpoint (.pt / .bin) needs torch: "
                          "pip install torch (the CPU build is enough), or install this "
                          "package's test extras (pip install -e '.[test]')") from e
    return torch


def _to_numpy(tensors: dict) -> dict[str, np.ndarray]:
    """torch tensors -> numpy (floating point widened to float32)."""
    out = {}
    for k, t in tensors.items():
        if hasattr(t, "detach"):
            t = t.detach().cpu()
            t = t.float() if t.is_floating_point() else t
            out[k] = t.numpy()
        elif isinstance(t, np.ndarray):
            out[k] = t.astype(np.float32) if np.issubdtype(t.dtype, np.floating) else t
        elif isinstance(t, (int, float)):
            out[k] = np.asarray(t)
        else:
            raise ValueError(f"checkpoint entry {k!r} is a {type(t).__name__}, not a tensor")
    return out


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip with ``constants.pkl`` and ``code/``; a plain
    ``torch.save`` zip has neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a CLIP checkpoint as float32 numpy arrays, keyed as the file keys them
    (OpenAI's names or Hugging Face's; `convert` takes either).

    Args:
        path: OpenAI's TorchScript ``.pt``, a ``torch.save``'d state dict, a Hugging Face
            ``model.safetensors`` / ``pytorch_model.bin``, or a directory holding one.
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"CLIP checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        for name in _HF_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return load_state_dict(os.path.join(path, name))
        raise FileNotFoundError(f"{path!r} is a directory without a Hugging Face CLIP "
                                f"checkpoint ({' or '.join(_HF_FILES)})")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError("reading a .safetensors checkpoint needs the safetensors "
                              "package: pip install safetensors") from e
        return _to_numpy(load_file(path))
    torch = _import_torch()
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch.jit is deprecated, but it is the format
            warnings.simplefilter("ignore", DeprecationWarning)
            state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(
                state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a CLIP state dict")
    return _to_numpy(dict(state))


def _hf_settings(path: str) -> dict:
    """Heads and activation from the ``config.json`` next to a Hugging Face checkpoint
    (empty when there is none)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        return {}
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "clip":
        return {}
    text, vision = cfg.get("text_config", {}), cfg.get("vision_config", {})
    out = {}
    if "num_attention_heads" in vision:
        out["vision_heads"] = int(vision["num_attention_heads"])
    if "num_attention_heads" in text:
        out["text_heads"] = int(text["num_attention_heads"])
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) == 1:
        out["activation"] = acts.pop()
    return out


# ----------------------------------------------------------------------------- key names


def _hf_to_openai(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face CLIP keys -> OpenAI's (q/k/v fused, projections transposed)."""
    out: dict[str, np.ndarray] = {}
    unexpected = []
    fixed = {
        "logit_scale": "logit_scale",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    }
    layer = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)")
    sub = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
           "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.T
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif key.endswith("position_ids"):
            continue  # a buffer of 0..n-1, not a weight
        elif m := layer.fullmatch(key):
            tower, i, rest = m.groups()
            prefix = ("visual." if tower == "vision" else "") + f"transformer.resblocks.{i}."
            name, _, kind = rest.rpartition(".")
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, kind), {})[name[len("self_attn.")]] = value
            elif name in sub:
                out[prefix + sub[name] + "." + kind] = value
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"the Hugging Face checkpoint lacks the "
                             f"{sorted({'q', 'k', 'v'} - set(parts))} projection {kind} of "
                             f"{prefix}")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[prefix + "attn." + name] = np.concatenate([parts["q"], parts["k"], parts["v"]], 0)
    if unexpected:
        raise ValueError(f"unexpected keys in the Hugging Face CLIP checkpoint: "
                         f"{_names(unexpected)}")
    return out


def _names(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _count_blocks(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if found and found != set(range(len(found))):
        raise ValueError(f"the {prefix or 'text '}tower's residual blocks are not numbered "
                         f"0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def _shape(sd: dict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"the CLIP checkpoint lacks {key!r} (missing keys cannot be "
                         "inferred)")
    return tuple(sd[key].shape)


def infer_config(sd: dict[str, np.ndarray], *, vision_heads: int | None = None,
                 text_heads: int | None = None, activation: str = "quick_gelu"
                 ) -> clip.ClipConfig:
    """The `ClipConfig` of an OpenAI-keyed ViT CLIP state dict, read from its shapes.

    Heads are not stored in the weights; OpenAI's models use 64-wide heads, so
    ``width // 64`` unless given.
    """
    if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in sd):
        raise ValueError("only ViT CLIP models are supported: this checkpoint's image tower "
                         "is a ResNet (visual.layer1..., visual.attnpool...)")
    if "visual.conv1.weight" not in sd:
        raise ValueError("not a ViT CLIP checkpoint: no visual.conv1.weight (the patch "
                         "embedding); only ViT CLIP models are supported")
    conv = _shape(sd, "visual.conv1.weight")  # (width, 3, patch, patch)
    if len(conv) != 4 or conv[1] != 3 or conv[2] != conv[3]:
        raise ValueError(f"visual.conv1.weight has shape {conv}, expected (width, 3, patch, "
                         "patch)")
    vision_width, patch = conv[0], conv[-1]
    n_pos = _shape(sd, "visual.positional_embedding")[0]
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid + 1 != n_pos:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows, not a square grid "
                         "plus the class token")
    text_width = _shape(sd, "ln_final.weight")[0]
    return clip.ClipConfig(
        embed_dim=_shape(sd, "text_projection")[1],
        image_size=grid * patch,
        patch_size=patch,
        vision_width=vision_width,
        vision_layers=_count_blocks(sd, "visual."),
        vision_heads=int(vision_heads or max(vision_width // OPENAI_HEAD_DIM, 1)),
        vocab_size=_shape(sd, "token_embedding.weight")[0],
        context_length=_shape(sd, "positional_embedding")[0],
        text_width=text_width,
        text_layers=_count_blocks(sd, ""),
        text_heads=int(text_heads or max(text_width // OPENAI_HEAD_DIM, 1)),
        activation=activation,
    )


# ----------------------------------------------------------------------------- conversion


def _block_params(get, prefix: str, width: int) -> dict:
    """One residual block: OpenAI's ``prefix.*`` tensors in the `CLIP` layout."""
    w_qkv = get(prefix + "attn.in_proj_weight", (3 * width, width))  # (3*out, in)
    b_qkv = get(prefix + "attn.in_proj_bias", (3 * width,))
    return {
        "ln_1": {"scale": get(prefix + "ln_1.weight", (width,)),
                 "bias": get(prefix + "ln_1.bias", (width,))},
        "ln_2": {"scale": get(prefix + "ln_2.weight", (width,)),
                 "bias": get(prefix + "ln_2.bias", (width,))},
        "attn_qkv_kernel": w_qkv.reshape(3, width, width).transpose(2, 0, 1),
        "attn_qkv_bias": b_qkv.reshape(3, width),
        "attn_out_kernel": get(prefix + "attn.out_proj.weight", (width, width)).T,
        "attn_out_bias": get(prefix + "attn.out_proj.bias", (width,)),
        "mlp_c_fc_kernel": get(prefix + "mlp.c_fc.weight", (4 * width, width)).T,
        "mlp_c_fc_bias": get(prefix + "mlp.c_fc.bias", (4 * width,)),
        "mlp_c_proj_kernel": get(prefix + "mlp.c_proj.weight", (width, 4 * width)).T,
        "mlp_c_proj_bias": get(prefix + "mlp.c_proj.bias", (width,)),
    }


def convert(state_dict: dict, *, vision_heads: int | None = None,
            text_heads: int | None = None, activation: str = "quick_gelu"
            ) -> tuple[clip.ClipConfig, PyTree]:
    """``(config, params)`` of a ViT CLIP state dict (OpenAI's or Hugging Face's keys).

    Every tensor must be used and every parameter found, with the shape the inferred
    config gives it; otherwise a ValueError names the offending keys.

    Args:
        state_dict: name -> array (numpy or torch).
        vision_heads, text_heads: attention heads, if not OpenAI's ``width // 64``.
        activation: the MLP activation (OpenAI's models: ``"quick_gelu"``).
    """
    sd = _to_numpy(dict(state_dict))
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        sd = _hf_to_openai(sd)
    for k in _IGNORED:
        sd.pop(k, None)
    config = infer_config(sd, vision_heads=vision_heads, text_heads=text_heads,
                          activation=activation)
    used: set[str] = set()
    missing: list[str] = []
    mis_shaped: list[str] = []

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in sd:
            missing.append(key)
            return np.zeros(shape, np.float32)
        used.add(key)
        value = np.asarray(sd[key], np.float32)
        if value.shape != tuple(shape):
            mis_shaped.append(f"{key} {value.shape} (expected {tuple(shape)})")
            return np.zeros(shape, np.float32)
        return value

    c = config
    dv, dt, e = c.vision_width, c.text_width, c.embed_dim
    p = c.patch_size
    visual = {
        "conv1": get("visual.conv1.weight", (dv, 3, p, p)).transpose(2, 3, 1, 0),
        "class_embedding": get("visual.class_embedding", (dv,)),
        "positional_embedding": get("visual.positional_embedding", (c.num_patches + 1, dv)),
        "ln_pre": {"scale": get("visual.ln_pre.weight", (dv,)),
                   "bias": get("visual.ln_pre.bias", (dv,))},
        "ln_post": {"scale": get("visual.ln_post.weight", (dv,)),
                    "bias": get("visual.ln_post.bias", (dv,))},
        "proj": get("visual.proj", (dv, e)),
    }
    for i in range(c.vision_layers):
        visual[f"resblocks_{i}"] = _block_params(get, f"visual.transformer.resblocks.{i}.", dv)
    text = {
        "token_embedding": get("token_embedding.weight", (c.vocab_size, dt)),
        "positional_embedding": get("positional_embedding", (c.context_length, dt)),
        "ln_final": {"scale": get("ln_final.weight", (dt,)),
                     "bias": get("ln_final.bias", (dt,))},
        "text_projection": get("text_projection", (dt, e)),
    }
    for i in range(c.text_layers):
        text[f"resblocks_{i}"] = _block_params(get, f"transformer.resblocks.{i}.", dt)
    params = {"visual": visual, "text": text,
              "logit_scale": get("logit_scale", ()).reshape(())}

    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if mis_shaped:
        problems.append(f"shape mismatches: {_names(mis_shaped)}")
    unexpected = set(sd) - used
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if problems:
        raise ValueError(f"the CLIP checkpoint does not fit a ViT CLIP of {c}: "
                         + "; ".join(problems))
    _check_tree(config, params)
    return config, params


def _check_tree(config: clip.ClipConfig, params: PyTree) -> None:
    """The converted tree must be exactly what `clip.init_params` makes."""
    import jax

    want = jax.tree_util.tree_flatten_with_path(clip.param_shapes(config))[0]
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    want_d = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in want}
    got_d = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in got}
    if want_d != got_d:
        diff = sorted(set(want_d.items()) ^ set(got_d.items()))
        raise AssertionError(f"converted CLIP parameters do not match the model's tree: "
                             f"{diff[:8]}")


# ----------------------------------------------------------------------------- export


def import_clip(checkpoint_path: str, merges_path: str, out_dir: str, *,
                vision_heads: int | None = None, text_heads: int | None = None) -> str:
    """Converts a CLIP checkpoint and its BPE merges file into a scorer export.

    ``out_dir`` receives the parameters and ``meta.json``
    (`dalle_jax.exports.write_scorer`; identity kind ``"clip"`` with the model config
    and the tokenizer's identity, ``source: "openai"``, the checkpoint's file name) and a
    copy of the merges file under ``out_dir/tokenizer/``, so the export needs nothing else
    to score. An existing non-empty ``out_dir`` is never overwritten.

    Heads and activation come from a Hugging Face checkpoint's ``config.json`` when there
    is one; otherwise OpenAI's conventions (``width // 64``, quick GELU) unless given.

    Returns:
        the export directory (absolute).
    """
    from dalle_jax import exports
    from dalle_jax.rerank import clip_tokenizer

    checkpoint_path, merges_path = str(checkpoint_path), str(merges_path)
    if not os.path.exists(checkpoint_path):
        raise FileNotFoundError(f"CLIP checkpoint {checkpoint_path!r} does not exist")
    if not os.path.isfile(merges_path):
        raise FileNotFoundError(f"CLIP BPE merges file {merges_path!r} does not exist")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"export directory {out_dir!r} exists and is not empty; "
                              "choose another")
    tokenizer = clip_tokenizer.ClipTokenizer(merges_path)
    settings = _hf_settings(checkpoint_path)
    if vision_heads is not None:
        settings["vision_heads"] = vision_heads
    if text_heads is not None:
        settings["text_heads"] = text_heads
    config, params = convert(load_state_dict(checkpoint_path), **settings)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the merges file {merges_path!r} gives {tokenizer.vocab_size} token "
                         f"ids but the checkpoint's text tower embeds {config.vocab_size}: "
                         "they do not belong together")
    ident = tokenizer.identity()
    meta = {"identity": {"kind": "clip", "model": dataclasses.asdict(config),
                         "tokenizer": ident},
            "source": "openai", "checkpoint": os.path.basename(checkpoint_path.rstrip("/"))}
    return exports.write_scorer(out_dir, params, meta, merges_path, ident["file"])
