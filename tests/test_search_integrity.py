"""The experiment records exactly what ran: ASHA at max_t, refused settings, resumes, crashes.

Every search runs ``python -m mtl.search`` in a subprocess with its own local Ray, on the tiny
BERT of test_search_run.py, with as few trials and evaluations as each case needs.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from ray.tune.schedulers.async_hyperband import _Bracket

from mtl.search import results as results_lib
from mtl.search.results import Summary, TrialRow
from mtl.search.scheduler import EvaluationASHA, asha_rungs
from mtl.search.space import load_space, parse_space
from tests.test_search_run import (
    _cli,
    _env,
    _slow_space,
    _wait,
    kill_driver,
    result_rows,
    run_cli,
    study_of,
    tiny_space,
    trial_dirs,
)

# results.csv's metric columns: overall, then the built-in tasks' (the order before the registry).
METRICS = ("overall", "sst_acc", "para_acc", "sts_pearson")

pytestmark = pytest.mark.slow

RESUME_DIR = [sys.executable, "-m", "mtl.search", "--resume"]  # + EXPERIMENT_DIR


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


def start(space: Path, *extra: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """``python -m mtl.search`` in the background, in its own session (for kill_driver)."""
    return subprocess.Popen(
        _cli(space, *extra),
        cwd=cwd,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
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
    assert asha_rungs(max_t, grace, rf) == ours.rungs  # what the analyses draw and score at


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
# 5, 9. An orphaned study; a search in which every trial failed


def test_orphaned_study_is_named_and_overwrite_starts_afresh(
    tmp_path, tiny_backbone, real_data_dir
):
    # Every trial of this search fails: its loss is NaN at the first step.
    space = _space(
        tmp_path,
        tiny_backbone,
        real_data_dir,
        "orphan",
        search={"sampler": "random", "num_samples": 1, "points_to_evaluate": [{"lr": 1e30}]},
    )
    db = tmp_path / "results" / "orphan.optuna.db"
    db.parent.mkdir()
    optuna.create_study(study_name="orphan", storage=f"sqlite:///{db}")  # its folder deleted
    for extra in ((), ("--resume",)):
        proc = cli(space, *extra)
        assert proc.returncode == 2
        assert proc.stderr.splitlines() == [
            f"error: experiment.name: the study 'orphan' in sqlite:///{db} has no experiment "
            f"folder {tmp_path}/results/orphan (deleted?); pass --overwrite to delete the study "
            "and start afresh, or choose another experiment.name"
        ]
    proc = cli(space, "--overwrite")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: all 1 trials failed" in proc.stderr
    df = pd.read_csv(tmp_path / "results" / "orphan" / "results.csv")
    assert list(df["status"]) == ["error"]
    assert [t.state.name for t in study_of(space).trials] == ["FAIL"]


# ---------------------------------------------------------------------------------------------
# 10. --smoke with a URI storage path


def test_smoke_on_a_uri_replaces_the_previous_smoke(tmp_path, tiny_backbone, real_data_dir):
    space = _space(
        tmp_path,
        tiny_backbone,
        real_data_dir,
        "smokeuri",
        experiment={"name": "smokeuri", "storage_path": f"file://{tmp_path}/store"},
    )
    env = {**_env(), "MTL_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(2):
        proc = subprocess.run(
            _cli(space, "--smoke"),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    exp = tmp_path / "store" / "smokeuri-smoke"
    assert len(pd.read_csv(exp / "results.csv")) == 3
    assert len(trial_dirs(exp)) == 3
    url = load_space(exp / "design_space.yaml").experiment.study_storage
    assert len(optuna.load_study(study_name="smokeuri-smoke", storage=url).trials) == 3


# ---------------------------------------------------------------------------------------------
# 2, 3, 6, 7. A driver killed mid-trial, resumed from its folder in another directory


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, tiny_backbone, real_data_dir):
    """A 2-trial search on a file:// storage URI, started with --set base.train.epochs=1 in one
    directory, SIGKILLed while its second trial runs, then resumed from its folder in another."""
    root = tmp_path_factory.mktemp("killed")
    space = _slow_space(root, tiny_backbone, real_data_dir, "uri", num_samples=2)
    raw = yaml.safe_load(space.read_text())
    raw["experiment"]["storage_path"] = f"file://{root}/store"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    for sub in ("a", "b", "tmp", "cache"):
        (root / sub).mkdir()
    # Scratch folders go to TMPDIR; Ray's own files stay in /tmp (socket paths must be short).
    env = {
        **_env(),
        "TMPDIR": str(root / "tmp"),
        "RAY_TMPDIR": "/tmp",
        "MTL_CACHE_DIR": str(root / "cache"),
    }
    exp = root / "store" / "uri"
    proc = start(space, "--set", "base.train.epochs=1", cwd=root / "a", env=env)
    try:

        def one_done_one_running():
            dirs = trial_dirs(exp)
            done = [d for d in dirs if (d / "outcome.json").exists()]
            running = [d for d in dirs if d not in done and len(result_rows(d)) >= 2]
            return running[0] if done and running else None

        interrupted = _wait(one_done_one_running, proc, 300, "a finished and a running trial")
    finally:
        kill_driver(proc)
    leaked = sorted(str(p) for p in (root / "tmp").rglob("train_state.json"))
    tb_before = sorted((interrupted / "tb").glob("events.*"))
    refused = subprocess.run(
        _cli(space, "--resume"),
        cwd=root / "b",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    resumed = subprocess.run(
        [*RESUME_DIR, f"file://{exp}", "--num-cpus", "2", "--no-dashboard"],
        cwd=root / "b",
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {
        "root": root,
        "exp": exp,
        "interrupted": interrupted,
        "leaked": leaked,
        "tb_before": tb_before,
        "refused": refused,
        "resumed": resumed,
    }


def test_resume_refuses_a_different_space_naming_the_key(killed_and_resumed):
    refused, exp = killed_and_resumed["refused"], killed_and_resumed["exp"]
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"error: --resume: base.train.epochs is 2 here but 1 in file://{exp}/design_space.yaml, "
        f"the space this experiment ran; resume with `python -m mtl.search --resume "
        f"file://{exp}` (no file, no --set) or start a new experiment"
    ]


def test_resume_from_the_folder_finishes_the_saved_space(killed_and_resumed):
    exp = killed_and_resumed["exp"]
    saved = load_space(exp / "design_space.yaml")
    assert saved.base["train"]["epochs"] == 1
    df = pd.read_csv(exp / "results.csv")
    resumed = killed_and_resumed["resumed"]
    assert list(df["status"]) == ["completed", "completed"], (
        resumed.stdout[-4000:] + resumed.stderr[-4000:]
    )
    assert list(df["evaluations"]) == [4, 4]  # the epochs-1 budget, also for the resumed trial
    evaluations = [r["evaluation"] for r in result_rows(killed_and_resumed["interrupted"])]
    assert evaluations == [1.0, 2.0, 3.0, 4.0]


def test_one_study_recorded_in_the_folder_whatever_the_directory(killed_and_resumed):
    root, exp = killed_and_resumed["root"], killed_and_resumed["exp"]
    databases = sorted(root.rglob("*.optuna.db"))
    assert len(databases) == 1 and databases[0].is_relative_to(root / "cache" / "studies")
    url = f"sqlite:///{databases[0]}"
    assert load_space(exp / "design_space.yaml").experiment.study_storage == url
    study = optuna.load_study(study_name="uri", storage=url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    df = pd.read_csv(exp / "results.csv")
    assert list(df["optuna_state"]) == ["COMPLETE", "COMPLETE"]


def test_tensorboard_holds_one_point_per_step_after_the_resume(killed_and_resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    interrupted = killed_and_resumed["interrupted"]
    assert killed_and_resumed["tb_before"]  # the lost attempt's events, mirrored before the kill
    acc = EventAccumulator(str(interrupted / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
    reports = [r for r in result_rows(interrupted) if "evaluation" in r]
    assert [e.step for e in acc.Scalars("dev/overall")] == [int(r["step"]) for r in reports]


def test_hparams_after_the_resume_one_row_per_trial(killed_and_resumed):
    """The driver killed mid-trial wrote no HParams row for it; the resumed one writes one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    exp, interrupted = killed_and_resumed["exp"], killed_and_resumed["interrupted"]
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(exp))
    mux.Reload()
    runs = mux.PluginRunToTagToContent("hparams")
    assert [r for r, tags in runs.items() if "_hparams_/experiment" in tags] == ["."]
    df = pd.read_csv(exp / "results.csv")
    sessions = {r: t for r, t in runs.items() if "_hparams_/session_start_info" in t}
    assert sorted(sessions) == sorted(Path(d).name for d in df["trial_dir"])
    for tags in sessions.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(tags["_hparams_/session_start_info"])
        assert data.session_start_info.hparams["fate"].string_value == "completed"
    acc = EventAccumulator(str(interrupted), size_guidance={"scalars": 0})
    acc.Reload()
    reports = [r for r in result_rows(interrupted) if "evaluation" in r]
    objective = acc.Scalars("search/best_overall")
    assert [e.step for e in objective] == [int(r["step"]) for r in reports]


