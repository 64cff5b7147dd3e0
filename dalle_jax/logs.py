"""Where a job's log lines go: a short console, and every detail in a log file.

The console (stderr, beside the progress bars) shows, by ``--verbosity`` (``-v``):

* ``-1``: warnings and errors only;
* ``0`` (the default): also a few informative lines per job (`note`: what runs where,
  a resume, the training summary);
* ``1``: every INFO line of the project and its libraries, except the libraries'
  routine chatter (orbax/TFDS per-checkpoint lines, JAX probing for platforms that are
  not installed, e.g. "Unable to initialize backend 'tpu'" on a CPU machine);
* ``2`` or more: everything, DEBUG included.

Warnings and errors always reach the console (of every process); informative lines
only process 0's. Progress bars and the jobs' printed summaries are not log lines and
always show. Lines are written through ``tqdm.write`` so they never land inside a bar.

The log file, ``WORKDIR/logs/<job>.log`` (``<job>.p<i>.log`` for process ``i`` of a
multi-process job), receives every line at INFO or above (DEBUG too with ``-v 1``),
console or not, with absl's prefix (level, time, thread, file:line), Python warnings,
and the traceback of a job that fails. Each run appends, after a header line naming the
command. Lines logged before the file can be opened (before the process index is known)
are held and written first.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import logging as absl_logging

# LogRecord attributes: an informative line for the console; a line for the file only.
CONSOLE = "dalle_jax_console"
FILE_ONLY = "dalle_jax_file_only"

# Routine library INFO lines hidden from the console below --verbosity=2 (dozens per
# checkpoint from orbax; TFDS/etils bookkeeping) and JAX's platform probing.
_NOISY_PATHS = ("/orbax/", "/tensorflow_datasets/", "/etils/")
_NOISY_LOGGERS = ("jax._src.xla_bridge",)
# Harmless library warnings hidden from the console at the default verbosity: no
# OpenCV, so PIL decodes; a custom TFDS builder config.
_NOISY_WARNINGS = ("OpenCV is not installed", "Using custom data configuration")


@absl_logging.skip_log_prefix
def note(msg: str, *args) -> None:
    """Logs an INFO line that also reaches the console at the default verbosity.

    For the few lines a user reads while a job runs (what runs where, a resume, the
    final summary); everything else is `absl.logging.info` and goes to the log file.
    """
    absl_logging.info(msg, *args, extra={CONSOLE: True})


def progress(total: int | None = None, desc: str | None = None, *, unit: str = "img",
             initial: int = 0, enabled: bool = True, leave: bool = False, iterable=None,
             mininterval: float = 0.5):
    """The progress bar of every long-running job: a tqdm bar with ETA on process 0, and a
    disabled one (the same methods, drawing nothing) on the other processes or when
    ``enabled`` is False. Wraps ``iterable`` when given."""
    import jax
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                dynamic_ncols=True, mininterval=mininterval,
                disable=not enabled or jax.process_index() != 0)


def log_path(workdir: str, job: str, process_index: int = 0, process_count: int = 1) -> str:
    """``WORKDIR/logs/<job>.log``, or ``<job>.p<i>.log`` when there are several processes."""
    name = f"{job}.p{process_index}.log" if process_count > 1 else f"{job}.log"
    return os.path.join(workdir, "logs", name)


class ConsoleFilter(logging.Filter):
    """Which records reach the console, by verbosity (see the module docstring)."""

    def __init__(self, verbosity: int, process_index: int = 0):
        super().__init__()
        self.verbosity = verbosity
        self.process_index = process_index

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, FILE_ONLY, False):
            return False
        if self.verbosity >= 2:
            return True
        if record.levelno >= logging.WARNING:
            return self.verbosity >= 1 or not str(record.msg).startswith(_NOISY_WARNINGS)
        if self.verbosity >= 1:
            return not (record.name.startswith(_NOISY_LOGGERS)
                        or any(n in record.pathname for n in _NOISY_PATHS))
        return (self.verbosity == 0 and self.process_index == 0
                and bool(getattr(record, CONSOLE, False)))


class ConsoleFormatter(logging.Formatter):
    """Informative lines as bare text at the default verbosity; everything else with
    absl's prefix (level, time, thread, file:line)."""

    def __init__(self, verbosity: int):
        super().__init__()
        self.verbosity = verbosity

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.verbosity <= 0 and getattr(record, CONSOLE, False):
            return text
        return absl_logging.get_absl_log_prefix(record) + text


