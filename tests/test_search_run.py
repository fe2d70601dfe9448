"""End-to-end searches with a real local Ray, a real SQLite study and a tiny random-weight BERT.

Every search runs ``python -m mtl.search`` in a subprocess (its own local Ray on 2 CPUs, no
dashboard), as a user would. :func:`tiny_experiment` is built once per session; the analysis
tests can use it too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from mtl.config import load_config
from mtl.search.space import load_space
from mtl.train import train

pytestmark = pytest.mark.slow

MAX_T = 4  # evaluations of a full trial in the tiny experiment: 2 epochs, eval_every 0.5


def tiny_space(root: Path, backbone: Path, data_dir: Path, name: str, **sections: dict) -> Path:
    """A design space on the tiny BERT and 128-example slices; ``sections`` override parts."""
    raw = {
        "experiment": {"name": name, "storage_path": str(root / "results"), "seed": 0},
        "base": {
            "model": {"backbone": str(backbone), "head_hidden": 32},
            "data": {
                "data_dir": str(data_dir),
                "max_train_examples": 128,
                "max_eval_examples": 64,
                "max_length": 48,
            },
            "train": {
                "epochs": 2,
                "eval_every": 0.5,
                "batch_size": 32,
                "write_predictions": False,
                "log_every": 2,
            },
        },
        "parameters": {
            # 0 cannot learn (ASHA stops it), 1e30 makes the loss NaN at the first step.
            "lr": {"path": "train.lr", "type": "categorical", "choices": [0.0, 1e30, 1e-3, 3e-3]},
            "pooling": {"path": "model.pooling", "type": "categorical", "choices": ["cls", "mean"]},
            "head_dropout": {
                "path": "model.head_dropout",
                "type": "float",
                "low": 0.0,
                "high": 0.3,
            },
        },
        "objective": {"metric": "overall"},
        "search": {
            "sampler": "tpe",
            "num_samples": 6,
            "max_concurrent_trials": 1,
            "startup_trials": 3,
            # A good config first, so that the hopeless lr=0 is certainly below ASHA's cutoff
            # (reduction factor 2: the median of the two) at the first rung.
            "points_to_evaluate": [
                {"lr": 1e-3, "pooling": "cls"},
                {"lr": 0.0, "pooling": "cls"},
                {"lr": 1e30},
            ],
            # Then the best two completed configurations once more with seed 1.
            "repeats": {"top_k": 2, "seeds": [1]},
        },
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources_per_trial": {"cpu": 1},
        "failure": {"max_retries": 2},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("RAY_ADDRESS", None)
    return env


def _cli(space: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mtl.search",
        str(space),
        "--num-cpus",
        "2",
        "--no-dashboard",
        *extra,
    ]


def run_cli(space: Path, *extra: str, timeout: float = 480) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _cli(space, *extra),
        cwd=space.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def start_cli(space: Path, **popen) -> subprocess.Popen:
    """``python -m mtl.search space`` in the background, its output in one text pipe."""
    return subprocess.Popen(
        _cli(space),
        cwd=space.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


# e.g. 0006-1a1dfdeb (a grid's trials share a 5-digit Tune prefix: 0006-1a1df)
TRIAL_FOLDER = re.compile(r"\d{4}-[0-9a-f]{5,8}")


def trial_dirs(exp: Path) -> list[Path]:
    """The trial folders of ``exp`` so far (none before the experiment folder exists)."""
    return sorted(p for p in exp.glob("*-*") if p.is_dir() and TRIAL_FOLDER.fullmatch(p.name))


def result_rows(trial_dir: Path) -> list[dict]:
    """Tune's result.json of a trial, one dict per report (a line still being written is left
    out, so this can poll a running trial)."""
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def study_of(space_path: Path) -> optuna.Study:
    raw = yaml.safe_load(space_path.read_text())
    name = raw["experiment"]["name"]
    url = f"sqlite:///{raw['experiment']['storage_path']}/{name}.optuna.db"
    return optuna.load_study(study_name=name, storage=url)


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory, tiny_backbone, real_data_dir):
    """(space file, experiment folder, CLI output) of a finished 6-trial search."""
    root = tmp_path_factory.mktemp("search")
    space = tiny_space(root, tiny_backbone, real_data_dir, "tiny")
    proc = run_cli(space)
    return space, root / "results" / "tiny", proc.stdout


# ---------------------------------------------------------------------------------------------
# The end-to-end search


def test_results_csv_has_every_trial_with_its_status(tiny_experiment):
    _, exp, _ = tiny_experiment
    df = pd.read_csv(exp / "results.csv")
    assert len(df) == 6
    # The design space as it ran is kept beside the results, loadable as a design-space file.
    assert load_space(exp / "design_space.yaml").search.num_samples == 6
    assert df["trial_id"].is_unique
    assert set(df["status"]) <= {"completed", "stopped", "error"}
    by_lr = df.set_index("param.lr")
    hopeless = df[df["param.lr"] == 0.0].iloc[0]
    assert (hopeless["status"], hopeless["reason"]) == ("stopped", "ASHA")
    assert hopeless["evaluations"] < MAX_T
    nan = df[df["param.lr"] == 1e30]
    assert (nan["status"] == "error").all()
    assert nan["reason"].str.contains("non-finite loss").all()
    done = df[df["status"] == "completed"]
    assert len(done) >= 1 and (done["evaluations"] == MAX_T).all()
    assert (done["epochs"] == 2.0).all()
    stopped = df[df["status"] == "stopped"]
    assert (stopped["evaluations"] < MAX_T).all() and (stopped["reason"] == "ASHA").all()
    ok = df[df["status"] != "error"]
    assert ok["node_id"].str.len().gt(10).all()
    assert all(Path(p).is_dir() for p in ok["best_checkpoint"])
    assert (ok["best.overall"] >= ok["last.overall"] - 1e-12).all()
    assert (df["retries"] == 0).all()
    # Parameters a trial did not use are empty, never made up.
    assert set(df.columns) >= {"param.lr", "param.pooling", "param.head_dropout"}
    del by_lr


def test_optuna_study_states_and_values(tiny_experiment):
    space, exp, _ = tiny_experiment
    df = pd.read_csv(exp / "results.csv").set_index("trial_id")
    study = study_of(space)
    assert len(study.trials) == 6
    # The objective's name on the dashboard's axes, not "Objective 0".
    assert study.metric_names == ["best_overall"]
    assert "closed_by_driver" not in study.user_attrs  # nothing was closed
    states = {t.state for t in study.trials}
    assert {optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE} <= states
    expected = {"completed": "COMPLETE", "stopped": "PRUNED", "error": "FAIL"}
    for t in study.trials:
        row = df.loc[t.user_attrs["ray_trial_id"]]
        assert t.state.name == expected[row["status"]] == row["optuna_state"]
        # What a trial's page shows: its fate, why, its folder, its dev metrics.
        assert t.user_attrs["fate"] == row["status"]
        assert t.user_attrs["trial_folder"] == Path(row["trial_dir"]).name
        if row["status"] == "stopped":
            assert t.user_attrs["reason"] == f"ASHA at evaluation {row['evaluations']}"
        if t.state == optuna.trial.TrialState.FAIL:
            assert "loss became nan" in t.user_attrs["reason"]
            assert t.value is None
            continue
        best = t.user_attrs["best"]
        for m in ("overall", "sst_acc", "para_acc", "sts_pearson"):
            assert best[m] == pytest.approx(row[f"best.{m}"])
        assert best["evaluation"] <= row["evaluations"]
        # One intermediate value per evaluation, the best-so-far score, ending at the trial's value.
        assert sorted(t.intermediate_values) == list(range(1, int(row["evaluations"]) + 1))
        steps = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        assert steps == sorted(steps)
        assert t.value == pytest.approx(t.intermediate_values[max(t.intermediate_values)])
        assert t.value == pytest.approx(row["best.overall"])


def test_nonfinite_loss_ends_the_trial_without_retries(tiny_experiment):
    _, exp, _ = tiny_experiment
    df = pd.read_csv(exp / "results.csv")
    row = df[df["param.lr"] == 1e30].iloc[0]
    trial = Path(row["trial_dir"])
    rows = result_rows(trial)
    assert rows[-1]["nonfinite"] == 1.0 and "loss became nan" in rows[-1]["error"]
    assert row["retries"] == 0
    # The experiment went on: trials after it ran.
    assert (df["status"] == "completed").sum() + (df["status"] == "stopped").sum() == 5


def _hparams_plugin_data(mux, run: str, tag: str):
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = mux.PluginRunToTagToContent("hparams").get(run, {})
    return plugin_data_pb2.HParamsPluginData.FromString(content[tag]) if tag in content else None


def test_tensorboard_holds_one_hparams_view_with_every_trial(tiny_experiment):
    """TensorBoard's own readers over the experiment folder, as ``tensorboard --logdir`` reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import api_pb2

    _, exp, _ = tiny_experiment
    df = pd.read_csv(exp / "results.csv")
    mux = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})
    mux.AddRunsFromDirectory(str(exp))
    mux.Reload()
    hparams_runs = mux.PluginRunToTagToContent("hparams")
    # One writer of the experiment summary: the experiment folder's own events.
    assert [r for r, tags in hparams_runs.items() if "_hparams_/experiment" in tags] == ["."]
    experiment = _hparams_plugin_data(mux, ".", "_hparams_/experiment").experiment
    assert [h.name for h in experiment.hparam_infos] == [
        "lr",
        "pooling",
        "head_dropout",
        "fate",
        "reason",
    ]
    fate = next(h for h in experiment.hparam_infos if h.name == "fate")
    assert {v.string_value for v in fate.domain_discrete.values} == {
        "completed",
        "stopped",
        "error",
    }
    metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert metrics == {("", "search/best_overall")} | {
        ("tb", f"dev/{m}") for m in ("overall", "sst_acc", "para_acc", "sts_pearson")
    }
    sessions = [r for r, tags in hparams_runs.items() if "_hparams_/session_start_info" in tags]
    # One row per trial, every trial, each in its short, unique folder.
    assert sorted(sessions) == sorted(Path(d).name for d in df["trial_dir"])
    assert all(TRIAL_FOLDER.fullmatch(run) for run in sessions)
    for _, row in df.iterrows():
        run = Path(row["trial_dir"]).name
        start = _hparams_plugin_data(mux, run, "_hparams_/session_start_info").session_start_info
        end = _hparams_plugin_data(mux, run, "_hparams_/session_end_info").session_end_info
        assert start.hparams["lr"].number_value == pytest.approx(row["param.lr"])
        assert start.hparams["pooling"].string_value == row["param.pooling"]
        assert start.hparams["head_dropout"].number_value == pytest.approx(
            row["param.head_dropout"]
        )
        assert start.hparams["fate"].string_value == row["status"]
        failure = api_pb2.STATUS_FAILURE if row["status"] == "error" else api_pb2.STATUS_SUCCESS
        assert end.status == failure
        # The full parameters stay in params.json.
        params = json.loads((Path(row["trial_dir"]) / "params.json").read_text())
        assert params["lr"] == row["param.lr"]
        reports = [r for r in result_rows(Path(row["trial_dir"])) if "evaluation" in r]
        events = EventAccumulator(row["trial_dir"], size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        # Ray's bookkeeping and a second copy of the dev metrics are gone, and no stray hparam/*.
        assert not [t for t in tags if t.startswith(("ray/", "hparam"))]
        if row["status"] == "error":
            assert start.hparams["reason"].string_value.startswith("training loss became nan")
            continue
        objective = events.Scalars("search/best_overall")
        assert [p.value for p in objective] == pytest.approx([r["best_overall"] for r in reports])
        assert [p.step for p in objective] == [int(r["step"]) for r in reports]
        # The trainer's events (synced as artifacts): the dev metrics, one point per evaluation.
        trainer = EventAccumulator(f"{row['trial_dir']}/tb", size_guidance={"scalars": 0})
        dev = trainer.Reload().Scalars("dev/overall")
        assert [p.value for p in dev] == pytest.approx([r["overall"] for r in reports])
        assert [p.step for p in dev] == [int(r["step"]) for r in reports]
        if row["status"] == "stopped":
            # ASHA's stop on the curves: one point at the step and evaluation where it stopped.
            (stop,) = events.Scalars("search/stopped_at")
            assert (stop.step, stop.value) == (int(reports[-1]["step"]), row["evaluations"])
            reason = f"ASHA at evaluation {row['evaluations']}"
            assert start.hparams["reason"].string_value == reason
        else:
            assert "search/stopped_at" not in tags
            assert start.hparams["reason"].string_value == ""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tensorboard_server_lists_every_trial_with_fate_and_metrics(tiny_experiment):
    """``tensorboard --logdir <experiment>`` asked as its HParams table asks (no browser)."""
    import urllib.request

    _, exp, _ = tiny_experiment
    df = pd.read_csv(exp / "results.csv")
    df = df.set_index(df["trial_dir"].map(lambda d: Path(d).name))
    port = _free_port()
    tensorboard = Path(sys.executable).parent / "tensorboard"
    server = subprocess.Popen(
        [tensorboard, "--logdir", exp, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_FAILURE", "STATUS_SUCCESS", "STATUS_UNKNOWN"],
        "colParams": [
            {"hparam": "fate"},
            {"hparam": "lr"},
            {"metric": {"tag": "search/best_overall", "group": ""}, "order": "ORDER_DESC"},
        ],
        "startIndex": 0,
        "sliceSize": 100,
    }
    try:
        deadline, answer = time.time() + 90, None
        while answer is None or answer.get("totalSize", 0) < len(df):
            assert time.time() < deadline and server.poll() is None, answer
            time.sleep(1)
            post = urllib.request.Request(
                f"http://127.0.0.1:{port}/data/plugin/hparams/session_groups",
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
            )
            with contextlib.suppress(OSError):
                answer = json.loads(urllib.request.urlopen(post, timeout=10).read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    groups = {g["name"]: g for g in answer["sessionGroups"]}
    # One row per trial, every trial, named by its folder (as the curves' runs are).
    assert set(groups) == set(df.index)
    for folder, group in groups.items():
        row = df.loc[folder]
        assert group["hparams"]["fate"] == row["status"]
        assert group["hparams"]["lr"] == pytest.approx(row["param.lr"])
        (session,) = group["sessions"]
        assert session["status"] == (
            "STATUS_FAILURE" if row["status"] == "error" else "STATUS_SUCCESS"
        )
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        if row["status"] != "error":
            assert values["search/best_overall"] == pytest.approx(row["best.overall"])
            assert values["dev/overall"] == pytest.approx(row["last.overall"])


def test_best_config_runs_with_the_trainer(tiny_experiment, tmp_path):
    _, exp, out = tiny_experiment
    df = pd.read_csv(exp / "results.csv")
    best = df[df["status"] == "completed"].sort_values("best.overall").iloc[-1]
    cfg = load_config(exp / "best_config.yaml")
    assert cfg.train.lr == best["param.lr"]
    assert cfg.model.pooling == best["param.pooling"]
    assert cfg.model.head_dropout == pytest.approx(best["param.head_dropout"])
    assert cfg.train.selection_metric == "overall"
    assert "top " in out and str(best["trial_id"]) in out
    # What `python -m mtl.train best_config.yaml --set train.max_steps=2` runs.
    cfg = load_config(exp / "best_config.yaml", ["train.max_steps=2", "train.progress=false"])
    metrics = train(cfg, run_dir=tmp_path / "run")
    assert set(metrics) >= {"overall", "sst_acc", "para_acc", "sts_pearson"}


def test_repeats_rerun_the_top_configurations_with_further_seeds(tiny_experiment):
    _, exp, _ = tiny_experiment
    df = pd.read_csv(exp / "results.csv")
    top = df[df["status"] == "completed"].sort_values("best.overall", ascending=False).head(2)
    runs = pd.read_csv(exp / "repeats.csv")
    assert len(runs) == 2 * len(top)
    assert sorted(runs["seed"]) == sorted([0, 1] * len(top))
    assert set(runs[runs["seed"] == 0]["trial_id"]) == set(top["trial_id"])
    summary = pd.read_csv(exp / "repeats_summary.csv")
    assert list(summary["overall.count"]) == [2] * len(top)
    for _, row in summary.iterrows():
        values = runs[runs["config"] == row["config"]]["overall"]
        assert row["overall.mean"] == pytest.approx(values.mean())
        assert row["overall.std"] == pytest.approx(values.std())
    repeat_trials = trial_dirs(exp.parent / "tiny-repeats")
    assert len(repeat_trials) == len(top)
    for trial in repeat_trials:
        cfg = yaml.safe_load((trial / "config.yaml").read_text())
        assert cfg["seed"] == 1


def test_resuming_a_finished_search_rewrites_an_older_repeats_csv(tiny_experiment, tmp_path):
    """repeats.csv from before it named each run's folder and checkpoint (which
    ``analysis.ensemble --with-repeats`` reads) is rewritten by one --resume, training nothing."""
    space, exp, _ = tiny_experiment
    storage = tmp_path / "results"
    shutil.copytree(exp.parent, storage)  # the experiment, its repeats and its study, moved
    before = pd.read_csv(storage / "tiny" / "repeats.csv", dtype={"trial_id": str})
    older = before.drop(columns=["trial_dir", "best_checkpoint"])
    older.to_csv(storage / "tiny" / "repeats.csv", index=False)
    reports = {p: p.read_text() for p in storage.glob("*/*/result.json")}
    run_cli(space, "--resume", "--set", f"experiment.storage_path={storage}")
    after = pd.read_csv(storage / "tiny" / "repeats.csv", dtype={"trial_id": str})
    assert list(after["trial_id"]) == list(before["trial_id"])
    for row in after.to_dict("records"):  # in the moved folders
        assert Path(row["trial_dir"]).parent.parent == storage
        assert (Path(row["best_checkpoint"]) / "model.safetensors").is_file()
    assert {p: p.read_text() for p in storage.glob("*/*/result.json")} == reports  # no training


def test_smoke_runs_any_space_with_a_tiny_budget(tmp_path, tiny_backbone, real_data_dir):
    space = tiny_space(tmp_path, tiny_backbone, real_data_dir, "smoke")
    proc = run_cli(space, "--smoke")
    df = pd.read_csv(tmp_path / "results" / "smoke-smoke" / "results.csv")
    assert len(df) == 3 and df["evaluations"].max() <= 2
    assert "3 trials" in proc.stdout
    assert not (tmp_path / "results" / "smoke").exists()


def test_time_budget_stops_trials_and_closes_the_study(tmp_path, tiny_backbone, real_data_dir):
    space = _slow_space(tmp_path, tiny_backbone, real_data_dir, "budget", num_samples=20)
    raw = yaml.safe_load(space.read_text())
    # Long enough that a trial is running when it ends, also when a loaded machine is slow to
    # start Ray's worker processes (15 s was not, at load 6 on 2 cores); 20 trials need minutes.
    raw["search"].update(time_budget_s=30, sampler="tpe")
    # Trials of 24 evaluations (several seconds each, the gap between two trials well under one):
    # shorter ones finish so fast that the budget can end between two trials, none running.
    raw["base"]["train"]["epochs"] = 6
    space.write_text(yaml.safe_dump(raw))
    run_cli(space)
    df = pd.read_csv(tmp_path / "results" / "budget" / "results.csv")
    assert len(df) < 20
    cut = df[df["status"] == "stopped"]
    assert len(cut) >= 1 and (cut["reason"] == "time budget or interrupted").all()
    study = study_of(space)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert set(cut["optuna_state"]) <= {"PRUNED", "FAIL"}
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    for _, row in cut.iterrows():
        attrs = by_ray_id[row["trial_id"]].user_attrs
        assert (attrs["fate"], attrs["reason"]) == ("stopped", "time budget or interrupted")
    assert study.user_attrs["closed_by_driver"]
    # TensorBoard's HParams row of each trial cut by the budget says so too.
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path / "results" / "budget"))
    mux.Reload()
    for _, row in df.iterrows():
        start = _hparams_plugin_data(
            mux, Path(row["trial_dir"]).name, "_hparams_/session_start_info"
        )
        assert start.session_start_info.hparams["fate"].string_value == row["status"]
        assert start.session_start_info.hparams["reason"].string_value == (
            row["reason"] if isinstance(row["reason"], str) else ""
        )


# ---------------------------------------------------------------------------------------------
# Fault tolerance


def _wait(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"search ended before {what}: rc {proc.returncode}\n{out[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), to end the Ray processes a killed driver left
    behind (its raylet re-parents some agents, which then outlive the process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL a search started with start_new_session=True, and every Ray process it started."""
    tree = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _slow_space(root: Path, backbone: Path, data_dir: Path, name: str, num_samples: int) -> Path:
    path = tiny_space(root, backbone, data_dir, name)
    raw = yaml.safe_load(path.read_text())
    # 8 evaluations of about 0.7 s per trial: time to kill something mid-run.
    raw["base"]["train"].update(eval_every=0.25, batch_size=16)
    raw["search"] = {"sampler": "random", "num_samples": num_samples, "max_concurrent_trials": 1}
    raw["scheduler"] = {"type": "fifo"}
    raw["parameters"]["lr"] = {"path": "train.lr", "type": "categorical", "choices": [1e-3, 3e-3]}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_killed_trial_worker_is_retried_from_its_checkpoint(tmp_path, tiny_backbone, real_data_dir):
    space = _slow_space(tmp_path, tiny_backbone, real_data_dir, "sigkill", num_samples=1)
    exp = tmp_path / "results" / "sigkill"
    proc = start_cli(space)
    try:

        def second_report():
            for trial in trial_dirs(exp):
                rows = result_rows(trial)
                if len(rows) >= 2:
                    return trial, rows
            return None

        trial, rows = _wait(second_report, proc, 240, "the second report")
        os.kill(rows[-1]["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    df = pd.read_csv(exp / "results.csv")
    row = df.iloc[0]
    assert (row["status"], row["retries"], row["evaluations"]) == ("completed", 1, 8)
    evaluations = [r["evaluation"] for r in result_rows(trial) if "evaluation" in r]
    # Resumed from the last checkpoint: no evaluation repeated, none lost.
    assert evaluations == [float(i) for i in range(1, 9)]
    assert len({r["pid"] for r in result_rows(trial)}) == 2
    assert_one_point_per_step(trial / "tb")


def assert_one_point_per_step(tb: Path) -> None:
    """The trainer's TensorBoard events of a trial: no step written twice by two attempts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)


def test_killed_driver_then_resume_finishes_without_rerunning(
    tmp_path, tiny_backbone, real_data_dir
):
    space = _slow_space(tmp_path, tiny_backbone, real_data_dir, "resume", num_samples=4)
    exp = tmp_path / "results" / "resume"
    proc = start_cli(space, start_new_session=True)  # the driver and its Ray: killed together
    try:

        def two_done_and_third_running():
            dirs = trial_dirs(exp)
            done = [d for d in dirs if (d / "outcome.json").exists()]
            running = [d for d in dirs if d not in done and len(result_rows(d)) >= 2]
            return (done, running) if len(done) >= 2 and running else None

        done, running = _wait(two_done_and_third_running, proc, 300, "two finished trials")
    finally:
        kill_driver(proc)  # and the Ray agents a SIGKILLed driver leaves running
    time.sleep(2)
    before = {d.name: (d / "result.json").read_text() for d in trial_dirs(exp)}
    finished_mtime = {d.name: (d / "outcome.json").stat().st_mtime for d in done}

    assert (
        "already exists"
        in subprocess.run(
            _cli(space), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
        ).stderr
    )
    run_cli(space, "--resume")

    df = pd.read_csv(exp / "results.csv")
    assert len(df) == 4 and set(df["status"]) == {"completed"}
    after = {d.name: (d / "result.json").read_text() for d in trial_dirs(exp)}
    assert len(after) == 4
    for name, text in before.items():
        assert after[name].startswith(text)  # nothing reported is lost
    for d in done:
        assert after[d.name] == before[d.name]  # finished trials did not run again
        assert (d / "outcome.json").stat().st_mtime == finished_mtime[d.name]
    interrupted = running[0]
    evaluations = [r["evaluation"] for r in result_rows(interrupted) if "evaluation" in r]
    assert evaluations == [float(i) for i in range(1, 9)]
    study = study_of(space)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    assert all(not math.isnan(t.value) for t in complete)
