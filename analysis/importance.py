"""Which parameters mattered: fANOVA importances, score against value, learning curves.

``python -m analysis.importance EXP [--rung R] [--out DIR] [--space FILE] [--seed 0]``

ASHA lets few trials finish, and those it lets finish are the good ones: importances computed
over finished trials alone would explain the differences among the winners only. So every trial
is scored at one *rung*, a number of evaluations that every trial reached (by default the largest
such ASHA rung, usually the grace period), with the best dev objective it had reached by then, as
ASHA itself compares trials. Trials that failed (error) or stopped before the rung are listed and
left out.

fANOVA (Hutter et al. 2014) runs through Optuna's ``FanovaImportanceEvaluator`` on an in-memory
study of those scores. Optuna computes importances over the parameters that *every* trial has;
a conditional parameter (one with a ``when:``, such as a learning-rate range per mode) is in some
trials only, so it is left out of the main ranking and listed with the reason. Where enough trials
have it, its importance within those trials is given separately.

Written into ``EXP/analysis/importance/``: ``importance.md`` / ``.json``, ``importance.png``,
``param_<name>.png`` (score at the rung against the value, each trial's final score too, and a
warning when the best values sit at the boundary of the searched range) and
``learning_curves.png`` (every trial's dev objective per evaluation, ASHA's rungs marked). Each
PNG has a CSV of the plotted points beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.importance import FanovaImportanceEvaluator, get_param_importances
from optuna.search_space import intersection_search_space

from analysis.common import (
    AnalysisError,
    ExperimentView,
    load_experiment,
    markdown_table,
    out_dir,
    run_main,
    save_figure,
)
from mtl.search.space import BoolParam, CategoricalParam, FloatParam, IntParam

BOUNDARY = 0.1  # outer fraction of a range (in the search's scale) that counts as its boundary
GUESSED = "the values seen (no study or design space found: ranges guessed, no boundary checks)"
MIN_SUBSET = 5  # trials needed to rank a conditional parameter within the trials that have it
STATUS_COLORS = {"completed": "tab:blue", "stopped": "tab:orange", "unfinished": "tab:gray"}


@dataclass
class RungScores:
    """Every usable trial's score at one rung."""

    rung: int
    frame: pd.DataFrame  # trial_id, status, score (best objective up to the rung), final
    params: dict[str, dict[str, Any]]  # trial_id -> parameter values
    distributions: dict[str, dict[str, BaseDistribution]]  # trial_id -> name -> range searched
    excluded: dict[str, str]  # trial_id -> why it is left out
    source: str  # where the ranges come from
    ranges_known: bool = True  # False: ranges guessed from the values seen (no boundary checks)


@dataclass
class Importance:
    values: dict[str, float]  # parameter -> share of the variance (sums to 1 unless all 0)
    left_out: dict[str, str]  # parameter -> why Optuna leaves it out
    within: dict[str, tuple[int, float]] = field(default_factory=dict)  # conditional: (n, share)
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Scores at a rung


def _space_distribution(param: Any) -> BaseDistribution:
    if isinstance(param, CategoricalParam):
        return CategoricalDistribution(param.choices)
    if isinstance(param, BoolParam):
        return CategoricalDistribution([False, True])
    if isinstance(param, IntParam):
        return IntDistribution(param.low, param.high, log=param.log, step=param.step)
    assert isinstance(param, FloatParam)
    return FloatDistribution(param.low, param.high, log=param.log, step=param.step)


def _as_choice(value: Any, choices: tuple[Any, ...]) -> Any:
    """The choice a results.csv value stands for (CSV turns 1 into 1.0, True into a numpy bool)."""
    value = value.item() if hasattr(value, "item") else value
    for choice in choices:
        if isinstance(choice, bool) == isinstance(value, bool) and choice == value:
            return choice
    for choice in choices:
        if str(choice) == str(value):
            return choice
    raise AnalysisError(f"value {value!r} is none of the choices {list(choices)}")


def _inferred(values: pd.Series) -> BaseDistribution:
    """A range guessed from the values seen (no study and no design space)."""
    seen = values.dropna()
    if pd.api.types.is_float_dtype(seen) and (seen != seen.round()).any():
        return FloatDistribution(float(seen.min()), float(seen.max()))
    return CategoricalDistribution(
        sorted({v.item() if hasattr(v, "item") else v for v in seen}, key=str)
    )


