"""The one on-disk cache module: its root, its file digest, its atomic write, and no twin of it."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

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
    """What in ``path`` re-implements the cache module: its environment variable, a file digest
    or an atomic rename of its own."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and node.value == "MTL_CACHE_DIR":
            found.append(f"{node.lineno}: reads $MTL_CACHE_DIR")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            name = f"{node.value.id}.{node.attr}"
            if name in ("os.replace", "hashlib.file_digest"):
                found.append(f"{node.lineno}: {name}")
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
    path.write_text('import os\nroot = os.environ.get("MTL_CACHE_DIR")\nos.replace("a", "b")\n')
    assert _twins(path) == ["2: reads $MTL_CACHE_DIR", "3: os.replace"]
