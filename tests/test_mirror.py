"""The trial's copy of the trainer's run folder into the folder Tune syncs (``mirror``)."""

from __future__ import annotations

import threading
from pathlib import Path

from mtl.search.trainable import mirror


def _versions(n: int, size: int) -> list[bytes]:
    # Each version is the previous one grown, like an events file; every byte says its version.
    return [bytes([i]) * (size * (i + 1)) for i in range(n)]


def test_a_reader_never_sees_a_half_written_file(tmp_path):
    run, work = tmp_path / "run", tmp_path / "work"
    (run / "tb").mkdir(parents=True)
    work.mkdir()
    versions = _versions(12, 1 << 20)
    seen: list[bytes] = []
    done = threading.Event()

    def reader() -> None:  # what Tune's syncer does: read whatever is in the folder, any time
        while not done.is_set():
            path = work / "tb" / "events"
            if path.is_file():
                seen.append(path.read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for data in versions:
            (run / "tb" / "events").write_bytes(data)
            mirror(run, work)
    finally:
        done.set()
        thread.join()
    assert seen, "the reader never ran"
    assert all(data in versions for data in seen)
    assert (work / "tb" / "events").read_bytes() == versions[-1]


def test_weights_stay_out_and_best_json_comes_up(tmp_path):
    run, work = tmp_path / "run", tmp_path / "work"
    for folder in ("checkpoint", "best", "tb"):
        (run / folder).mkdir(parents=True)
    (run / "checkpoint" / "model.safetensors").write_bytes(b"w" * 100)
    (run / "best" / "model.safetensors").write_bytes(b"w" * 100)
    (run / "best" / "best.json").write_text('{"overall": 0.5}')
    (run / "tb" / "events").write_bytes(b"e")
    (run / "metrics.json").write_text("{}")
    work.mkdir()
    mirror(run, work)
    files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    assert files == ["best.json", "metrics.json", "tb/events"]
    # No staging folder is left beside the synced one.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "work"]


def test_unchanged_files_are_not_copied_again_and_changed_ones_are(tmp_path):
    run, work = tmp_path / "run", tmp_path / "work"
    run.mkdir()
    work.mkdir()
    (run / "config.yaml").write_text("a: 1\n")
    (run / "metrics.json").write_text("[1]")
    mirror(run, work)
    inode = (work / "config.yaml").stat().st_ino
    (run / "metrics.json").write_text("[1, 2]")
    mirror(run, work)
    assert (work / "config.yaml").stat().st_ino == inode
    assert (work / "metrics.json").read_text() == "[1, 2]"


def test_a_missing_run_folder_copies_nothing(tmp_path):
    mirror(tmp_path / "never-created", tmp_path / "work")
    assert not (tmp_path / "work").exists()
    assert list(Path(tmp_path).iterdir()) == []
