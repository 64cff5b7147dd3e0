"""Helpers for `ml_collections` config files: the ``get_config(arg)`` argument parser.

Every file in ``configs/`` exposes ``get_config(arg=None)``. ``arg`` is the text after
the colon in ``--config=configs/FILE.py:ARG``: comma-separated ``key=value`` pairs
and bare flags (``size=tiny,runlocal``). Values are coerced to the type of the
default, and an unknown key raises, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

import ml_collections

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"config arg {key}={text!r}: expected a boolean")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"config arg {key}={text!r}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"config arg {key}={text!r}: expected a number") from None
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``"k=v,flag"`` into a locked ConfigDict of ``defaults`` overridden by ``arg``.

    Args:
      arg: the config argument string, or None/"" for all defaults.
      **defaults: every accepted key with its default value; the default's type
        decides how the value is parsed. A bare ``flag`` means ``flag=True``.

    Raises:
      ValueError: an unknown key, a malformed pair, or a value of the wrong type.
    """
    out = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; accepted: {sorted(defaults)}")
        if not sep:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
            out[key] = True
        else:
            out[key] = _coerce(key, value.strip(), defaults[key])
    cfg = ml_collections.ConfigDict(out)
    cfg.lock()
    return cfg


def comma_list(value: Any) -> list[str]:
    """The items of a comma-separated setting, whitespace stripped and empty items
    dropped: ``"validation, test_compositional"`` -> ``["validation", "test_compositional"]``."""
    return [x.strip() for x in str(value).split(",") if x.strip()]


def check_choice(name: str, value: Any, choices: Any) -> Any:
    """Raises a ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {sorted(choices)}")
    return value


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """Serialises a resolved config (FieldReferences resolved) for ``workdir/config.json``."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def config_dir_on_path(config_spec: str) -> None:
    """Puts the directory of ``path/to/file.py[:arg]`` on ``sys.path``.

    Config files import their shared sections with ``import common``; this makes that
    work wherever the command is run from (the installed ``dalle-jax`` script included).
    """
    path = config_spec.split(":", 1)[0]
    if path.endswith(".py"):
        d = os.path.dirname(os.path.abspath(path))
        if d not in sys.path:
            sys.path.insert(0, d)


def load_config(config_spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/file.py[:arg]`` the way ``--config`` does (for tests and notebooks)."""
    config_dir_on_path(config_spec)
    path, _, arg = config_spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    cfg.lock()
    return cfg
