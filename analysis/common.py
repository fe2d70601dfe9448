"""An experiment folder written by ``python -m mtl.search``, read once for every analysis.

The folder's format (file names, the reader of each trial's ``result.json``, the saved design
space, where the study is) is :mod:`mtl.search.experiment`'s and ASHA's rungs are
:mod:`mtl.search.scheduler`'s; this module is the analyses' view of what they read:

* ``EXP/results.csv``: one row per trial: status, ``param.<name>``, ``best.<metric>``, evaluations,
  best checkpoint and trial folder (its columns: :mod:`mtl.search.results`).
* ``EXP/<trial>/result.json``: Tune's record of every report, i.e. the dev metrics after every
  evaluation (a trial's learning curve, also for trials ASHA stopped).
* ``EXP/<trial>/config.yaml``: the trainer config the trial ran (the trainer writes it).
* ``EXP/repeats.csv``, ``EXP/repeats_summary.csv``: seed repeats of the top configurations.
* The design space: ``--space FILE``, else ``EXP/design_space.yaml`` (the search writes it before
  the first trial): the objective, ASHA's rungs and the parameters' conditions. An older folder
  without one still analyses; the analyses say what they could not know.
* The Optuna study (exact parameter values and searched ranges): where the saved space records
  it (``experiment.study_storage``), else ``<name>.optuna.db`` beside the folder.

Paths recorded on the search machine are re-rooted into ``EXP`` when the folder has been moved
(copied off a cluster, committed under ``results/``).
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import optuna
import pandas as pd
import yaml

from mtl import metrics as metrics_lib
from mtl import tasks as tasks_lib
from mtl.config import ConfigError, build_config
from mtl.search import experiment as experiment_folder
from mtl.search.scheduler import asha_rungs
from mtl.search.space import DesignSpace, load_space

# The built-in tasks' metrics in the paper's column order (Tables 1 to 6) and their column names;
# an experiment that declares a task has its own (ExperimentView.metrics, .column_names).
METRICS: tuple[str, ...] = metrics_lib.metric_names(tasks_lib.BUILTIN.values())
COLUMN_NAMES: dict[str, str] = metrics_lib.metric_titles(tasks_lib.BUILTIN.values())
ANALYSIS_DIR = "analysis"

optuna.logging.set_verbosity(optuna.logging.WARNING)


class AnalysisError(Exception):
    """Bad input to an analysis: one line, printed as ``error: ...`` with exit status 2."""


def run_main(fn: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's ``fn(argv)``; an :class:`AnalysisError` becomes one line and status 2."""
    try:
        return fn(argv)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------
# The experiment


