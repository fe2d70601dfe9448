"""The analysis commands on real tiny experiments (tests/experiment_fixture.py).

Every number a table, plot or ensemble shows is checked against what the search recorded
(results.csv, repeats.csv, each trial's result.json and its own prediction files), not only that
a file exists.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from analysis import ensemble, importance, paired, report, retrain, tables
from analysis.common import (
    METRICS,
    AnalysisError,
    load_experiment,
    local_path,
    read_predictions,
    run_main,
    top_trial_ids,
)
from mtl import data as data_lib
from mtl.config import build_config
from mtl.search.scheduler import asha_rungs
from mtl.search.space import grid_points, load_space
from mtl.train import load_data
from tests.conftest import REPO
from tests.experiment_fixture import Experiments, build_experiments
from tests.test_search_run import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def analysis_experiments(tmp_path_factory, tiny_backbone, real_data_dir) -> Experiments:
    return build_experiments(tmp_path_factory.mktemp("analysis"), tiny_backbone, real_data_dir)


ABLATIONS = REPO / "search_spaces" / "ablations"


def _key(cfg: dict) -> tuple:
    return (
        cfg["model"]["design"],
        cfg["train"]["mode"],
        cfg["train"]["routine"],
        cfg["smart"]["enabled"],
        cfg["pal"]["variant"],
        cfg["contrastive"]["enabled"],
    )


def _trial_keys(exp: Path) -> pd.DataFrame:
    """results.csv with each trial's configuration read from its own config.yaml."""
    df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})
    df["key"] = [
        _key(yaml.safe_load((Path(d) / "config.yaml").read_text())) for d in df["trial_dir"]
    ]
    return df


def _check_rows_against_results(csv: Path, trials: pd.DataFrame, md: str) -> None:
    table = pd.read_csv(csv, dtype={"best_trial": str})
    for row in table.to_dict("records"):
        if row["trials"] == 0:
            assert all(math.isnan(row[m]) for m in METRICS)
            continue
        best = trials[trials["trial_id"] == row["best_trial"]].iloc[0]
        group = trials[trials["key"] == best["key"]]
        assert row["trials"] == len(group)
        for status in ("completed", "stopped", "error"):
            assert row[status] == (group["status"] == status).sum()
        done = group[group["status"] == "completed"]
        if len(done):
            assert best["trial_id"] == done.loc[done["best.overall"].idxmax(), "trial_id"]
        for m in METRICS:
            assert row[m] == best[f"best.{m}"]  # exactly the recorded value
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row['configuration']} |"))
        for m in METRICS:
            assert f"{row[m]:.3f}" in line


# ---------------------------------------------------------------------------------------------
# Tables


def test_table_rows_equal_results_csv_and_repeats(analysis_experiments, tmp_path):
    exp = analysis_experiments.search
    assert tables.main([str(exp), "--out", str(tmp_path), "--resamples", "199"]) == 0
    trials = _trial_keys(exp)
    folder = tmp_path / "tables"
    conf = pd.read_csv(folder / "configurations.csv", dtype={"best_trial": str})
    assert conf["trials"].sum() == len(trials)  # every trial stands behind exactly one row
    md = (folder / "configurations.md").read_text()
    _check_rows_against_results(folder / "configurations.csv", trials, md)
    for row in conf.to_dict("records"):
        key = trials.loc[trials["trial_id"] == row["best_trial"], "key"].iloc[0]
        assert row["configuration"].startswith(f"design {key[0]}")
        assert (" + RR" in row["configuration"]) == (key[2] == "round_robin")
    # Paper tables for the designs present: Table 1 and/or 2, with the paper's four rows.
    written = sorted(p.stem for p in folder.glob("table_?.csv"))
    designs = {k[0] for k in trials["key"]}
    assert written == [f"table_{d}" for d in sorted(designs)]
    for name in written:
        t = pd.read_csv(folder / f"{name}.csv")
        assert list(t["configuration"]) == [
            "Pretrain w/ RR",
            "Finetune w/ RR",
            "Pretrain w/o RR",
            "Finetune w/o RR",
        ]
        text = (folder / f"{name}.md").read_text()
        _check_rows_against_results(folder / f"{name}.csv", trials, text)
        paper = next(p for p in tables.PAPER_TABLES if p.key == name)
        theirs = text.split("The paper")[1]
        for row in paper.rows:  # the paper's numbers below ours, never mixed into our rows
            assert f"| {row.label} | {row.paper[0]:.3f} | {row.paper[1]:.3f} |" in theirs
    # Mean ± std over seeds where the configuration was repeated (search.repeats).
    runs = pd.read_csv(exp / "repeats.csv", dtype={"trial_id": str})
    summary = pd.read_csv(exp / "repeats_summary.csv")
    repeated = conf[conf["best_trial"].isin(runs["trial_id"])]
    assert len(repeated) >= 1
    for row in repeated.to_dict("records"):
        config = runs.loc[runs["trial_id"] == row["best_trial"], "config"].iloc[0]
        stats = summary[summary["config"] == config].iloc[0]
        assert row["seeds"] == stats["overall.count"]
        for m in METRICS:
            assert row[f"{m}_mean"] == pytest.approx(stats[f"{m}.mean"], abs=1e-12)
            assert row[f"{m}_std"] == pytest.approx(stats[f"{m}.std"], abs=1e-12)
        assert f"{row['overall']:.3f} ({row['overall_mean']:.3f} ± {row['overall_std']:.3f})" in md
    tex = (folder / "configurations.tex").read_text()
    assert r"\begin{tabular}" in tex and "Overall Score" in tex


def test_grid_tables_have_the_papers_rows(analysis_experiments, tmp_path):
    exp = analysis_experiments.grid
    assert tables.main([str(exp), "--out", str(tmp_path), "--resamples", "199"]) == 0
    folder = tmp_path / "tables"
    t3 = pd.read_csv(folder / "table_3.csv")
    assert list(t3["configuration"]) == [
        "design 1 w/o SMART",
        "design 1 w/ SMART",
        "design 2 w/o SMART",
        "design 2 w/ SMART",
    ]
    assert list(t3["trials"]) == [2, 2, 2, 2] and list(t3["completed"]) == [2, 2, 2, 2]
    assert list(t3["seeds"]) == [2, 2, 2, 2]  # the grid's seed axis: mean ± std over 2 seeds
    assert list(t3["paper_overall"]) == [0.740, 0.685, 0.773, 0.766]
    _check_rows_against_results(
        folder / "table_3.csv", _trial_keys(exp), (folder / "table_3.md").read_text()
    )
    # The grid's "w/o SMART" cells are also Table 1's and Table 2's "Finetune w/ RR".
    for design in (1, 2):
        t = pd.read_csv(folder / f"table_{design}.csv").set_index("configuration")
        assert t.loc["Finetune w/ RR", "trials"] == 2 and t["trials"].sum() == 2


