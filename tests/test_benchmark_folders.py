"""The benchmarks clean up after themselves (:mod:`benchmarks.scratch`).

``benchmarks/trial_startup.py``'s smallest run (one trial, the tiny BERT, shared data on the quick
slices) under a real local Ray, with ``TMPDIR`` and ``RAY_TMPDIR`` pointed at folders of this
test: the run's temporary folder (the trials' checkpoints, 2-3 GB with MiniLM) must be gone when
it exits, and no process of its Ray left. The seconds it prints are not checked here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.scratch import run_folder
from tests.conftest import REPO

BENCHMARK = REPO / "benchmarks" / "trial_startup.py"


@pytest.fixture
def short_tmp():
    # Not pytest's tmp_path: Ray's socket paths under RAY_TMPDIR must stay under 107 characters.
    path = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _processes_naming(text: str) -> list[str]:
    """Command lines of the running processes that contain ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if text in cmd:
            found.append(f"{proc.name}: {cmd[:160]}")
    return found


@pytest.mark.slow
def test_the_benchmark_removes_its_folder_and_stops_its_ray(
    tiny_backbone: Path, real_data_dir: Path, short_tmp: Path
) -> None:
    tmp, ray_tmp = short_tmp / "tmp", short_tmp / "ray"
    tmp.mkdir()
    # torch's compile cache is every torch program's, not the run's: kept out of TMPDIR.
    env = {**os.environ, "TMPDIR": str(tmp), "RAY_TMPDIR": str(ray_tmp)}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(short_tmp / "inductor")
    env.pop("RAY_ADDRESS", None)
    args = ["--trials", "1", "--modes", "shared", "--data", "quick"]
    args += ["--backbone", str(tiny_backbone), "--data-dir", str(real_data_dir)]
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quick  shared" in done.stdout  # it measured
    assert not list(tmp.iterdir())
    # Every process of its Ray names RAY_TMPDIR (its session folder); give them time to exit.
    deadline = time.monotonic() + 30
    while _processes_naming(str(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _processes_naming(str(ray_tmp))


def test_a_temporary_run_folder_goes_on_errors_too_and_stays_with_keep(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    stopped = []
    with (
        pytest.raises(KeyboardInterrupt),
        run_folder("x-", before_removal=lambda: stopped.append(root.exists())) as root,
    ):
        (root / "results").mkdir()
        raise KeyboardInterrupt
    assert not root.exists() and stopped == [True]  # stopped before the folder went
    with run_folder("x-", keep=True) as root:
        (root / "results").mkdir()
    assert (root / "results").is_dir()
    assert f"kept the run folder {root}" in capsys.readouterr().out
    # The user's own folder is never removed.
    with run_folder("x-", given=short_tmp / "mine") as root:
        (root / "results").mkdir()
    assert root == short_tmp / "mine" and (root / "results").is_dir()


def test_a_temporary_run_folder_goes_when_timeout_ends_the_run(short_tmp: Path) -> None:
    code = (
        "import time\n"
        "from benchmarks.scratch import run_folder\n"
        "with run_folder('x-') as root:\n"
        "    print(root, flush=True)\n"
        "    time.sleep(60)\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(short_tmp)},
        stdout=subprocess.PIPE,
        text=True,
    )
    root = Path(run.stdout.readline().strip())
    assert root.is_dir() and root.parent == short_tmp
    run.terminate()  # SIGTERM, as `timeout` sends it
    assert run.wait(timeout=30) == 128 + 15
    assert not root.exists()