@dataclass
class ExperimentView:
    """What the analyses read of one experiment folder (:func:`load_experiment`)."""

    path: Path
    results: pd.DataFrame  # results.csv, one row per trial
    space: DesignSpace | None = None
    space_file: Path | None = None
    study: optuna.Study | None = None
    repeats: pd.DataFrame | None = None  # repeats.csv
    repeats_summary: pd.DataFrame | None = None  # repeats_summary.csv
    metric: str = "overall"  # the objective the search ranked by
    _history: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    _configs: dict[str, dict[str, Any] | None] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @functools.cached_property
    def tasks(self) -> dict[str, tasks_lib.Task]:
        """Every task the experiment's trainer config knows (built-in and declared), by name."""
        raw = self.space.base if self.space is not None else None
        if raw is None:
            raw = next(
                (c for t in self.results["trial_id"] if (c := self.trial_config(t)) is not None),
                {},
            )
        try:
            return tasks_lib.registry(build_config(raw, "trial config").data)
        except ConfigError:
            return dict(tasks_lib.BUILTIN)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The dev metrics in the paper's column order: each task's, then overall."""
        return metrics_lib.metric_names(self.tasks.values())

    @property
    def column_names(self) -> dict[str, str]:
        """Metric -> its column name in tables (``SST Acc.``, ..., ``Overall Score``)."""
        return metrics_lib.metric_titles(self.tasks.values())

    @property
    def param_names(self) -> list[str]:
        return [c.removeprefix("param.") for c in self.results.columns if c.startswith("param.")]

    def row(self, trial_id: str) -> pd.Series:
        rows = self.results[self.results["trial_id"] == trial_id]
        if rows.empty:
            raise AnalysisError(
                f"{self.path}: no trial {trial_id!r} in {experiment_folder.RESULTS_FILE}"
            )
        return rows.iloc[0]

    def params(self, trial_id: str) -> dict[str, Any]:
        """The trial's parameter values (only those its conditions let it sample)."""
        row = self.row(trial_id)
        return {
            n: _scalar(row[f"param.{n}"]) for n in self.param_names if pd.notna(row[f"param.{n}"])
        }

    def local(self, recorded: str) -> Path:
        """A path recorded by the search, re-rooted into this folder (or its seed repeats'
        ``<name>-repeats`` folder beside it) if the folders moved."""
        path = Path(recorded)
        if path.exists():
            return path
        parts = path.parts
        roots = {self.name: self.path, self.repeats_name: self.path.parent / self.repeats_name}
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] in roots:
                return roots[parts[i]].joinpath(*parts[i + 1 :])
        return path

    def searched(self, trial_id: str) -> bool:
        """Whether ``trial_id`` is a trial of the search (results.csv), not a seed repeat's run."""
        return bool((self.results["trial_id"] == trial_id).any())

    @property
    def repeats_name(self) -> str:
        """The folder of the seed repeats' own runs, beside this one (mtl.search.run)."""
        return f"{self.name}-repeats"

    def run_row(self, trial_id: str) -> pd.Series:
        """The row of a search trial (results.csv) or of a seed repeat's run (repeats.csv);
        either has ``trial_dir``, ``best_checkpoint`` and ``status``. Raises
        :class:`AnalysisError` for an id in neither, or a repeats.csv from before it recorded
        where its runs are."""
        if self.searched(trial_id):
            return self.row(trial_id)
        repeats = self.repeats
        if repeats is not None:
            rows = repeats[repeats["trial_id"] == trial_id]
            if not rows.empty:
                missing = {"trial_dir", "best_checkpoint"} - set(repeats.columns)
                if missing:
                    raise AnalysisError(
                        f"{self.path / experiment_folder.REPEATS_FILE}: no "
                        f"{', '.join(sorted(missing))} column (written by an older mtl.search); "
                        "run the search once more with --resume to rewrite it"
                    )
                return rows.iloc[0]
        raise AnalysisError(
            f"{self.path}: no trial {trial_id!r} in {experiment_folder.RESULTS_FILE}"
            + (f" or {experiment_folder.REPEATS_FILE}" if repeats is not None else "")
        )

    def best_score(self, trial_id: str, metric: str | None = None) -> float:
        """A search trial's or a seed repeat's best dev ``metric`` (default: the objective);
        NaN when the run never reported it."""
        metric = metric or self.metric
        key = f"best.{metric}" if self.searched(trial_id) else metric  # repeats.csv: bare names
        return float(self.run_row(trial_id).get(key, math.nan))

    def repeat_ids(self, trial_id: str) -> list[tuple[str, int]]:
        """The completed seed repeats of search trial ``trial_id`` (``search.repeats``): their
        run ids and seeds, by seed; empty when its configuration was not repeated."""
        repeats = self.repeats
        if repeats is None:
            return []
        own = repeats[repeats["trial_id"] == trial_id]
        if own.empty:
            return []
        runs = repeats[
            (repeats["config"] == own["config"].iloc[0])
            & (repeats["trial_id"] != trial_id)
            & (repeats["status"] == "completed")
        ]
        for column in ("best_checkpoint", self.metric):  # a run to load and rank
            if column in runs:
                runs = runs[runs[column].notna()]
        runs = runs.sort_values("seed")
        return [(str(t), int(seed)) for t, seed in zip(runs["trial_id"], runs["seed"], strict=True)]

    def trial_dir(self, trial_id: str) -> Path:
        """The run folder of a search trial or of a seed repeat's run (for a repeats.csv from
        before it recorded ``trial_dir``: the folder whose reports carry the run's id)."""
        try:
            return self.local(str(self.run_row(trial_id)["trial_dir"]))
        except AnalysisError:
            found = self._find_repeat_dir(trial_id)
            if found is None:
                raise
            return found

    def _find_repeat_dir(self, trial_id: str) -> Path | None:
        folder = self.path.parent / self.repeats_name
        if self.repeats is None or not (self.repeats["trial_id"] == trial_id).any():
            return None
        if not folder.is_dir():
            return None
        for run in sorted(p for p in folder.iterdir() if p.is_dir()):
            reports = experiment_folder.read_reports(str(run))
            if reports and reports[0].get("trial_id") == trial_id:
                return run
        return None

    def checkpoint_dir(self, trial_id: str) -> Path | None:
        value = self.run_row(trial_id)["best_checkpoint"]
        return self.local(str(value)) if isinstance(value, str) and value else None

    def history(self, trial_id: str) -> pd.DataFrame:
        """Dev metrics after every evaluation of a trial (Tune's result.json), one row each:
        columns ``evaluation``, ``epoch``, ``step`` and :attr:`metrics` (NaN where unreported)."""
        if trial_id not in self._history:
            reports = experiment_folder.read_reports(str(self.trial_dir(trial_id)))
            columns = ["evaluation", "epoch", "step", *self.metrics]
            frame = experiment_folder.evaluations(reports).reindex(columns=columns)
            self._history[trial_id] = frame.astype({"evaluation": int})
        return self._history[trial_id]

    def trial_config(self, trial_id: str) -> dict[str, Any] | None:
        """The trainer config the trial ran: its config.yaml, else rebuilt from the space."""
        if trial_id not in self._configs:
            path = self.trial_dir(trial_id) / "config.yaml"
            cfg = None
            if path.is_file():
                cfg = yaml.safe_load(path.read_text())
            elif self.space is not None and self.searched(
                trial_id
            ):  # a repeat's own seed is not in the space
                cfg = self.space.trial_config(self.params(trial_id))
            self._configs[trial_id] = cfg
        return self._configs[trial_id]

    @property
    def max_t(self) -> int:
        """Evaluations of a full-budget trial."""
        if self.space is not None:
            return self.space.max_t
        done = self.results[self.results["status"] == "completed"]["evaluations"]
        return int(done.max()) if len(done) else int(self.results["evaluations"].max())

    @property
    def rungs(self) -> list[int] | None:
        """The evaluations at which ASHA compared trials (the first at or past each of its
        rungs, :func:`mtl.search.scheduler.asha_rungs`); None without the space or with the fifo
        scheduler."""
        if self.space is None or self.space.scheduler.type != "asha":
            return None
        sched = self.space.scheduler
        found = asha_rungs(self.space.max_t, sched.grace_period, sched.reduction_factor)
        return [math.ceil(r) for r in found]

    def status_counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.results["status"].value_counts().items()}