def test_no_scratch_checkpoint_is_left_after_the_resume(killed_and_resumed):
    root = killed_and_resumed["root"]
    # The kill left the running trial's scratch run folder (model and optimizer) behind ...
    assert killed_and_resumed["leaked"]
    # ... and the resumed run removed it.
    assert not (root / "tmp" / "mtl-search").exists()


# ---------------------------------------------------------------------------------------------
# 4. A driver killed before Ray Tune saved any trial


def test_resume_after_a_crash_before_the_first_experiment_state_runs_the_whole_search(
    tmp_path, tiny_backbone, real_data_dir
):
    space = _space(
        tmp_path,
        tiny_backbone,
        real_data_dir,
        "early",
        search={
            "sampler": "tpe",
            "num_samples": 2,
            "max_concurrent_trials": 1,
            "points_to_evaluate": [{"lr": 1e-3}, {"lr": 3e-3}],
        },
    )
    exp = tmp_path / "results" / "early"
    proc = start(space, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while not (exp / "tuner.pkl").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
    finally:
        kill_driver(proc)
    assert (exp / "tuner.pkl").exists()
    assert not list(exp.glob("experiment_state-*.json")), "killed too late to test this case"
    proc = cli(exp, "--resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "starting afresh" in proc.stdout
    df = pd.read_csv(exp / "results.csv")
    assert len(df) == 2 and set(df["status"]) <= {"completed", "stopped"}
    assert len(study_of(space).trials) == 2


# ---------------------------------------------------------------------------------------------
# 13. ASHA's rung records after a resume


def test_asha_after_a_resume_still_stops_by_the_first_runs_results(
    tmp_path, tiny_backbone, real_data_dir
):
    # lr 0 cannot learn: at rung 1 it is below the lr 1e-3 trial of the first run, and only that
    # record (lost with the scheduler when the driver died) can stop it.
    space = _space(
        tmp_path,
        tiny_backbone,
        real_data_dir,
        "rungs",
        search={
            "sampler": "tpe",
            "num_samples": 2,
            "max_concurrent_trials": 1,
            "points_to_evaluate": [{"lr": 1e-3, "pooling": "cls"}, {"lr": 0.0, "pooling": "cls"}],
        },
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    exp = tmp_path / "results" / "rungs"
    proc = start(space, cwd=tmp_path)
    try:

        def first_done():
            done = [d for d in trial_dirs(exp) if (d / "outcome.json").exists()]
            return done[0] if done else None

        first = _wait(first_done, proc, 300, "the first trial to finish")
    finally:
        kill_driver(proc)
    others = [d for d in trial_dirs(exp) if d != first and result_rows(d)]
    assert not others, "killed too late: the second trial had reported already"
    proc = cli(exp, "--resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    df = pd.read_csv(exp / "results.csv").set_index("param.lr")
    assert df.loc[1e-3, "status"] == "completed"
    assert (df.loc[0.0, "status"], df.loc[0.0, "reason"]) == ("stopped", "ASHA")
    assert df.loc[0.0, "evaluations"] == 1


# ---------------------------------------------------------------------------------------------
# 12. results.csv's columns do not depend on the first trial


def test_a_search_interrupted_in_its_seed_repeats_exits_1_and_resumes_them(
    tmp_path, tiny_backbone, real_data_dir
):
    # The reference run's case: interrupted (SIGINT) while its seed repeats ran, the search
    # exited 0 like a finished one, so results/run_reference.sh marked it complete and the
    # repeats were never resumed.
    space = _slow_space(tmp_path, tiny_backbone, real_data_dir, "cut", num_samples=1)
    raw = yaml.safe_load(space.read_text())
    raw["search"]["repeats"] = {"top_k": 1, "seeds": [1, 2]}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    exp, rexp = tmp_path / "results" / "cut", tmp_path / "results" / "cut-repeats"
    proc = start(space, cwd=tmp_path)
    try:
        _wait(
            lambda: any(len(result_rows(d)) >= 2 for d in trial_dirs(rexp)),
            proc,
            480,
            "a seed repeat under way",
        )
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: Tune stops and saves its state
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            kill_driver(proc)
    assert proc.returncode == 1, out[-3000:]
    assert re.search(r"interrupted: [12] of 2 seed repeats have not ended", out), out[-3000:]
    resumed = subprocess.run(
        [*RESUME_DIR, str(exp), "--num-cpus", "2", "--no-dashboard"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = pd.read_csv(exp / "repeats.csv")
    assert sorted(runs["seed"]) == [0, 1, 2]
    assert (runs["status"] == "completed").all(), runs


def _row(trial_id: str, params: dict) -> TrialRow:
    return TrialRow(
        trial_id=trial_id,
        status="completed",
        reason="",
        params=params,
        best={"overall": 0.5},
        last={"overall": 0.4},
        epochs=1.0,
        evaluations=2,
        retries=0,
        node_id="n",
        best_checkpoint="",
        trial_dir="",
        optuna_number=None,
        optuna_state="",
    )


def test_results_columns_are_fixed_whatever_the_first_trial(tmp_path):
    space = parse_space(
        {
            "experiment": {"name": "cols"},
            "parameters": {
                "smart": {"path": "smart.enabled", "type": "bool"},
                "smart_weight": {
                    "path": "smart.weight",
                    "type": "categorical",
                    "choices": [1.0, 5.0],
                    "when": {"smart": True},
                },
                "design": {"path": "model.design", "type": "categorical", "choices": [1, 2]},
            },
            "search": {"sampler": "grid"},
            "scheduler": {"type": "fifo"},
        }
    )
    # The first trial has no smart_weight (its condition failed), as in the Table 3 grid.
    rows = [
        _row("a", {"smart": False, "design": 1}),
        _row("b", {"smart": True, "smart_weight": 5.0, "design": 2}),
    ]
    expected = [
        "trial_id",
        "status",
        "reason",
        "param.smart",
        "param.smart_weight",
        "param.design",
        *(f"best.{m}" for m in METRICS),
        *(f"last.{m}" for m in METRICS),
        "epochs",
        "evaluations",
        "retries",
        "node_id",
        "best_checkpoint",
        "trial_dir",
        "optuna_number",
        "optuna_state",
    ]
    for order in (rows, rows[::-1]):
        summary = Summary(space, str(tmp_path), order)
        results_lib.write(summary)
        df = pd.read_csv(tmp_path / "results.csv")
        assert list(df.columns) == expected
    # A parameter no trial used still has its (empty) column.
    summary = Summary(space, str(tmp_path), [rows[0]])
    assert list(summary.frame().columns) == expected
