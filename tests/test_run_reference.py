"""results/run_reference.sh decides per experiment whether to start, resume or skip a search.

The decision is the script's own shell logic, so these tests source it and put a recording
``python`` in front of the real one: each call's arguments are written down and the search's exit
status is the one ``mtl.search`` gives (0 finished, 1 interrupted; see ``mtl.search.__main__``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "results" / "run_reference.sh"

HARNESS = """
source "$SCRIPT" "$STORAGE"
python() {  # records the call; mtl.search makes its folder and exits with $SEARCH_STATUS
  echo "$*" >> "$CALLS"
  if [ "$2" = mtl.search ]; then mkdir -p "$STORAGE/exp"; return "$SEARCH_STATUS"; fi
}
search search_spaces/quick.yaml exp
echo "after search" >> "$CALLS"
"""


def _run(tmp_path: Path, search_status: int) -> tuple[int, list[str]]:
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = {
        "PATH": "/usr/bin:/bin",
        "SCRIPT": str(SCRIPT),
        "STORAGE": str(tmp_path / "storage"),
        "CALLS": str(calls),
        "SEARCH_STATUS": str(search_status),
    }
    proc = subprocess.run(["bash", "-c", HARNESS], env=env, cwd=tmp_path, timeout=60)
    return proc.returncode, calls.read_text().splitlines()


def _searches(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m mtl.search")]


def test_a_new_experiment_starts_and_is_marked_complete_when_the_search_finishes(tmp_path):
    code, calls = _run(tmp_path, 0)
    assert code == 0
    (search,) = _searches(calls)
    assert "--resume" not in search and "experiment.name=exp" in search
    assert any(c.startswith("-m analysis.tables") for c in calls)
    assert (tmp_path / "storage" / "exp" / "reference-complete").is_file()
    assert calls[-1] == "after search"


def test_an_interrupted_search_is_resumed_though_it_wrote_results_csv(tmp_path):
    # An interrupted mtl.search writes results.csv (its unfinished trials marked) and exits 1.
    exp = tmp_path / "storage" / "exp"
    exp.mkdir(parents=True)
    (exp / "results.csv").write_text("trial,status\n0001,unfinished\n")
    code, calls = _run(tmp_path, 1)
    (search,) = _searches(calls)
    assert search.endswith("--resume")
    # Interrupted again: the script stops there, no tables of a half-run, no completion mark.
    assert code == 1
    assert "after search" not in calls and not any("analysis" in c for c in calls)
    assert not (exp / "reference-complete").exists()
    # The resume that finishes marks it; the run after that skips the search.
    code, calls = _run(tmp_path, 0)
    assert code == 0 and (exp / "reference-complete").is_file()
    code, calls = _run(tmp_path, 0)
    assert code == 0 and _searches(calls) == []
    assert any(c.startswith("-m analysis.tables") for c in calls)


def _sourced(tmp_path: Path, body: str, **env: str) -> str:
    script = f'source "$SCRIPT" "{tmp_path / "storage"}"\n{body}'
    env = {"PATH": "/usr/bin:/bin", "SCRIPT": str(SCRIPT), **env}
    proc = subprocess.run(
        ["bash", "-c", script], env=env, cwd=tmp_path, timeout=60, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_grids_budget_needs_no_settings(tmp_path):
    """Run with no settings, the script gives each grid the budget of the issue-17 reference
    grids: 2,000 training examples per task, Tables 1-2 at the paper's per-mode learning rates
    and Tables 3-5 at 1e-4 (before, one LR for all: the tables took two differently set runs)."""
    body = 'printf "%s\\n" "${budget[@]}"; for g in tables_1_2_x table_3_y; do echo "$g=$(grid_lr $g)"; done'
    out = _sourced(tmp_path, body).splitlines()
    assert "base.data.max_train_examples=2000" in out
    assert "tables_1_2_x=" in out and "table_3_y=base.train.lr=1e-4" in out
    out = _sourced(tmp_path, body, LR="3e-5", EXAMPLES="500").splitlines()
    assert "base.data.max_train_examples=500" in out
    assert "tables_1_2_x=base.train.lr=3e-5" in out and "table_3_y=base.train.lr=3e-5" in out


def test_each_grid_search_gets_its_learning_rate(tmp_path):
    """run_grids, the loop the script runs, passes grid_lr's setting to mtl.search."""
    calls = tmp_path / "calls.txt"
    body = (
        'python() { echo "$*" >> "$CALLS"; '
        'if [ "$2" = mtl.search ]; then mkdir -p "$STORAGE/${8#experiment.name=}"; fi; }\n'
        "run_grids tables_1_2_design_mode_routine table_3_design_smart\n"
    )
    storage = tmp_path / "storage"
    _sourced(tmp_path, body, CALLS=str(calls), STORAGE=str(storage))
    searches = [c for c in calls.read_text().splitlines() if c.startswith("-m mtl.search")]
    assert len(searches) == 2
    assert "base.train.lr" not in searches[0] and "experiment.name=tables_1_2" in searches[0]
    assert searches[1].endswith("--set base.train.lr=1e-4")


