"""What a person sees: raptor's lines and errors on the console, everything else in the log file."""

from __future__ import annotations

import io
import logging
import os
import select
import time

import pytest

from raptor import console


@pytest.fixture
def handlers(tmp_path):
    """A console on a buffer and a run log file, as `raptor run` sets them up; restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    console.setup(verbose=False)
    console.adopt_ray_loggers()  # as `raptor run` does once Ray is imported (Ray gives its loggers their own handlers)
    root.handlers[-1] = console.ConsoleHandler(buf, verbose=False)
    path = console.log_file(str(tmp_path / "run"), "t")
    yield buf, path
    for h in root.handlers:
        if isinstance(h, console.RunLogHandler):
            h.close()
    root.handlers[:], root.level = saved


def test_console_shows_raptor_and_errors_the_file_gets_everything(handlers):
    """Catches chatter on the console (the ~420-line quickstart) or records missing from the log file."""
    buf, path = handlers
    logging.getLogger("raptor.service.engine.pipeline").info("stage stage1: running")
    logging.getLogger("raptor.data").warning("skipping sample 7: corrupt JPEG")
    logging.getLogger("ray.train").info("Reporting training result 1: TrainingReport(...)")
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
    logging.getLogger("ray").error("worker died")
    shown = buf.getvalue()
    assert "stage stage1: running" in shown and "WARNING raptor.data: skipping sample 7" in shown
    assert "ERROR ray: worker died" in shown
    assert "TrainingReport" not in shown and "accelerator" not in shown
    text = open(path).read()
    assert all(s in text for s in ("stage stage1: running", "TrainingReport", "Setting accelerator", "worker died"))


def test_worker_lines_are_sorted_by_their_mark(handlers):
    """Catches rank 0's progress lost among Ray's worker output, or worker chatter leaking onto the console."""
    buf, path = handlers
    console._worker_output({"pid": 42, "actor_name": "RayTrainWorker", "lines": [
        console.MARK + "INFO raptor.train.metrics: stage1 step 10/200 loss 0.1",
        "[2026-11-30 16:25:35,698] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
        console.MARK + "WARNING raptor.data.reader: rank 1 worker 0: skipping sample 3",
    ]})
    shown = buf.getvalue()
    assert "stage1 step 10/200 loss 0.1" in shown and "WARNING raptor.data.reader: rank 1 worker 0" in shown
    assert "real_accelerator" not in shown
    assert "(RayTrainWorker pid=42) [2026-11-30 16:25:35,698] [WARNING] [real_accelerator" in open(path).read()


def test_progress_rewrites_one_line_on_a_terminal():
    """Catches a terminal flooded with one line per logged step (or a bar that swallows the next message)."""
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        handler = console.ConsoleHandler(tty, verbose=False)
        for step in (10, 20):
            handler.emit(logging.LogRecord("raptor.train.metrics", logging.INFO, "", 0, f"stage2 step {step}/150 loss 0.1", None, None))
        handler.emit(logging.LogRecord("raptor.service.engine.pipeline", logging.INFO, "", 0, "stage stage2: done in 79s", None, None))
        tty.flush()
        out = ""
        deadline = time.monotonic() + 10
        while "done in 79s" not in out and time.monotonic() < deadline:  # a pty hands over what it has so far
            if select.select([master], [], [], 0.5)[0]:
                out += os.read(master, 4096).decode()
    os.close(master)
    lines = out.replace("\r\n", "\n").split("\n")
    assert lines[0].startswith("\r") and "step 10/150" in lines[0] and "\rstep" not in lines[0]
    assert "\r" in lines[0] and "step 20/150" in lines[0]  # both progress updates on one line
    assert "stage stage2: done in 79s" in lines[1]