def trial_parameters(exp: ExperimentView) -> tuple[dict, dict, str]:
    """Parameter values and searched ranges per trial: from the Optuna study (exact), else the
    design space, else guessed from results.csv."""
    params: dict[str, dict[str, Any]] = {}
    dists: dict[str, dict[str, BaseDistribution]] = {}
    if exp.study is not None:
        by_number = {t.number: t for t in exp.study.get_trials(deepcopy=False)}
        for _, row in exp.results.iterrows():
            number = row.get("optuna_number")
            if pd.notna(number) and int(number) in by_number:
                trial = by_number[int(number)]
                params[row["trial_id"]] = dict(trial.params)
                dists[row["trial_id"]] = dict(trial.distributions)
        return params, dists, "the Optuna study"
    if exp.space is not None:
        space_dists = {n: _space_distribution(p) for n, p in exp.space.parameters.items()}
        source = "the design space"
    else:
        space_dists = {n: _inferred(exp.results[f"param.{n}"]) for n in exp.param_names}
        source = GUESSED
    for trial_id in exp.results["trial_id"]:
        values = {}
        for name, value in exp.params(trial_id).items():
            dist = space_dists.get(name)
            if isinstance(dist, CategoricalDistribution):
                value = _as_choice(value, dist.choices)
            values[name] = value
        params[trial_id] = values
        dists[trial_id] = {n: space_dists[n] for n in values if n in space_dists}
    return params, dists, source


def rung_scores(
    exp: ExperimentView, rung: int | None = None, metric: str | None = None
) -> RungScores:
    """Each trial's best ``metric`` up to ``rung`` evaluations (default: the largest rung that
    every trial that did not fail reached)."""
    metric = metric or exp.metric
    params, dists, source = trial_parameters(exp)
    excluded: dict[str, str] = {}
    reached: dict[str, int] = {}
    for _, row in exp.results.iterrows():
        trial_id = row["trial_id"]
        history = exp.history(trial_id)
        if row["status"] == "error":
            excluded[trial_id] = f"error: {row.get('reason', '')}".rstrip(": ")
        elif history.empty:
            excluded[trial_id] = f"{row['status']} before its first evaluation"
        elif trial_id not in params:
            excluded[trial_id] = "not in the Optuna study"
        else:
            reached[trial_id] = int(history["evaluation"].max())
    if not reached:
        raise AnalysisError(f"{exp.path}: no trial reached an evaluation")
    if rung is None:
        common = min(reached.values())
        rungs = [r for r in (exp.rungs or []) if r <= common]
        rung = max(rungs) if rungs else common
    if rung < 1:
        raise AnalysisError(f"--rung {rung}: must be at least 1")
    rows = []
    for trial_id, last in reached.items():
        if last < rung:
            excluded[trial_id] = f"stopped after {last} evaluations, before rung {rung}"
            continue
        history = exp.history(trial_id)
        score = history.loc[history["evaluation"] <= rung, metric].astype(float).max()
        row = exp.row(trial_id)
        final = float(row[f"best.{metric}"]) if row["status"] == "completed" else math.nan
        rows.append({"trial_id": trial_id, "status": row["status"], "score": score, "final": final})
    if len(rows) < 2:
        raise AnalysisError(
            f"{exp.path}: importance needs at least 2 trials that reached rung {rung}; "
            f"found {len(rows)} (try a smaller --rung)"
        )
    return RungScores(rung, pd.DataFrame(rows), params, dists, excluded, source, source != GUESSED)


# ---------------------------------------------------------------------------------------------
# fANOVA