def test_a_finished_search_is_not_analysed_again_once_its_report_is_newer(tmp_path):
    """A rerun after an interruption redid the bootstrap tables of every grid that had finished
    (minutes each); they are made again only if the search finished after its report."""
    name = f"exp-{tmp_path.name}"  # results/NAME is the repo's own folder: a name of this test's
    report = REPO / "results" / name / "report.md"
    calls = tmp_path / "calls.txt"
    storage = tmp_path / "storage"
    (storage / name).mkdir(parents=True)
    marker = storage / name / "reference-complete"
    marker.touch()
    body = 'python() { echo "$*" >> "$CALLS"; }\n' + f"search search_spaces/quick.yaml {name}\n"
    try:
        _sourced(tmp_path, body, CALLS=str(calls))
        assert [c.split()[1] for c in calls.read_text().splitlines()] == ["analysis.tables"]
        report.parent.mkdir()
        report.write_text("made after the search finished\n")
        calls.write_text("")
        _sourced(tmp_path, body, CALLS=str(calls))
        assert calls.read_text() == ""  # nothing searched, nothing analysed
        os.utime(report, (marker.stat().st_mtime - 60,) * 2)  # the search finished after it
        _sourced(tmp_path, body, CALLS=str(calls))
        assert [c.split()[1] for c in calls.read_text().splitlines()] == ["analysis.tables"]
    finally:
        shutil.rmtree(report.parent, ignore_errors=True)


def test_a_rerun_search_gets_its_importance_ensemble_and_report_again(tmp_path):
    """quick's and full-cpu's analyses were skipped whenever results/NAME/ensemble/ensemble.json
    existed, so a search run again kept the old run's ensemble and report; they follow the same
    rule as the grids now: made again only if the search finished after its report."""
    name = f"exp-{tmp_path.name}"
    report = REPO / "results" / name / "report.md"
    (REPO / "results" / name / "ensemble").mkdir(parents=True)
    try:
        (REPO / "results" / name / "ensemble" / "ensemble.json").write_text("{}")
        report.write_text("the previous run's\n")
        marker = tmp_path / "storage" / name / "reference-complete"
        marker.parent.mkdir(parents=True)
        marker.touch()
        os.utime(report, (marker.stat().st_mtime - 60,) * 2)  # the search finished after it
        calls = tmp_path / "calls.txt"
        body = 'python() { echo "$*" >> "$CALLS"; }\n' + f"analyse_search {name} --top-k 3\n"
        _sourced(tmp_path, body, CALLS=str(calls))
        made = [c.split()[1] for c in calls.read_text().splitlines()]
        assert made == ["analysis.importance", "analysis.ensemble", "analysis.report"]
        assert "--top-k 3 --out results/" in calls.read_text().splitlines()[1]
        report.touch()  # now the report is the newer
        calls.write_text("")
        _sourced(tmp_path, body, CALLS=str(calls))
        assert calls.read_text() == ""
    finally:
        shutil.rmtree(report.parent, ignore_errors=True)