def _scalar(value: Any) -> Any:
    """numpy scalars as Python values (YAML and Optuna want plain types)."""
    return value.item() if hasattr(value, "item") else value


def load_experiment(path: str | Path, space: str | Path | None = None) -> ExperimentView:
    """Read an experiment folder; raises :class:`AnalysisError` for a folder that is not one.

    ``space``: the design-space file (``--space``); default ``EXP/design_space.yaml``, and none
    when the folder has none (an experiment older than that file).
    """
    if "://" in str(path):
        raise AnalysisError(f"{path}: only local folders; copy the experiment here first")
    exp_dir = Path(path).expanduser()
    if not exp_dir.is_dir():
        raise AnalysisError(f"{exp_dir}: no such folder")
    exp_dir = exp_dir.resolve()
    results_path = exp_dir / experiment_folder.RESULTS_FILE
    if not results_path.is_file():
        raise AnalysisError(
            f"{exp_dir}: no {experiment_folder.RESULTS_FILE}; not an experiment folder, or its search has not "
            "ended (python -m mtl.search FILE --resume writes it)"
        )
    try:
        results = pd.read_csv(results_path, dtype={"trial_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise AnalysisError(f"{results_path}: unreadable ({type(err).__name__})") from None
    needed = {"trial_id", "status", "evaluations", "trial_dir", "best_checkpoint"}
    missing = sorted(needed - set(results.columns))
    if missing:
        raise AnalysisError(f"{results_path}: missing columns {', '.join(missing)}")
    if results.empty:
        raise AnalysisError(f"{results_path}: no trials")

    space_obj, space_file = read_space(exp_dir, space)
    exp = ExperimentView(path=exp_dir, results=results, space=space_obj, space_file=space_file)
    exp.study = _load_study(exp)
    for name, file in (
        ("repeats", experiment_folder.REPEATS_FILE),
        ("repeats_summary", experiment_folder.REPEATS_SUMMARY_FILE),
    ):
        csv = exp_dir / file
        if csv.is_file():
            setattr(exp, name, pd.read_csv(csv, dtype={"trial_id": str}))
    exp.metric = _objective(exp)
    return exp


def top_trial_ids(
    exp: ExperimentView,
    top_k: int | None,
    include_stopped: bool = False,
    metric: str | None = None,
    need_checkpoint: bool = False,
) -> list[str]:
    """The ``top_k`` best completed (or also stopped) trials by ``metric``, best first."""
    metric = metric or exp.metric
    statuses = ("completed", "stopped") if include_stopped else ("completed",)
    keep = exp.results["status"].isin(statuses) & exp.results[f"best.{metric}"].notna()
    if need_checkpoint:
        keep &= exp.results["best_checkpoint"].notna()
    pool = exp.results[keep]
    if top_k is None or top_k < 1:
        raise AnalysisError("--top-k: give a number of trials of at least 1")
    if top_k > len(pool):
        what = " or stopped" if include_stopped else ""
        raise AnalysisError(
            f"--top-k {top_k}: {exp.name} has only {len(pool)} completed{what} trials"
            + (" with a checkpoint" if need_checkpoint else "")
            + ("" if include_stopped else " (--include-stopped adds stopped ones)")
        )
    return list(pool.sort_values(f"best.{metric}", ascending=False)["trial_id"][:top_k])


def _objective(exp: ExperimentView) -> str:
    if exp.space is not None:
        return exp.space.objective.metric
    for trial_id in exp.results["trial_id"]:
        cfg = exp.trial_config(trial_id)
        if cfg is not None:
            return cfg.get("train", {}).get("selection_metric", "overall")
    return "overall"


def _load_study(exp: ExperimentView) -> optuna.Study | None:
    for url in experiment_folder.study_urls(exp.path, exp.space):
        db = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
        if db is not None and not Path(db).is_file():
            continue  # a recorded location not on this machine: opening it would create it
        try:
            return optuna.load_study(study_name=exp.name, storage=url)
        except (KeyError, ValueError, RuntimeError, ImportError):  # no such study in that storage
            continue
    return None


def read_space(exp_dir: Path, given: str | Path | None) -> tuple[DesignSpace | None, Path | None]:
    """The design space of ``exp_dir`` and its file: ``given`` (``--space``), else the one the
    search saved in the folder (``design_space.yaml``), else none. A ``-smoke`` experiment read
    with its original file gets the smoke budget; raises :class:`AnalysisError` for a file that
    is not a valid design space."""
    try:
        if given is not None:
            return _smoke(load_space(given), exp_dir), Path(given)
        saved = experiment_folder.read_saved(str(exp_dir))
    except ConfigError as err:
        hint = "" if given is not None else " (pass the experiment's file with --space)"
        raise AnalysisError(f"{err}{hint}") from None
    return (saved, exp_dir / experiment_folder.SPACE_FILE) if saved is not None else (None, None)


def _smoke(space: DesignSpace, exp_dir: Path) -> DesignSpace:
    if exp_dir.name != f"{space.experiment.name}-smoke":
        return space
    from mtl.search.run import smoke_space

    return smoke_space(space, has_gpu=False)


# ---------------------------------------------------------------------------------------------
# Output


def out_dir(exp: ExperimentView, out: str | None, *sub: str) -> Path:
    """``EXP/analysis[/sub]`` or ``out[/sub]``, created."""
    base = Path(out) if out is not None else exp.path / ANALYSIS_DIR
    path = base.joinpath(*sub)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AnalysisError(f"{path}: cannot create ({err.strerror})") from None
    return path


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub pipe table of ``frame`` (its cells already formatted as strings)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    def numeric(column: str) -> bool:  # numbers, maybe with "± std" or a mark: right-aligned
        return all(not str(v)[:1].isalpha() for v in frame[column])

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    align = (
        "|"
        + "|".join("---:" if i > 0 and numeric(c) else ":---" for i, c in enumerate(frame.columns))
        + "|"
    )
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, align, *body]) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    out = out.replace("±", r"$\pm$").replace("†", r"$^\dagger$").replace("‡", r"$^\ddagger$")
    return out.replace("−", "$-$")  # the comparisons' "row minus row"


