"""The on-disk cache shared by every module that keeps files between runs.

One root (``$MTL_CACHE_DIR``, else ``~/.cache/mtl``), with a folder per user of it: the downloaded
data (:mod:`mtl.data`, ``data/<commit>``), the stage-1 encoders (:mod:`mtl.contrastive`,
``stage1``) and the Optuna studies of experiments on object storage
(:mod:`mtl.search.experiment`, ``studies``); one content digest (sha256 of a file's bytes); one way to write a file so that a
reader never sees it half-written (a temporary name in the same folder, then an atomic rename);
one way to build a cached file in one process at a time (a ``filelock`` beside it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock


def cache_root() -> Path:
    """``$MTL_CACHE_DIR``, else ``~/.cache/mtl``."""
    root = os.environ.get("MTL_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mtl"


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, then rename it to ``path`` atomically.

    If ``write`` raises (say a download fails its check) or the rename fails, the temporary file
    is removed and ``path`` is untouched: concurrent readers see the old file or the whole new
    one, never a part.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(lock_path: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """Hold the file lock ``lock_path`` (a ``filelock.FileLock``) for the block, so that one
    process or thread at a time builds a cached file; the others wait, then find it built.

    The caller looks for the file again inside the block: whoever waited reads what the holder
    stored instead of building it again. The lock is released when the block ends, raises
    included; on Unix it is an ``flock``, which the kernel drops if the holder dies.

    Args:
        lock_path: The lock file, beside the file it guards.
        waiting: Called once, before blocking, when another holder has the lock (say, to log
            that this run waits for it); not called when the lock is free.

    Raises:
        OSError: The lock file cannot be created (e.g. a read-only folder).
    """
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        waiting()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
