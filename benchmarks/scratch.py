"""The benchmarks' run folders: a temporary one is removed when the run ends, unless kept.

A benchmark's runs hold model checkpoints (hundreds of MB to GB each with MiniLM); a temporary
folder left behind after every run fills ``/tmp``. A folder the user names is theirs and stays.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _exit(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def stop_ray() -> None:
    """Stops the Ray this process started, if it still runs (after an error or Ctrl-C)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def add_keep_argument(parser: argparse.ArgumentParser) -> None:
    """``--keep``: leave the temporary run folder in place, and say where it is."""
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary run folder (the runs, with their checkpoints) and say where it"
        " is (default: removed at the end)",
    )


@contextmanager
def run_folder(
    prefix: str,
    keep: bool = False,
    given: str | Path | None = None,
    before_removal: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """The folder a benchmark writes its runs into.

    Args:
        prefix: the temporary folder's name prefix, e.g. ``"trial-startup-"``.
        keep: leave the temporary folder in place and print its path.
        given: the user's folder (created if missing): used instead, and never removed.
        before_removal: runs when the block ends, before anything is removed (e.g. stopping the
            Ray the benchmark started, so that no worker writes there or outlives the run).

    Yields:
        The folder. A temporary one is removed when the block ends, however it ends (an error,
        Ctrl-C, SIGTERM as ``timeout`` sends it), unless ``keep``.
    """
    if given is not None:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix=prefix))
    # SIGTERM (`timeout`, `kill`) would end the process without running the clean-up below.
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield folder
    finally:
        signal.signal(signal.SIGTERM, previous)
        if before_removal is not None:
            before_removal()
        if given is None and keep:
            print(f"kept the run folder {folder}", flush=True)
        elif given is None:
            shutil.rmtree(folder)
