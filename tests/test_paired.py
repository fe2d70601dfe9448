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
    n = 40
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


def test_a_task_only_some_runs_predicted_is_not_compared_rather_than_dropped(tmp_path):
    """Runs that trained different data.tasks: the task was left out of every metric, so the
    overall difference compared A's two-task score with B's three-task one as if alike."""
    rng = np.random.default_rng(1)
    n = 40
    ids = [f"e{i}" for i in range(n)]
    gold = rng.uniform(0, 5, n).round(1)
    sts = _sts_rows(ids, gold + rng.normal(0, 1, n), gold)
    sst = [("sst", f"s{i}", float(i % 5), float((i * 2) % 5)) for i in range(n)]
    a = paired.read_dev_predictions(_write(tmp_path / "a.csv", sts + sst))
    b = paired.read_dev_predictions(_write(tmp_path / "b.csv", sts))
    with pytest.raises(
        paired.NotComparable, match="sst has no dev predictions in side B of seed pair 2"
    ):
        paired.compare([(a, a), (a, b)], "tasks", resamples=99)
    results, examples = paired.compare([(b, b)], "one task", resamples=99)
    assert examples == {"sts": n} and {c.metric for c in results} == {"sts_pearson", "overall"}


def test_a_seed_that_ran_twice_keeps_both_runs_in_the_comparison(tmp_path):
    """A grid repeated by num_samples runs each cell twice under one seed: the comparison kept
    one run of each side (seed -> trial), so half the runs were dropped unsaid."""
    from analysis import tables
    from analysis.common import load_experiment

    rng = np.random.default_rng(2)
    n = 40
    ids = [f"e{i}" for i in range(n)]
    gold = rng.uniform(0, 5, n).round(1)
    rows = []
    for trial, design, noise in (("a0", 1, 2.0), ("a1", 1, 1.5), ("b0", 2, 1.0), ("b1", 2, 0.2)):
        folder = tmp_path / trial
        folder.mkdir()
        pred = gold + rng.normal(0, noise, n)
        _write(folder / paired.DEV_PREDICTIONS_FILE, _sts_rows(ids, pred, gold))
        r = scipy.stats.pearsonr(pred, gold).statistic
        rows.append(
            {
                "trial_id": trial,
                "status": "completed",
                "evaluations": 2,
                "trial_dir": str(folder),
                "best_checkpoint": "",
                "param.design": design,
                "param.seed": 0,
                "best.overall": (r + 1) / 2,
                "best.sst_acc": None,
                "best.para_acc": None,
                "best.sts_pearson": r,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    exp = load_experiment(tmp_path)
    base, variant = tables.row_runs(exp, "a0"), tables.row_runs(exp, "b0")
    assert sorted(base.values()) == ["a0", "a1"] and sorted(variant.values()) == ["b0", "b1"]
    record = tables.compare_runs(exp, base, variant, "repeated grid", 199, 0)
    r = {t["trial_id"]: t["best.sts_pearson"] for t in rows}
    assert record["seeds"] == 2 and record["base_trials"] == "a0 a1" and not record["unpaired"]
    want = (r["b0"] - r["a0"] + r["b1"] - r["a1"]) / 2
    assert record["sts_pearson_diff"] == pytest.approx(want, abs=1e-12)
    # A run the other side has no partner for is left out, and named.
    record = tables.compare_runs(exp, base, {(0, 0): "b0"}, "one side twice", 199, 0)
    assert record["seeds"] == 1 and record["unpaired"] == "a1"
    assert record["sts_pearson_diff"] == pytest.approx(r["b0"] - r["a0"], abs=1e-12)
    _, notes = tables.display_comparisons(pd.DataFrame([record | {"comparison": "b − a"}]), False)
    assert (
        "b − a: runs without a partner on the other side (a seed only one side ran), left out: a1."
        in notes
    )


@pytest.mark.parametrize("shared", [10, paired.MIN_SHARED - 1, paired.MIN_SHARED])
def test_a_seed_pair_sharing_few_examples_is_refused_before_its_interval_can_be_nan(
    tmp_path, shared
):
    """Seed pair 2 evaluated other dev examples but ``shared``: resamples of the 400-example
    union that drew none of them made its Pearson undefined, and the interval NaN."""
    rng = np.random.default_rng(3)
    n = 400
    ids = [f"e{i}" for i in range(n)]
    gold = rng.uniform(0, 5, n).round(1)
    full = [gold + rng.normal(0, s, n) for s in (1.0, 0.5)]
    a, b = (
        paired.read_dev_predictions(_write(tmp_path / f"{k}.csv", _sts_rows(ids, p, gold)))
        for k, p in zip("ab", full, strict=True)
    )
    few = b.iloc[n - shared :]  # the last `shared` examples only
    pairs = [(a, b), (a, few)]
    if shared < paired.MIN_SHARED:
        with pytest.raises(paired.NotComparable, match=f"sts: only {shared} of {n} dev examples"):
            paired.compare(pairs, "few", resamples=9999)
        return
    results, _ = paired.compare(pairs, "enough", resamples=9999)
    assert all(np.isfinite([c.difference, c.low, c.high, c.p_value]).all() for c in results)


@pytest.mark.parametrize("n", [paired.MIN_EXAMPLES - 1, paired.MIN_EXAMPLES, 24])
def test_runs_that_share_every_example_need_only_min_examples(tmp_path, n):
    """With the same dev examples on both sides no resample can miss them: a small dev set
    (every run on the same max_eval_examples) is compared; below MIN_EXAMPLES it is refused."""
    rng = np.random.default_rng(4)
    ids = [f"e{i}" for i in range(n)]
    gold = rng.uniform(0, 5, n).round(1)
    a, b = (
        paired.read_dev_predictions(
            _write(tmp_path / f"{k}.csv", _sts_rows(ids, gold + rng.normal(0, s, n), gold))
        )
        for k, s in (("a", 1.0), ("b", 0.5))
    )
    if n < paired.MIN_EXAMPLES:
        with pytest.raises(paired.NotComparable, match=f"sts: only {n} dev examples in common$"):
            paired.compare([(a, b), (a, b)], "tiny", resamples=199)
        return
    results, examples = paired.compare([(a, b), (a, b)], "small", resamples=199)
    assert examples == {"sts": n}
    assert all(np.isfinite([c.low, c.high]).all() for c in results)
