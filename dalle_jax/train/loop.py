"""The one training loop shared by both stages (the dVAE and the transformer).

A stage supplies a `Task`: how to initialise params, a pure loss, how to turn a host
batch into arrays, and optional summaries and evaluation. The loop owns everything
else: the optimizer and EMA, sharded init, the jitted step with donated state,
metric accumulation on device (no host sync between log steps), checkpoints with the
data-iterator position, resume, evaluation and progress reporting.

Resume order (big_vision / MaxText): the workdir's latest checkpoint → ``ckpt.resume_from``
(another run's checkpoint: state and data position) → ``ckpt.init_params`` (a params
export or checkpoint: params only, fresh optimizer) → scratch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding

from dalle_jax import checkpoint as ckpt_lib
from dalle_jax import exports
from dalle_jax import metrics as metrics_lib
from dalle_jax import logs, multihost
from dalle_jax import sharding, treeutil
from dalle_jax.train import optim

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree


@dataclasses.dataclass
class Task:
    """What a stage plugs into the loop.

    Attributes:
      name: short name ("dvae", "transformer", "clip"), stored in checkpoints.
      identity: the model's defining config; a checkpoint whose identity differs is refused.
      init_variables: ``rng -> {"params": ...}`` with logically partitioned (boxed) leaves.
      loss_fn: ``(params, batch, rng, step) -> (loss, metrics)``; pure. Metrics are scalars,
        except names starting with ``hist/`` which are vectors summed over the log window.
      device_batch: host batch (numpy dict, strings included) -> dict of numeric arrays
        to transfer; keys must have a leading batch dim.
      summarize: host-side ``metrics -> metrics`` run at log time (e.g. histograms to usage).
      evaluate: ``(params, step) -> metrics`` run every ``eval_every`` steps and at the end;
        or an `evals.registry.Suite`, whose evaluators each keep their own ``every``.
      tokens_per_example: sequence length of one example; when set, the loop also logs
        ``perf/tokens_per_second``.
      resblocks: the model's resblock layout for per-resblock gradient scaling (float16
        training). A task that has one accepts ``grad_scales=`` in ``loss_fn`` and runs each
        resblock's backward pass at its scale; a task without one cannot train in float16.
    """

    name: str
    identity: dict
    init_variables: Callable[[jax.Array], PyTree]
    loss_fn: Callable[..., tuple[jax.Array, dict]]
    device_batch: Callable[[dict], dict]
    summarize: Callable[[dict], dict] | None = None
    evaluate: Callable[[PyTree, int], dict] | None = None
    tokens_per_example: int = 0
    resblocks: optim.ResblockLayout | None = None


def _tree_norm(tree: PyTree) -> jax.Array:
    return optax.tree.norm(tree)


def param_axes(task: Task) -> PyTree:
    """Logical axis names of every parameter, from an abstract init (nothing allocated)."""
    abstract = jax.eval_shape(task.init_variables, jax.random.key(0))
    return sharding.logical_specs(abstract["params"])


def build_optimizer(cfg, task: Task, mesh_shape: dict[str, int], axes: PyTree = None
                    ) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, lr_fn)`` of a run: ``cfg.optim``, with per-resblock gradient scaling when
    ``cfg.precision.compute_dtype`` is float16.

    float16 needs the scaling (its 5-bit exponent underflows the late resblocks'
    gradients, paper §2.4), so a float16 run of a task without a resblock layout is
    refused rather than trained unscaled. ``mesh_shape`` (mesh axis -> degree; the devices
    need not exist) gives the scales' replica factor; ``axes`` are the parameters' logical
    axes when the caller has them already (else `param_axes`).
    """
    axes = param_axes(task) if axes is None else axes
    precision = cfg.get("precision", None)
    if precision is None or str(precision.compute_dtype) != "float16":
        return optim.build(cfg.optim, axes)
    if task.resblocks is None:
        raise ValueError(
            f"precision.compute_dtype=float16 needs per-resblock gradient scaling, which the "
            f"{task.name!r} task does not implement; train it in bfloat16 or float32")
    rules = sharding.get_rules(cfg.sharding_rules)
    replicas = sharding.batch_shards(mesh_shape, rules)
    rule = optim.GradScalingRule.from_config(precision.grad_scaling, replicas)
    return optim.build(cfg.optim, axes, resblocks=task.resblocks, scaling=rule)


