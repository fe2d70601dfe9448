"""The paper's ablation tables (Tables 1 to 5) from an experiment's trials.

``python -m analysis.tables EXP [--out DIR] [--space FILE] [--metric overall]``

A *configuration* is what the paper's rows vary: head design, pretrain/finetune, sequential or
round-robin, SMART, PAL and the contrastive stage (SimCSE), read from each trial's own trainer
config. Other hyperparameters (learning rate, dropout, seed...) vary inside a configuration, so a
row stands for every trial of its configuration:

* its cells are the dev metrics of the row's best trial (by the objective, at that trial's best
  evaluation: ``best.*`` of results.csv), chosen among completed trials first. A trial stopped
  early (ASHA, time budget) or left unfinished only stands for its row when no trial of the
  configuration completed, and then its cells are marked (``†`` / ``‡``) as partial-budget scores;
* where the best trial's configuration was run again with other seeds (``search.repeats``, or a
  ``seed`` parameter of a grid), the mean ± standard deviation over those runs follows in
  parentheses, and the Seeds column counts them;
* the Trials column counts every trial behind the row, naming those stopped or failed.

Written into ``EXP/analysis/tables/``: ``table_1`` ... ``table_5`` (the paper's rows, for each
paper table the experiment touches, with the paper's numbers beside ours in the Markdown) and
``configurations`` (every configuration present), each as ``.md``, ``.tex`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis import paired
from analysis.common import (
    COLUMN_NAMES,
    METRICS,
    AnalysisError,
    ExperimentView,
    fmt,
    latex_table,
    load_experiment,
    markdown_table,
    out_dir,
    run_main,
)
from mtl.config import ConfigError, build_config

KEYS = ("design", "mode", "routine", "smart", "pal", "contrastive", "backbone")
STOPPED_MARK = {"stopped": "†", "unfinished": "‡"}


def configuration(cfg: dict[str, Any]) -> dict[str, Any]:
    """The paper's configuration keys of one trainer config (a dict, possibly partial)."""
    full = build_config(cfg).to_dict()
    return {
        "design": int(full["model"]["design"]),
        "mode": full["train"]["mode"],
        "routine": full["train"]["routine"],
        "smart": bool(full["smart"]["enabled"]),
        "pal": full["pal"]["variant"],
        # False, or the stage-1 loss: margin (the paper's) or infonce.
        "contrastive": full["contrastive"]["loss"] if full["contrastive"]["enabled"] else False,
        "backbone": Path(str(full["model"]["backbone"])).name,
    }


def label(conf: dict[str, Any], backbone: bool = False) -> str:
    """A configuration as the paper writes it: ``design 2 + RR + PAL``."""
    parts = [f"design {conf['design']}"]
    if conf["routine"] == "round_robin":
        parts.append("RR")
    if conf["pal"] == "paper":
        parts.append("PAL")
    elif conf["pal"] == "standard":
        parts.append("PAL (standard)")
    if conf["contrastive"] == "infonce":
        parts.append("SimCSE (InfoNCE)")
    elif conf["contrastive"]:
        parts.append("SimCSE")
    if conf["smart"]:
        parts.append("SMART")
    text = " + ".join(parts)
    if conf["mode"] == "pretrain":
        text += " (pretrain)"
    if backbone:
        text += f" [{conf['backbone']}]"
    return text


# ---------------------------------------------------------------------------------------------
# The paper's tables


@dataclass(frozen=True)
class PaperRow:
    label: str
    match: dict[str, Any]  # configuration keys this row fixes (on top of the table's)
    paper: tuple[float, ...]  # SST, paraphrase, STS, overall as published (METRICS order)


@dataclass(frozen=True)
class PaperTable:
    key: str
    title: str
    where: dict[str, Any]  # configuration keys every row of the table shares
    needs: dict[str, Any]  # written only when some trial has these values
    rows: tuple[PaperRow, ...]


# The paper's published numbers: data, not code.
PAPER_FILE = Path(__file__).with_name("paper_results.yaml")


