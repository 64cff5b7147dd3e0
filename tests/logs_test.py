"""Job logs and TensorBoard: a short console, the details in WORKDIR/logs/<job>.log, and
event files beside metrics.jsonl (or none, without error, when tensorboardX is absent)."""

import logging
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from absl import logging as absl_logging

from dalle_jax import logs
from dalle_jax import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PROBE = "Unable to initialize backend 'tpu'"


def read_events(directory):
    """``(tag, step, value)`` of every summary value in the event files of ``directory``:
    a float for a scalar, ``(height, width, png bytes)`` for an image."""
    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(directory)):
        if not name.startswith("events.out.tfevents"):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # TFRecords: length, its CRC, the record, its CRC
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    out.append((v.tag, event.step,
                                (v.image.height, v.image.width, v.image.encoded_image_string)))
                else:
                    out.append((v.tag, event.step, v.simple_value))
    return out


def _record(msg, level=logging.INFO, name="absl", pathname="/x/dalle_jax/jobs.py", **extra):
    r = logging.LogRecord(name, level, pathname, 1, msg, (), None)
    r.__dict__.update(extra)
    return r


def test_console_filter_by_verbosity():
    note = _record("job starts", **{logs.CONSOLE: True})
    info = _record("step 10: loss=1")
    probe = _record(TPU_PROBE + ": no libtpu.so", name="jax._src.xla_bridge",
                    pathname="/site-packages/jax/_src/xla_bridge.py")
    orbax = _record("saved", pathname="/site-packages/orbax/checkpoint/x.py")
    warning = _record("disk almost full", logging.WARNING)
    harmless = _record("OpenCV is not installed", logging.WARNING)
    error = _record("bad", logging.ERROR, name="jax._src.xla_bridge")
    file_only = _record("traceback", logging.ERROR, **{logs.FILE_ONLY: True})

    def shown(verbosity, process=0):
        f = logs.ConsoleFilter(verbosity, process)
        return {r.msg.split(":")[0] for r in (note, info, probe, orbax, warning, harmless, error,
                                              file_only) if f.filter(r)}

    assert shown(-1) == {"disk almost full", "bad"}
    assert shown(0) == {"job starts", "disk almost full", "bad"}
    assert shown(0, process=1) == {"disk almost full", "bad"}  # notes: process 0 only
    assert shown(1) == {"job starts", "step 10", "disk almost full", "OpenCV is not installed",
                        "bad"}
    assert shown(2) == shown(1) | {TPU_PROBE, "saved"}


def test_logs_route_console_and_file(tmp_path, capsys):
    job_logs = logs.Logs()
    job_logs.start(0)
    try:
        logging.getLogger("jax._src.xla_bridge").info(TPU_PROBE + ": no libtpu.so")  # held
        logs.note("the job starts")
        path = job_logs.open_file(logs.log_path(str(tmp_path), "train"))
        absl_logging.info("a detail")
        absl_logging.warning("a warning")
        logging.getLogger("jax._src.xla_bridge").warning("CUDA backend failed to initialize")
    finally:
        job_logs.close()
    console = capsys.readouterr().err
    assert "the job starts\n" in console  # bare text, no absl prefix
    assert "a warning" in console and "CUDA backend failed" in console
    assert "a detail" not in console and TPU_PROBE not in console
    text = open(path).read()
    assert path == str(tmp_path / "logs" / "train.log")
    assert text.startswith("---- ")
    for line in (TPU_PROBE, "the job starts", "a detail", "a warning", "CUDA backend failed"):
        assert line in text, line
    assert "] a detail" in text  # with absl's prefix
    assert text.index(TPU_PROBE) < text.index("a detail")  # held lines come first
    assert logs.log_path("w", "train", 1, 2) == os.path.join("w", "logs", "train.p1.log")