EXPECTED_ROWS = {
    "tables_1_2_design_mode_routine.yaml": {
        "table_1": ["Pretrain w/ RR", "Finetune w/ RR", "Pretrain w/o RR", "Finetune w/o RR"],
        "table_2": ["Pretrain w/ RR", "Finetune w/ RR", "Pretrain w/o RR", "Finetune w/o RR"],
    },
    "table_3_design_smart.yaml": {
        "table_3": [
            "design 1 w/o SMART",
            "design 1 w/ SMART",
            "design 2 w/o SMART",
            "design 2 w/ SMART",
        ],
    },
    "table_4_design_routine_pal.yaml": {
        "table_4": [
            "design 1 + PAL",
            "design 1 + RR + PAL",
            "design 2 + PAL",
            "design 2 + RR + PAL",
        ],
    },
    "table_5_design_routine_contrastive.yaml": {
        "table_5": [
            "design 1 + SimCSE",
            "design 1 + RR + SimCSE",
            "design 2 + SimCSE",
            "design 2 + RR + SimCSE",
        ],
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_every_ablation_grid_fills_its_paper_table(name):
    """Each shipped grid, three seeds per cell: its paper table has every row, each from three."""
    space = load_space(ABLATIONS / name)
    rows = []
    for i, point in enumerate(grid_points(space)):
        conf = tables.configuration(space.trial_config(point))
        rows.append(
            {"trial_id": str(i), "status": "completed", "evaluations": 10, **conf}
            | {f"best.{m}": 0.5 + i / 100 for m in METRICS}
        )
    trials = pd.DataFrame(rows)
    got = {t.key: s for t, s in tables.paper_tables(trials, "overall")}
    for key, labels in EXPECTED_ROWS[name].items():
        assert list(got[key]["configuration"]) == labels
        assert list(got[key]["trials"]) == [3] * 4  # seeds 0, 1, 2
    # Table 4's grid also has the PAL-free cells: Table 1's and 2's finetune rows.
    if name.startswith("table_4"):
        assert sorted(got) == ["table_1", "table_2", "table_4"]


def test_a_stopped_trial_never_stands_unmarked():
    """A configuration whose only scored trial ASHA stopped is marked, with a footnote."""
    trials = pd.DataFrame(
        [
            {
                "trial_id": "a",
                "status": "completed",
                "evaluations": 4,
                "best.overall": 0.5,
                "c": "x",
            },
            {"trial_id": "b", "status": "stopped", "evaluations": 1, "best.overall": 0.9, "c": "x"},
            {"trial_id": "c", "status": "stopped", "evaluations": 2, "best.overall": 0.4, "c": "y"},
            {
                "trial_id": "d",
                "status": "error",
                "evaluations": 0,
                "best.overall": np.nan,
                "c": "y",
            },
        ]
    )
    for m in METRICS[:-1]:
        trials[f"best.{m}"] = trials["best.overall"]
    summary = tables.summarize(trials, [(c, trials["c"] == c) for c in ("x", "y")], "overall")
    # x: the completed trial stands, though the stopped one scored higher part-way.
    assert list(summary["best_trial"]) == ["a", "c"]
    shown, notes = tables.display(summary, max_t=4)
    assert shown.loc[0, "Overall Score"] == "0.500"
    assert shown.loc[1, "Overall Score"] == "0.400†"
    assert shown.loc[1, "Trials"] == "2 (1 stopped, 1 error)"
    assert any(n.startswith("†") and "c: 2 of 4" in n for n in notes)


# ---------------------------------------------------------------------------------------------
# Paired comparisons (analysis.paired)


def _metrics_of(frame: pd.DataFrame) -> dict[str, float]:
    """Dev metrics of a dev_predictions.csv, computed here with numpy and scipy."""
    out = {}
    for task, m in (("sst", "sst_acc"), ("para", "para_acc"), ("sts", "sts_pearson")):
        rows = frame[frame["task"] == task]
        if task != "sts":
            out[m] = float((rows["prediction"] == rows["gold"]).mean())
        elif rows["prediction"].std() == 0:
            out[m] = 0.0
        else:
            out[m] = float(scipy.stats.pearsonr(rows["prediction"], rows["gold"]).statistic)
    out["overall"] = (out["sst_acc"] + out["para_acc"] + (out["sts_pearson"] + 1) / 2) / 3
    return out


def test_every_trial_keeps_its_dev_predictions_at_its_best_evaluation(analysis_experiments):
    """Stopped trials too, and with write_predictions false (the grid): the file's metrics are
    the trial's recorded best ones."""
    for exp in (analysis_experiments.search, analysis_experiments.grid):
        df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})
        ok = df[df["status"] != "error"]
        if exp == analysis_experiments.search:
            assert (ok["status"] == "stopped").any()
        for row in ok.to_dict("records"):
            frame = paired.read_dev_predictions(Path(row["trial_dir"]) / "dev_predictions.csv")
            got = _metrics_of(frame)
            for m in METRICS:
                assert got[m] == pytest.approx(row[f"best.{m}"], abs=1e-12), (row["trial_id"], m)


