"""analysis.paired on small dev_predictions.csv files written here: what the comparison reads
from a file is every row the trainer scored, or one line naming the file and line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis import paired
from analysis.common import AnalysisError


def _write(path: Path, rows: list[tuple[str, str, float, float]]) -> Path:
    frame = pd.DataFrame(rows, columns=["task", "id", "prediction", "gold"])
    frame.to_csv(path, index=False)
    return path


def _sts_rows(ids: list[str], pred: np.ndarray, gold: np.ndarray) -> list[tuple]:
    return [("sts", i, float(p), float(g)) for i, p, g in zip(ids, pred, gold, strict=True)]


def test_a_dev_id_the_file_repeats_is_paired_by_occurrence_not_dropped(tmp_path):
    """The trainer keeps dev rows whose id an earlier row had (mtl.data counts them) and scores
    every row; the comparison must too: the k-th row with an id in A meets the k-th in B."""
    rng = np.random.default_rng(0)
    n = 24
    ids = [f"e{i}" for i in range(n)]
    ids[7] = ids[3]  # one id twice, on two examples with different gold scores
    ids[15] = ids[11]  # and one id twice with the same gold score
    gold = rng.uniform(0, 5, n).round(1)
    gold[15] = gold[11]
    pa, pb = gold + rng.normal(0, 2, n), gold + rng.normal(0, 1, n)
    sst_gold = rng.integers(0, 5, n)
    sst_a, sst_b = rng.integers(0, 5, n), np.where(rng.random(n) < 0.6, sst_gold, 0)
    sst_ids = [f"s{i}" for i in range(n)]
    sst_ids[9] = sst_ids[2]
    frames = []
    for name, sts, sst in (("a", pa, sst_a), ("b", pb, sst_b)):
        rows = _sts_rows(ids, sts, gold) + [
            ("sst", i, float(p), float(g)) for i, p, g in zip(sst_ids, sst, sst_gold, strict=True)
        ]
        frames.append(paired.read_dev_predictions(_write(tmp_path / f"{name}.csv", rows)))
    results, examples = paired.compare([tuple(frames)], "repeated ids", resamples=199)
    got = {c.metric: c.difference for c in results}
    r = scipy.stats.pearsonr(pb, gold).statistic - scipy.stats.pearsonr(pa, gold).statistic
    acc = np.mean(sst_b == sst_gold) - np.mean(sst_a == sst_gold)
    assert examples == {"sst": n, "sts": n}
    assert got["sts_pearson"] == pytest.approx(r, abs=1e-12)
    assert got["sst_acc"] == pytest.approx(acc, abs=1e-12)
    assert got["overall"] == pytest.approx((acc + r / 2) / 2, abs=1e-12)


@pytest.mark.parametrize(
    ("cell", "column", "line"),
    [
        ("", "prediction", 4),
        ("abc", "prediction", 4),
        ("nan", "gold", 4),
        ("inf", "prediction", 4),
        ("", "id", 5),
    ],
)
def test_a_prediction_or_gold_that_is_not_a_finite_number_is_named(tmp_path, cell, column, line):
    """An empty or non-numeric cell was a NaN that turned every difference and interval into
    NaN beside a p-value of about 0.01, or a ValueError traceback."""
    rows = ["task,id,prediction,gold"] + [f"sts,e{i},{i % 5}.5,{(i * 3) % 5}.0" for i in range(12)]
    fields = rows[line - 1].split(",")
    fields[{"id": 1, "prediction": 2, "gold": 3}[column]] = cell
    rows[line - 1] = ",".join(fields)
    path = tmp_path / "dev_predictions.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(AnalysisError, match=re.escape(f"{path}: line {line}: ")):
        paired.read_dev_predictions(path)
