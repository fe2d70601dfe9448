"""One Markdown page that puts an experiment's analyses together.

``python -m analysis.report EXP [--data-dir DIR] [--out DIR] [--space FILE]``

Regenerates the tables (:mod:`analysis.tables`, with their paired comparisons and the best trial
against the next ones) and the importance plots
(:mod:`analysis.importance`), includes the ensemble's Table 6 when ``python -m analysis.ensemble``
has run (it is not run here: it loads models), and draws from the dev predictions (the ensemble's,
else the best trial's own ``predictions/``) the paper's Figure 4 (SST labels predicted against
gold), the SST and paraphrase confusion matrices and the STS scatter of predictions against gold
(for a task declared in the config: its confusion matrix, or its scatter for a regression).
Ends with the design space and the commands that reproduce the experiment and this page.

Written: ``EXP/analysis/report.md``, and ``EXP/analysis/predictions/*.png`` with their data as CSV.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import importance as importance_lib
from analysis import paired
from analysis import tables as tables_lib
from analysis.common import (
    AnalysisError,
    ExperimentView,
    fmt,
    fmt_param,
    load_experiment,
    local_path,
    markdown_table,
    out_dir,
    portable,
    read_predictions,
    run_main,
    save_figure,
)
from mtl import data as data_lib
from mtl.tasks import Task

# ---------------------------------------------------------------------------------------------
# Predictions against gold


def prediction_source(exp: ExperimentView, folder: Path) -> tuple[Path | None, str]:
    """The folder of dev predictions to analyse, and a sentence saying whose they are."""
    ensemble = folder / "ensemble"
    if (ensemble / "ensemble.json").is_file():
        members = json.loads((ensemble / "ensemble.json").read_text())["selected"]
        return ensemble, f"the ensemble of {len(members)} ({', '.join(members)})"
    done = exp.results[exp.results["status"] == "completed"]
    for _, row in done.sort_values(f"best.{exp.metric}", ascending=False).iterrows():
        preds = exp.trial_dir(row["trial_id"]) / "predictions"
        if any(preds.glob("*-dev-output.csv")):
            return (
                preds,
                f"the best trial with predictions, {row['trial_id']} (its best checkpoint)",
            )
    return None, (
        "no dev predictions: the trials ran with train.write_predictions false and no ensemble has "
        "been built (python -m analysis.ensemble EXP --top-k 1 writes them)"
    )


def joined(pred_dir: Path, data_dir: Path, task: Task) -> pd.DataFrame | None:
    """id, gold, prediction of one task's dev predictions."""
    path = pred_dir / f"{task.name}-dev-output.csv"
    if not path.is_file():
        return None
    preds = read_predictions(path)
    try:
        raw = data_lib.read_split(data_dir, task, "dev")
    except data_lib.DataError as err:
        raise AnalysisError(str(err)) from None
    gold = pd.DataFrame({"id": raw.ids, "gold": raw.labels})
    frame = preds.merge(gold, on="id", how="left")
    if frame["gold"].isna().any():
        raise AnalysisError(f"{path}: ids not in {data_lib.split_file(task, 'dev')} of {data_dir}")
    return frame[["id", "gold", "prediction"]]


def class_names(task: Task) -> list[str]:
    """The names of a classification's classes (its label numbers when it names none)."""
    assert task.num_labels is not None
    return list(task.label_names or [str(k) for k in range(task.num_labels)])


def plot_label_distribution(frame: pd.DataFrame, task: Task, folder: Path) -> Path:
    """The paper's Figure 4 (for SST): how often each label is predicted and is gold."""
    assert task.num_labels is not None
    labels = list(range(task.num_labels))
    data = pd.DataFrame(
        {
            "label": labels,
            "predicted": [int((frame["prediction"] == k).sum()) for k in labels],
            "gold": [int((frame["gold"] == k).sum()) for k in labels],
        }
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, data["predicted"], 0.4, label="prediction")
    ax.bar(x + 0.2, data["gold"], 0.4, label="ground truth")
    ax.set_xticks(x, class_names(task), rotation=15, fontsize=8)
    ax.set_ylabel("dev examples")
    ax.set_title(f"Distribution of {task.title} labels (prediction vs. ground truth)")
    ax.legend()
    return save_figure(fig, data, folder / f"{task.name}_label_distribution.png")


def plot_confusion(
    frame: pd.DataFrame, classes: list[int], names: list[str], title: str, png: Path
) -> Path:
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for g, p in zip(frame["gold"].astype(int), frame["prediction"].astype(int), strict=True):
        matrix[classes.index(g), classes.index(p)] += 1
    data = pd.DataFrame(
        [
            {"gold": g, "predicted": p, "count": int(matrix[i, j])}
            for i, g in enumerate(classes)
            for j, p in enumerate(classes)
        ]
    )
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2.5, 1.1 * len(classes) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(classes)), names, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    return save_figure(fig, data, png)


