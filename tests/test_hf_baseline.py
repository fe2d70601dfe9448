"""analysis.hf_baseline: three single-task Hugging Face fine-tunes on the local split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr

from analysis import hf_baseline
from mtl.data import read_split, subsample
from mtl.heads import task_metric
from mtl.metrics import overall_score
from mtl.tasks import BUILTIN


def test_fine_tunes_each_task_on_the_local_split(
    tmp_path: Path, tiny_backbone: Path, real_data_dir: Path
) -> None:
    out = tmp_path / "baseline"
    argv = ["--out", str(out), "--backbone", str(tiny_backbone), "--data-dir", str(real_data_dir)]
    argv += ["--max-train-examples", "48", "--max-eval-examples", "40", "--epochs", "2"]
    argv += ["--batch-size", "16", "--max-length", "32", "--lr", "1e-3"]
    assert hf_baseline.main(argv) == 0
    record = json.loads((out / "scores.json").read_text())
    assert set(record["tasks"]) == {"sst", "para", "sts"}
    for r in record["tasks"].values():
        assert r["train_examples"] == 48 and r["dev_examples"] == 40
        assert len(r["epochs"]) == 2 and r["score"] == r["epochs"][-1]
    metrics = {r["metric"]: r["score"] for r in record["tasks"].values()}
    assert record["overall"] == overall_score(metrics)
    assert "| **overall** |" in (out / "scores.md").read_text()
    # The dev rows are the trainer's fixed subsample of the real dev file.
    dev = subsample(read_split(real_data_dir, "sst", "dev"), 40, 0)
    assert 0.0 <= record["tasks"]["sst"]["score"] <= 1.0 and len(dev) == 40


def test_scores_are_the_trainers_metrics() -> None:
    # The baseline scores with the trainer's task definitions (mtl.tasks): Pearson as scipy
    # computes it, None for constant predictions, accuracy for the classification tasks.
    preds, gold = np.array([0.1, 0.4, 0.3, 0.9]), np.array([0.0, 2.0, 1.0, 5.0])
    assert task_metric("sts", preds, gold) == pytest.approx(float(pearsonr(preds, gold).statistic))
    assert task_metric("sts", np.zeros(4), gold) is None
    assert task_metric("sst", np.array([1, 2]), np.array([1, 3])) == 0.5
    assert tuple(BUILTIN.values()) == hf_baseline.TASKS
    assert [hf_baseline.hf_num_labels(t) for t in hf_baseline.TASKS] == [5, 2, 1]


def test_a_missing_data_folder_is_one_line_and_status_2(tmp_path: Path, capsys) -> None:
    code = hf_baseline.main(["--out", str(tmp_path), "--data-dir", str(tmp_path / "nope")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.data_dir") and "\n" not in err