def _independent(pairs: list[tuple[pd.DataFrame, pd.DataFrame]], resamples: int, seed: int):
    """B - A per metric: scipy.stats.bootstrap and permutation_test with scalar, unvectorized
    statistics written here with scipy.stats.pearsonr and dictionaries of ids."""
    tasks = ("sst", "para", "sts")
    union: dict[str, list[str]] = {}
    for t in tasks:
        seen: dict[str, None] = {}
        for pair in pairs:
            for f in pair:
                seen.update(dict.fromkeys(f.loc[f["task"] == t, "id"]))
        union[t] = list(seen)
    lookup = [
        [
            {
                t: dict(
                    zip(
                        f.loc[f["task"] == t, "id"],
                        f.loc[f["task"] == t, "prediction"],
                        strict=True,
                    )
                )
                for t in tasks
            }
            for f in pair
        ]
        for pair in pairs
    ]
    gold = {t: {} for t in tasks}
    for pair in pairs:
        for f in pair:
            for t in tasks:
                rows = f[f["task"] == t]
                gold[t].update(zip(rows["id"], rows["gold"], strict=True))

    def metric(t: str, preds: list[float], golds: list[float]) -> float:
        if t != "sts":
            return float(np.mean(np.array(preds) == np.array(golds)))
        if np.std(preds) == 0:
            return 0.0
        return float(scipy.stats.pearsonr(preds, golds).statistic)

    def diff(m: str, ids: dict[str, list[str]], swap: set[str]) -> float:
        per_pair = []
        for sides in lookup:
            parts = {}
            for t in tasks:
                common = [i for i in ids[t] if i in sides[0][t] and i in sides[1][t]]
                a = [sides[1 if i in swap else 0][t][i] for i in common]
                b = [sides[0 if i in swap else 1][t][i] for i in common]
                g = [gold[t][i] for i in common]
                parts[t] = (metric(t, b, g), metric(t, a, g))
            if m == "overall":
                s = [parts["sst"], parts["para"], tuple((v + 1) / 2 for v in parts["sts"])]
                per_pair.append(sum(x - y for x, y in s) / 3)
            else:
                t = {"sst_acc": "sst", "para_acc": "para", "sts_pearson": "sts"}[m]
                per_pair.append(parts[t][0] - parts[t][1])
        return float(np.mean(per_pair))

    samples = tuple(np.arange(len(union[t])) for t in tasks)
    flat = [(t, i) for t in tasks for i in union[t]]
    out = {}
    for m in METRICS:

        def boot(*idx, m=m):
            return diff(m, {t: [union[t][k] for k in idx[n]] for n, t in enumerate(tasks)}, set())

        def perm(x, y, m=m):
            swapped = {flat[k - len(flat)][1] for k in x if k >= len(flat)}
            return diff(m, union, swapped)

        ci = scipy.stats.bootstrap(
            samples,
            boot,
            n_resamples=resamples,
            batch=paired.BATCH,
            vectorized=False,
            paired=False,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        p = scipy.stats.permutation_test(
            (np.arange(len(flat)), np.arange(len(flat)) + len(flat)),
            perm,
            permutation_type="samples",
            n_resamples=resamples,
            batch=paired.PERMUTATION_BATCH,
            vectorized=False,
            rng=np.random.default_rng(seed),
        ).pvalue
        out[m] = (diff(m, union, set()), ci.low, ci.high, p)
    return out


GRID_ROWS = {
    "design 1 w/o SMART": (1, False),
    "design 1 w/ SMART": (1, True),
    "design 2 w/o SMART": (2, False),
    "design 2 w/ SMART": (2, True),
}


def test_grid_comparisons_equal_an_independent_scipy_computation(analysis_experiments, tmp_path):
    exp = analysis_experiments.grid
    argv = [str(exp), "--out", str(tmp_path), "--resamples", "199", "--seed", "3"]
    assert tables.main(argv) == 0
    folder = tmp_path / "tables"
    comp = pd.read_csv(folder / "table_3_comparisons.csv", dtype={"base_trials": str})
    pairs = {(r["base"], r["variant"], r["changed"]) for r in comp.to_dict("records")}
    assert pairs == {
        ("design 1 w/o SMART", "design 1 w/ SMART", "smart"),
        ("design 2 w/o SMART", "design 2 w/ SMART", "smart"),
        ("design 1 w/o SMART", "design 2 w/o SMART", "design"),
        ("design 1 w/ SMART", "design 2 w/ SMART", "design"),
    }
    df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})
    t3 = pd.read_csv(folder / "table_3.csv").set_index("configuration")
    paper = {r.label: r.paper for r in tables.PAPER_TABLES[2].rows}
    md = (folder / "table_3.md").read_text()
    for row in comp.to_dict("records"):
        assert row["seeds"] == 2
        sides = []
        for label in (row["base"], row["variant"]):
            design, smart = GRID_ROWS[label]
            runs = df[(df["param.design"] == design) & (df["param.smart"] == smart)]
            sides.append(
                {
                    int(r["param.seed"]): paired.read_dev_predictions(
                        Path(r["trial_dir"]) / "dev_predictions.csv"
                    )
                    for r in runs.to_dict("records")
                }
            )
        want = _independent([(sides[0][s], sides[1][s]) for s in (0, 1)], 199, 3)
        for n, m in enumerate(METRICS):
            diff, low, high, p = want[m]
            assert row[f"{m}_diff"] == pytest.approx(diff, abs=1e-9)
            assert row[f"{m}_low"] == pytest.approx(low, abs=1e-9)
            assert row[f"{m}_high"] == pytest.approx(high, abs=1e-9)
            assert row[f"{m}_p"] == pytest.approx(p, abs=1e-12)
            assert row[f"{m}_significant"] == (low > 1e-12 or high < -1e-12)
            # Same seed, same dev examples: the mean paired difference is the difference of
            # the rows' means over seeds.
            means = t3.loc[row["variant"], f"{m}_mean"] - t3.loc[row["base"], f"{m}_mean"]
            assert row[f"{m}_diff"] == pytest.approx(means, abs=1e-9)
            # The paper's difference, from its single runs, beside ours.
            assert row[f"paper_{m}_diff"] == pytest.approx(
                paper[row["variant"]][n] - paper[row["base"]][n]
            )
        line = next(x for x in md.splitlines() if x.startswith(f"| {row['comparison']} |"))
        assert line.count("*") == sum(bool(row[f"{m}_significant"]) for m in METRICS)
    forest = pd.read_csv(folder / "table_3_forest.csv")
    for row in comp.to_dict("records"):
        for m in METRICS:
            got = forest[(forest["comparison"] == row["comparison"]) & (forest["metric"] == m)]
            assert got["difference"].item() == pytest.approx(row[f"{m}_diff"])
            assert got["low"].item() == pytest.approx(row[f"{m}_low"])
    assert (folder / "table_3_forest.png").stat().st_size > 0
    assert r"\begin{tabular}" in (folder / "table_3_comparisons.tex").read_text()


def _planted(frame: pd.DataFrame) -> pd.DataFrame:
    """Every other example of each task predicted exactly (prediction := gold)."""
    out = frame.copy()
    half = out.groupby("task").cumcount() % 2 == 0
    out.loc[half, "prediction"] = out.loc[half, "gold"]
    return out


def test_itself_gives_zero_and_a_planted_difference_is_detected(analysis_experiments):
    exp = load_experiment(analysis_experiments.grid)
    best = exp.results.sort_values("best.overall", ascending=False)["trial_id"].iloc[0]
    runs = tables.row_runs(exp, best)
    assert len(runs) == 2  # both seeds of the best configuration
    same = tables.compare_runs(exp, runs, runs, "itself", 199, 0)
    assert same["seeds"] == 2 and not same["note"]
    for m in METRICS:
        assert same[f"{m}_diff"] == 0 and same[f"{m}_low"] == same[f"{m}_high"] == 0
        assert same[f"{m}_p"] == 1 and not same[f"{m}_significant"]
    frames = [paired.read_dev_predictions(paired.prediction_file(exp, t)) for t in runs.values()]
    for pairs in ([(frames[0], _planted(frames[0]))], [(f, _planted(f)) for f in frames]):
        results, _ = paired.compare(pairs, "planted", resamples=199)
        for c in results:
            assert c.difference > 0 and c.low > 0 and c.significant, c
            assert c.p_value < 0.05, c


