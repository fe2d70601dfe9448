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
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.common import (
    COLUMN_NAMES,
    METRICS,
    AnalysisError,
    Experiment,
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
        "contrastive": bool(full["contrastive"]["enabled"]),
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
    if conf["contrastive"]:
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
    paper: tuple[float, float, float, float]  # SST, paraphrase, STS, overall as published


@dataclass(frozen=True)
class PaperTable:
    key: str
    title: str
    where: dict[str, Any]  # configuration keys every row of the table shares
    needs: dict[str, Any]  # written only when some trial has these values
    rows: tuple[PaperRow, ...]


_BASE = {"smart": False, "pal": "none", "contrastive": False}
_RR, _SEQ = {"routine": "round_robin"}, {"routine": "sequential"}


def _modes_table(design: int, paper: list[tuple[float, float, float, float]]) -> PaperTable:
    rows = [
        ("Pretrain w/ RR", {"mode": "pretrain", **_RR}),
        ("Finetune w/ RR", {"mode": "finetune", **_RR}),
        ("Pretrain w/o RR", {"mode": "pretrain", **_SEQ}),
        ("Finetune w/o RR", {"mode": "finetune", **_SEQ}),
    ]
    return PaperTable(
        key=f"table_{design}",
        title=f"Table {design}: Performance on Dev Datasets Using Design {design} (RR = Round Robin)",
        where={"design": design, **_BASE},
        needs={"design": design},
        rows=tuple(PaperRow(lab, m, p) for (lab, m), p in zip(rows, paper, strict=True)),
    )


def _designs_table(
    number: int, title: str, where: dict, needs: dict, labels: list[str], keys: list[dict], paper
) -> PaperTable:
    return PaperTable(
        key=f"table_{number}",
        title=f"Table {number}: {title}",
        where=where,
        needs=needs,
        rows=tuple(PaperRow(*r) for r in zip(labels, keys, paper, strict=True)),
    )


_DESIGN_ROUTINE = [
    {"design": 1, **_SEQ},
    {"design": 1, **_RR},
    {"design": 2, **_SEQ},
    {"design": 2, **_RR},
]

PAPER_TABLES: tuple[PaperTable, ...] = (
    _modes_table(
        1,
        [
            (0.391, 0.695, 0.317, 0.582),
            (0.495, 0.859, 0.733, 0.740),
            (0.391, 0.700, 0.321, 0.584),
            (0.474, 0.868, 0.741, 0.738),
        ],
    ),
    _modes_table(
        2,
        [
            (0.391, 0.704, 0.473, 0.611),
            (0.511, 0.887, 0.841, 0.773),
            (0.389, 0.681, 0.449, 0.598),
            (0.499, 0.884, 0.881, 0.774),
        ],
    ),
    _designs_table(
        3,
        "Performance Across Configurations (Classifier Designs and SMART)",
        {"mode": "finetune", **_RR, "pal": "none", "contrastive": False},
        {"smart": True},
        ["design 1 w/o SMART", "design 1 w/ SMART", "design 2 w/o SMART", "design 2 w/ SMART"],
        [
            {"design": 1, "smart": False},
            {"design": 1, "smart": True},
            {"design": 2, "smart": False},
            {"design": 2, "smart": True},
        ],
        [
            (0.495, 0.859, 0.733, 0.740),
            (0.474, 0.836, 0.487, 0.685),
            (0.511, 0.887, 0.841, 0.773),
            (0.507, 0.885, 0.816, 0.766),
        ],
    ),
    _designs_table(
        4,
        "Performance Across Configurations (Classifier Designs and PAL)",
        {"mode": "finetune", "smart": False, "pal": "paper", "contrastive": False},
        {"pal": "paper"},
        ["design 1 + PAL", "design 1 + RR + PAL", "design 2 + PAL", "design 2 + RR + PAL"],
        _DESIGN_ROUTINE,
        [
            (0.443, 0.861, 0.774, 0.730),
            (0.466, 0.864, 0.753, 0.735),
            (0.470, 0.867, 0.869, 0.757),
            (0.500, 0.881, 0.849, 0.768),
        ],
    ),
    _designs_table(
        5,
        "Performance Across Configurations (Classifier Designs and SimCSE)",
        {"mode": "finetune", "smart": False, "pal": "none", "contrastive": True},
        {"contrastive": True},
        [
            "design 1 + SimCSE",
            "design 1 + RR + SimCSE",
            "design 2 + SimCSE",
            "design 2 + RR + SimCSE",
        ],
        _DESIGN_ROUTINE,
        [
            (0.464, 0.857, 0.739, 0.730),
            (0.483, 0.861, 0.753, 0.740),
            (0.448, 0.881, 0.874, 0.755),
            (0.511, 0.880, 0.850, 0.772),
        ],
    ),
)

# Table 6: the paper's final ensemble (written by analysis.ensemble).
PAPER_TABLE_6 = {"dev": (0.511, 0.887, 0.881, 0.780), "test": (0.520, 0.887, 0.880, 0.783)}


# ---------------------------------------------------------------------------------------------
# Trials -> rows


def trials_frame(exp: Experiment) -> pd.DataFrame:
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


def seed_runs(exp: Experiment, trial_id: str) -> pd.DataFrame | None:
    """Completed runs of ``trial_id``'s parameters with other seeds (itself included), or None."""
    if exp.repeats is not None and (exp.repeats["trial_id"] == trial_id).any():
        config = exp.repeats.loc[exp.repeats["trial_id"] == trial_id, "config"].iloc[0]
        runs = exp.repeats[
            (exp.repeats["config"] == config) & (exp.repeats["status"] == "completed")
        ]
        return runs[["trial_id", "seed", *METRICS]]
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
        | {m: runs[f"best.{m}"] for m in METRICS}
    )