def _create_state(init_variables: Callable, tx, rng) -> TrainState:
    """A fresh train state with boxed (logically partitioned) leaves."""
    params = init_variables(rng)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params)


def abstract_train_state(init_variables: Callable, tx, seed: int = 0) -> TrainState:
    """The train state's shapes with their logical axes (boxed), allocating nothing; the
    optimizer state's leaves carry the axes of the params they mirror."""
    return jax.eval_shape(functools.partial(_create_state, init_variables, tx),
                          jax.random.key(seed))


def _abstract_state(task: Task, tx, mesh, rules, seed: int):
    """Shapes + shardings of the train state, computed without allocating anything."""
    create = functools.partial(_create_state, task.init_variables, tx)
    abstract_boxed = abstract_train_state(task.init_variables, tx, seed)
    shardings = sharding.tree_shardings(abstract_boxed, mesh, rules)

    def create_unboxed(rng):
        return sharding.unboxed(create(rng))

    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        sharding.unboxed(abstract_boxed), shardings)
    return abstract, shardings, create_unboxed


_LOOP_METRICS = ("loss", "grad_norm", "param_norm", "update_norm", "lr")


def make_train_step(task: Task, tx: optax.GradientTransformation, lr_fn: Callable, *,
                    ema_decay: float, ema_every: int, seed: int) -> Callable:
    """The pure step ``(state, acc, batch) -> (state, acc)`` that `train` jits.

    ``acc`` holds the running sums of the step metrics (the task's, plus ``loss``,
    ``grad_norm``, ``param_norm``, ``update_norm`` and ``lr``). Benchmarks time this same
    function, so their figures are the training loop's.

    With per-resblock gradient scaling (``tx`` from `build_optimizer` for float16) the
    step reads the current scales from the optimizer state and passes them to the loss;
    ``grad_norm`` is then the norm of the unscaled gradients (non-finite values counted
    as 0), and the scaler's metrics (`optim.scaling_metrics`) join the step metrics.
    """
    base_key = jax.random.key(seed + 1)

    def train_step(state: TrainState, acc: dict, batch: dict):
        rng = jax.random.fold_in(base_key, state.step)
        scales = optim.grad_scales(state.opt_state)
        loss_fn = (task.loss_fn if scales is None
                   else functools.partial(task.loss_fn, grad_scales=scales))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, batch, rng, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        true_grads = grads
        if scales is not None:
            true_grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0),
                                      optim.unscale(grads, scales, task.resblocks))
            metrics = dict(metrics, **optim.scaling_metrics(opt_state, task.resblocks))
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        do_ema = (step % ema_every) == 0
        ema = jax.tree.map(lambda e, p: jnp.where(do_ema, ema_decay * e + (1 - ema_decay) * p, e),
                           state.ema_params, params)
        metrics = dict(metrics, loss=loss, grad_norm=_tree_norm(true_grads),
                       param_norm=_tree_norm(params), update_norm=_tree_norm(updates),
                       lr=lr_fn(state.step))
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        acc = jax.tree.map(jnp.add, acc, metrics)
        return TrainState(step=step, params=params, opt_state=opt_state, ema_params=ema), acc

    return train_step