def test_top_trials_say_whether_the_best_is_a_tie(analysis_experiments, tmp_path):
    exp = analysis_experiments.search
    assert tables.main([str(exp), "--out", str(tmp_path), "--resamples", "199"]) == 0
    folder = tmp_path / "tables"
    top = pd.read_csv(folder / "top_trials_comparisons.csv", dtype={"base": str, "variant": str})
    df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str}).set_index("trial_id")
    ok = df[df["status"] != "error"]
    ranked = pd.concat(
        [
            ok[ok["status"] == "completed"].sort_values("best.overall", ascending=False),
            ok[ok["status"] != "completed"].sort_values("best.overall", ascending=False),
        ]
    ).index[:5]
    assert list(top["variant"]) == [ranked[0]] * 4 and list(top["base"]) == list(ranked[1:])
    assert (df.loc[top["base"], "status"] == "stopped").any()  # read at its best evaluation
    md = (folder / "top_trials.md").read_text()
    for row in top.to_dict("records"):
        want = df.loc[row["variant"], "best.overall"] - df.loc[row["base"], "best.overall"]
        assert row["overall_diff"] == pytest.approx(want, abs=1e-9)
        verdict = next(
            x for x in md.splitlines() if x.startswith(f"- {row['variant']} vs {row['base']}:")
        )
        assert ("a tie" in verdict) == (not row["overall_significant"])


# ---------------------------------------------------------------------------------------------
# Importance and plots


def _rung_score(trial_dir: Path, rung: int) -> float:
    reports = [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines() if x]
    return max(r["overall"] for r in reports if "evaluation" in r and r["evaluation"] <= rung)


def test_importance_uses_every_trial_at_a_rung_and_plots_their_values(
    analysis_experiments, tmp_path
):
    exp = analysis_experiments.search
    assert importance.main([str(exp), "--out", str(tmp_path)]) == 0
    folder = tmp_path / "importance"
    summary = json.loads((folder / "importance.json").read_text())
    df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str}).set_index("trial_id")
    ok = df[df["status"] != "error"]
    assert summary["rung"] == 1  # ASHA's first rung: the grace period every trial reached
    assert sorted(summary["trials"]) == sorted(ok.index)  # stopped trials included
    assert set(summary["excluded_trials"]) == set(df.index[df["status"] == "error"])
    assert (ok["status"] == "stopped").any()
    # head_hidden is sampled only with two head layers: left out, with the reason.
    assert set(summary["importance"]) == {"design", "routine", "lr", "head_layers", "head_dropout"}
    assert "sampled only when head_layers: 2" in summary["left_out"]["head_hidden"]
    assert sum(summary["importance"].values()) == pytest.approx(1.0)
    assert "head_hidden" in (folder / "importance.md").read_text()

    # Each parameter's plot: the points are the trials' values and scores.
    for name in ("lr", "head_dropout", "design", "head_hidden"):
        points = pd.read_csv(folder / f"param_{name}.csv", dtype={"trial_id": str}).set_index(
            "trial_id"
        )
        having = ok[ok[f"param.{name}"].notna()]
        assert sorted(points.index) == sorted(having.index)
        for trial_id, p in points.iterrows():
            assert p["value"] == pytest.approx(having.loc[trial_id, f"param.{name}"])
            assert p["score_at_rung"] == _rung_score(Path(df.loc[trial_id, "trial_dir"]), 1)
            if df.loc[trial_id, "status"] == "completed":
                assert p["final_score"] == df.loc[trial_id, "best.overall"]
            else:
                assert math.isnan(p["final_score"])
        assert (folder / f"param_{name}.png").stat().st_size > 0
    bars = pd.read_csv(folder / "importance.csv")
    assert dict(
        zip(bars["parameter"][bars["scope"] == "all trials"], bars["importance"], strict=True)
    ) == pytest.approx(summary["importance"])

    # Learning curves: every evaluation of every trial, as Tune recorded it.
    curves = pd.read_csv(folder / "learning_curves.csv", dtype={"trial_id": str})
    for trial_id, row in df.iterrows():
        reports = [
            json.loads(x)
            for x in (Path(row["trial_dir"]) / "result.json").read_text().splitlines()
            if x
        ]
        evals = [r for r in reports if "evaluation" in r]
        mine = curves[curves["trial_id"] == trial_id]
        assert list(mine["evaluation"]) == [int(r["evaluation"]) for r in evals]
        assert list(mine["overall"]) == [r["overall"] for r in evals]
        assert len(mine) == row["evaluations"]


@pytest.mark.parametrize(
    ("dist", "values", "expected"),
    [
        (FloatDistribution(0.0, 0.3), [0.29, 0.1, 0.15, 0.2, 0.05], "upper boundary"),
        (FloatDistribution(0.0, 0.3), [0.01, 0.1, 0.15, 0.2, 0.25], "lower boundary"),
        (FloatDistribution(0.0, 0.3), [0.15, 0.29, 0.01, 0.2, 0.05], None),
        # log scale: 3e-4 sits in the middle of [1e-5, 1e-2] on a log axis, not at its low end.
        (FloatDistribution(1e-5, 1e-2, log=True), [3e-4, 1e-2, 1e-5, 5e-3, 2e-3], None),
        (
            FloatDistribution(1e-5, 1e-2, log=True),
            [1.1e-5, 3e-4, 1e-3, 5e-3, 2e-3],
            "lower boundary",
        ),
        (IntDistribution(1, 100), [99, 3, 50, 40, 60], "upper boundary"),
        (CategoricalDistribution([16, 32, 64]), [64, 16, 32, 32, 16], "upper boundary"),
        (CategoricalDistribution([16, 32]), [32, 16, 32, 16, 32], None),  # two choices: no inside
        (CategoricalDistribution(["cls", "mean"]), ["cls", "mean", "cls", "mean", "cls"], None),
    ],
)
def test_boundary_warning(dist, values, expected):
    scores = [0.9, 0.5, 0.4, 0.3, 0.2]  # the first value is the best
    warning = importance.boundary_warning("p", dist, values, scores)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and expected in warning


# ---------------------------------------------------------------------------------------------
# Ensemble


def _best_completed(exp: Path, design: int | None = None) -> pd.Series:
    """The best completed trial (with ``design``: the best of that design that did not fail)."""
    df = _trial_keys(exp)
    done = df[df["status"] == "completed"] if design is None else df[df["status"] != "error"]
    if design is not None:
        done = done[[k[0] == design for k in done["key"]]]
    return done.sort_values("best.overall", ascending=False).iloc[0]


def _ensemble(exp: Path, out: Path, *args: str) -> Path:
    assert ensemble.main([str(exp), "--out", str(out), "--max-eval-examples", "64", *args]) == 0
    return out / "ensemble"