def _study(scores: RungScores, trial_ids: list[str]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    by_id = scores.frame.set_index("trial_id")["score"]
    for trial_id in trial_ids:
        study.add_trial(
            optuna.trial.create_trial(
                params=scores.params[trial_id],
                distributions=scores.distributions[trial_id],
                value=float(by_id[trial_id]),
            )
        )
    return study


def _fanova(study: optuna.Study, seed: int) -> dict[str, float]:
    values = [t.value for t in study.trials]
    if len(set(values)) < 2:
        return dict.fromkeys(intersection_search_space(study.get_trials(deepcopy=False)), 0.0)
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    return {name: float(v) for name, v in found.items()}


def importance(scores: RungScores, exp: ExperimentView | None = None, seed: int = 0) -> Importance:
    """fANOVA over every trial at the rung, and the conditional parameters it leaves out."""
    ids = list(scores.frame["trial_id"])
    study = _study(scores, ids)
    common = intersection_search_space(study.get_trials(deepcopy=False))
    names = sorted({n for t in ids for n in scores.params[t]})
    left_out: dict[str, str] = {}
    within: dict[str, tuple[int, float]] = {}
    for name in names:
        if name in common:
            continue
        having = [t for t in ids if name in scores.params[t]]
        if len(having) == len(ids):
            left_out[name] = "its searched range differs between trials"
            continue
        why = f"set in {len(having)} of {len(ids)} trials"
        if exp is not None and exp.space is not None and name in exp.space.parameters:
            when = exp.space.parameters[name].when
            if when:
                cond = ", ".join(f"{k}: {_cond(v)}" for k, v in when.items())
                why += f" (sampled only when {cond})"
        left_out[name] = why + "; Optuna ranks only parameters every trial has"
        if len(having) >= MIN_SUBSET:
            sub = _fanova(_study(scores, having), seed)
            if name in sub:
                within[name] = (len(having), sub[name])
    values = _fanova(study, seed)
    note = ""
    if scores.frame["score"].nunique() < 2:
        note = f"every trial scored the same at rung {scores.rung}: no parameter explains anything"
    return Importance(values, left_out, within, note)


def _cond(value: Any) -> str:
    if hasattr(value, "values") and not isinstance(value, list | dict):
        return "not " + "/".join(map(str, value.values))
    return "/".join(map(str, value)) if isinstance(value, list) else str(value)


# ---------------------------------------------------------------------------------------------
# Boundaries


def boundary_warning(
    name: str, dist: BaseDistribution, values: list[Any], scores: list[float]
) -> str | None:
    """A warning when the best trials' values all sit in the same outer ``BOUNDARY`` of the range.

    "Best" is the top fifth of the trials (at least one) by score. Numeric ranges are compared
    in the search's scale (log for log ranges); categorical choices count when they are three or
    more numbers (the smallest and largest choice are the boundary).
    """
    if not values:
        return None
    k = max(1, math.ceil(len(values) / 5))
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]
    top = [values[i] for i in order]
    if isinstance(dist, FloatDistribution | IntDistribution):
        low, high = float(dist.low), float(dist.high)
        if high <= low:
            return None
        scale = math.log if dist.log else float
        pos = [(scale(float(v)) - scale(low)) / (scale(high) - scale(low)) for v in top]
        side = "upper" if min(pos) >= 1 - BOUNDARY else "lower" if max(pos) <= BOUNDARY else None
        shown = f"[{low:g}, {high:g}]" + (" (log scale)" if dist.log else "")
    elif isinstance(dist, CategoricalDistribution):
        numeric = [
            c for c in dist.choices if isinstance(c, int | float) and not isinstance(c, bool)
        ]
        if len(numeric) < 3 or len(numeric) != len(dist.choices):
            return None
        side = "upper" if all(v == max(numeric) for v in top) else None
        side = side or ("lower" if all(v == min(numeric) for v in top) else None)
        shown = "{" + ", ".join(f"{c:g}" for c in sorted(numeric)) + "}"
    else:
        return None
    if side is None:
        return None
    best = ", ".join(f"{v:g}" for v in top)
    return (
        f"{name}: the best {k} trial(s) ({best}) sit at the {side} boundary of the searched "
        f"range {shown}; the optimum may lie outside it: widen the range"
    )


# ---------------------------------------------------------------------------------------------
# Plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def plot_importance(imp: Importance, folder: Path) -> Path:
    rows = [{"parameter": n, "importance": v, "scope": "all trials"} for n, v in imp.values.items()]
    rows += [
        {"parameter": n, "importance": share, "scope": f"within the {k} trials that have it"}
        for n, (k, share) in imp.within.items()
    ]
    data = pd.DataFrame(rows, columns=["parameter", "importance", "scope"])
    fig, ax = plt.subplots(figsize=(6, 0.4 * max(3, len(data)) + 1))
    labels = [
        p if s == "all trials" else f"{p} (within)"
        for p, s in zip(data["parameter"], data["scope"], strict=True)
    ]
    colors = ["tab:blue" if s == "all trials" else "tab:gray" for s in data["scope"]]
    ax.barh(labels[::-1], data["importance"][::-1], color=colors[::-1])
    ax.set_xlabel("fANOVA importance (share of variance)")
    ax.set_title("Parameter importance")
    return save_figure(fig, data, folder / "importance.png")


