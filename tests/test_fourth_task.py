"""A task declared in the config, with no code change, end to end: a trainer run and a search.

The declared tasks are real tasks built here from the shared data:

* ``sst2``: binary SST (SST-5's labels 0-1 -> 0, 3-4 -> 1, neutral rows dropped), one sentence,
  with its own column names (``uid``, ``text``, ``positive``) and a test file;
* ``sts_high``: "STS >= 4" as a pair classification (2 labels), no test file;
* ``sts_unit``: STS similarity / 5, a pair regression on [0, 1].
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import scipy.stats
import yaml
from safetensors.torch import load_file

from mtl import data as data_lib
from mtl.config import build_config
from mtl.evaluation import DEV_PREDICTIONS_FILE
from mtl.tasks import BUILTIN, registry
from mtl.train import train
from tests.test_train import tiny_config

CUSTOM_TASKS = [
    {
        "name": "sst2",
        "kind": "classification",
        "num_labels": 2,
        "train_file": "sst2-train.csv",
        "dev_file": "sst2-dev.csv",
        "test_file": "sst2-test.csv",
        "id_column": "uid",
        "text_columns": ["text"],
        "label_column": "positive",
        "title": "SST-2",
        "prediction_header": "Predicted_Positive",
    },
    {
        "name": "sts_high",
        "kind": "classification",
        "num_labels": 2,
        "pair": True,
        "train_file": "sts_high-train.csv",
        "dev_file": "sts_high-dev.csv",
        "text_columns": ["sentence1", "sentence2"],
        "label_column": "high",
    },
    {
        "name": "sts_unit",
        "kind": "regression",
        "score_range": [0.0, 1.0],
        "pair": True,
        "train_file": "sts_unit-train.csv",
        "dev_file": "sts_unit-dev.csv",
        "text_columns": ["sentence1", "sentence2"],
        "label_column": "score",
    },
]


def _write(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as fh:
        out = csv.writer(fh, delimiter="\t")
        out.writerow(["", *header])
        out.writerows([i, *row] for i, row in enumerate(rows))


def build_data(shared: Path, out: Path) -> Path:
    """The built-in files (links) and the three declared tasks' files, from the shared data."""
    out.mkdir(parents=True, exist_ok=True)
    for name in data_lib.DATA_FILES:
        if (shared / name).is_file():
            (out / name).symlink_to(shared / name)
    for split in ("train", "dev", "test"):
        raw = data_lib.read_split(shared, BUILTIN["sst"], split)
        if split == "test":
            rows = [[i, t] for i, t in zip(raw.ids, raw.text_a, strict=True)]
            _write(out / "sst2-test.csv", ["uid", "text"], rows)
            continue
        rows = [
            [i, t, int(y >= 3)]
            for i, t, y in zip(raw.ids, raw.text_a, raw.labels, strict=True)
            if y != 2
        ]
        _write(out / f"sst2-{split}.csv", ["uid", "text", "positive"], rows)
        sts = data_lib.read_split(shared, BUILTIN["sts"], split)
        pairs = list(zip(sts.ids, sts.text_a, sts.text_b, sts.labels, strict=True))
        header = ["id", "sentence1", "sentence2"]
        _write(
            out / f"sts_high-{split}.csv",
            [*header, "high"],
            [[i, a, b, int(y >= 4)] for i, a, b, y in pairs],
        )
        _write(
            out / f"sts_unit-{split}.csv",
            [*header, "score"],
            [[i, a, b, y / 5] for i, a, b, y in pairs],
        )
    return out


