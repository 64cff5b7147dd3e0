"""The evaluator registry: ``config.evals.<name>`` sections name what to evaluate.

Each section of ``config.evals`` is one evaluation::

    c.evals = dict(
        val=dict(type="val_loss", every=200, num_batches=8),
        caption_match=dict(type="caption_match", every=0, captions=200),
    )

``type`` names a registered evaluator (the section's own name when ``type`` is absent);
``every`` is how often the training loop runs it (steps; the config's ``eval_every``
when absent, 0: never during training, only by the ``evaluate`` job). The remaining keys
are the evaluator's own settings, documented on its class.

An evaluator is built once per run as ``cls(name, section, context)`` and called as
``evaluator(params, step) -> {metric: float}``. It evaluates one *subject* (the model
whose parameters it is given): ``"dvae"``, ``"transformer"`` or ``"scorer"``; the
`EvalContext` carries what else it needs (the config, the model, tokenizers, where to
write pictures and JSON). The training loop runs the evaluators of the stage it trains;
``--job=evaluate`` runs them on an export (`dalle_jax.evals.job`).

Registering a new evaluator::

    @registry.register("my_metric", subject="transformer")
    class MyMetric(registry.Evaluator):
        def __call__(self, params, step):
            return {"my_metric": ...}
"""

from __future__ import annotations

import abc
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

SUBJECTS = ("dvae", "transformer", "scorer")

_TYPES: dict[str, type] = {}
# Modules that register evaluators; imported on first lookup so that importing the
# registry stays cheap.
_BUILTIN_MODULES = ("dalle_jax.evals.recon", "dalle_jax.evals.val_loss",
                    "dalle_jax.evals.caption_match", "dalle_jax.evals.shapes_fid",
                    "dalle_jax.evals.clip_retrieval")


@dataclasses.dataclass
class EvalContext:
    """What evaluators of one run share.

    Attributes:
        cfg: the run's whole config.
        out_dir: where evaluators write pictures and JSON (``workdir/eval`` in training).
        subject: the kind of model being evaluated (one of `SUBJECTS`).
        model: the Flax module of the subject (`DVAE`, `Transformer` or `CLIP`), when it
            has one.
        text_tokenizer: the caption BPE (stage 2), or the scorer's tokenizer.
        image_tokenizer: the dVAE `ImageTokenizer` that decodes image tokens (stage 2).
        sampler: a `Sampler` over the evaluated transformer (the ``evaluate`` job and
            the ``sample`` job pass theirs; evaluators that sample build one otherwise).
        cache: shared between the evaluators of one call (e.g. generated images that
            several of them score); cleared at every step.
        progress: whether evaluators that take long show progress bars (the ``evaluate``
            job; not in training, where the loop's bar is on screen).
    """

    cfg: Any
    out_dir: str
    subject: str
    model: Any = None
    text_tokenizer: Any = None
    image_tokenizer: Any = None
    sampler: Any = None
    cache: dict = dataclasses.field(default_factory=dict)
    progress: bool = False

    def progress_bar(self, total: int, desc: str):
        """``(update, close)`` of a progress bar when ``progress`` is set, else no-ops."""
        from dalle_jax import logs

        bar = logs.progress(total, desc, enabled=self.progress)
        return bar.update, bar.close

    def __post_init__(self):
        if self.subject not in SUBJECTS:
            raise ValueError(f"evaluation subject must be one of {SUBJECTS}, got {self.subject!r}")


class Evaluator(abc.ABC):
    """Base class: keeps the section's name, settings and context.

    Subclasses set ``subject`` and implement ``__call__(params, step) -> dict``; an
    optional ``prepare()`` loads files (other models, weights) ahead of the first call of
    an evaluator that training will run.
    """

    subject: str = ""
    # Whether the evaluator's computations are traced under the run's mesh and
    # logical-axis rules (`sharding.activation_rules`), as the training step is. Those
    # that drive a `Sampler` (which applies the rules itself) or load other models say no.
    traced_under_rules: bool = True

    def __init__(self, name: str, section: Mapping[str, Any], ctx: EvalContext):
        self.name = name
        self.section = section
        self.ctx = ctx

    def setting(self, key: str, default: Any) -> Any:
        return self.section.get(key, default) if hasattr(self.section, "get") else default

    @abc.abstractmethod
    def __call__(self, params: Any, step: int) -> dict[str, float]:
        """The metrics of ``params`` at training step ``step``."""