def plot_parameter(
    name: str, scores: RungScores, metric: str, folder: Path
) -> tuple[Path, str | None]:
    """Score at the rung (and final score) against the value of one parameter."""
    ids = [t for t in scores.frame["trial_id"] if name in scores.params[t]]
    frame = scores.frame.set_index("trial_id").loc[ids].reset_index()
    frame.insert(2, "value", [scores.params[t][name] for t in ids])
    data = frame.rename(columns={"score": "score_at_rung", "final": "final_score"})
    dist = scores.distributions[ids[0]][name]
    warning = None
    if scores.ranges_known:
        warning = boundary_warning(name, dist, list(data["value"]), list(data["score_at_rung"]))

    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = isinstance(dist, FloatDistribution | IntDistribution)
    if numeric:
        x = data["value"].astype(float)
        if dist.log:
            ax.set_xscale("log")
        ax.axvline(dist.low, color="k", lw=0.8, ls=":")
        ax.axvline(dist.high, color="k", lw=0.8, ls=":")
    else:
        choices = list(dist.choices)
        x = pd.Series([choices.index(v) for v in data["value"]], dtype=float)
        ax.set_xticks(range(len(choices)), [str(c) for c in choices])
    for status, color in STATUS_COLORS.items():
        sel = (data["status"] == status).to_numpy()
        if sel.any():
            ax.scatter(
                x[sel],
                data["score_at_rung"][sel],
                c=color,
                label=f"{status}: at rung {scores.rung}",
            )
    done = data["final_score"].notna().to_numpy()
    if done.any():
        ax.scatter(
            x[done],
            data["final_score"][done],
            facecolors="none",
            edgecolors="k",
            label="final (completed)",
        )
    ax.set_xlabel(name)
    ax.set_ylabel(f"dev {metric}")
    ax.legend(fontsize=7)
    title = f"{name}: {len(data)} trials"
    if warning:
        title += "\nWARNING: best values at the boundary of the range"
    ax.set_title(title, color="red" if warning else "black", fontsize=9)
    return save_figure(fig, data, folder / f"param_{_safe(name)}.png"), warning


def plot_learning_curves(exp: ExperimentView, metric: str, folder: Path) -> Path:
    """Every trial's dev ``metric`` per evaluation, ASHA's rungs as vertical lines."""
    rows = []
    for _, row in exp.results.iterrows():
        history = exp.history(row["trial_id"])
        for _, h in history.iterrows():
            rows.append(
                {
                    "trial_id": row["trial_id"],
                    "status": row["status"],
                    "evaluation": int(h["evaluation"]),
                    "epoch": float(h["epoch"]),
                    metric: float(h[metric]),
                }
            )
    data = pd.DataFrame(rows, columns=["trial_id", "status", "evaluation", "epoch", metric])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {**STATUS_COLORS, "error": "tab:red"}
    seen: set[str] = set()
    for _, curve in data.groupby("trial_id", sort=False):
        status = curve["status"].iloc[0]
        ax.plot(
            curve["evaluation"],
            curve[metric],
            marker="o",
            ms=3,
            lw=1,
            color=colors.get(status, "k"),
            label=status if status not in seen else None,
        )
        seen.add(status)
    rungs = exp.rungs
    if rungs:
        for r in rungs:
            ax.axvline(r, color="k", ls="--", lw=0.8)
        ax.text(rungs[0], ax.get_ylim()[1], " ASHA rungs", va="top", fontsize=7)
    else:
        stops = sorted(
            set(exp.results.loc[exp.results["reason"] == "ASHA", "evaluations"].astype(int))
        )
        for r in stops:
            ax.axvline(r, color="k", ls=":", lw=0.8)
        if stops:
            ax.text(stops[0], ax.get_ylim()[1], " ASHA stops seen", va="top", fontsize=7)
    ax.set_xlabel("evaluation (ASHA's time unit)")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(f"Learning curves of {exp.results.shape[0]} trials")
    ax.legend(fontsize=7)
    return save_figure(fig, data, folder / "learning_curves.png")