def plot_scores(frame: pd.DataFrame, task: Task, folder: Path) -> Path:
    """A regression's dev predictions against gold (STS: similarity scores)."""
    assert task.score_range is not None
    data = frame.copy()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(data["gold"], data["prediction"], s=6, alpha=0.5)
    ax.plot(task.score_range, task.score_range, color="k", lw=0.8, ls="--")
    corr = (
        np.corrcoef(data["gold"], data["prediction"])[0, 1]
        if data["prediction"].std() > 0
        else math.nan
    )
    ax.set_xlabel(f"gold {task.label_column}")
    ax.set_ylabel(f"predicted {task.label_column}")
    ax.set_title(f"{task.title} dev: prediction vs. gold (Pearson {corr:.3f})")
    return save_figure(fig, data, folder / f"{task.name}_scatter.png")


def prediction_plots(
    pred_dir: Path, data_dir: Path, folder: Path, tasks: Iterable[Task]
) -> list[Path]:
    """Per task with dev predictions: a classification's confusion matrix (and, with more than
    two classes, its label distribution), a regression's scatter plot."""
    out = []
    for task in tasks:
        frame = joined(pred_dir, data_dir, task)
        if frame is None:
            continue
        if task.kind == "regression":
            out.append(plot_scores(frame, task, folder))
            continue
        assert task.num_labels is not None
        if not task.binary:
            out.append(plot_label_distribution(frame, task, folder))
        out.append(
            plot_confusion(
                frame,
                list(range(task.num_labels)),
                class_names(task),
                f"{task.title} dev confusion matrix",
                folder / f"{task.name}_confusion.png",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# The page


def rebase_links(markdown: str, prefix: str) -> str:
    """Relative link targets of ``markdown`` prefixed with the folder ``prefix``."""
    return re.sub(
        r"\]\((?![a-z]+://|/|#)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", markdown
    )


def _link(path: Path, base: Path) -> str:
    rel = path.relative_to(base).as_posix()
    return f"[{path.name}]({rel})"


def _image(path: Path, base: Path) -> str:
    return f"![{path.stem}]({path.relative_to(base).as_posix()})"


def _top_trials(exp: ExperimentView, k: int = 5) -> str:
    metric = exp.metric
    done = exp.results[exp.results[f"best.{metric}"].notna() & (exp.results["status"] != "error")]
    top = done.sort_values(f"best.{metric}", ascending=False).head(k)
    rows = []
    for _, r in top.iterrows():
        params = ", ".join(
            f"{n}={fmt_param(r[f'param.{n}'])}"
            for n in exp.param_names
            if pd.notna(r[f"param.{n}"])
        )
        rows.append(
            {
                "Trial": r["trial_id"],
                "Status": r["status"]
                + (f" ({r['reason']})" if isinstance(r.get("reason"), str) else ""),
                **{title: fmt(r[f"best.{m}"]) for m, title in exp.column_names.items()},
                "Evaluations": f"{int(r['evaluations'])} of {exp.max_t}",
                "Parameters": params,
            }
        )
    return markdown_table(pd.DataFrame(rows)) if rows else "No trial reached an evaluation.\n"


def _table_section(md: Path, written: list[Path], folder: Path) -> list[str]:
    """A table's Markdown (links re-rooted at the report) and every file written with it."""
    text = md.read_text()
    related = [p for p in written if p.stem == md.stem or p.stem.startswith(md.stem + "_")]
    prefix = md.parent.relative_to(folder).as_posix()
    files = ", ".join(_link(p, folder) for p in related if p.suffix != ".png")
    return [rebase_links(text, prefix), "Files: " + files, ""]


def _commands(exp: ExperimentView, folder: Path) -> list[str]:
    space = str(exp.space_file) if exp.space_file is not None else "DESIGN_SPACE.yaml"
    smoke = " --smoke" if exp.name.endswith("-smoke") else ""
    exp_arg = shlex.quote(str(exp.path))
    lines = [f"python -m mtl.search {shlex.quote(space)}{smoke}"]
    lines += [f"python -m analysis.tables {exp_arg}", f"python -m analysis.importance {exp_arg}"]
    ens = folder / "ensemble" / "ensemble.json"
    if ens.is_file():
        lines.append(
            json.loads(ens.read_text()).get("command")
            or f"python -m analysis.ensemble {exp_arg} --top-k K"
        )
    lines.append(f"python -m analysis.report {exp_arg}")
    return lines


def run(
    exp: ExperimentView,
    out: str | None = None,
    data_dir: str | None = None,
    resamples: int = paired.DEFAULT_RESAMPLES,
) -> Path:
    """Regenerate tables and importance, draw the prediction plots, write report.md."""
    folder = out_dir(exp, out)
    table_files = tables_lib.run(exp, out, resamples=resamples)
    try:
        imp_files, warnings = importance_lib.run(exp, out)
        imp_error = ""
    except AnalysisError as err:
        imp_files, warnings, imp_error = [], [], str(err)

    pred_dir, pred_note = prediction_source(exp, folder)
    pred_files: list[Path] = []
    if pred_dir is not None:
        resolved = _data_dir(exp, folder, data_dir)
        if resolved is None:
            pred_note += "; no data folder with the gold labels (pass --data-dir)"
        else:
            pred_files = prediction_plots(
                pred_dir, resolved, out_dir(exp, out, "predictions"), exp.tasks.values()
            )

    counts = exp.status_counts()
    lines = [
        f"# Experiment {exp.name}",
        "",
        f"`EXP` below is the experiment folder `{exp.name}` where the search wrote it. "
        f"{len(exp.results)} trials ("
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f"), ranked by dev {exp.metric}; a full trial runs {exp.max_t} evaluations.",
        "",
        "1. [Best trials](#best-trials)",
        "2. [Tables](#tables)",
        "3. [Parameter importance](#parameter-importance)",
        "4. [Ensemble](#ensemble)",
        "5. [Predictions against gold](#predictions-against-gold)",
        "6. [Configuration and commands](#configuration-and-commands)",
        "",
        "## Best trials",
        "",
        _top_trials(exp),
    ]
    mds = [p for p in table_files if p.suffix == ".md"]
    top = [p for p in mds if p.stem == "top_trials"]
    for md in top:  # is the best a tie with the next ones?
        lines += _table_section(md, table_files, folder)
    lines += ["## Tables", ""]
    for md in [p for p in mds if p not in top]:
        lines += _table_section(md, table_files, folder)

    lines += ["## Parameter importance", ""]
    if imp_error:
        lines += [f"Not computed: {imp_error}.", ""]
    else:
        text = imp_files[0].read_text().split("\n", 2)[2]  # without its heading
        lines += [rebase_links(text, imp_files[0].parent.relative_to(folder).as_posix()), ""]
        lines += [
            "Files: " + ", ".join(_link(p, folder) for p in imp_files if p.suffix != ".png"),
            "",
        ]
        for w in warnings:
            print(f"WARNING {w}", file=sys.stderr)

    lines += ["## Ensemble", ""]
    table6 = folder / "ensemble" / "table_6.md"
    if table6.is_file():
        lines += [table6.read_text(), ""]
        files = [table6, table6.with_suffix(".tex"), table6.with_suffix(".csv")]
        files += sorted((folder / "ensemble").glob("*-output.csv"))
        files += [folder / "ensemble" / n for n in ("members.csv", "ensemble.json", "MISSING.txt")]
        files = [f for f in files if f.is_file()]
        lines += ["Files: " + ", ".join(_link(p, folder) for p in files), ""]
    else:
        lines += [
            "Not built yet: `python -m analysis.ensemble "
            + shlex.quote(str(exp.path))
            + " --top-k K` "
            "writes Table 6 and the submission files, then run this report again.",
            "",
        ]

    lines += ["## Predictions against gold", "", f"Dev predictions of {pred_note}.", ""]
    for png in pred_files:
        lines += [_image(png, folder), "", f"Data: {_link(png.with_suffix('.csv'), folder)}", ""]

    lines += ["## Configuration and commands", ""]
    if exp.space_file is not None and exp.space_file.is_file():
        lines += [
            f"Design space `{exp.space_file}`:",
            "",
            "```yaml",
            exp.space_file.read_text().rstrip(),
            "```",
            "",
        ]
    else:
        best = exp.path / "best_config.yaml"
        lines += [
            "The design-space file was not found (pass --space); the best trial's config:",
            "",
        ]
        if best.is_file():
            lines += ["```yaml", best.read_text().rstrip(), "```", ""]
    lines += [
        "To reproduce the experiment and this page:",
        "",
        "```bash",
        *_commands(exp, folder),
        "```",
        "",
    ]

    report = folder / "report.md"
    report.write_text(portable(exp, "\n".join(lines)))
    return report


def _data_dir(exp: ExperimentView, folder: Path, given: str | None) -> Path | None:
    if given:
        return Path(given)
    candidates = []
    ens = folder / "ensemble" / "ensemble.json"
    if ens.is_file():
        candidates.append(json.loads(ens.read_text()).get("data_dir"))
    for trial_id in exp.results["trial_id"]:
        cfg = exp.trial_config(trial_id)
        if cfg is not None:
            candidates.append(cfg.get("data", {}).get("data_dir"))
            break
    for c in candidates:
        if c and local_path(exp, c).is_dir():
            return local_path(exp, c)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report", description="One Markdown report of an experiment."
    )
    parser.add_argument("exp", help="experiment folder written by python -m mtl.search")
    parser.add_argument(
        "--data-dir", help="CS224N data folder with the dev labels (default: the trials')"
    )
    parser.add_argument("--out", help="output folder (default EXP/analysis)")
    parser.add_argument(
        "--space",
        help="the design-space file (default: EXP/design_space.yaml, saved by the search)",
    )
    parser.add_argument(
        "--resamples",
        type=int,
        default=paired.DEFAULT_RESAMPLES,
        help="bootstrap resamples and permutations of each paired comparison (default 9999)",
    )
    args = parser.parse_args(argv)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise AnalysisError(f"--data-dir {args.data_dir}: no such folder")
    if args.resamples < 100:
        raise AnalysisError(f"--resamples {args.resamples}: give at least 100")
    exp = load_experiment(args.exp, args.space)
    report = run(exp, args.out, args.data_dir, args.resamples)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