def compile_train_step(task: Task, tx: optax.GradientTransformation, lr_fn: Callable, mesh,
                       rules, batch: dict, *, ema_decay: float, ema_every: int, seed: int = 0,
                       abstract: TrainState | None = None):
    """Lowers and compiles `make_train_step` ahead of time from abstract inputs.

    Nothing is allocated: the state is `eval_shape`-d with its shardings, and ``batch``
    maps each batch key to a `jax.ShapeDtypeStruct` (global shape; it is placed on the
    mesh's batch axes here). Returns ``(compiled, zero_acc)``: the executable the loop
    runs (state and accumulators donated) and the zeroed metric accumulators it takes.
    The step is traced under `sharding.activation_rules`, so the model's activation
    constraints apply. Tests use it to read `memory_report` of a configuration without
    running it. ``abstract``: the state's `ShapeDtypeStruct`s with shardings, when the
    caller has them already.
    """
    if abstract is None:
        abstract, _, _ = _abstract_state(task, tx, mesh, rules, seed)
    state_sh = jax.tree.map(lambda a: a.sharding, abstract)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(
        mesh, sharding.batch_spec(mesh, rules, len(v.shape)))) for k, v in batch.items()}
    rep = NamedSharding(mesh, jax.sharding.PartitionSpec())
    acc_shapes = jax.eval_shape(functools.partial(metric_accumulator, task), abstract, batch)
    zero_acc = jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), acc_shapes), rep)
    acc = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                       acc_shapes)
    step = make_train_step(task, tx, lr_fn, ema_decay=ema_decay, ema_every=ema_every, seed=seed)
    step_fn = jax.jit(step, donate_argnums=(0, 1),
                      out_shardings=(state_sh, jax.tree.map(lambda _: rep, acc)))
    with sharding.activation_rules(mesh, rules):
        lowered = step_fn.lower(abstract, acc, batch)
    return lowered.compile(), zero_acc