# ---------------------------------------------------------------------------------------------
# Writing


def run(
    exp: ExperimentView, out: str | None = None, rung: int | None = None, seed: int = 0
) -> tuple[list[Path], list[str]]:
    """Write every importance output of ``exp``; returns the files and the boundary warnings."""
    folder = out_dir(exp, out, "importance")
    metric = exp.metric
    scores = rung_scores(exp, rung, metric)
    imp = importance(scores, exp, seed)
    written = [plot_importance(imp, folder)]
    warnings = []
    names = sorted({n for t in scores.frame["trial_id"] for n in scores.params[t]})
    plots = []
    for name in names:
        png, warning = plot_parameter(name, scores, metric, folder)
        plots.append(png)
        if warning:
            warnings.append(warning)
    written += plots
    written.append(plot_learning_curves(exp, metric, folder))

    summary = {
        "metric": metric,
        "rung": scores.rung,
        "trials": list(scores.frame["trial_id"]),
        "ranges_from": scores.source,
        "importance": imp.values,
        "left_out": imp.left_out,
        "within": {n: {"trials": k, "importance": v} for n, (k, v) in imp.within.items()},
        "excluded_trials": scores.excluded,
        "boundary_warnings": warnings,
        "note": imp.note,
    }
    (folder / "importance.json").write_text(json.dumps(summary, indent=2))
    md = folder / "importance.md"
    md.write_text(_markdown(exp, scores, imp, warnings, [p.name for p in plots]))
    return [md, folder / "importance.json", *written], warnings


def _markdown(
    exp, scores: RungScores, imp: Importance, warnings: list[str], plots: list[str]
) -> str:
    n = len(scores.frame)
    lines = [
        "### Parameter importance",
        "",
        f"fANOVA (Optuna's FanovaImportanceEvaluator) over {n} trials, each scored by its best dev "
        f"{exp.metric} up to evaluation {scores.rung} (a rung every one of them reached, so trials "
        f"ASHA stopped count as much as those it let finish). Parameter ranges from {scores.source}.",
        "",
    ]
    if imp.note:
        lines += [f"Note: {imp.note}.", ""]
    table = pd.DataFrame(
        [{"Parameter": k, "Importance": f"{v:.3f}"} for k, v in imp.values.items()]
        + [
            {"Parameter": f"{k} (within the {t} trials that have it)", "Importance": f"{v:.3f}"}
            for k, (t, v) in imp.within.items()
        ],
        columns=["Parameter", "Importance"],
    )
    lines += [markdown_table(table), "![importance](importance.png)", ""]
    if imp.left_out:
        lines += ["Left out of the ranking:", ""]
        lines += [f"- `{k}`: {v}" for k, v in imp.left_out.items()] + [""]
    if scores.excluded:
        lines += ["Trials left out:", ""]
        lines += [f"- {k}: {v}" for k, v in scores.excluded.items()] + [""]
    lines += ["Boundary warnings:", ""]
    lines += [f"- WARNING {w}" for w in warnings] if warnings else ["- none"]
    lines += ["", "Score against value (dotted lines: the searched range):", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "![learning curves](learning_curves.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.importance",
        description="fANOVA parameter importance, score-against-value plots and learning curves.",
    )
    parser.add_argument("exp", help="experiment folder written by python -m mtl.search")
    parser.add_argument(
        "--rung",
        type=int,
        help="score trials at this many evaluations (default: "
        "the largest rung every trial reached)",
    )
    parser.add_argument("--out", help="output folder (default EXP/analysis)")
    parser.add_argument(
        "--space",
        help="the design-space file (default: EXP/design_space.yaml, saved by the search)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of fANOVA's random forest")
    args = parser.parse_args(argv)
    exp = load_experiment(args.exp, args.space)
    if args.rung is not None and args.rung > exp.max_t:
        raise AnalysisError(
            f"--rung {args.rung}: above the {exp.max_t} evaluations of a full trial"
        )
    written, warnings = run(exp, args.out, args.rung, args.seed)
    print(written[0].read_text())
    for w in warnings:
        print(f"WARNING {w}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