def test_ensemble_of_one_or_two_identical_members_reproduces_the_member(
    analysis_experiments, tmp_path
):
    exp, data_dir = analysis_experiments.search, analysis_experiments.data_dir
    best = _best_completed(exp)
    own = Path(best["trial_dir"]) / "predictions"
    one = _ensemble(exp, tmp_path / "one", "--members", best["trial_id"])
    two = _ensemble(exp, tmp_path / "two", "--members", f"{best['trial_id']},{best['trial_id']}")
    for task in ("sst", "para", "sts"):
        name = f"{task}-dev-output.csv"
        # The trial's own dev predictions (same 64 examples, written by the trainer) byte for byte.
        assert (one / name).read_bytes() == (own / name).read_bytes()
        assert (two / name).read_bytes() == (own / name).read_bytes()
    for name in ("sst-test-output.csv", "sts-test-output.csv"):
        assert (two / name).read_bytes() == (one / name).read_bytes()
    # Its dev scores are the search's for that trial (same checkpoint, same examples).
    dev = json.loads((one / "ensemble.json").read_text())["dev"]
    for m in METRICS:
        assert dev[m] == best[f"best.{m}"]
    # The test files parse and cover every test id; the absent Quora test file is named.
    for task in ("sst", "sts"):
        preds = read_predictions(one / f"{task}-test-output.csv")
        ids = data_lib.read_split(data_dir, task, "test").ids
        assert sorted(preds["id"]) == sorted(ids) and preds["id"].is_unique
        if task == "sst":
            assert set(preds["prediction"]) <= {0, 1, 2, 3, 4}
    assert not (one / "para-test-output.csv").exists()
    assert "quora-test-student.csv" in (one / "MISSING.txt").read_text()
    header = (one / "sst-test-output.csv").read_text().splitlines()[0]
    assert header == "id \t Predicted_Sentiment "


def test_ensemble_scores_on_the_trainers_dev_examples_whatever_the_seed(
    tiny_backbone, real_data_dir
):
    """Without --seed the dev subsample is the one the trainer scored the members on."""
    cfg = build_config(
        {
            "seed": 3,
            "model": {"backbone": str(tiny_backbone)},
            "data": {"data_dir": str(real_data_dir), "max_eval_examples": 24},
        }
    )
    splits = ensemble.encode_splits(cfg, ensemble.EvalData(real_data_dir, 24))
    trainer = load_data(cfg)
    for task in cfg.data.tasks:
        assert splits[(task, "dev")].ids == trainer.dev[task].ids
    other = ensemble.encode_splits(cfg, ensemble.EvalData(real_data_dir, 24, seed=3))
    assert other[("sst", "dev")].ids != trainer.dev["sst"].ids  # --seed: another draw


def test_ensemble_averages_members_of_different_designs(analysis_experiments, tmp_path):
    exp = analysis_experiments.search
    a, b = _best_completed(exp, design=1), _best_completed(exp, design=2)
    pa = _ensemble(exp, tmp_path / "a", "--members", a["trial_id"])
    pb = _ensemble(exp, tmp_path / "b", "--members", b["trial_id"])
    both = _ensemble(exp, tmp_path / "ab", "--members", f"{a['trial_id']},{b['trial_id']}")
    members = pd.read_csv(both / "members.csv")
    assert list(members["configuration"].str[:8]) == ["design 1", "design 2"]
    mean = (
        read_predictions(pa / "sts-dev-output.csv")["prediction"]
        + read_predictions(pb / "sts-dev-output.csv")["prediction"]
    ) / 2
    got = read_predictions(both / "sts-dev-output.csv")["prediction"]
    assert np.allclose(got, mean, atol=1.5e-6)  # printed with 6 decimals
    table = pd.read_csv(both / "table_6.csv")
    assert table["row"].iloc[-2] == "ensemble of 2: dev"
    dev = json.loads((both / "ensemble.json").read_text())["dev"]
    assert table["overall"].iloc[-2] == pytest.approx(dev["overall"])


def test_greedy_selection_never_scores_below_its_best_member(analysis_experiments, tmp_path):
    exp = analysis_experiments.search
    out = _ensemble(exp, tmp_path, "--top-k", "3", "--greedy", "--include-stopped")
    members = pd.read_csv(out / "members.csv")
    summary = json.loads((out / "ensemble.json").read_text())
    assert len(members) == 3 and 1 <= len(summary["selected"]) <= 3
    assert summary["dev"]["overall"] >= members["dev.overall"].max() - 1e-12
    assert "greedy forward selection" in (out / "table_6.md").read_text()
    optimism = summary["greedy_optimism"]
    assert optimism["selections"] == 2 * optimism["halvings"] == 40
    assert 0 <= optimism["held_out"] <= 1 and 0 <= optimism["selected_on"] <= 1
    note = (out / "table_6.md").read_text()
    assert f"on the other half against {optimism['selected_on']:.3f}" in note
    corrected = summary["dev"]["overall"] - optimism["optimism"]
    assert f"optimism-corrected estimate {corrected:.3f}" in note


def test_ensemble_with_repeats_adds_each_top_trials_seed_runs_as_members(
    analysis_experiments, tmp_path
):
    """Under ASHA the seed repeats are the fully trained runs of the top configurations: with
    --with-repeats each top trial brings its completed repeats (repeats.csv) as members."""
    exp = analysis_experiments.search
    runs = pd.read_csv(exp / "repeats.csv", dtype={"trial_id": str})
    searched = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})["trial_id"]
    own = runs[runs["trial_id"].isin(searched)]  # the search's own trials, one per configuration
    repeat = runs[~runs["trial_id"].isin(searched) & (runs["status"] == "completed")]
    assert len(own) == 2 and len(repeat) >= 1
    for row in runs.to_dict("records"):  # every run says where it is
        assert (Path(row["trial_dir"]) / "config.yaml").is_file()
        assert (Path(row["best_checkpoint"]) / "model.safetensors").is_file()
    out = _ensemble(exp, tmp_path / "all", "--top-k", "2", "--with-repeats")
    members = pd.read_csv(out / "members.csv", dtype={"trial_id": str})
    expected = [
        t
        for c, first in zip(own["config"], own["trial_id"], strict=True)
        for t in (first, *repeat[repeat["config"] == c].sort_values("seed")["trial_id"])
    ]
    assert list(members["trial_id"]) == expected
    for row in repeat.to_dict("records"):
        got = members[members["trial_id"] == row["trial_id"]].iloc[0]
        assert got["configuration"].endswith(f", seed {row['seed']}")
        # Its best checkpoint, rebuilt, scores what the repeat run recorded on the same examples.
        for m in METRICS:
            assert got[f"dev.{m}"] == pytest.approx(row[m], abs=1e-9)
        assert got["search_best"] == pytest.approx(row["overall"], abs=1e-12)
        # The paired tables find the same run's dev predictions.
        view = load_experiment(exp)
        expected_file = Path(row["trial_dir"]) / paired.DEV_PREDICTIONS_FILE
        assert paired.prediction_file(view, row["trial_id"]) == expected_file
        assert expected_file.is_file()
    # A repeat run alone reproduces its own dev predictions, byte for byte.
    first = repeat.iloc[0]
    alone = _ensemble(exp, tmp_path / "one", "--members", first["trial_id"])
    own_preds = Path(first["trial_dir"]) / "predictions" / "sts-dev-output.csv"
    assert (alone / "sts-dev-output.csv").read_bytes() == own_preds.read_bytes()


