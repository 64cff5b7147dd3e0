"""Import of OpenAI's released dVAE weights into a dVAE export.

OpenAI published ``encoder.pkl`` and ``decoder.pkl``: whole pickled ``torch.nn.Module``s of
the ``dall_e`` package (github.com/openai/DALL-E), whose state dicts are named ``blocks.<path>.{w,b}`` with
OIHW kernels. This module

* reads such a pickle (or takes a module / state dict directly), infers the `DVAEConfig`
  from the tensor shapes, checks every name and shape against our model, and converts the
  tensors to our parameter tree (``blocks.a.b.w`` -> ``encoder|decoder/a/b/kernel``, HWIO);
* writes the converted parameters as a dVAE export (`dalle_jax.exports.save_dvae`),
  the same format the dVAE trainer produces.

torch and ``dall_e`` are needed only to read the pickles (unpickling imports the classes);
converting a state dict of numpy arrays, saving and loading need neither.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from dalle_jax import exports
from dalle_jax.tokenizers.dvae import DVAEConfig, abstract_params


_GROUP_RE = re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.")


class NotADVAEError(ValueError):
    """The object read is not an OpenAI dVAE encoder / decoder."""


# ----------------------------------------------------------------------------- reading


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading OpenAI's dVAE pickles needs PyTorch (CPU is enough): "
            "pip install torch && pip install --no-deps dall-e==0.1"
        ) from e
    return torch


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickles one of OpenAI's ``encoder.pkl`` / ``decoder.pkl`` on CPU.

    The files pickle whole modules, so unpickling needs the ``dall_e`` package and
    ``weights_only=False`` (the default turned to True in torch 2.6). Only trusted files
    should be read this way: unpickling can run code.
    """
    torch = _import_torch()
    try:
        import dall_e  # noqa: F401  (the pickles reference dall_e.encoder / dall_e.decoder)
    except ImportError as e:
        raise ImportError(
            "OpenAI's dVAE pickles reference classes of the `dall_e` package, which is not "
            "installed: pip install --no-deps dall-e==0.1 (it needs attrs)"
        ) from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such dVAE pickle: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise NotADVAEError(f"{path}: unpickling needs module {e.name!r}, which is missing") from e
    except Exception as e:
        raise NotADVAEError(f"{path} is not a readable torch pickle: {type(e).__name__}: {e}") from e


def state_dict_arrays(obj: Any, what: str = "object") -> dict[str, np.ndarray]:
    """``name -> float32 numpy array`` from a torch module, a state dict or a name->array map."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise NotADVAEError(
            f"{what} is a {type(obj).__module__}.{type(obj).__name__}, not a torch module or "
            "state dict"
        )
    out = {}
    for name, value in obj.items():
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu()
            if str(value.dtype) == "torch.bfloat16":
                value = value.float()
            value = value.numpy()
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise NotADVAEError(f"{what}: tensor {name!r} has dtype {arr.dtype}, expected float")
        out[str(name)] = arr.astype(np.float32)
    return out


# ----------------------------------------------------------------------------- names


def torch_name_to_path(name: str, half: str) -> tuple[str, ...]:
    """``blocks.group_1.block_1.res_path.conv_1.w`` -> ``(half, group_1, ..., conv_1, kernel)``."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or parts[-1] not in ("w", "b"):
        raise KeyError(name)
    leaf = "kernel" if parts[-1] == "w" else "bias"
    return (half, *parts[1:-1], leaf)


def path_to_torch_name(path: tuple[str, ...]) -> str:
    """Inverse of `torch_name_to_path` (the first element, encoder/decoder, is dropped)."""
    leaf = {"kernel": "w", "bias": "b"}[path[-1]]
    return ".".join(("blocks", *path[1:-1], leaf))


def _expected_torch_shapes(config: DVAEConfig, half: str) -> dict[str, tuple[int, ...]]:
    """The state-dict names and OIHW shapes a release module of this config has."""
    flat = traverse_util.flatten_dict(abstract_params(config)[half])
    out = {}
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        if len(shape) == 4:  # HWIO -> OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        out[path_to_torch_name((half, *path))] = shape
    return out


# ----------------------------------------------------------------------------- config inference