@pytest.fixture(scope="module")
def task_data(real_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_data(real_data_dir, tmp_path_factory.mktemp("fourth-task-data"))


@pytest.mark.parametrize(
    ("design", "routine", "smart", "pal", "selection"),
    [
        (1, "sequential", True, "paper", "sst2_acc"),
        (2, "round_robin", False, "standard", "overall"),
    ],
)
def test_declared_tasks_train_evaluate_and_predict(
    tiny_backbone: Path,
    task_data: Path,
    tmp_path: Path,
    design: int,
    routine: str,
    smart: bool,
    pal: str,
    selection: str,
) -> None:
    cfg = tiny_config(
        tiny_backbone,
        task_data,
        tmp_path / "run",
        model={"design": design},
        data={"tasks": ["sst", "sst2", "sts_high", "sts_unit"], "custom_tasks": CUSTOM_TASKS},
        train={
            "epochs": 2,
            "eval_every": 0.5,
            "lr": 3e-3,
            "routine": routine,
            "selection_metric": selection,
        },
        smart={"enabled": smart, "weight": 1.0},
        pal={"variant": pal, "heads": 2, "low_dim": 8},
    )
    tasks = registry(cfg.data)
    history: list[dict] = []
    metrics = train(cfg, lambda m, c: history.append(m))
    run = tmp_path / "run"

    # Every task has its metric; overall folds the declared ones in with the same weight.
    names = ("sst_acc", "sst2_acc", "sts_high_acc", "sts_unit_pearson", "overall")
    for m in history:
        assert set(names) <= set(m)
        # An undefined Pearson r (a constant prediction: NaN here) counts as r = 0.
        r = 0.0 if math.isnan(m["sts_unit_pearson"]) else m["sts_unit_pearson"]
        unit = [m["sst_acc"], m["sst2_acc"], m["sts_high_acc"], (r + 1) / 2]
        assert m["overall"] == pytest.approx(sum(unit) / 4)
        assert m[f"best_{selection}"] == max(h[selection] for h in history[: history.index(m) + 1])
    assert metrics[selection] == max(m[selection] for m in history)

    # The dev predictions behind the best evaluation give its metrics exactly.
    frame = pd.read_csv(run / DEV_PREDICTIONS_FILE, dtype={"id": str})
    assert set(frame["task"]) == {"sst", "sst2", "sts_high", "sts_unit"}
    for name in ("sst2", "sts_high"):
        rows = frame[frame["task"] == name]
        assert len(rows) == 16 and set(rows["gold"]) <= {0, 1}
        assert (rows["prediction"] == rows["gold"]).mean() == metrics[f"{name}_acc"]
    rows = frame[frame["task"] == "sts_unit"]
    assert rows["gold"].between(0, 1).all()
    r = scipy.stats.pearsonr(rows["prediction"], rows["gold"]).statistic
    assert r == pytest.approx(metrics["sts_unit_pearson"], abs=1e-12)

    # Submission-style files: the declared header, a class or a score per id; test where declared.
    preds = run / "predictions"
    sst2 = (preds / "sst2-test-output.csv").read_text().splitlines()
    assert sst2[0] == "id \t Predicted_Positive "
    test_ids = set(data_lib.read_split(task_data, tasks["sst2"], "test").ids)
    assert len(sst2) == 1 + 16  # data.max_eval_examples, said in MISSING.txt
    assert {line.split(" , ")[0] for line in sst2[1:]} <= test_ids
    assert {line.split(" , ")[1].strip() for line in sst2[1:]} <= {"0", "1"}
    assert "sst2-test-output.csv: 16 of" in (preds / "MISSING.txt").read_text()
    unit = (preds / "sts_unit-dev-output.csv").read_text().splitlines()
    assert unit[0] == "id \t Predicted_score "
    assert all(len(line.split(" , ")[1].strip().split(".")[1]) == 6 for line in unit[1:])
    assert not (preds / "sts_high-test-output.csv").exists()  # no test file declared

    # Each declared task has its own head and PALs in the checkpoint.
    keys = load_file(run / "best" / "model.safetensors").keys()
    assert any(k.startswith("heads.sst2.") for k in keys)
    assert any(k.startswith("heads.sts_unit.") for k in keys)
    assert any(k.startswith("encoder.pal.sst2.") for k in keys)
    assert any(k.startswith("encoder.pal.sts_unit.") for k in keys)
    report = json.loads((run / "data_report.json").read_text())
    assert report["train_examples"]["sst2"] == 24


@pytest.mark.slow
def test_a_search_ranks_by_a_declared_task_and_the_analyses_cover_it(
    tiny_backbone: Path, task_data: Path, tmp_path: Path
) -> None:
    """A tiny search (real local Ray) with ``objective.metric: sst2_acc``; then results.csv,
    best_config.yaml, the tables, the ensemble and the report know the declared task."""
    from analysis import ensemble, report, tables
    from analysis.common import load_experiment, run_main
    from tests.test_search_run import run_cli, tiny_space

    space = tiny_space(tmp_path, tiny_backbone, task_data, "fourth")
    raw = yaml.safe_load(space.read_text())
    raw["base"]["data"] |= {
        "tasks": ["sst", "sst2", "sts_unit"],
        "custom_tasks": [CUSTOM_TASKS[0], CUSTOM_TASKS[2]],
    }
    raw["base"]["train"] |= {"epochs": 1, "write_predictions": True}
    raw["base"]["data"]["max_train_examples"] = 64
    raw["parameters"] = {
        "design": {"path": "model.design", "type": "categorical", "choices": [1, 2]},
        "lr": {"path": "train.lr", "type": "categorical", "choices": [1e-3, 3e-3]},
    }
    raw["objective"] = {"metric": "sst2_acc"}
    raw["search"] = {
        "sampler": "random",
        "num_samples": 2,
        "max_concurrent_trials": 1,
        "points_to_evaluate": [{"design": 1, "lr": 3e-3}, {"design": 2, "lr": 3e-3}],
    }
    raw["scheduler"] = {"type": "fifo"}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_cli(space)

    exp_dir = tmp_path / "results" / "fourth"
    results = pd.read_csv(exp_dir / "results.csv", dtype={"trial_id": str})
    for col in ("best.sst2_acc", "best.sts_unit_pearson", "last.sst2_acc", "best.para_acc"):
        assert col in results.columns
    assert (results["status"] == "completed").all()
    assert results["best.sst2_acc"].notna().all()
    best = results.sort_values("best.sst2_acc", ascending=False).iloc[0]
    best_cfg = yaml.safe_load((exp_dir / "best_config.yaml").read_text())
    assert best_cfg["train"]["selection_metric"] == "sst2_acc"
    assert [t["name"] for t in best_cfg["data"]["custom_tasks"]] == ["sst2", "sts_unit"]

    exp = load_experiment(exp_dir)
    assert exp.metric == "sst2_acc"
    assert exp.metrics == (
        "sst_acc",
        "para_acc",
        "sts_pearson",
        "sst2_acc",
        "sts_unit_pearson",
        "overall",
    )
    assert exp.column_names["sst2_acc"] == "SST-2 Acc."

    out = tmp_path / "analysis"
    assert tables.main([str(exp_dir), "--out", str(out), "--resamples", "199"]) == 0
    configurations = (out / "tables" / "configurations.md").read_text()
    assert "SST-2 Acc." in configurations and "sts_unit Corr." in configurations

    # The trials' dev subsample: 64 examples per task, the trainer's (the default), whatever the run.
    argv = [str(exp_dir), "--top-k", "1", "--out", str(out), "--max-eval-examples", "64"]
    assert run_main(ensemble.main, argv) == 0
    summary = json.loads((out / "ensemble" / "ensemble.json").read_text())
    # An ensemble of one member predicts what the member predicted at the checkpoint Tune kept:
    # an evaluation with the best sst2_acc (Tune and the trainer may break a tie differently).
    assert summary["dev"]["sst2_acc"] == float(best["best.sst2_acc"])
    history = exp.history(str(best["trial_id"]))
    kept = history[history["sst2_acc"] == float(best["best.sst2_acc"])]
    assert summary["dev"]["sts_unit_pearson"] in list(kept["sts_unit_pearson"])
    assert summary["dev"]["overall"] in list(kept["overall"])
    assert math.isfinite(summary["dev"]["overall"])
    lines = (out / "ensemble" / "sst2-test-output.csv").read_text().splitlines()
    assert lines[0] == "id \t Predicted_Positive "
    assert len(lines) - 1 == len(
        data_lib.read_split(task_data, registry(build_config(best_cfg).data)["sst2"], "test")
    )

    assert run_main(report.main, [str(exp_dir), "--out", str(out), "--resamples", "199"]) == 0
    page = (out / "report.md").read_text()
    assert "SST-2 Acc." in page
    assert (out / "predictions" / "sst2_confusion.png").is_file()
    assert (out / "predictions" / "sts_unit_scatter.png").is_file()
