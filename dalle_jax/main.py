"""The command-line entry point: ``python -m dalle_jax.main --job=JOB --config=FILE.py:ARGS --workdir=DIR``.

One binary runs every stage; the job name picks the stage and the config file picks
the sizes. The resolved config is written to ``workdir/config.json`` before the job
starts (a previous, different one is kept as ``config.<time>.json``, never overwritten).
Multi-host runs initialise ``jax.distributed`` here: automatically on SLURM and TPU
pods, or explicitly with ``--coordinator_address/--num_processes/--process_id``
(`dalle_jax.multihost`). Every process then checks that it runs the same config as
process 0; processes other than 0 log warnings and errors only.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from dalle_jax import configlib, jobs, multihost

# `import common` inside config files must resolve before flags are parsed.
for _a in sys.argv[1:]:
    if _a.startswith("--config="):
        configlib.config_dir_on_path(_a[len("--config=") :])

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, `path/to/file.py:args`.",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for this run's outputs (created if missing).")
flags.DEFINE_enum("job", None, sorted(jobs.JOBS), "Which job to run.")
flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"],
                  "Initialise jax.distributed: auto = when SLURM/TPU-pod variables say so.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-host).")
flags.DEFINE_integer("initialization_timeout_s", 300,
                     "Multi-host: seconds to wait for every process to join.")
flags.DEFINE_integer("heartbeat_timeout_s", 100,
                     "Multi-host: a process silent this long (it died) stops the others "
                     "with an error naming it.")
flags.mark_flags_as_required(["config", "workdir", "job"])


def init_distributed() -> None:
    try:
        multihost.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                             mode=FLAGS.multihost,
                             initialization_timeout_s=FLAGS.initialization_timeout_s,
                             heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def write_config(cfg, workdir: str) -> str:
    """Saves the resolved config; an older, different config.json is renamed, not lost."""
    path = os.path.join(workdir, "config.json")
    text = configlib.to_json(cfg)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return path
        os.replace(path, os.path.join(workdir, time.strftime("config.%Y%m%d-%H%M%S.json")))
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


class _QuietLibraries(std_logging.Filter):
    """Drops library chatter: orbax/TFDS INFO lines (dozens per checkpoint) and two
    harmless TFDS warnings (no OpenCV, so PIL decodes; a custom builder config)."""

    _NOISY_PATHS = ("/orbax/", "/tensorflow_datasets/", "/etils/")
    _NOISY_WARNINGS = ("OpenCV is not installed", "Using custom data configuration")

    def filter(self, record: std_logging.LogRecord) -> bool:
        if FLAGS.verbosity > 0:
            return True
        if record.levelno >= std_logging.WARNING:
            return not str(record.msg).startswith(self._NOISY_WARNINGS)
        return not any(n in record.pathname for n in self._NOISY_PATHS)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    init_distributed()
    import jax

    if jax.process_index() != 0 and FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)
    cfg = _CONFIG.value
    multihost.check_same_config(configlib.to_json(cfg))
    workdir = os.path.abspath(FLAGS.workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        write_config(cfg, workdir)
    logging.info("job=%s workdir=%s processes=%d devices=%d", FLAGS.job, workdir,
                 jax.process_count(), jax.device_count())
    jobs.JOBS[FLAGS.job](cfg, workdir)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