def register(type_name: str, *, subject: str) -> Callable[[type], type]:
    """Class decorator: ``config.evals.<name>.type = type_name`` builds this class."""
    if subject not in SUBJECTS:
        raise ValueError(f"subject must be one of {SUBJECTS}, got {subject!r}")

    def deco(cls: type) -> type:
        if type_name in _TYPES and _TYPES[type_name] is not cls:
            raise ValueError(f"evaluator type {type_name!r} is already registered "
                             f"({_TYPES[type_name].__module__}.{_TYPES[type_name].__name__})")
        cls.subject = subject
        cls.type_name = type_name
        _TYPES[type_name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    import importlib

    for m in _BUILTIN_MODULES:
        importlib.import_module(m)


def types() -> dict[str, type]:
    """Every registered evaluator type, ``{type name: class}``."""
    _load_builtins()
    return dict(_TYPES)


def lookup(type_name: str) -> type:
    known = types()
    if type_name not in known:
        raise ValueError(f"unknown evaluator type {type_name!r}; registered types: "
                         f"{', '.join(sorted(known))}")
    return known[type_name]


def _items(evals_cfg: Any) -> list[tuple[str, Any]]:
    if evals_cfg is None:
        return []
    return sorted(evals_cfg.items()) if hasattr(evals_cfg, "items") else []


def section_type(name: str, section: Any) -> str:
    return str(section.get("type", name)) if hasattr(section, "get") else name


def subject_of(name: str, section: Any) -> str:
    """The subject (`SUBJECTS`) of the evaluator a config section builds."""
    return lookup(section_type(name, section)).subject


@dataclasses.dataclass
class Scheduled:
    name: str
    every: int
    evaluator: Any


class Suite:
    """The evaluators of one subject, each on its own schedule.

    Called by the training loop as ``suite(params, step)`` when `due` says so; returns
    the metrics of the evaluators that ran, merged, plus ``<name>/seconds`` each.
    """

    # The training loop calls a suite outside the activation rules: it applies them
    # itself, to the evaluators traced under them.
    applies_rules = True

    def __init__(self, scheduled: list[Scheduled], total_steps: int = 0, cfg: Any = None):
        self.scheduled = scheduled
        self.total_steps = int(total_steps)
        self.cfg = cfg
        self.last: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.scheduled)

    def names(self) -> list[str]:
        return [s.name for s in self.scheduled]

    def _due(self, s: Scheduled, step: int) -> bool:
        return s.every > 0 and (step % s.every == 0 or step == self.total_steps)

    def due(self, step: int) -> bool:
        return any(self._due(s, step) for s in self.scheduled)

    def run_one(self, s: Scheduled, params: Any, step: int) -> dict[str, float]:
        """One evaluator's metrics, under the run's activation rules when it wants them."""
        if not getattr(s.evaluator, "traced_under_rules", True) or self.cfg is None \
                or "mesh" not in self.cfg:
            return s.evaluator(params, step)
        from dalle_jax import sharding

        mesh = sharding.make_mesh(self.cfg.mesh)
        with sharding.activation_rules(mesh, sharding.get_rules(self.cfg.sharding_rules)):
            return s.evaluator(params, step)

    def __call__(self, params: Any, step: int, *, everything: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.scheduled:
            if not (everything or self._due(s, step)):
                continue
            t0 = time.time()
            metrics = self.run_one(s, params, step)
            clash = sorted(set(metrics) & set(out))
            if clash:
                raise ValueError(f"evaluator {s.name!r} reports metrics already reported by "
                                 f"another evaluator: {clash}")
            out.update(metrics)
            out[f"{s.name}/seconds"] = round(time.time() - t0, 3)
            logging.info("eval %s at step %d: %s", s.name, step, metrics)
        self.last = out
        for s in self.scheduled:
            if hasattr(s.evaluator, "ctx"):
                s.evaluator.ctx.cache.clear()
        return out


def build(cfg: Any, ctx: EvalContext, *, only: str | list[str] = "") -> Suite:
    """The `Suite` of ``cfg.evals`` sections whose evaluator evaluates ``ctx.subject``.

    Args:
        cfg: the run config (``evals`` sections, ``eval_every`` as the default ``every``,
            ``total_steps`` for the final evaluation).
        ctx: the shared context.
        only: comma-separated section names to build (empty: all of ``ctx.subject``). A
            named section of another subject is an error.
    """
    default_every = int(cfg.get("eval_every", 0)) if hasattr(cfg, "get") else 0
    wanted = [x.strip() for x in (only.split(",") if isinstance(only, str) else only)
              if x.strip()]
    sections = dict(_items(cfg.get("evals") if hasattr(cfg, "get") else None))
    missing = [w for w in wanted if w not in sections]
    if missing:
        raise ValueError(f"no evals section named {missing}; the config has "
                         f"{sorted(sections) or 'none'}")
    scheduled = []
    for name, section in sorted(sections.items()):
        if wanted and name not in wanted:
            continue
        cls = lookup(section_type(name, section))
        if cls.subject != ctx.subject:
            if wanted:
                raise ValueError(f"evals.{name} ({cls.type_name}) evaluates a {cls.subject}, "
                                 f"not the {ctx.subject} given")
            continue
        every = int(section.get("every", default_every)) if hasattr(section, "get") \
            else default_every
        if every < 0:
            raise ValueError(f"evals.{name}.every must be >= 0, got {every}")
        evaluator = cls(name, section, ctx)
        if getattr(evaluator, "enabled", True):
            if every > 0 and hasattr(evaluator, "prepare"):
                # Loads what it needs now, outside the traced evaluation (where Flax's
                # activation rules would also apply to the parameters it initialises).
                evaluator.prepare()
            scheduled.append(Scheduled(name, every, evaluator))
    total = int(cfg.get("total_steps", 0)) if hasattr(cfg, "get") else 0
    return Suite(scheduled, total, cfg)


def check_sections(cfg: Any) -> None:
    """Raises when a ``cfg.evals`` section names an unknown evaluator type."""
    for name, section in _items(cfg.get("evals") if hasattr(cfg, "get") else None):
        lookup(section_type(name, section))


def output_dir(workdir: str) -> str:
    """Where training-time evaluators write pictures and JSON."""
    return os.path.join(workdir, "eval")