def _job(args, tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # JAX probes
    full.update(DALLE_JAX_DATA_DIR=str(tmp_path / "data"), **env)
    cmd = [sys.executable, "-m", "dalle_jax.main", "--job=prepare",
           "--config=configs/shapes.py:size=tiny", f"--workdir={tmp_path}/w",
           "--config.data.shapes.num_train=16", "--config.data.shapes.num_validation=4",
           "--config.data.shapes.num_test=4", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=full, timeout=300)


def test_job_console_is_short_and_log_file_has_details(tmp_path):
    out = _job([], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    log_file = tmp_path / "w" / "logs" / "prepare.log"
    assert f"prepare in {tmp_path}/w: 1 process" in console
    assert "Unable to initialize backend" not in console
    assert "jobs.py" not in console and "] prepared:" not in console  # no absl INFO lines
    assert "report: " in out.stdout and "prepare_report.json" in out.stdout  # its summary
    assert '"splits"' not in out.stdout  # one line, not the report's JSON
    text = log_file.read_text()
    assert "] prepared: " in text and "main.py" in text
    # On a machine without a TPU, JAX's probe for one is in the file only.
    if TPU_PROBE in console + text:
        assert TPU_PROBE in text

    again = _job(["--verbosity=1"], tmp_path)  # a rerun appends; INFO on the console
    assert again.returncode == 0, again.stderr[-3000:]
    assert "] prepared: " in again.stderr
    assert "Unable to initialize backend" not in again.stderr
    assert log_file.read_text().startswith(text)
    assert log_file.read_text().count("\n---- ") == 1


def test_failing_job_traceback_in_log_file(tmp_path):
    out = _job(["--job=encode"], tmp_path)  # the shapes config has no `encode` section
    assert out.returncode != 0
    error = out.stderr.strip().splitlines()[-1]
    assert "Traceback" in out.stderr and "encode" in error  # Python's own, on the console
    text = (tmp_path / "w" / "logs" / "encode.log").read_text()
    assert "job encode failed" in text and "Traceback" in text and error in text
    assert "job encode failed" not in out.stderr


def test_tensorboard_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboardX")
    w = metrics_lib.MetricWriter(str(tmp_path))
    try:
        assert w.tensorboard
        w.write(2, {"train/loss": np.float32(1.5), "train/lr": 0.1, "eval/n": 3})
        w.write(4, {"train/loss": 1.25, "eval/per_class": [1.0, 2.0]})
        grid = np.zeros((8, 12, 3), np.uint8)
        grid[:, :6] = 255
        metrics_lib.write_images(4, {"eval/recon": grid})  # the newest writer gets it
    finally:
        w.close()
    metrics_lib.write_images(6, {"eval/recon": grid})  # no open writer: nothing happens
    events = read_events(str(tmp_path))
    scalars = {(t, s): v for t, s, v in events if not isinstance(v, tuple)}
    assert scalars == {("train/loss", 2): 1.5, ("train/lr", 2): pytest.approx(0.1),
                       ("eval/n", 2): 3.0, ("train/loss", 4): 1.25}
    images = [(t, s, v[:2]) for t, s, v in events if isinstance(v, tuple)]
    assert images == [("eval/recon", 4, (8, 12))]
    from PIL import Image
    import io

    png = [v[2] for t, s, v in events if isinstance(v, tuple)][0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), grid)
    assert sorted(metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))) == [2, 4]


def test_training_loop_writes_tensorboard(tmp_path):
    pytest.importorskip("tensorboardX")
    from loop_test import _cfg, _Iter, _task

    from dalle_jax.train import loop

    def evaluate(params, step):
        metrics_lib.write_images(step, {"eval/grid": np.full((4, 4, 3), step, np.uint8)})
        return {"score": float(step)}

    loop.train(_cfg(), str(tmp_path), _task(evaluate=evaluate), lambda: _Iter())
    events = read_events(str(tmp_path))
    tags = {t for t, _, _ in events}
    assert {"train/loss", "train/mse", "train/lr", "perf/steps_per_second", "eval/score",
            "eval/grid"} <= tags
    assert sorted(s for t, s, _ in events if t == "train/loss") == [2, 4, 6]
    assert sorted(s for t, s, _ in events if t == "eval/grid") == [3, 6]

    off = _cfg()
    off.log.tensorboard = False
    loop.train(off, str(tmp_path / "off"), _task(), lambda: _Iter())
    assert not [n for n in os.listdir(tmp_path / "off") if n.startswith("events.")]


def test_without_tensorboardx_the_job_runs(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    monkeypatch.setattr(metrics_lib, "_said_no_tensorboard", False)
    caplog.set_level(logging.INFO)
    from loop_test import _cfg, _Iter, _task

    from dalle_jax.train import loop

    def evaluate(params, step):
        metrics_lib.write_images(step, {"eval/grid": np.zeros((4, 4, 3), np.uint8)})
        return {"score": 1.0}

    loop.train(_cfg(), str(tmp_path), _task(evaluate=evaluate), lambda: _Iter())
    assert sorted(metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))) == [2, 3, 4, 6]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("events.")]
    said = [r for r in caplog.records if "tensorboardX is not installed" in r.getMessage()]
    assert len(said) == 1 and getattr(said[0], logs.CONSOLE)
    metrics_lib.MetricWriter(str(tmp_path / "again")).close()  # said once per process
    assert len([r for r in caplog.records if "tensorboardX" in r.getMessage()]) == 1