def test_ensemble_with_repeats_refuses_what_it_cannot_read(analysis_experiments, tmp_path, capsys):
    # An experiment without seed repeats: one line, status 2.
    grid = analysis_experiments.grid
    argv = [str(grid), "--top-k", "1", "--with-repeats", "--out", str(tmp_path / "g")]
    assert run_main(ensemble.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --with-repeats:") and "no repeats.csv" in err
    assert len(err.splitlines()) == 1
    # A top trial outside search.repeats' top 2 joins alone, and says so.
    exp = analysis_experiments.search
    argv = [str(exp), "--top-k", "4", "--with-repeats", "--include-stopped"]
    assert (
        run_main(ensemble.main, [*argv, "--max-eval-examples", "64", "--out", str(tmp_path)]) == 0
    )
    members = pd.read_csv(tmp_path / "ensemble" / "members.csv", dtype={"trial_id": str})
    runs = pd.read_csv(exp / "repeats.csv", dtype={"trial_id": str})
    top = top_trial_ids(load_experiment(exp), 4, include_stopped=True, need_checkpoint=True)
    alone = [t for t in top if t not in set(runs["trial_id"])]
    assert alone and len(members) == 4 + (runs["trial_id"].nunique() - 2)
    assert all(list(members["trial_id"]).count(t) == 1 for t in alone)
    assert f"no completed seed repeats of {', '.join(alone)}: they join alone" in (
        capsys.readouterr().err
    )
    # A repeats.csv from before it recorded its runs' folders (both folders moved elsewhere):
    # the ensemble says how to rewrite it; the paired tables still find each run's predictions.
    storage = tmp_path / "moved"
    for folder in (exp, exp.parent / f"{exp.name}-repeats"):
        shutil.copytree(folder, storage / folder.name)
    copy = storage / exp.name
    runs = pd.read_csv(copy / "repeats.csv", dtype={"trial_id": str})
    runs.drop(columns=["trial_dir", "best_checkpoint"]).to_csv(copy / "repeats.csv", index=False)
    argv = [str(copy), "--top-k", "1", "--with-repeats", "--out", str(tmp_path / "o")]
    assert run_main(ensemble.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "repeats.csv: no best_checkpoint, trial_dir column" in err and "--resume" in err
    view = load_experiment(copy)
    searched = set(view.results["trial_id"])
    for row in runs[~runs["trial_id"].isin(searched)].to_dict("records"):
        found = paired.prediction_file(view, row["trial_id"])
        moved = storage / f"{exp.name}-repeats" / Path(row["trial_dir"]).name
        assert found == moved / paired.DEV_PREDICTIONS_FILE and found.is_file()


def _noise_outputs(rng: np.random.Generator, n: int) -> ensemble.Outputs:
    """One member whose dev scores are independent of the labels (it has learned nothing)."""
    values = {
        ("sst", "dev"): rng.dirichlet(np.ones(5), size=n),
        ("para", "dev"): rng.random(n),
        ("sts", "dev"): rng.random(n) * 5,
    }
    return ensemble.Outputs({k: [f"{k[0]}{i}" for i in range(n)] for k in values}, values)


def test_greedy_optimism_finds_what_selection_on_dev_adds_to_members_that_know_nothing():
    # Members that predict noise have an expected overall of 0.4 on any new sample (SST 1/5,
    # Quora 1/2, STS Pearson 0 -> 1/2). Greedy selection on dev still finds an ensemble that
    # scores above that on the dev it chose on; the held-out halves must see through it.
    from mtl.tasks import BUILTIN

    rng = np.random.default_rng(0)
    n = 600
    members = [_noise_outputs(rng, n) for _ in range(8)]
    gold = {
        "sst": rng.integers(0, 5, n),
        "para": rng.integers(0, 2, n).astype(float),
        "sts": rng.random(n) * 5,
    }
    _, steps = ensemble.greedy(members, gold, "overall", BUILTIN)
    in_sample = steps[-1]["overall"]
    result = ensemble.greedy_optimism(members, gold, "overall", BUILTIN, halvings=10, seed=1)
    assert in_sample > 0.41  # selection flatters noise on the data it chose on
    assert result["selected_on"] > 0.41
    # What the selections score on the half they did not see is the truth, give or take noise.
    assert result["held_out"] == pytest.approx(0.4, abs=0.015)
    assert result["held_out"] < in_sample - 0.01
    assert result["optimism"] > 0.01
    # Halves flatter more than the whole: the correction errs on the safe side.
    assert in_sample - result["optimism"] <= 0.4 + 0.005
    # One halving, recomputed by hand: select on A and score on B, then the other way round.
    single = ensemble.greedy_optimism(members, gold, "overall", BUILTIN, halvings=1, seed=7)
    rng = np.random.default_rng(7)
    order = {name: rng.permutation(n) for name in gold}
    half_a = {name: np.sort(o[: n // 2]) for name, o in order.items()}
    half_b = {name: np.sort(o[n // 2 :]) for name, o in order.items()}
    held_out = []
    for pick, other in ((half_a, half_b), (half_b, half_a)):
        parts = [ensemble.dev_subset(m, gold, pick) for m in members]
        chosen, _ = ensemble.greedy([p[0] for p in parts], parts[0][1], "overall", BUILTIN)
        held = [ensemble.dev_subset(members[i], gold, other) for i in chosen]
        combined = ensemble.average([h[0] for h in held])
        held_out.append(ensemble.evaluate(combined, held[0][1], BUILTIN)["overall"])
    assert single["selections"] == 2
    assert single["held_out"] == pytest.approx(np.mean(held_out))


def test_members_that_trained_different_tasks_are_refused_not_averaged_over_what_they_share():
    # average() kept the splits every member had: a member without STS dropped STS from the
    # ensemble, and its overall score was a two-task mean set beside three-task members'.
    rng = np.random.default_rng(0)
    outputs = [_noise_outputs(rng, 30) for _ in range(3)]
    del outputs[2].values[("sts", "dev")], outputs[2].ids[("sts", "dev")]
    members = [
        ensemble.Member(t, None, Path(t), "design 2", 0.5)  # type: ignore[arg-type]
        for t in ("aaaa", "bbbb", "cccc")
    ]
    ensemble.same_splits(members[:2], outputs[:2])
    with pytest.raises(AnalysisError, match="member cccc has no sts dev scores and member aaaa"):
        ensemble.same_splits(members, outputs)
    with pytest.raises(AnalysisError, match="member cccc has no sts dev scores and member aaaa"):
        ensemble.same_splits([members[2], members[0]], [outputs[2], outputs[0]])
    # average() itself refuses to average over what the members share.
    with pytest.raises(AnalysisError, match="members scored different splits: \\('sts', 'dev'\\)"):
        ensemble.average([outputs[2], outputs[0]])
    with pytest.raises(AnalysisError, match="members scored different splits"):
        ensemble.average(outputs)


# ---------------------------------------------------------------------------------------------
# Report


def test_ensemble_json_names_the_data_folder_as_the_run_named_it(analysis_experiments, monkeypatch):
    """Not this machine's absolute path when the run did not name one (ensemble.json is
    committed with the results): the members' null data_dir is $MTL_DATA_DIR's folder."""
    exp = load_experiment(analysis_experiments.search)
    data_dir = analysis_experiments.data_dir
    unnamed = ensemble.EvalData(data_dir, None)
    monkeypatch.setenv("MTL_DATA_DIR", str(data_dir))
    assert ensemble.recorded_data_dir(exp, unnamed) == "$MTL_DATA_DIR"
    assert local_path(exp, "$MTL_DATA_DIR") == data_dir
    monkeypatch.delenv("MTL_DATA_DIR")
    assert ensemble.recorded_data_dir(exp, unnamed) is None  # the downloaded copy
    inside = ensemble.EvalData(data_dir, None, named=str(exp.path / "data"))
    assert ensemble.recorded_data_dir(exp, inside) == "EXP/data"
    assert local_path(exp, "EXP/data") == exp.path / "data"
    elsewhere = ensemble.EvalData(data_dir, None, named=str(data_dir))
    assert ensemble.recorded_data_dir(exp, elsewhere) == str(data_dir)  # as the run named it


def test_report_links_every_plot_and_table(analysis_experiments):
    exp, data_dir = analysis_experiments.search, analysis_experiments.data_dir
    # The data folder beside the experiment, as on a cluster's shared storage.
    beside = exp.parent / "cs224n"
    if not beside.exists():
        beside.symlink_to(data_dir)
    # The whole dev set, into EXP/analysis.
    argv = [str(exp), "--top-k", "2", "--include-stopped", "--data-dir", str(beside)]
    assert ensemble.main(argv) == 0
    assert report.main([str(exp), "--resamples", "199"]) == 0
    folder = exp / "analysis"
    text = (folder / "report.md").read_text()
    links = set(re.findall(r"\]\(([^)#]+)\)", text))
    for target in links:
        assert (folder / target).is_file(), target
    outputs = [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix in (".png", ".md", ".tex")
        or (p.suffix == ".csv" and p.parent.name in ("tables", "ensemble"))
    ]
    outputs = [o for o in outputs if o != "report.md"]
    assert outputs and not sorted(set(outputs) - links)
    # The best trial against the next ones, under "Best trials", before the tables.
    best = text.split("## Best trials")[1].split("## Tables")[0]
    assert "against the next ones" in best and "tables/top_trials_forest.png" in best
    # No folder of the machine that made it: paths are relative to the experiment folder, EXP.
    storage = str(exp.parent)
    summary = (folder / "ensemble" / "ensemble.json").read_text()
    assert storage not in text and storage not in summary
    # ensemble.json names the data folder from EXP, and reads back as this machine's folder.
    assert json.loads(summary)["data_dir"] == "EXP/../cs224n"
    assert local_path(load_experiment(exp), "EXP/../cs224n") == beside
    assert f"`EXP` below is the experiment folder `{exp.name}`" in text
    assert "python -m analysis.tables EXP" in text
    # The command reruns the design space as it ran (the copy the search keeps in EXP).
    rerun = re.search(r"python -m mtl\.search EXP/(\S+)", text)
    assert rerun is not None
    from mtl.search.space import load_space

    original = load_space(analysis_experiments.search_space)
    # The copy is the resolved space: every default filled in, the study's location recorded.
    from mtl.search.experiment import canonical, resolve

    assert canonical(load_space(exp / rerun.group(1))) == canonical(resolve(original))
    assert "python -m analysis.ensemble" in text and "--top-k 2" in text
    # Figure 4: the label counts plotted are those of the ensemble's dev predictions and gold.
    sst = read_predictions(folder / "ensemble" / "sst-dev-output.csv")
    gold = data_lib.read_split(data_dir, "sst", "dev")
    assert len(sst) == len(gold.ids)  # the whole dev set
    dist = pd.read_csv(folder / "predictions" / "sst_label_distribution.csv")
    assert list(dist["predicted"]) == [int((sst["prediction"] == k).sum()) for k in range(5)]
    assert list(dist["gold"]) == [gold.labels.count(k) for k in range(5)]
    confusion = pd.read_csv(folder / "predictions" / "sst_confusion.csv")
    assert confusion["count"].sum() == len(sst)
    assert confusion.groupby("predicted")["count"].sum().tolist() == list(dist["predicted"])
    scatter = pd.read_csv(folder / "predictions" / "sts_scatter.csv", dtype={"id": str})
    sts = read_predictions(folder / "ensemble" / "sts-dev-output.csv")
    assert list(scatter["prediction"]) == list(sts["prediction"])
    raw = data_lib.read_split(data_dir, "sts", "dev")
    sts_gold = dict(zip(raw.ids, raw.labels, strict=True))
    assert list(scatter["gold"]) == [sts_gold[i] for i in scatter["id"]]


# ---------------------------------------------------------------------------------------------
# Retraining the best configurations


def test_retrain_reruns_the_top_configurations_at_the_new_budget(analysis_experiments, tmp_path):
    exp = analysis_experiments.search
    df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})
    top = df[df["status"] == "completed"].sort_values("best.overall", ascending=False)[:2]
    space_file = tmp_path / "retrain.yaml"
    overrides = ["--set", "base.data.max_train_examples=96", "--set", "base.train.epochs=1"]
    argv = [str(exp), "--top-k", "2", "--name", "again", "--out", str(space_file), *overrides]
    assert run_main(retrain.main, argv) == 0
    space = load_space(space_file)
    assert (space.search.num_samples, space.scheduler.type) == (2, "fifo")
    assert space.base["data"]["max_train_examples"] == 96

    run_cli(space_file)
    again = exp.parent / "again"
    rerun = pd.read_csv(again / "results.csv", dtype={"trial_id": str})
    assert (rerun["status"] == "completed").all() and len(rerun) == 2
    params = [c for c in df.columns if c.startswith("param.")]
    want = sorted(map(repr, top[params].to_dict("records")))
    assert sorted(map(repr, rerun[params].to_dict("records"))) == want
    for trial_dir in rerun["trial_dir"]:
        cfg = yaml.safe_load((Path(trial_dir) / "config.yaml").read_text())
        assert (cfg["data"]["max_train_examples"], cfg["train"]["epochs"]) == (96, 1)
    # Its trials are the ensemble's members like any experiment's.
    out = tmp_path / "ensemble"
    assert run_main(ensemble.main, [str(again), "--top-k", "2", "--out", str(out)]) == 0
    assert (out / "ensemble" / "ensemble.json").is_file()


def test_retrain_with_a_bad_override_leaves_no_file(analysis_experiments, tmp_path, capsys):
    space_file = tmp_path / "retrain.yaml"
    argv = [str(analysis_experiments.search), "--top-k", "1", "--out", str(space_file)]
    assert run_main(retrain.main, [*argv, "--set", "base.train.nonsense=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.nonsense: unknown key" in err and "\n" not in err
    assert not space_file.exists()


# ---------------------------------------------------------------------------------------------
# Bad input


def _no_results(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# The folder is read through mtl.search.experiment, as the search wrote it


def _copy(exp: Path, root: Path) -> Path:
    """The experiment folder copied under ``root/results``, its recorded trial folders re-pointed
    at the copy's (as after copying it off the search machine)."""
    copy = root / "results" / exp.name
    shutil.copytree(exp, copy)
    results = pd.read_csv(copy / "results.csv", dtype={"trial_id": str})
    results["trial_dir"] = [str(copy / Path(d).name) for d in results["trial_dir"]]
    results.to_csv(copy / "results.csv", index=False)
    return copy


def test_the_space_is_the_saved_one_or_given_never_guessed(
    analysis_experiments, tmp_path, monkeypatch
):
    exp = analysis_experiments.search
    assert load_experiment(exp).space_file == exp / "design_space.yaml"
    assert load_experiment(exp).study is not None  # where design_space.yaml records it

    # A folder without design_space.yaml, beside a file whose experiment section names it: the
    # file is not taken; the analyses run and say what they could not know.
    copy = _copy(exp, tmp_path)
    (copy / "design_space.yaml").unlink()
    raw = yaml.safe_load(analysis_experiments.search_space.read_text())
    raw["experiment"]["storage_path"] = "results"
    (tmp_path / "analysis.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    bare = load_experiment(copy)
    assert bare.space is None and bare.space_file is None and bare.rungs is None
    assert bare.study is None  # no analysis.optuna.db beside the copy
    assert importance.main([str(copy), "--out", str(tmp_path / "out")]) == 0
    assert "ranges guessed" in (tmp_path / "out/importance/importance.md").read_text()
    given = load_experiment(copy, tmp_path / "analysis.yaml")
    assert given.space_file == tmp_path / "analysis.yaml" and given.rungs == [1, 2]

    # The study copied beside the folder is found when the recorded location is not here.
    saved = yaml.safe_load((exp / "design_space.yaml").read_text())
    saved["experiment"]["study_storage"] = f"sqlite:///{tmp_path}/gone/analysis.optuna.db"
    (copy / "design_space.yaml").write_text(yaml.safe_dump(saved))
    shutil.copy(exp.parent / "analysis.optuna.db", copy.parent)
    moved = load_experiment(copy)
    assert moved.study is not None and len(moved.study.trials) == len(moved.results)
    assert not (tmp_path / "gone").exists()  # looking did not create it

    # A saved space that is not one is named, with the way out.
    for text, problem in (("a: [", "line 1 invalid YAML"), ("- 1\n", "expected a mapping")):
        (copy / "design_space.yaml").write_text(text)
        with pytest.raises(AnalysisError, match=re.escape(problem) + ".*--space"):
            load_experiment(copy)
    assert load_experiment(copy, tmp_path / "analysis.yaml").space is not None


def test_rungs_are_the_schedulers(analysis_experiments):
    exp = load_experiment(analysis_experiments.search)
    sched = exp.space.scheduler
    assert exp.rungs == asha_rungs(exp.max_t, sched.grace_period, sched.reduction_factor)
    assert exp.rungs == [1, 2]  # max_t 4: no rung at max_t, a trial there runs to its end


def test_a_report_cut_by_a_crash_is_left_out(analysis_experiments, tmp_path):
    copy = _copy(analysis_experiments.search, tmp_path)
    results = pd.read_csv(copy / "results.csv", dtype={"trial_id": str})
    trial = results[results["status"] == "completed"].iloc[0]
    before = load_experiment(copy).history(trial["trial_id"])
    reports = Path(trial["trial_dir"]) / "result.json"
    last = json.loads(reports.read_text().splitlines()[-1])
    with reports.open("a") as f:  # the retried attempt's report of the last evaluation, then a cut
        f.write(json.dumps({**last, "overall": 0.0}) + "\n" + '{"evaluation": 9, "over')
    after = load_experiment(copy).history(trial["trial_id"])
    assert list(after["evaluation"]) == list(before["evaluation"])  # no evaluation 9
    assert after["overall"].iloc[-1] == 0.0  # the later report of an evaluation wins
    pd.testing.assert_frame_equal(after.iloc[:-1], before.iloc[:-1])
    assert importance.main([str(copy), "--out", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (tables.main, lambda e, t: [str(t / "nowhere")], "no such folder"),
        (importance.main, lambda e, t: [_no_results(t)], "no results.csv"),
        (ensemble.main, lambda e, t: [str(e), "--top-k", "50"], "--top-k 50: analysis has only"),
        (
            ensemble.main,
            lambda e, t: [str(e), "--members", "nosuchtrial"],
            "no trial 'nosuchtrial'",
        ),
        (ensemble.main, lambda e, t: [str(e)], "exactly one of --top-k"),
        (retrain.main, lambda e, t: [str(e), "--top-k", "50"], "--top-k 50: analysis has only"),
        (
            importance.main,
            lambda e, t: [str(e), "--rung", "9"],
            "--rung 9: above the 4 evaluations",
        ),
        (report.main, lambda e, t: [str(e), "--data-dir", str(t / "nodata")], "--data-dir"),
        (tables.main, lambda e, t: [str(e), "--resamples", "5"], "--resamples 5: give at least"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    analysis_experiments, tmp_path, capsys, command, args, message
):
    rc = run_main(command, args(analysis_experiments.search, tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("task,id,prediction\nsst,a,1\n", "missing columns gold"),
        ("task,id,prediction,gold\nmnli,a,1,1\n", "unknown task 'mnli'"),
        ("", "unreadable (EmptyDataError)"),
    ],
)
def test_a_bad_dev_predictions_file_is_named(tmp_path, text, message):
    path = tmp_path / "dev_predictions.csv"
    path.write_text(text)
    with pytest.raises(AnalysisError, match=re.escape(f"{path}: {message}")):
        paired.read_dev_predictions(path)


def test_the_command_line_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.tables", str(tmp_path / "nowhere")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such folder"


def test_the_two_stage1_losses_are_rows_of_their_own():
    """Table 5's grid runs both losses: never averaged together, each compared with stage 1 off."""
    base = {"model": {"design": 2}, "train": {"routine": "round_robin"}}
    confs = [
        tables.configuration(base),
        tables.configuration({**base, "contrastive": {"enabled": True}}),
        tables.configuration({**base, "contrastive": {"enabled": True, "loss": "infonce"}}),
    ]
    assert [c["contrastive"] for c in confs] == [False, "margin", "infonce"]
    assert [tables.label(c) for c in confs] == [
        "design 2 + RR",
        "design 2 + RR + SimCSE",
        "design 2 + RR + SimCSE (InfoNCE)",
    ]
    assert tables.one_choice_pairs(confs) == [
        (0, 1, "contrastive"),
        (0, 2, "contrastive"),
        (1, 2, "contrastive"),
    ]
