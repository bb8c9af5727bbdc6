"""What a person sees: one line per stage, rank 0's progress, warnings that need action; the rest in a log file.

The console shows raptor's own records (the driver's, and the workers' lines that carry
:data:`MARK`, see ``raptor.train.logs``), and errors from anyone. Everything else, Ray's and DeepSpeed's
messages, the workers' prints and Python warnings, goes to the run's log file
(``{storage.url}/logs/raptor-<time>.log``), at full detail. ``-v`` shows it all on the console too.
Where the console is a terminal, rank 0's progress lines overwrite each other as a progress bar.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from typing import Any, TextIO

from raptor import storage

log = logging.getLogger(__name__)

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MARK = "[raptor] "  # a worker's own lines start with it (raptor.train.logs), so the driver can pick them out
WORKER_FORMAT = MARK + "%(levelname)s %(name)s: %(message)s"
_WORKER_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): (.*)")
_PROGRESS = re.compile(r"^stage\d step \d+/\d+ ")


class ConsoleHandler(logging.StreamHandler):
    """``HH:MM:SS message`` for raptor's INFO; the level and logger for warnings and errors.

    Only raptor's records and errors pass unless ``verbose``; on a terminal, progress lines
    (``stage1 step 10/200 ...``) rewrite one line instead of scrolling.
    """

    def __init__(self, stream: TextIO, verbose: bool):
        super().__init__(stream)
        self.verbose = verbose
        self.tty = stream.isatty()
        self._open_bar = False
        self.setLevel(logging.DEBUG if verbose else logging.INFO)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        return record.name.startswith("raptor") or record.levelno >= logging.ERROR

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING or self.verbose:
            return f"{stamp} {record.levelname} {record.name}: {text}"
        return f"{stamp} {text}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            bar = self.tty and record.levelno == logging.INFO and bool(_PROGRESS.match(record.getMessage()))
            if bar:
                self.stream.write("\r" + text[: os.get_terminal_size(self.stream.fileno()).columns - 1] + "\x1b[K")
            else:
                self.stream.write(("\n" if self._open_bar else "") + text + "\n")
            self._open_bar = bar
            self.flush()
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def setup(verbose: bool) -> None:
    """The console handler on stderr for every ``raptor`` command; Python warnings become log records."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, (ConsoleHandler, RunLogHandler))]
    root.addHandler(ConsoleHandler(sys.stderr, verbose))
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    for noisy in ("matplotlib", "PIL", "urllib3", "botocore", "s3fs", "fsspec", "asyncio", "filelock"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


class RunLogHandler(logging.FileHandler):
    """The run's log file: every record at full detail."""


def log_file(run_url: str, name: str) -> str:
    """Send every record, at full detail, to ``<run>/logs/raptor-<time>.log`` (a local copy for remote runs)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if storage.scheme(run_url) == "file":
        folder = os.path.join(run_url, "logs")
    else:
        folder = os.path.join(os.environ.get("RAPTOR_LOG_DIR") or tempfile.gettempdir(), "raptor-logs", name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"raptor-{stamp}.log")
    handler = RunLogHandler(path)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, RunLogHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    return path


def adopt_ray_loggers() -> None:
    """Ray's loggers print to stderr on their own; send their records through ours instead."""
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def _worker_output(data: dict[str, Any]) -> None:
    """One batch of lines a Ray worker printed: raptor's lines to its loggers, the rest to the log file."""
    who = f"{data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')}"
    chatter = logging.getLogger("workers")  # not under "ray": ray.init sets that logger's level to WARNING
    for line in data.get("lines", []):
        if line.startswith(MARK) and (m := _WORKER_LINE.match(line[len(MARK):])):
            logging.getLogger(m.group(2)).log(logging.getLevelName(m.group(1)), "%s", m.group(3))
        else:
            chatter.debug("(%s) %s", who, line)


def route_worker_output() -> None:
    """Replace Ray's printer of worker output in this driver with :func:`_worker_output`.

    Ray offers no public hook for this; without the dispatcher (another Ray version) its printer
    stays, and the console is only noisier.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        log.debug("Ray's worker-output dispatcher is not available; worker output is printed as it comes")
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("raptor")
    dispatcher.add_handler("raptor", _worker_output)