def memory_report(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program from XLA's memory analysis: ``argument_bytes``,
    ``output_bytes``, ``alias_bytes`` (outputs that reuse donated arguments), ``temp_bytes``
    and ``peak_bytes`` (arguments + outputs - aliased + temporaries). Empty where the backend
    does not report it."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return {}
    if mem is None:
        return {}
    out = {"argument_bytes": int(mem.argument_size_in_bytes),
           "output_bytes": int(mem.output_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes),
           "temp_bytes": int(mem.temp_size_in_bytes)}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"])
    return out


def init_state(task: Task, tx: optax.GradientTransformation, mesh, rules, seed: int):
    """A fresh sharded train state and its shardings (no checkpoint involved)."""
    _, state_sh, create = _abstract_state(task, tx, mesh, rules, seed)
    return jax.jit(create, out_shardings=state_sh)(jax.random.key(seed)), state_sh


def metric_accumulator(task: Task, state: TrainState, batch: dict) -> dict:
    """Zeroed accumulators for `make_train_step`'s metric sums."""
    shapes = jax.eval_shape(
        lambda s, b: task.loss_fn(s.params, b, jax.random.key(0), s.step)[1], state, batch)
    acc = {k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes.items()}
    acc.update({k: jnp.zeros((), jnp.float32) for k in _LOOP_METRICS})
    if optim.grad_scales(state.opt_state) is not None:
        names = jax.eval_shape(lambda o: optim.scaling_metrics(o, task.resblocks),
                               state.opt_state)
        acc.update({k: jnp.zeros((), jnp.float32) for k in names})
    return acc


def train(
    cfg,
    workdir: str,
    task: Task,
    make_train_iter: Callable[[], Iterator[dict]],
    *,
    stop_at_step: int | None = None,
) -> TrainState:
    """Trains ``task`` for ``cfg.total_steps``; returns the final state.

    Args:
      cfg: the run config (sections ``optim``, ``ckpt``, ``log``, ``mesh``,
        ``sharding_rules``, plus ``seed``, ``total_steps``, ``eval_every``).
      workdir: run directory (checkpoints/, metrics.jsonl).
      task: the stage.
      make_train_iter: builds the training input pipeline (an iterator with
        ``get_state``/``set_state``).
      stop_at_step: stop early (with a checkpoint) once this step is reached; used to
        simulate interruptions and to split long runs.

    The step and the evaluations are traced under the config's mesh and logical-axis
    rules (`sharding.activation_rules`), so the models' activation constraints shard
    activations as the preset says (e.g. heads and MLP over ``tensor`` with ``fsdp_tp``).
    """
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.get_rules(cfg.sharding_rules)
    # Before anything is allocated or compiled: every parameter must divide its mesh axes.
    abstract_params = jax.eval_shape(task.init_variables, jax.random.key(0))["params"]
    sharding.check_shardable(abstract_params, dict(mesh.shape), rules)
    tx, lr_fn = build_optimizer(cfg, task, dict(mesh.shape),
                                sharding.logical_specs(abstract_params))
    seed = int(cfg.seed)
    total_steps = int(cfg.total_steps)
    ema_decay = float(cfg.optim.ema_decay)
    ema_every = max(1, int(cfg.optim.ema_every))
    log_every = max(1, int(cfg.log.every_steps))
    eval_every = int(cfg.get("eval_every", 0))
    ckpt_every = int(cfg.ckpt.every_steps)
    logging.info("mesh: %s; rules: %s", sharding.describe(mesh), cfg.sharding_rules)

    abstract, state_sh, create = _abstract_state(task, tx, mesh, rules, seed)
    meta = {"task": task.name, "identity": task.identity, "seed": seed,
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)}
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=int(cfg.ckpt.max_to_keep),
                                 async_save=bool(cfg.ckpt.async_save))
    train_iter = make_train_iter()

    # ---- init or restore, in the documented order --------------------------------
    state = None
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, abstract, task.identity)
        train_iter.set_state(data_state)
        logs.note("resumed from %s step %d", ckpt.directory, latest)
    elif cfg.ckpt.resume_from:
        d, step = ckpt_lib.find_checkpoint(cfg.ckpt.resume_from)
        other = ckpt_lib.Checkpointer(d, read_only=True, async_save=False)
        state, data_state, _ = other.restore(step, abstract, task.identity)
        train_iter.set_state(data_state)
        logs.note("resumed from %s step %d", d, step)
    if state is None:
        state = jax.jit(create, out_shardings=state_sh)(jax.random.key(seed))
        if cfg.ckpt.init_params:
            params = _load_init_params(cfg.ckpt.init_params, abstract.params, task.identity)
            # Separate buffers: the step donates both trees, and one buffer donated twice
            # would be freed under the other.
            state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
            logging.info("initialised params from %s", cfg.ckpt.init_params)
    start_step = int(jax.device_get(state.step))
    logging.info("params: %s", f"{treeutil.count_params(state.params):,}")

    # ---- the step ------------------------------------------------------------------
    first = train_iter.__next__()
    batch_sh = {k: NamedSharding(mesh, sharding.batch_spec(mesh, rules, np.ndim(v)))
                for k, v in task.device_batch(first).items()}

    def put(host_batch):
        arrays = task.device_batch(host_batch)
        return {k: jax.make_array_from_process_local_data(batch_sh[k], np.asarray(v))
                for k, v in arrays.items()}

    dev_first = put(first)
    t0 = time.time()
    compiled, zero_acc = compile_train_step(
        task, tx, lr_fn, mesh, rules, {k: jax.typeof(v) for k, v in dev_first.items()},
        ema_decay=ema_decay, ema_every=ema_every, seed=seed, abstract=abstract)
    logging.info("step compiled in %.1fs", time.time() - t0)
    mem = memory_report(compiled)
    if mem:
        logging.info("step memory per device: args %.1f MiB, temp %.1f MiB, out %.1f MiB, "
                     "aliased %.1f MiB", *(mem[k] / 2**20 for k in (
                         "argument_bytes", "temp_bytes", "output_bytes", "alias_bytes")))

    writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(cfg.log.get("tensorboard", True)),
                                      first_step=start_step)
    t_start = time.time()
    progress = _progress(total_steps, start_step, bool(cfg.log.progress_bar))
    acc = jax.tree.map(jnp.copy, zero_acc)
    window_start, window_t0, window_n = start_step, time.time(), 0
    step = start_step
    pending = dev_first
    batch_size = int(next(iter(dev_first.values())).shape[0])
    stop_at = total_steps if stop_at_step is None else min(total_steps, stop_at_step)

    def save(step, force=False):
        ckpt.save(step, state, train_iter.get_state(), meta, force=force)

    with multihost.Preemption() as preemption:
        while step < stop_at:
            batch = pending if pending is not None else put(next(train_iter))
            pending = None
            with jax.transfer_guard("disallow"):
                state, acc = compiled(state, acc, batch)
            step += 1
            window_n += 1
            if progress is not None:
                progress.update(1)
            # Called after every step on every process: SIGTERM to any process makes all
            # of them agree on this step to save at and stop.
            preempted = preemption.reached(step)
            last = step == stop_at or preempted
            if step % log_every == 0 or last:
                host = {k: np.asarray(v) for k, v in jax.device_get(acc).items()}
                out = _reduce_window(host, window_n, task.summarize)
                dt = time.time() - window_t0
                out["perf/steps_per_second"] = window_n / max(dt, 1e-9)
                out["perf/examples_per_second"] = window_n * batch_size / max(dt, 1e-9)
                if task.tokens_per_example:
                    out["perf/tokens_per_second"] = (out["perf/examples_per_second"]
                                                     * task.tokens_per_example)
                metrics_lib.check_finite(out, (window_start, step))
                writer.write(step, {f"train/{k}" if "/" not in k else k: v for k, v in out.items()})
                if progress is not None:
                    progress.set_postfix(loss=f"{out['loss']:.4f}")
                acc = jax.tree.map(jnp.copy, zero_acc)
                window_start, window_t0, window_n = step, time.time(), 0
            if task.evaluate is not None and _eval_due(task.evaluate, eval_every, step, total_steps):
                eval_params = state.ema_params if ema_decay > 0 else state.params
                t_eval = time.time()
                if getattr(task.evaluate, "applies_rules", False):
                    ev = task.evaluate(eval_params, step)  # an evals.registry.Suite
                else:
                    with sharding.activation_rules(mesh, rules):
                        ev = task.evaluate(eval_params, step)
                ev["seconds"] = time.time() - t_eval
                writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
                window_t0 += time.time() - t_eval  # keep eval time out of the step rate
            if (ckpt_every and step % ckpt_every == 0) or last:
                save(step, force=True)
            if preempted:
                break
    ckpt.close()
    if progress is not None:
        progress.close()
    writer.close()
    logs.note("%s: step %d of %d, %d steps in %.0fs; %s", task.name, step, total_steps,
              step - start_step, time.time() - t_start, metrics_lib.headline(writer.latest))
    return state