def _paper_numbers(row: dict[str, Any]) -> tuple[float, ...]:
    return tuple(float(row[m]) for m in METRICS)


def load_paper(path: Path = PAPER_FILE) -> tuple[tuple[PaperTable, ...], dict[str, tuple]]:
    """The paper's Tables 1 to 5 and its ensemble's Table 6 (split -> numbers) from ``path``."""
    raw = yaml.safe_load(path.read_text())
    tables = tuple(
        PaperTable(
            key=t["key"],
            title=t["title"],
            where=t["where"],
            needs=t["needs"],
            rows=tuple(PaperRow(r["label"], r["match"], _paper_numbers(r)) for r in t["rows"]),
        )
        for t in raw["tables"]
    )
    return tables, {split: _paper_numbers(row) for split, row in raw["ensemble"].items()}


PAPER_TABLES, PAPER_TABLE_6 = load_paper()


# ---------------------------------------------------------------------------------------------
# Trials -> rows


def trials_frame(exp: ExperimentView) -> pd.DataFrame:
    """results.csv with each trial's configuration keys and label (trials whose config cannot be
    read are left out, with a warning)."""
    rows, unknown = [], []
    for _, row in exp.results.iterrows():
        cfg = exp.trial_config(row["trial_id"])
        try:
            conf = configuration(cfg) if cfg is not None else None
        except ConfigError:
            conf = None
        if conf is None:
            unknown.append(row["trial_id"])
            continue
        rows.append({**row.to_dict(), **conf})
    if unknown:
        print(
            f"warning: no trainer config for trials {', '.join(unknown)}; left out", file=sys.stderr
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise AnalysisError(f"{exp.path}: no trial with a readable config.yaml")
    several = frame["backbone"].nunique() > 1
    frame["configuration"] = [label(r, backbone=several) for r in frame.to_dict("records")]
    return frame


def seed_runs(exp: ExperimentView, trial_id: str) -> pd.DataFrame | None:
    """Completed runs of ``trial_id``'s parameters with other seeds (itself included), or None."""
    if exp.repeats is not None and (exp.repeats["trial_id"] == trial_id).any():
        config = exp.repeats.loc[exp.repeats["trial_id"] == trial_id, "config"].iloc[0]
        runs = exp.repeats[
            (exp.repeats["config"] == config) & (exp.repeats["status"] == "completed")
        ]
        return runs[["trial_id", "seed", *exp.metrics]]
    seeds = [n for n in exp.param_names if _path(exp, n) == "seed"]
    if not seeds:
        return None
    others = {k: v for k, v in exp.params(trial_id).items() if k not in seeds}
    same = [
        t
        for t in exp.results.loc[exp.results["status"] == "completed", "trial_id"]
        if {k: v for k, v in exp.params(t).items() if k not in seeds} == others
    ]
    if len(same) < 2:
        return None
    runs = exp.results[exp.results["trial_id"].isin(same)]
    return pd.DataFrame(
        {"trial_id": runs["trial_id"], "seed": runs[f"param.{seeds[0]}"]}
        | {m: runs[f"best.{m}"] for m in exp.metrics}
    )


def _path(exp: ExperimentView, name: str) -> str:
    if exp.space is not None and name in exp.space.parameters:
        return exp.space.path_of(name)
    return name


def summarize(
    trials: pd.DataFrame,
    groups: list[tuple[str, pd.Series]],
    metric: str,
    exp: ExperimentView | None = None,
) -> pd.DataFrame:
    """One row per ``(label, mask over trials)``: counts, the best trial and its metrics, and the
    mean and standard deviation over its seed runs (with ``exp``)."""
    metrics = exp.metrics if exp is not None else METRICS
    out = []
    for name, mask in groups:
        group = trials[mask]
        counts = group["status"].value_counts()
        row: dict[str, Any] = {
            "configuration": name,
            "trials": len(group),
            **{s: int(counts.get(s, 0)) for s in ("completed", "stopped", "error", "unfinished")},
        }
        best = _best(group, metric)
        row["stopped_trials"] = " ".join(group.loc[group["status"] == "stopped", "trial_id"])
        row.update(
            best_trial=best["trial_id"] if best is not None else "",
            best_status=best["status"] if best is not None else "",
            best_evaluations=int(best["evaluations"]) if best is not None else 0,
        )
        for m in metrics:
            row[m] = float(best[f"best.{m}"]) if best is not None else math.nan
        runs = seed_runs(exp, best["trial_id"]) if exp is not None and best is not None else None
        row["seeds"] = len(runs) if runs is not None else 0
        for m in metrics:
            ok = runs is not None and len(runs) > 1
            row[f"{m}_mean"] = float(runs[m].mean()) if ok else math.nan
            row[f"{m}_std"] = float(runs[m].std()) if ok else math.nan
        out.append(row)
    return pd.DataFrame(out)


def _best(group: pd.DataFrame, metric: str) -> pd.Series | None:
    scored = group[group[f"best.{metric}"].notna()]
    for statuses in (("completed",), ("stopped", "unfinished")):
        pool = scored[scored["status"].isin(statuses)]
        if len(pool):
            return pool.loc[pool[f"best.{metric}"].astype(float).idxmax()]
    return None


def display(
    summary: pd.DataFrame, max_t: int, columns: dict[str, str] = COLUMN_NAMES
) -> tuple[pd.DataFrame, list[str]]:
    """The table as the paper prints it (strings), and its footnotes; ``columns``: metric ->
    column name (:attr:`ExperimentView.column_names`)."""
    marks: set[str] = set()
    rows = []
    for r in summary.to_dict("records"):
        mark = STOPPED_MARK.get(r["best_status"], "")
        if mark:
            marks.add(r["best_status"])
        cells = {"Configuration": r["configuration"]}
        for m, column in columns.items():
            text = fmt(r[m]) + (mark if not math.isnan(r[m]) else "")
            if r["seeds"] > 1:
                text += f" ({fmt(r[m + '_mean'])} ± {fmt(r[m + '_std'])})"
            cells[column] = text
        others = [f"{r[s]} {s}" for s in ("stopped", "error", "unfinished") if r[s]]
        cells["Trials"] = f"{r['trials']}" + (f" ({', '.join(others)})" if others else "")
        cells["Seeds"] = str(r["seeds"]) if r["seeds"] > 1 else "—"
        rows.append(cells)
    notes = [
        "Cells: the dev metrics of the configuration's best trial (completed trials first), at "
        "its best evaluation; in parentheses, where the configuration was run with other seeds, "
        "the mean ± standard deviation over those runs (Seeds). Trials: every trial behind the "
        "row."
    ]
    for status in sorted(marks):
        best = summary[summary["best_status"] == status]
        evals = ", ".join(
            f"{t}: {e} of {max_t}"
            for t, e in zip(best["best_trial"], best["best_evaluations"], strict=True)
        )
        what = "stopped early" if status == "stopped" else "unfinished (the search was interrupted)"
        notes.append(
            f"{STOPPED_MARK[status]} No trial of this configuration completed; the best was "
            f"{what} after fewer evaluations than a full trial ({evals}): a partial-budget "
            "score, not the configuration's final score."
        )
    return pd.DataFrame(rows), notes


# ---------------------------------------------------------------------------------------------
# Paired comparisons (analysis.paired): rows that differ in one choice, the best trial vs the next

# For each configuration key, its values from base to variant: a comparison is "variant - base".
ORDER: dict[str, list[Any]] = {
    "design": [1, 2],
    "mode": ["pretrain", "finetune"],
    "routine": ["sequential", "round_robin"],
    "smart": [False, True],
    "pal": ["none", "paper", "standard"],
    "contrastive": [False, "margin", "infonce"],
}
SIGNIFICANT_MARK = "*"


Run = tuple[int, int]  # (seed, k): the k-th completed run under that seed (k = 0 mostly)


def row_runs(exp: ExperimentView, trial_id: str) -> dict[Run, str]:
    """(seed, k) -> trial id: the completed seed runs of ``trial_id``'s parameters (itself
    included), or the trial alone under its config's seed. A seed that ran twice (a grid
    repeated by ``num_samples``) keeps both runs, as (seed, 0) and (seed, 1)."""
    runs = seed_runs(exp, trial_id)
    if runs is not None and len(runs) > 1:
        seeds = runs["seed"].astype(int).reset_index(drop=True)
        k = seeds.groupby(seeds).cumcount()
        return {
            (int(s), int(i)): str(t) for s, i, t in zip(seeds, k, runs["trial_id"], strict=True)
        }
    cfg = exp.trial_config(trial_id) or {}
    return {(int(cfg.get("seed", 0)), 0): trial_id}


def seed_pairs(a: dict[Run, str], b: dict[Run, str]) -> list[tuple[Run, str, str]]:
    """(run, A's trial, B's trial) for the runs both sides have (the same seed, the same
    repetition); without one in common, the runs paired in seed order (as many as the side
    with fewer)."""
    common = sorted(set(a) & set(b))
    if common:
        return [(s, a[s], b[s]) for s in common]
    return [(sa, a[sa], b[sb]) for sa, sb in zip(sorted(a), sorted(b), strict=False)]


def compare_runs(
    exp: ExperimentView,
    base: dict[Run, str],
    variant: dict[Run, str],
    source: str,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """The CSV fields of one comparison ``variant - base`` (or why it could not be made);
    ``unpaired``: the runs of either side without a partner (a seed only one side ran),
    left out of the comparison."""
    pairs = seed_pairs(base, variant)
    paired_ids = {t for _, ta, tb in pairs for t in (ta, tb)}
    record: dict[str, Any] = {
        "seeds": len(pairs),
        "base_trials": " ".join(t for _, t, _ in pairs),
        "variant_trials": " ".join(t for _, _, t in pairs),
        "unpaired": " ".join(
            t for side in (base, variant) for _, t in sorted(side.items()) if t not in paired_ids
        ),
        "note": "",
    }
    frames, missing = [], []
    for _, ta, tb in pairs:
        files = [paired.prediction_file(exp, t) for t in (ta, tb)]
        missing += [t for t, f in zip((ta, tb), files, strict=True) if f is None]
        if None not in files:
            frames.append(tuple(paired.read_dev_predictions(f, exp.tasks) for f in files))
    if missing:
        record["note"] = (
            f"no {paired.DEV_PREDICTIONS_FILE} for {', '.join(sorted(set(missing)))} "
            "(trained before runs kept their dev predictions)"
        )
        return record
    try:
        results, examples = paired.compare(
            frames, source, resamples=resamples, seed=seed, tasks=exp.tasks
        )
    except paired.NotComparable as err:
        record["note"] = str(err)
        return record
    record["examples"] = " ".join(f"{t}:{n}" for t, n in examples.items())
    for c in results:
        record.update(
            {
                f"{c.metric}_diff": c.difference,
                f"{c.metric}_low": c.low,
                f"{c.metric}_high": c.high,
                f"{c.metric}_p": c.p_value,
                f"{c.metric}_significant": c.significant,
            }
        )
    return record


def one_choice_pairs(keys: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """(base row, variant row, changed key) for every two rows that differ in exactly one
    configuration key, the base being the value earlier in :data:`ORDER`."""
    out = []
    for i, j in itertools.combinations(range(len(keys)), 2):
        changed = [k for k in KEYS if keys[i].get(k) != keys[j].get(k)]
        if len(changed) != 1 or changed[0] not in ORDER:
            continue
        key = changed[0]
        order = ORDER[key]
        if order.index(keys[i][key]) > order.index(keys[j][key]):
            i, j = j, i
        out.append((i, j, key))
    return out


def comparisons(
    exp: ExperimentView,
    summary: pd.DataFrame,
    keys: list[dict[str, Any]],
    resamples: int,
    seed: int,
    paper: tuple[tuple[float, ...], ...] | None = None,
) -> pd.DataFrame:
    """One row per pair of table rows that differ in one choice: ``variant - base`` per metric
    with its paired-bootstrap interval and permutation p-value (and the paper's difference, from
    its single runs, where the table is the paper's)."""
    out = []
    for i, j, key in one_choice_pairs(keys):
        a, b = summary.iloc[i], summary.iloc[j]
        if not a["best_trial"] or not b["best_trial"]:
            continue
        name = f"{b['configuration']} − {a['configuration']}"
        record = {"comparison": name, "base": a["configuration"], "variant": b["configuration"]}
        record["changed"] = key
        record.update(
            compare_runs(
                exp,
                row_runs(exp, a["best_trial"]),
                row_runs(exp, b["best_trial"]),
                f"{exp.name}: {name}",
                resamples,
                seed,
            )
        )
        if paper is not None:
            for n, m in enumerate(METRICS):
                record[f"paper_{m}_diff"] = paper[j][n] - paper[i][n]
        out.append(record)
    return pd.DataFrame(out)


def top_trial_comparisons(
    exp: ExperimentView, metric: str, resamples: int, seed: int, k: int = 5
) -> pd.DataFrame:
    """The best trial (by ``metric``; completed first, as the tables choose) against each of the
    next ``k - 1``: ``best - other`` on the dev examples, one trial (one seed) per side."""
    scored = exp.results[exp.results[f"best.{metric}"].notna() & (exp.results["status"] != "error")]
    done = scored["status"] == "completed"
    ranked = pd.concat(
        [
            scored[done].sort_values(f"best.{metric}", ascending=False),
            scored[~done].sort_values(f"best.{metric}", ascending=False),
        ]
    ).head(k)
    if len(ranked) < 2:
        return pd.DataFrame()
    best = str(ranked["trial_id"].iloc[0])
    out = []
    for other in ranked["trial_id"].iloc[1:]:
        record = {"comparison": f"{best} − {other}", "base": other, "variant": best}
        seed_a = int((exp.trial_config(other) or {}).get("seed", 0))
        seed_b = int((exp.trial_config(best) or {}).get("seed", 0))
        record.update(
            compare_runs(
                exp,
                {(seed_a, 0): other},
                {(seed_b, 0): best},
                f"{exp.name}: {best} vs {other}",
                resamples,
                seed,
            )
        )
        out.append(record)
    return pd.DataFrame(out)


def display_comparisons(
    frame: pd.DataFrame, paper: bool, columns: dict[str, str] = COLUMN_NAMES
) -> tuple[pd.DataFrame, list[str]]:
    """The comparisons as printed (strings), and their footnotes."""
    rows = []
    for r in frame.to_dict("records"):
        cells = {"Comparison": r["comparison"], "Seeds": str(r["seeds"])}
        for m, column in columns.items():
            cells[column] = paired.cell(r, m) if not r.get("note") else "—"
        if paper:
            cells["Paper, overall (single runs)"] = paired.fmt_diff(r["paper_overall_diff"])
        rows.append(cells)
    notes = [
        "Each cell: the difference (left row minus right row) on the dev examples, averaged over "
        "the seed pairs (Seeds: runs of both rows under the same seed, a seed's k-th run with "
        "the other row's k-th, or in seed order where the rows share no seed); in brackets its 95% "
        "confidence interval from a paired bootstrap over dev examples (percentile method, both "
        "rows scored on the same resampled examples, STS Pearson recomputed on each resample); "
        "p: two-sided paired permutation test. "
        f"{SIGNIFICANT_MARK} The interval excludes 0: a difference on these dev examples, "
        "not a claim about new data (no correction for the number of comparisons)."
    ]
    if paper:
        notes.append(
            "Paper: the same difference between the paper's published rows, one run each "
            "(no interval can be computed)."
        )
    for r in frame.to_dict("records"):
        if r.get("note"):
            notes.append(f"{r['comparison']}: not compared: {r['note']}.")
        if isinstance(r.get("unpaired"), str) and r["unpaired"]:
            notes.append(
                f"{r['comparison']}: runs without a partner on the other side (a seed only "
                f"one side ran), left out: {r['unpaired']}."
            )
    return pd.DataFrame(rows), notes


def write_comparisons(
    folder: Path,
    key: str,
    title: str,
    frame: pd.DataFrame,
    paper: bool = False,
    columns: dict[str, str] = COLUMN_NAMES,
) -> tuple[list[Path], str]:
    """``key``_comparisons.csv/.tex and ``key``_forest.png/.csv; returns the files and the
    Markdown section (for ``key``.md)."""
    if frame.empty:
        return [], ""
    shown, notes = display_comparisons(frame, paper, columns)
    md = f"\n#### Paired comparisons: {title}\n\n{markdown_table(shown)}\n"
    md += "\n".join(f"{n}\n" for n in notes)
    paths = [folder / f"{key}_comparisons.csv", folder / f"{key}_comparisons.tex"]
    frame.to_csv(paths[0], index=False)
    caption = f"Paired comparisons: {title}. " + " ".join(notes)
    paths[1].write_text(latex_table(shown, caption, f"tab:{key}-comparisons"))
    if "overall_diff" in frame and frame["overall_diff"].notna().any():
        png = folder / f"{key}_forest.png"
        paths += [
            paired.forest_plot(frame, f"{title}: differences with 95% intervals", png, columns),
            png.with_suffix(".csv"),
        ]
        md += f"\n![{key} forest plot]({png.name})\n"
    return paths, md


# ---------------------------------------------------------------------------------------------
# Writing


def _mask(trials: pd.DataFrame, keys: dict[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=trials.index)
    for key, value in keys.items():
        mask &= trials[key] == value
    return mask


def paper_tables(trials: pd.DataFrame, metric: str, exp: ExperimentView | None = None):
    """(table, summary) for each paper table whose distinguishing setting some trial has."""
    out = []
    for table in PAPER_TABLES:
        if not _mask(trials, table.needs).any():
            continue
        groups = [(r.label, _mask(trials, {**table.where, **r.match})) for r in table.rows]
        summary = summarize(trials, groups, metric, exp)
        if summary["trials"].sum() == 0:
            continue
        for i, m in enumerate(METRICS):
            summary[f"paper_{m}"] = [r.paper[i] for r in table.rows]
        out.append((table, summary))
    return out


def configurations_summary(trials: pd.DataFrame, metric: str, exp: ExperimentView | None = None):
    """Every configuration present, best first."""
    labels = list(dict.fromkeys(trials["configuration"]))
    summary = summarize(
        trials, [(lab, trials["configuration"] == lab) for lab in labels], metric, exp
    )
    keys = trials.drop_duplicates("configuration").set_index("configuration")[list(KEYS)]
    summary = summary.join(keys, on="configuration")
    return summary.sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)


def write_table(
    folder: Path,
    key: str,
    title: str,
    summary: pd.DataFrame,
    max_t: int,
    extra_md: str = "",
    columns: dict[str, str] = COLUMN_NAMES,
) -> list[Path]:
    """``key``.md, .tex and .csv of one table."""
    shown, notes = display(summary, max_t, columns)
    md = f"### {title}\n\n{markdown_table(shown)}\n" + "\n".join(f"{n}\n" for n in notes)
    paths = [folder / f"{key}.md", folder / f"{key}.tex", folder / f"{key}.csv"]
    paths[0].write_text(md + extra_md)
    paths[1].write_text(latex_table(shown, title + ". " + " ".join(notes), f"tab:{key}"))
    summary.to_csv(paths[2], index=False)
    return paths


def paper_block(table: PaperTable) -> str:
    frame = pd.DataFrame(
        [
            {
                "Configuration": r.label,
                **{COLUMN_NAMES[m]: f"{v:.3f}" for m, v in zip(METRICS, r.paper, strict=True)},
            }
            for r in table.rows
        ]
    )
    return (
        "\nThe paper (bert-base-uncased, full training data, 10 epochs, one run per row):\n\n"
        + markdown_table(frame)
    )


def run(
    exp: ExperimentView,
    out: str | None = None,
    metric: str | None = None,
    resamples: int = paired.DEFAULT_RESAMPLES,
    seed: int = 0,
) -> list[Path]:
    """Write every table of ``exp``, each with its paired comparisons, and the best trial
    against the next ones; returns the files written (each table's .md first)."""
    metric = metric or exp.metric
    folder = out_dir(exp, out, "tables")
    trials = trials_frame(exp)
    written = []
    for table, summary in paper_tables(trials, metric, exp):
        keys = [{**table.where, **r.match} for r in table.rows]
        frame = comparisons(exp, summary, keys, resamples, seed, tuple(r.paper for r in table.rows))
        files, md = write_comparisons(
            folder, table.key, table.title, frame, paper=True, columns=exp.column_names
        )
        written += write_table(
            folder,
            table.key,
            table.title,
            summary,
            exp.max_t,
            paper_block(table) + md,
            exp.column_names,
        )
        written += files
    summary = configurations_summary(trials, metric, exp)
    keys = summary[list(KEYS)].to_dict("records")
    frame = comparisons(exp, summary, keys, resamples, seed)
    title = f"Every configuration of {exp.name} (best by dev {metric})"
    files, md = write_comparisons(folder, "configurations", title, frame, columns=exp.column_names)
    written += (
        write_table(folder, "configurations", title, summary, exp.max_t, md, exp.column_names)
        + files
    )
    written += write_top_trials(exp, folder, metric, resamples, seed)
    return written


def write_top_trials(
    exp: ExperimentView, folder: Path, metric: str, resamples: int, seed: int
) -> list[Path]:
    """``top_trials``.md (with its comparisons), .csv, .tex and forest plot: is the best trial
    better than each of the next ones, or a tie on these dev examples?"""
    frame = top_trial_comparisons(exp, metric, resamples, seed)
    if frame.empty:
        return []
    title = f"The best trial of {exp.name} against the next ones (dev {metric})"
    files, md = write_comparisons(folder, "top_trials", title, frame, columns=exp.column_names)
    verdicts = []
    for r in frame.to_dict("records"):
        if r.get("note"):
            verdicts.append(f"- {r['variant']} vs {r['base']}: not compared: {r['note']}")
            continue
        sig = r[f"{metric}_significant"]
        verdicts.append(
            f"- {r['variant']} vs {r['base']}: "
            + (
                f"better on dev {metric} (interval excludes 0)"
                if sig and r[f"{metric}_diff"] > 0
                else f"worse on dev {metric} (interval excludes 0)"
                if sig
                else f"a tie on dev {metric}: the interval includes 0"
            )
            + f", p={r[f'{metric}_p']:.3g}"
        )
    text = f"### {title}\n\n" + "\n".join(verdicts) + "\n" + md
    md_path = folder / "top_trials.md"
    md_path.write_text(text)
    return [md_path, *files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.tables",
        description="The paper's ablation tables of an experiment.",
    )
    parser.add_argument("exp", help="experiment folder written by python -m mtl.search")
    parser.add_argument("--out", help="output folder (default EXP/analysis)")
    parser.add_argument(
        "--space",
        help="the design-space file (default: EXP/design_space.yaml, saved by the search)",
    )
    parser.add_argument("--metric", help="rank by this dev metric (default: the objective)")
    parser.add_argument(
        "--resamples",
        type=int,
        default=paired.DEFAULT_RESAMPLES,
        help="bootstrap resamples and permutations of each paired comparison (default 9999)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the resampling (default 0)")
    args = parser.parse_args(argv)
    if args.resamples < 100:
        raise AnalysisError(f"--resamples {args.resamples}: give at least 100")
    exp = load_experiment(args.exp, args.space)
    if args.metric is not None and args.metric not in exp.metrics:
        raise AnalysisError(
            f"--metric {args.metric}: not a metric of {exp.name} ({', '.join(exp.metrics)})"
        )
    written = run(exp, args.out, args.metric, args.resamples, args.seed)
    for path in written:
        if path.suffix == ".md":
            print(path.read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
