"""The on-disk tokenized-data cache (mtl.data.load_packed_task_data) on the real CS224N files.

Each test has its own cache root (``MTL_CACHE_DIR``) and uses the tiny backbone's tokenizer
(MiniLM's real one); the data are slices (``max_*_examples``) of the real files, read in full.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock

from mtl.backbones import load_tokenizer
from mtl.config import DataConfig
from mtl.data import (
    TaskData,
    load_packed_task_data,
    load_task_data,
    tokenized_cache_dir,
    tokenized_key,
    unpack,
)

SLICES = {"max_train_examples": 96, "max_eval_examples": 32, "max_length": 40}


@pytest.fixture(autouse=True)
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone: Path):
    return load_tokenizer(tiny_backbone)


def _cfg(data_dir: Path, **changes) -> DataConfig:
    return DataConfig(data_dir=str(data_dir), **{**SLICES, **changes})


def _load(cfg: DataConfig, tokenizer, tokenizer_dir: Path, seed: int = 0) -> TaskData:
    return unpack(load_packed_task_data(cfg, tokenizer, tokenizer_dir, 2, seed))


def _files() -> list[Path]:
    return sorted(tokenized_cache_dir().glob("*.pkl"))


def assert_same_data(a: TaskData, b: TaskData) -> None:
    assert (a.missing, a.test_rows, a.data_dir) == (b.missing, b.test_rows, b.data_dir)
    assert [vars(r) for r in a.reports] == [vars(r) for r in b.reports]
    for split in ("train", "dev", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert sa.keys() == sb.keys()
        for task in sa:
            ea, eb = sa[task], sb[task]
            assert ea.ids == eb.ids
            assert (ea.labels is None) == (eb.labels is None)
            if ea.labels is not None:
                assert ea.labels.dtype == eb.labels.dtype and torch.equal(ea.labels, eb.labels)
            assert torch.equal(ea.lengths, eb.lengths)
            for name in ("input_ids", "token_type_ids", "input_ids_b"):
                xa, xb = getattr(ea, name), getattr(eb, name)
                assert (xa is None) == (xb is None), name
                if xa is not None:
                    assert len(xa) == len(xb)
                    assert all(
                        u.dtype == v.dtype and torch.equal(u, v)
                        for u, v in zip(xa, xb, strict=True)
                    )


def test_hit_equals_a_fresh_build_and_warns_the_same(
    real_data_dir: Path, tiny_backbone: Path, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(real_data_dir)
    fresh = load_task_data(cfg, tokenizer, 2, 0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtl.data"):
        cold = _load(cfg, tokenizer, tiny_backbone)
        cold_warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(_files()) == 1
        caplog.clear()
        warm = _load(cfg, tokenizer, tiny_backbone)
    assert any("tokenized data from the cache" in r.getMessage() for r in caplog.records)
    warm_warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # The real quora-train.csv has two empty labels: the skip report survives the cache.
    assert any("quora-train.csv: skipped 2" in w for w in cold_warnings)
    assert warm_warnings == cold_warnings
    assert_same_data(cold, fresh)
    assert_same_data(warm, fresh)
    assert len(_files()) == 1


def _copy_backbone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("change", ["data file bytes", "max_length", "tokenizer file", "seed"])
def test_what_the_data_depends_on_misses(
    change: str, real_data_dir: Path, tiny_backbone: Path, tokenizer, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(real_data_dir, data_dir)
    backbone = _copy_backbone(tiny_backbone, tmp_path / "backbone")
    first = _load(_cfg(data_dir), tokenizer, backbone)
    cfg, seed = _cfg(data_dir), 0
    if change == "data file bytes":
        # The same rows, one sentence changed: same size and shape, different bytes.
        path = data_dir / "ids-sst-dev.csv"
        path.chmod(0o644)
        lines = path.read_text().splitlines(keepends=True)
        lines = [lines[0]] + [line.replace(" the ", " a ", 1) for line in lines[1:]]
        path.write_text("".join(lines))
    elif change == "max_length":
        cfg = _cfg(data_dir, max_length=24)
    elif change == "tokenizer file":
        path = backbone / "tokenizer_config.json"
        path.chmod(0o644)
        path.write_text(json.dumps({**json.loads(path.read_text()), "model_max_length": 256}))
    else:
        seed = 1
    second = _load(cfg, tokenizer, backbone, seed)
    assert len(_files()) == 2
    assert_same_data(second, load_task_data(cfg, tokenizer, 2, seed))
    if change != "tokenizer file":  # its tokens do not change, only the bytes of its config
        with pytest.raises(AssertionError):
            assert_same_data(second, first)


def test_data_folder_and_batching_do_not_miss(
    real_data_dir: Path, tiny_backbone: Path, tokenizer, tmp_path: Path
) -> None:
    """The files are keyed by their bytes: a copy elsewhere, or another batching, is a hit."""
    _load(_cfg(real_data_dir), tokenizer, tiny_backbone)
    copy = tmp_path / "copy"
    shutil.copytree(real_data_dir, copy)
    data = _load(_cfg(copy, bucket=False), tokenizer, tiny_backbone)
    assert len(_files()) == 1
    assert data.data_dir == copy.resolve() or data.data_dir == copy


def test_truncated_cache_file_is_rebuilt_with_a_warning(
    real_data_dir: Path, tiny_backbone: Path, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(real_data_dir)
    fresh = _load(cfg, tokenizer, tiny_backbone)
    (path,) = _files()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="mtl.data"):
        rebuilt = _load(cfg, tokenizer, tiny_backbone)
    assert any(
        "unreadable" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records
    )
    assert_same_data(rebuilt, fresh)
    with path.open("rb") as fh:  # rebuilt whole
        assert isinstance(pickle.load(fh), TaskData)


def test_concurrent_writers_leave_one_whole_file(real_data_dir: Path, tiny_backbone: Path) -> None:
    cfg = _cfg(real_data_dir)

    def build(_: int) -> TaskData:
        # A tokenizer per thread: one fast tokenizer is not shared across threads.
        return _load(cfg, load_tokenizer(tiny_backbone), tiny_backbone)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(build, range(4)))
    for other in results[1:]:
        assert_same_data(other, results[0])
    assert len(_files()) == 1
    assert not list(tokenized_cache_dir().glob(".*"))  # no temporary file left
    assert_same_data(_load(cfg, load_tokenizer(tiny_backbone), tiny_backbone), results[0])


def test_a_build_in_progress_is_waited_for_and_read_not_repeated(
    real_data_dir: Path, tiny_backbone: Path, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """While another process holds the dataset's lock (it is tokenizing), a second asker waits,
    then reads what the first stored instead of tokenizing again: here the file the lock
    holder stores is another slice of the data, so only reading it gives that slice."""
    cfg = _cfg(real_data_dir)
    other = load_packed_task_data(
        _cfg(real_data_dir, max_train_examples=8), tokenizer, tiny_backbone, 2, 0
    )
    (other_path,) = _files()
    other_path.unlink()
    path = tokenized_cache_dir() / f"{tokenized_key(cfg, real_data_dir, tiny_backbone, 2, 0)}.pkl"
    lock = FileLock(f"{path}.lock")
    lock.acquire()
    with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.INFO, logger="mtl.data"):
        try:
            asked = pool.submit(_load, cfg, load_tokenizer(tiny_backbone), tiny_backbone)
            time.sleep(2)  # ample for this slice's build, were it not waiting
            assert not asked.done()
            path.write_bytes(pickle.dumps(other))
        finally:
            lock.release()
        got = asked.result(timeout=60)
    assert_same_data(got, unpack(other))
    assert len(got.train["sst"]) == 8
    waits = [r.getMessage() for r in caplog.records if "waiting for it" in r.getMessage()]
    assert waits == [f"another run is tokenizing {path.name}; waiting for it"]


def test_without_a_folder_for_the_cache_the_data_is_built_unlocked_with_a_warning(
    real_data_dir: Path, tiny_backbone: Path, tokenizer, tmp_path: Path, monkeypatch, caplog
) -> None:
    """A cache root that cannot hold a folder (here a file) costs the sharing, not the run."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("MTL_CACHE_DIR", str(not_a_folder))
    cfg = _cfg(real_data_dir)
    with caplog.at_level(logging.WARNING, logger="mtl.data"):
        got = _load(cfg, tokenizer, tiny_backbone)
    assert_same_data(got, load_task_data(cfg, tokenizer, 2, 0))
    warnings = [r.getMessage() for r in caplog.records]
    assert any(w.startswith("could not lock ") and "tokenizing without it" in w for w in warnings)
    assert any(w.startswith("could not store the tokenized data") for w in warnings)