def latex_table(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table of string cells (escaped here)."""
    escaped = frame.map(latex_escape)
    escaped.columns = [latex_escape(c) for c in frame.columns]
    return escaped.to_latex(
        index=False,
        escape=False,
        caption=latex_escape(caption),
        label=label,
        column_format="l" + "r" * (len(frame.columns) - 1),
    )


def save_figure(fig: plt.Figure, data: pd.DataFrame, png: Path) -> Path:
    """Write the figure and, beside it (same name, .csv), the data it plots; close the figure."""
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    data.to_csv(png.with_suffix(".csv"), index=False)
    return png


def fmt_param(value: Any) -> str:
    """A parameter value as the design space wrote it (results.csv turns 16 into 16.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt(value: Any, digits: int = 3) -> str:
    """A metric as the paper prints it; an em dash when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def read_predictions(path: Path) -> pd.DataFrame:
    """A CS224N prediction file (``id \\t Header`` then ``id , value`` lines) as id, prediction."""
    lines = path.read_text().splitlines()
    if not lines:
        raise AnalysisError(f"{path}: empty prediction file")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0]:
            raise AnalysisError(f"{path}:{n}: expected 'id , value'")
        rows.append((parts[0], float(parts[1])))
    return pd.DataFrame(rows, columns=["id", "prediction"])


def portable(exp: ExperimentView, text: str) -> str:
    """``text`` with the experiment folder's absolute path written ``EXP`` and its storage
    folder's ``EXP/..``, so that a committed report names no folder of the machine that made it.

    A path inside the folder becomes ``EXP/<relative path>``; a path is replaced only whole (not
    inside a longer folder name), and a storage folder that is the file-system root is kept.
    """
    folders = [(exp.path, "EXP")]
    if exp.path.parent != exp.path.parent.parent:
        folders.append((exp.path.parent, "EXP/.."))
    for folder, name in folders:
        text = re.sub(rf"(?<![\w.-]){re.escape(str(folder))}(?![\w.-])", name, text)
    return text


def local_path(exp: ExperimentView, text: str) -> Path:
    """A path as :func:`portable` (or ``ensemble.json``'s ``$MTL_DATA_DIR``) wrote it, on this
    machine: a leading ``EXP/..`` or ``EXP`` back to the storage or experiment folder,
    environment variables and ``~`` expanded; any other path unchanged."""
    for name, folder in (("EXP/..", exp.path.parent), ("EXP", exp.path)):
        if text == name or text.startswith(name + "/"):
            return folder / text[len(name) :].lstrip("/")
    return Path(os.path.expandvars(text)).expanduser()