class FileFormatter(logging.Formatter):
    """Every line with absl's prefix."""

    def format(self, record: logging.LogRecord) -> str:
        return absl_logging.get_absl_log_prefix(record) + super().format(record)


class _TqdmStderr:
    """``sys.stderr`` through ``tqdm.write``: a log line clears the progress bars, is
    printed, and the bars are redrawn below it."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr, end="")

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    def close(self) -> None:
        """Leaves ``sys.stderr`` open (the absl handler closes its stream at exit)."""


class _Held(logging.Handler):
    """Keeps the records logged before the log file is opened."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Logs:
    """The console and the log file of one job (see the module docstring).

    ``start(verbosity)`` routes the console at once and holds the lines for the file;
    ``open_file(path)`` writes them there and sends every later line there too.
    """

    def __init__(self):
        self.verbosity = 0
        self.console_filter: ConsoleFilter | None = None
        self.file_handler: logging.FileHandler | None = None
        self._held: _Held | None = None
        self._saved: tuple | None = None
        self._added_handler = False

    def start(self, verbosity: int) -> None:
        self.verbosity = int(verbosity)
        root = logging.getLogger()
        handler = absl_logging.get_absl_handler()
        python_handler = handler.python_handler
        self._saved = (root.level, python_handler.stream, python_handler.formatter)
        # The file keeps INFO whatever the console shows (DEBUG from --verbosity=1).
        root.setLevel(min(logging.INFO, _standard_level(self.verbosity)))
        python_handler.stream = _TqdmStderr()
        handler.setFormatter(ConsoleFormatter(self.verbosity))
        self.console_filter = ConsoleFilter(self.verbosity)
        handler.addFilter(self.console_filter)
        if handler not in root.handlers:
            root.addHandler(handler)
            self._added_handler = True
        self._held = _Held()
        root.addHandler(self._held)
        logging.captureWarnings(True)

    def set_process(self, process_index: int) -> None:
        """Informative lines reach only process 0's console."""
        if self.console_filter is not None:
            self.console_filter.process_index = int(process_index)

    def open_file(self, path: str) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fh = logging.FileHandler(path, mode="a", encoding="utf-8")
        fh.setFormatter(FileFormatter())
        fh.stream.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: "
                        f"{' '.join(sys.argv)}\n")
        root = logging.getLogger()
        if self._held is not None:
            root.removeHandler(self._held)
            for record in self._held.records:
                if record.levelno >= root.level:
                    fh.handle(record)
            self._held = None
        root.addHandler(fh)
        self.file_handler = fh
        return path

    def close(self) -> None:
        """Restores the logging set-up `start` changed (tests run several jobs in one
        process)."""
        root = logging.getLogger()
        logging.captureWarnings(False)
        for h in (self._held, self.file_handler):
            if h is not None:
                root.removeHandler(h)
                h.close()
        self._held = self.file_handler = None
        handler = absl_logging.get_absl_handler()
        if self.console_filter is not None:
            handler.removeFilter(self.console_filter)
            self.console_filter = None
        if self._saved is not None:
            level, stream, formatter = self._saved
            root.setLevel(level)
            handler.python_handler.stream = stream
            handler.setFormatter(formatter)
            self._saved = None
        if self._added_handler:
            root.removeHandler(handler)
            self._added_handler = False


def _standard_level(verbosity: int) -> int:
    """The Python logging level of an absl verbosity (-1 WARNING, 0 INFO, 1 DEBUG, ...)."""
    if verbosity <= 1:
        return absl_logging.converter.absl_to_standard(max(verbosity, -3))
    return logging.DEBUG - (verbosity - 1)
