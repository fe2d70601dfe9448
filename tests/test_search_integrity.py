"""The experiment records exactly what ran: ASHA at max_t, refused settings, resumes, crashes.

Every search runs ``python -m mtl.search`` in a subprocess with its own local Ray, on the tiny
BERT of test_search_run.py, with as few trials and evaluations as each case needs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from ray.tune.schedulers.async_hyperband import _Bracket

from mtl.search.scheduler import EvaluationASHA
from tests.test_search_run import _cli, _env, run_cli, study_of, tiny_space

pytestmark = pytest.mark.slow


def _space(root: Path, backbone: Path, data_dir: Path, name: str, **sections: dict) -> Path:
    """tiny_space with two trials one at a time, no repeats; ``sections`` replace whole sections."""
    path = tiny_space(root, backbone, data_dir, name)
    raw = yaml.safe_load(path.read_text())
    raw["search"] = {"sampler": "tpe", "num_samples": 2, "max_concurrent_trials": 1}
    raw.update(sections)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(space: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m mtl.search`` with any exit status (run_cli asserts 0)."""
    return subprocess.run(
        _cli(space, *extra),
        cwd=cwd or space.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=480,
    )


# ---------------------------------------------------------------------------------------------
# 1. ASHA never stops a trial that ran its whole budget


@pytest.mark.parametrize(
    ("max_t", "grace", "rf"), [(4, 1, 2), (4, 4, 2), (9, 1, 3), (10, 1, 3), (20, 2, 1.5)]
)
def test_asha_rungs_are_rays_below_max_t(max_t, grace, rf):
    ours = EvaluationASHA(
        time_attr="evaluation",
        metric="m",
        mode="max",
        max_t=max_t,
        grace_period=grace,
        reduction_factor=rf,
    )
    rays = sorted(m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs)
    assert ours.rungs == [m for m in rays if m < max_t]


def test_a_trial_that_reached_max_t_is_completed(tmp_path, tiny_backbone, real_data_dir):
    # Ray's ASHA has its only rung at max_t = grace_period = 4: it stopped the lr 0 trial there.
    space = _space(
        tmp_path,
        tiny_backbone,
        real_data_dir,
        "maxt",
        search={
            "sampler": "tpe",
            "num_samples": 2,
            "max_concurrent_trials": 1,
            "points_to_evaluate": [{"lr": 3.0e-3}, {"lr": 0.0}],
        },
        scheduler={"type": "asha", "grace_period": 4, "reduction_factor": 2},
    )
    proc = run_cli(space)
    assert "ASHA: no rung below max_t 4" in proc.stdout
    exp = tmp_path / "results" / "maxt"
    df = pd.read_csv(exp / "results.csv")
    assert list(df["status"]) == ["completed", "completed"]
    assert list(df["evaluations"]) == [4, 4]
    assert all((Path(d) / "outcome.json").is_file() for d in df["trial_dir"])
    states = {t.params["lr"]: t.state for t in study_of(space).trials}
    assert states == {
        3.0e-3: optuna.trial.TrialState.COMPLETE,
        0.0: optuna.trial.TrialState.COMPLETE,
    }


# ---------------------------------------------------------------------------------------------
# 9. A search in which every trial failed


def test_a_search_whose_every_trial_failed_exits_non_zero(tmp_path, tiny_backbone, real_data_dir):
    space = _space(
        tmp_path,
        tiny_backbone,
        real_data_dir,
        "allfail",
        search={"sampler": "random", "num_samples": 1, "points_to_evaluate": [{"lr": 1e30}]},
    )
    proc = cli(space)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: all 1 trials failed" in proc.stderr
    df = pd.read_csv(tmp_path / "results" / "allfail" / "results.csv")
    assert list(df["status"]) == ["error"]
