"""``--resume --retry-errored``: trials that errored for a reason outside them run again.

The case: a search whose trials failed for a cause that was later fixed (a package upgraded
under the running search made every new worker fail at start). Here two of three trials read a
data folder that does not exist yet, so they error at their start, with no checkpoint; once the
folder exists, a plain ``--resume`` leaves them errored and ``--resume --retry-errored`` runs
them to their end, in results.csv and in the Optuna study.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from tests.test_search_run import _cli, _env, study_of, tiny_space

pytestmark = pytest.mark.slow


def cli(target: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cli(target, *extra),
        cwd=target.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=480,
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def errored_then_retried(tmp_path_factory, tiny_backbone, real_data_dir):
    root = tmp_path_factory.mktemp("retry")
    later = root / "later-data"  # created between the runs: the cause that gets fixed
    space = tiny_space(root, tiny_backbone, real_data_dir, "retry")
    raw = yaml.safe_load(space.read_text())
    raw["base"]["train"].update(epochs=1)  # 2 evaluations a trial
    raw["parameters"] = {
        "data_dir": {
            "path": "data.data_dir",
            "type": "categorical",
            "choices": [str(real_data_dir), str(later)],
        },
        "head_dropout": {"path": "model.head_dropout", "type": "float", "low": 0.0, "high": 0.3},
    }
    raw["search"] = {
        "sampler": "random",
        "num_samples": 3,
        "max_concurrent_trials": 1,
        "points_to_evaluate": [
            {"data_dir": str(real_data_dir), "head_dropout": 0.1},
            {"data_dir": str(later), "head_dropout": 0.1},
            {"data_dir": str(later), "head_dropout": 0.2},
        ],
    }
    # Only one trial completes before the retry: the retry changes the top 2.
    raw["search"]["repeats"] = {"top_k": 2, "seeds": [1]}
    raw["scheduler"] = {"type": "fifo"}
    raw["failure"] = {"max_retries": 0}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    exp = root / "results" / "retry"

    first = cli(space)
    _ok(first)
    csv_first = pd.read_csv(exp / "results.csv")
    later.symlink_to(real_data_dir, target_is_directory=True)
    plain = cli(exp, "--resume")
    _ok(plain)
    csv_plain = pd.read_csv(exp / "results.csv")
    states_plain = [t.state for t in study_of(space).trials]
    retried = cli(exp, "--resume", "--retry-errored")
    _ok(retried)
    csv_retried = pd.read_csv(exp / "results.csv")
    # The remedy the retry prints for the repeats of the new top configurations.
    (exp.parent / "retry-repeats").rename(root / "earlier-repeats")
    remedied = cli(exp, "--resume")
    _ok(remedied)
    return {
        "space": space,
        "exp": exp,
        "later": str(later),
        "csv_first": csv_first,
        "csv_plain": csv_plain,
        "states_plain": states_plain,
        "csv_retried": csv_retried,
        "retried_out": retried.stdout,
        "remedied_out": remedied.stdout,
    }


def test_plain_resume_leaves_errored_trials_errored(errored_then_retried):
    first, plain = errored_then_retried["csv_first"], errored_then_retried["csv_plain"]
    assert sorted(first["status"]) == ["completed", "error", "error"]
    status = dict(zip(first["trial_id"], first["status"], strict=True))
    assert dict(zip(plain["trial_id"], plain["status"], strict=True)) == status
    FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
    assert sorted(errored_then_retried["states_plain"], key=str) == sorted(
        [COMPLETE, FAIL, FAIL], key=str
    )


def test_retry_errored_runs_them_to_their_end(errored_then_retried):
    first, csv = errored_then_retried["csv_first"], errored_then_retried["csv_retried"]
    assert list(csv["status"]) == ["completed"] * 3, csv[["trial_id", "status", "reason"]]
    assert sorted(csv["trial_id"]) == sorted(first["trial_id"])  # the same trials, not new ones
    assert list(csv["evaluations"]) == [2, 2, 2]
    assert csv["best.overall"].notna().all()
    assert list(csv["optuna_state"]) == ["COMPLETE"] * 3


def test_retried_trials_reach_the_study(errored_then_retried):
    """Each failed Optuna trial stays FAIL; its retry is a new COMPLETE trial, same parameters."""
    csv = errored_then_retried["csv_retried"]
    trials = study_of(errored_then_retried["space"]).trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert len(trials) == 5 and len(failed) == 2 and len(retries) == 2
    by_number = {t.number: t for t in trials}
    for retry in retries:
        source = by_number[retry.user_attrs["retry_of"]]
        assert source.state == optuna.trial.TrialState.FAIL
        assert retry.state == optuna.trial.TrialState.COMPLETE
        assert retry.params == source.params
        assert retry.params["data_dir"] == errored_then_retried["later"]
        assert retry.user_attrs["ray_trial_id"] == source.user_attrs["ray_trial_id"]
        assert retry.user_attrs["fate"] == "completed"
        assert sorted(retry.intermediate_values) == [1, 2]
        row = csv[csv["trial_id"] == retry.user_attrs["ray_trial_id"]].iloc[0]
        assert row["optuna_number"] == retry.number
        assert retry.value == pytest.approx(row["best.overall"])


def test_retry_errored_without_resume_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mtl.search", str(tmp_path / "x.yaml"), "--retry-errored"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --retry-errored reruns an experiment's trials; pass --resume"
    ]


def test_tensorboard_shows_the_retry_not_the_error(errored_then_retried):
    """One HParams row per trial folder, with the retry's fate; one point per evaluation.

    TensorBoard keeps a run's first session start info: the ended attempt's ``fate: error``
    would hide the retry's row unless the retry's start takes it out of the folder.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    exp, csv = errored_then_retried["exp"], errored_then_retried["csv_retried"]
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(exp))
    mux.Reload()
    runs = mux.PluginRunToTagToContent("hparams")
    sessions = {r: t for r, t in runs.items() if "_hparams_/session_start_info" in t}
    assert sorted(sessions) == sorted(Path(d).name for d in csv["trial_dir"])
    for run, tags in sessions.items():
        start = plugin_data_pb2.HParamsPluginData.FromString(tags["_hparams_/session_start_info"])
        end = plugin_data_pb2.HParamsPluginData.FromString(tags["_hparams_/session_end_info"])
        assert start.session_start_info.hparams["fate"].string_value == "completed", run
        assert end.session_end_info.status == api_pb2.STATUS_SUCCESS, run
    for trial_dir in csv["trial_dir"]:
        acc = EventAccumulator(trial_dir, size_guidance={"scalars": 0})
        acc.Reload()
        steps = [e.step for e in acc.Scalars("search/best_overall")]
        assert len(steps) == 2 and steps == sorted(set(steps)), (trial_dir, steps)