def _need(sd: Mapping[str, np.ndarray], name: str, ndim: int, what: str) -> np.ndarray:
    if name not in sd:
        sample = sorted(sd)[:6]
        raise NotADVAEError(
            f"{what} is not an OpenAI dVAE {what.split()[0]}: it has no tensor {name!r} "
            f"(it has {len(sd)} tensors, e.g. {sample})"
        )
    arr = sd[name]
    if arr.ndim != ndim:
        raise NotADVAEError(f"{what}: {name!r} has shape {arr.shape}, expected {ndim} dims")
    return arr


def _group_layout(sd: Mapping[str, np.ndarray], what: str) -> tuple[int, int]:
    """(group_count, n_blk_per_group) from the ``blocks.group_<g>.block_<i>`` names."""
    blocks: dict[int, set[int]] = {}
    for name in sd:
        m = _GROUP_RE.match(name)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks:
        raise NotADVAEError(f"{what} has no 'blocks.group_<g>.block_<i>' tensors")
    groups = sorted(blocks)
    if groups != list(range(1, len(groups) + 1)):
        raise NotADVAEError(f"{what}: groups are numbered {groups}, expected 1..{len(groups)}")
    counts = {g: len(b) for g, b in blocks.items()}
    if len(set(counts.values())) != 1:
        raise NotADVAEError(f"{what}: groups have different block counts {counts}")
    return len(groups), counts[1]


def infer_encoder_config(sd: Mapping[str, np.ndarray], image_size: int = 256) -> DVAEConfig:
    """Encoder config from tensor shapes (n_init is not part of the encoder; left default)."""
    what = "encoder state dict"
    w_in = _need(sd, "blocks.input.w", 4, what)
    w_out = _need(sd, "blocks.output.conv.w", 4, what)
    if w_in.shape[2:] != (7, 7):
        raise NotADVAEError(
            f"{what}: blocks.input.w is {w_in.shape}, expected a 7x7 kernel "
            "(a 1x1 input conv means this is a decoder)"
        )
    group_count, n_blk = _group_layout(sd, what)
    return DVAEConfig(image_size=image_size, input_channels=int(w_in.shape[1]),
                      group_count=group_count, n_hid=int(w_in.shape[0]), n_blk_per_group=n_blk,
                      vocab_size=int(w_out.shape[0]))


def infer_decoder_config(sd: Mapping[str, np.ndarray], image_size: int = 256) -> DVAEConfig:
    """Decoder config from tensor shapes."""
    what = "decoder state dict"
    w_in = _need(sd, "blocks.input.w", 4, what)
    w_out = _need(sd, "blocks.output.conv.w", 4, what)
    if w_in.shape[2:] != (1, 1):
        raise NotADVAEError(
            f"{what}: blocks.input.w is {w_in.shape}, expected a 1x1 kernel "
            "(a 7x7 input conv means this is an encoder)"
        )
    if w_out.shape[0] % 2:
        raise NotADVAEError(f"{what}: blocks.output.conv.w has {w_out.shape[0]} outputs, "
                            "expected 2 per channel (mu, ln b)")
    group_count, n_blk = _group_layout(sd, what)
    return DVAEConfig(image_size=image_size, input_channels=int(w_out.shape[0]) // 2,
                      group_count=group_count, n_hid=int(w_out.shape[1]), n_blk_per_group=n_blk,
                      n_init=int(w_in.shape[0]), vocab_size=int(w_in.shape[1]))


