"""The command-line entry point: ``python -m dalle_jax.main --job=JOB --config=FILE.py:ARGS --workdir=DIR``.

One binary runs every stage; the job name picks the stage and the config file picks
the sizes. The resolved config is written to ``workdir/config.json`` before the job
starts (a previous, different one is kept as ``config.<time>.json``, never overwritten).
Multi-host runs initialise ``jax.distributed`` here: automatically on SLURM and TPU
pods, or explicitly with ``--coordinator_address/--num_processes/--process_id``
(`dalle_jax.multihost`). Every process then checks that it runs the same config as
process 0. The console shows progress bars, a few informative lines and each job's
summary; every log line goes to ``workdir/logs/<job>.log`` (`dalle_jax.logs`, which
describes what ``--verbosity`` shows). Processes other than 0 print warnings and errors
only, and keep their own log file.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from dalle_jax import configlib, jobs, logs, multihost

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    job_logs = logs.Logs()
    job_logs.start(FLAGS.verbosity)
    init_distributed()
    import jax

    job_logs.set_process(jax.process_index())
    cfg = _CONFIG.value
    multihost.check_same_config(configlib.to_json(cfg))
    workdir = os.path.abspath(FLAGS.workdir)
    os.makedirs(workdir, exist_ok=True)
    log_file = job_logs.open_file(logs.log_path(workdir, FLAGS.job, jax.process_index(),
                                                jax.process_count()))
    if jax.process_index() == 0:
        write_config(cfg, workdir)
    logs.note("%s in %s: %d process%s, %d %s device%s; log %s", FLAGS.job, workdir,
              jax.process_count(), "es" if jax.process_count() > 1 else "",
              jax.device_count(), jax.default_backend(),
              "s" if jax.device_count() > 1 else "", log_file)
    try:
        jobs.JOBS[FLAGS.job](cfg, workdir)
    except Exception:
        # The console gets Python's own traceback; the log file keeps a copy.
        logging.error("job %s failed", FLAGS.job, exc_info=True, extra={logs.FILE_ONLY: True})
        raise


def run():
    app.run(main)


if __name__ == "__main__":
    run()