def _path(exp: Experiment, name: str) -> str:
    if exp.space is not None and name in exp.space.parameters:
        return exp.space.path_of(name)
    return name


def summarize(
    trials: pd.DataFrame,
    groups: list[tuple[str, pd.Series]],
    metric: str,
    exp: Experiment | None = None,
) -> pd.DataFrame:
    """One row per ``(label, mask over trials)``: counts, the best trial and its metrics, and the
    mean and standard deviation over its seed runs (with ``exp``)."""
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
        for m in METRICS:
            row[m] = float(best[f"best.{m}"]) if best is not None else math.nan
        runs = seed_runs(exp, best["trial_id"]) if exp is not None and best is not None else None
        row["seeds"] = len(runs) if runs is not None else 0
        for m in METRICS:
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


def display(summary: pd.DataFrame, max_t: int) -> tuple[pd.DataFrame, list[str]]:
    """The table as the paper prints it (strings), and its footnotes."""
    marks: set[str] = set()
    rows = []
    for r in summary.to_dict("records"):
        mark = STOPPED_MARK.get(r["best_status"], "")
        if mark:
            marks.add(r["best_status"])
        cells = {"Configuration": r["configuration"]}
        for m in METRICS:
            text = fmt(r[m]) + (mark if not math.isnan(r[m]) else "")
            if r["seeds"] > 1:
                text += f" ({fmt(r[m + '_mean'])} ± {fmt(r[m + '_std'])})"
            cells[COLUMN_NAMES[m]] = text
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
# Writing


def _mask(trials: pd.DataFrame, keys: dict[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=trials.index)
    for key, value in keys.items():
        mask &= trials[key] == value
    return mask


def paper_tables(trials: pd.DataFrame, metric: str, exp: Experiment | None = None):
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


def configurations_summary(trials: pd.DataFrame, metric: str, exp: Experiment | None = None):
    """Every configuration present, best first."""
    labels = list(dict.fromkeys(trials["configuration"]))
    summary = summarize(
        trials, [(lab, trials["configuration"] == lab) for lab in labels], metric, exp
    )
    keys = trials.drop_duplicates("configuration").set_index("configuration")[list(KEYS)]
    summary = summary.join(keys, on="configuration")
    return summary.sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)


def write_table(
    folder: Path, key: str, title: str, summary: pd.DataFrame, max_t: int, extra_md: str = ""
) -> list[Path]:
    """``key``.md, .tex and .csv of one table."""
    shown, notes = display(summary, max_t)
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


def run(exp: Experiment, out: str | None = None, metric: str | None = None) -> list[Path]:
    """Write every table of ``exp``; returns the files written."""
    metric = metric or exp.metric
    folder = out_dir(exp, out, "tables")
    trials = trials_frame(exp)
    written = []
    for table, summary in paper_tables(trials, metric, exp):
        written += write_table(
            folder, table.key, table.title, summary, exp.max_t, paper_block(table)
        )
    summary = configurations_summary(trials, metric, exp)
    title = f"Every configuration of {exp.name} (best by dev {metric})"
    written += write_table(folder, "configurations", title, summary, exp.max_t)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.tables",
        description="The paper's ablation tables of an experiment.",
    )
    parser.add_argument("exp", help="experiment folder written by python -m mtl.search")
    parser.add_argument("--out", help="output folder (default EXP/analysis)")
    parser.add_argument("--space", help="the design-space file (default: found by experiment name)")
    parser.add_argument(
        "--metric", choices=METRICS, help="rank by this dev metric (default: the objective)"
    )
    args = parser.parse_args(argv)
    exp = load_experiment(args.exp, args.space)
    written = run(exp, args.out, args.metric)
    for path in written:
        if path.suffix == ".md":
            print(path.read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
