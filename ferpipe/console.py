"""What a person sees and what a pod's log keeps: logging set up once per process, library noise kept out.

ferpipe's modules log through `logging.getLogger(__name__)` under the
`ferpipe` logger. A person at a terminal gets ferpipe's lines alone, without
timestamps (`for_console`); a pipeline task writes timestamped, levelled lines
that pod logs and the local run's log file keep (`for_task`). TensorFlow's
start-up chatter (oneDNN, absl, CPU features, CUDA probing), MLflow's and
Alembic's informational lines and libraries' deprecation warnings stay out of
a console unless `--verbose`: they say nothing about the run.

TensorFlow reads its log level once, when it is first imported, so both set-ups
must run before anything imports it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

ROOT = "ferpipe"
TASK_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of libraries that report their own housekeeping at INFO.
CHATTY = ("mlflow", "alembic", "absl", "tensorflow", "h5py", "matplotlib", "urllib3", "botocore", "kfp")


def _quiet_tensorflow(level: str) -> None:
    # 1 hides INFO (oneDNN, CPU features), 2 also WARNING (CUDA probing on CPU machines); errors always show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", level)


def _handler(stream, fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%d %H:%M:%S"))
    return handler


def _install(handler: logging.Handler, level: int, libraries: int) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "ferpipe", False)]:  # ours only: a host's stay
        root.removeHandler(old)
    handler.ferpipe = True
    root.addHandler(handler)
    root.setLevel(libraries)
    logging.getLogger(ROOT).setLevel(level)
    for name in CHATTY:
        logging.getLogger(name).setLevel(libraries)


def for_console(verbose: bool = False) -> None:
    """A person's terminal: ferpipe's lines as plain text on stdout; everything with --verbose."""
    if verbose:
        _install(_handler(sys.stdout, TASK_FORMAT), logging.DEBUG, logging.DEBUG)
        return
    _quiet_tensorflow("2")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(keras|tensorflow|mlflow|kfp)(\.|$)")
    _install(_handler(sys.stdout, "%(message)s"), logging.INFO, logging.WARNING)
    # urllib3 warns at each retry of an S3 call; the one-line error after the last retry says it all.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def for_task() -> None:
    """A pipeline task (a pod, or a local-runner subprocess): timestamps and levels, library warnings kept.

    The process is the task's: KFP's executor has already given the root logger a console handler of its
    own (`basicConfig`), and beside ours it printed every line twice, so ours replaces it.
    """
    _quiet_tensorflow("1")
    root = logging.getLogger()
    for host in [h for h in root.handlers if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)]:
        root.removeHandler(host)
    _install(_handler(sys.stdout, TASK_FORMAT), logging.INFO, logging.WARNING)


def progress_bar(iterable=None, **options):
    """tqdm on stderr that hides itself where nobody watches (no terminal: a pod, a log file, CI)."""
    from tqdm import tqdm

    options.setdefault("file", sys.stderr)
    options.setdefault("disable", None)  # None: off unless the stream is a terminal
    options.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **options)