def _check_against(sd: Mapping[str, np.ndarray], config: DVAEConfig, half: str) -> None:
    """Every name and shape of ``sd`` must be exactly what our model of ``config`` expects."""
    want = _expected_torch_shapes(config, half)
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = {n: (tuple(sd[n].shape), want[n]) for n in sorted(set(want) & set(sd))
             if tuple(sd[n].shape) != want[n]}
    if missing or unexpected or wrong:
        lines = [f"{half} state dict does not match an OpenAI dVAE {half} with {config}:"]
        if missing:
            lines.append(f"  missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            lines.append(f"  unexpected: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        for n, (got, exp) in list(wrong.items())[:10]:
            lines.append(f"  {n}: shape {got}, expected {exp}")
        raise NotADVAEError("\n".join(lines))


def _check_module_type(obj: Any, half: str) -> None:
    """A dall_e module must be of the right half (Encoder vs Decoder)."""
    cls = type(obj)
    if cls.__module__.startswith("dall_e."):
        want = "Encoder" if half == "encoder" else "Decoder"
        if cls.__name__ != want:
            raise NotADVAEError(f"expected a dall_e {want} for the {half}, got {cls.__module__}."
                                f"{cls.__name__}")


# ----------------------------------------------------------------------------- conversion


def convert_state_dicts(
    encoder_sd: Mapping[str, np.ndarray],
    decoder_sd: Mapping[str, np.ndarray],
    *,
    image_size: int = 256,
    dtype: str = "float32",
) -> tuple[DVAEConfig, dict[str, Any]]:
    """Converts two ``name -> OIHW float32 array`` maps into ``(config, params)`` (numpy)."""
    enc_cfg = infer_encoder_config(encoder_sd, image_size)
    dec_cfg = infer_decoder_config(decoder_sd, image_size)
    shared = ("input_channels", "group_count", "n_hid", "n_blk_per_group", "vocab_size")
    diff = {f: (getattr(enc_cfg, f), getattr(dec_cfg, f)) for f in shared
            if getattr(enc_cfg, f) != getattr(dec_cfg, f)}
    if diff:
        raise ValueError(f"encoder and decoder disagree (encoder, decoder): {diff}")
    config = DVAEConfig(**{**dec_cfg.to_dict(), "dtype": dtype})
    _check_against(encoder_sd, config, "encoder")
    _check_against(decoder_sd, config, "decoder")
    flat = {}
    for half, sd in (("encoder", encoder_sd), ("decoder", decoder_sd)):
        for name, arr in sd.items():
            path = torch_name_to_path(name, half)
            # PyTorch OIHW -> Flax HWIO.
            flat[path] = np.ascontiguousarray(arr.transpose(2, 3, 1, 0)) if arr.ndim == 4 else arr
    params = traverse_util.unflatten_dict(flat)
    want = abstract_params(config)
    if jax.tree.structure(want) != jax.tree.structure(params):  # guarded by _check_against
        raise AssertionError("converted parameter tree does not match the model")
    return config, params


def convert(
    encoder: Any,
    decoder: Any,
    *,
    image_size: int = 256,
    dtype: str = "float32",
) -> tuple[DVAEConfig, dict[str, Any]]:
    """OpenAI dVAE -> ``(DVAEConfig, params)``.

    Args:
        encoder: path to ``encoder.pkl``, a ``dall_e.Encoder`` module or its state dict.
        decoder: the same for the decoder.
        image_size: the resolution to configure (the weights are fully convolutional;
            OpenAI's model was trained at 256).
        dtype: compute dtype of the returned config.

    Returns:
        The inferred config and the parameter tree (numpy float32, HWIO kernels).

    Raises:
        NotADVAEError: an input is not an OpenAI dVAE encoder/decoder (names what is wrong).
        ImportError: a pickle path was given but torch or dall_e is missing.
    """
    sds = []
    for half, obj, infer in (("encoder", encoder, infer_encoder_config),
                             ("decoder", decoder, infer_decoder_config)):
        source = f"{half} {os.fspath(obj)!r}" if isinstance(obj, (str, os.PathLike)) else half
        if isinstance(obj, (str, os.PathLike)):
            obj = load_pickle(obj)
        try:
            _check_module_type(obj, half)
            sd = state_dict_arrays(obj, source)
            _check_against(sd, infer(sd, image_size), half)
        except NotADVAEError as e:
            raise NotADVAEError(f"{source}: {e}") from e
        sds.append(sd)
    return convert_state_dicts(*sds, image_size=image_size, dtype=dtype)


# ----------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------- entry point


def main(encoder_pkl: str, decoder_pkl: str, out_dir: str, *, image_size: int = 256) -> DVAEConfig:
    """Converts OpenAI's pickles into a checkpoint at ``out_dir`` (refuses a non-empty one)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"output directory {out_dir} exists and is not empty; not overwriting")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"output path {out_dir} exists and is not a directory")
    config, params = convert(encoder_pkl, decoder_pkl, image_size=image_size)
    exports.save_dvae(out_dir, config, params, source="openai",
                encoder_pkl=os.path.abspath(encoder_pkl), decoder_pkl=os.path.abspath(decoder_pkl))
    return config