def test_retry_says_which_top_configurations_the_repeats_miss(errored_then_retried):
    """The repeats ran the top 2 of one completed trial; after the retry three completed."""
    out = errored_then_retried["retried_out"]
    assert "repeats: the top 2 configurations changed since" in out, out[-3000:]
    assert "move that folder aside and --resume again" in out


def test_repeats_after_the_remedy_cover_the_new_top(errored_then_retried):
    exp, csv = errored_then_retried["exp"], errored_then_retried["csv_retried"]
    assert "configurations changed" not in errored_then_retried["remedied_out"]
    summary = pd.read_csv(exp / "repeats_summary.csv")
    assert list(summary["overall.count"]) == [2, 2]  # the search's run and seed 1
    runs = pd.read_csv(exp / "repeats.csv")
    own = runs[runs["trial_id"].isin(csv["trial_id"])]  # the search's own runs of the top 2
    assert sorted(own["overall"]) == pytest.approx(sorted(csv["best.overall"])[-2:])
    assert len(runs) == 4


def test_repeats_csv_names_the_runs_it_leaves_out(errored_then_retried, tmp_path, capsys):
    """Runs of a configuration outside the top K are named, never dropped without a word."""
    from mtl.config import build_config
    from mtl.search import results
    from mtl.search.experiment import load_saved
    from mtl.search.run import repeats_space

    exp = errored_then_retried["exp"]
    space = load_saved(str(exp))
    summary = results.Summary(space, str(tmp_path), results.read_rows(space, str(exp), None))
    rspace = repeats_space(space, summary)
    rpath = str(exp.parent / "retry-repeats")  # seed 1 of the top 2, joined here with a top 1
    capsys.readouterr()
    rows = results.read_rows(rspace, rpath, None)
    results.add_repeats(summary, rows, rpath, build_config(space.base).seed, top_k=1)
    out = capsys.readouterr().out
    runs = pd.read_csv(tmp_path / "repeats.csv")
    left_out = [r.trial_id for r in rows if r.trial_id not in set(runs["trial_id"])]
    assert len(runs) == 2 and len(left_out) == 1
    assert f"repeats: 1 runs in {rpath} repeat configurations no longer among the top 1" in out
    assert out.split("left out of repeats.csv: ")[1].split()[0] == left_out[0]