def _eval_due(evaluate, eval_every: int, step: int, total_steps: int) -> bool:
    """Whether ``task.evaluate`` runs after ``step``: an `evals.registry.Suite` keeps each
    evaluator's own schedule; a plain callable runs every ``eval_every`` steps and at the
    end."""
    due = getattr(evaluate, "due", None)
    if due is not None:
        return bool(due(step))
    return bool(eval_every) and (step % eval_every == 0 or step == total_steps)


def _reduce_window(host: dict, n: int, summarize) -> dict:
    out = {}
    for k, v in host.items():
        if k.startswith("hist/"):
            out[k] = v
        else:
            out[k] = float(v) / max(n, 1)
    if summarize is not None:
        out = summarize(out)
    return {k: v for k, v in out.items() if not k.startswith("hist/")}


def _load_init_params(path: str, abstract_params, identity):
    """Params from a params export (``--job=export`` makes one from any checkpoint)."""
    if not exports.is_export(path):
        raise ValueError(
            f"ckpt.init_params={path!r} is not a params export (no meta.json); make one with "
            "--job=export --config.export.source=<checkpoints dir> --config.export.dtype="
            "float32, or use ckpt.resume_from to continue a run with its optimizer state")
    params, _ = exports.load(path, identity=identity, abstract=abstract_params)
    return params


def _progress(total: int, initial: int, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return None
    return logs.progress(total, unit="step", initial=initial, leave=True, mininterval=1.0)