def test_switched_off_stores_nothing(real_data_dir: Path, tiny_backbone: Path, tokenizer) -> None:
    cfg = _cfg(real_data_dir, cache_tokenized=False)
    assert_same_data(_load(cfg, tokenizer, tiny_backbone), load_task_data(cfg, tokenizer, 2, 0))
    assert not tokenized_cache_dir().exists()


@pytest.mark.slow
def test_second_search_reads_the_first_searchs_tokenized_data(
    tmp_path: Path, tiny_backbone: Path, real_data_dir: Path, cache_root: Path
) -> None:
    """Through ``python -m mtl.search``: the DataCache actor of a second search on the same data
    loads the file the first one stored. The stored skip report is marked after the first search,
    and the second search's trial writes the marked report into its data_report.json."""
    from tests.test_search_run import run_cli, tiny_space, trial_dirs

    one_trial = {
        "num_samples": 1,
        "points_to_evaluate": [{"lr": 1e-3, "pooling": "cls"}],
        "repeats": None,
        "startup_trials": 1,
    }
    train = {"epochs": 1, "eval_every": 1, "max_steps": 2}
    for name in ("first", "second"):
        space = tiny_space(tmp_path, tiny_backbone, real_data_dir, name, search=one_trial)
        raw = yaml.safe_load(space.read_text())
        raw["base"]["train"].update(train)
        space.write_text(yaml.safe_dump(raw, sort_keys=False))
        run_cli(space)
        (path,) = _files()
        if name == "first":
            with path.open("rb") as fh:
                data = pickle.load(fh)
            data.reports[0].skipped["marked by the test"] = 7
            path.write_bytes(pickle.dumps(data))
    (trial,) = trial_dirs(tmp_path / "results" / "second")
    report = json.loads((trial / "data_report.json").read_text())
    assert report["skipped"][0]["skipped"]["marked by the test"] == 7
