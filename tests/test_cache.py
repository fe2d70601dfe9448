"""The one on-disk cache module: its root, its file digest, its atomic write, its build lock, and
no twin of it."""

from __future__ import annotations

import ast
import hashlib
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from mtl import cache, contrastive
from mtl import data as data_lib
from mtl.search import experiment

ROOT = Path(__file__).resolve().parents[1]


def test_every_user_of_the_cache_is_under_one_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "root"))
    assert cache.cache_root() == tmp_path / "root"
    assert data_lib.default_cache_dir().parent.parent == tmp_path / "root"
    assert contrastive.default_cache_dir() == tmp_path / "root" / "stage1"
    url = experiment.default_study_url("s3://bucket/experiments", "exp")
    assert url.startswith(f"sqlite:///{(tmp_path / 'root' / 'studies').resolve()}/")
    monkeypatch.setenv("MTL_CACHE_DIR", "")
    assert cache.cache_root() == Path.home() / ".cache" / "mtl"


def test_sha256_file_is_hashlibs_digest_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    assert cache.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failed_atomic_write_leaves_the_old_file_and_no_part(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.txt"
    cache.atomic_write(path, lambda tmp: tmp.write_text("old"))

    def fails(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("download failed its check")

    with pytest.raises(RuntimeError, match="its check"):
        cache.atomic_write(path, fails)
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def _twins(path: Path) -> list[str]:
    """What in ``path`` re-implements the cache module: its environment variable, a file digest,
    an atomic rename or a file lock of its own."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and node.value == "MTL_CACHE_DIR":
            found.append(f"{node.lineno}: reads $MTL_CACHE_DIR")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            name = f"{node.value.id}.{node.attr}"
            if name in ("os.replace", "hashlib.file_digest"):
                found.append(f"{node.lineno}: {name}")
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            modules = []
        if any(module.split(".")[0] == "filelock" for module in modules):
            found.append(f"{node.lineno}: imports filelock")
    return found


def test_no_module_but_mtl_cache_reimplements_it() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{where}"
        for folder in ("mtl", "analysis")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "mtl" / "cache.py"
        for where in _twins(path)
    ]
    assert offenders == []


def test_the_twin_check_finds_a_second_cache_root(tmp_path: Path) -> None:
    path = tmp_path / "twin.py"
    path.write_text(
        'import os\nroot = os.environ.get("MTL_CACHE_DIR")\nos.replace("a", "b")\n'
        "from filelock import FileLock\nimport filelock\n"
    )
    assert sorted(_twins(path)) == [
        "2: reads $MTL_CACHE_DIR",
        "3: os.replace",
        "4: imports filelock",
        "5: imports filelock",
    ]


def test_exclusive_makes_a_second_builder_wait_for_the_first(tmp_path: Path) -> None:
    """While another holder has the lock, ``exclusive`` calls ``waiting`` once, then blocks
    until the lock is released; a free lock is taken without calling it."""
    lock_path = tmp_path / "key.pkl.lock"
    waits: list[str] = []
    with cache.exclusive(lock_path, lambda: waits.append("free")):
        assert waits == []
        # Held: another holder (its own FileLock, as another process has) cannot take it.
        with pytest.raises(TimeoutError):
            FileLock(lock_path).acquire(timeout=0)
    holder = FileLock(lock_path)
    holder.acquire()
    waited, entered = threading.Event(), threading.Event()

    def second() -> None:
        with cache.exclusive(lock_path, waited.set):
            entered.set()

    thread = threading.Thread(target=second)
    try:
        thread.start()
        assert waited.wait(timeout=30)
        assert not entered.wait(timeout=0.5)  # blocked while the holder has it
    finally:
        holder.release()
    thread.join(timeout=30)
    assert entered.is_set()


def test_exclusive_releases_the_lock_when_the_build_raises(tmp_path: Path) -> None:
    lock_path = tmp_path / "key.lock"
    with (
        pytest.raises(RuntimeError, match="build failed"),
        cache.exclusive(lock_path, lambda: pytest.fail("the lock was free")),
    ):
        raise RuntimeError("build failed")
    lock = FileLock(lock_path)
    lock.acquire(timeout=0)  # raises Timeout if the failed build still held it
    lock.release()


def test_exclusive_raises_oserror_where_no_lock_file_can_be_made(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with (
        pytest.raises(OSError),
        cache.exclusive(not_a_folder / "key.lock", lambda: pytest.fail("nothing held it")),
    ):
        pytest.fail("entered without the lock")
