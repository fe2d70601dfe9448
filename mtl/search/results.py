"""The results of an experiment: ``results.csv``, ``best_config.yaml`` and the top-trials table.

Files written into the experiment folder (their names, and the reader of each trial's
``result.json``, are :mod:`mtl.search.experiment`'s):

* ``results.csv``: one row per trial, in a fixed column order (:meth:`Summary.columns`): its status (``completed``, ``stopped`` by ASHA or the time
  budget, ``error``, or ``unfinished`` when the driver stopped first) and the reason, every
  parameter (columns ``param.<name>``; empty where a condition left it out), the dev metrics of
  its best evaluation by the objective (``best.*``) and of its last one (``last.*``), epochs and
  evaluations run, retries, the Ray node that ran its last attempt, the best checkpoint's path,
  the trial folder and the Optuna trial number and state.
* ``best_config.yaml``: the trainer config of the best trial, runnable with ``python -m mtl.train``.
* ``top_trials.txt``: the table printed at the end.
* ``design_space.yaml`` (written before the first trial, :mod:`mtl.search.experiment`): the
  resolved design space as it runs (after ``--set`` and ``--smoke``, every default filled in).
* ``repeats.csv`` / ``repeats_summary.csv``: with ``search.repeats``, every run of the top
  configurations (the search's own run and one per further seed) and their mean and standard
  deviation per configuration.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pyarrow.fs
import yaml
from ray import tune

from mtl.config import build_config
from mtl.search.experiment import (
    BEST_CONFIG_FILE,
    REPEATS_FILE,
    REPEATS_SUMMARY_FILE,
    RESULTS_FILE,
    TOP_FILE,
    evaluations,
    read_reports,
)
from mtl.search.searcher import CLOSED_ATTR, RAY_TRIAL_ATTR, RETRY_ATTR
from mtl.search.space import DesignSpace, trial_config_dict
from mtl.search.trainable import NONFINITE_KEY, OUTCOME_FILE, trial_params


@dataclass
class TrialRow:
    """One trial of ``results.csv``."""

    trial_id: str
    status: str
    reason: str
    params: dict[str, Any]
    best: dict[str, float]
    last: dict[str, float]
    epochs: float
    evaluations: int
    retries: int
    node_id: str
    best_checkpoint: str
    trial_dir: str
    optuna_number: int | None = None
    optuna_state: str = ""

    def flat(self, metrics: Sequence[str]) -> dict[str, Any]:
        """The row of results.csv; ``metrics``: the dev metrics' columns (``DesignSpace.metrics``)."""
        row: dict[str, Any] = {
            "trial_id": self.trial_id,
            "status": self.status,
            "reason": self.reason,
        }
        row.update({f"param.{k}": v for k, v in self.params.items()})
        row.update({f"best.{k}": self.best.get(k, math.nan) for k in metrics})
        row.update({f"last.{k}": self.last.get(k, math.nan) for k in metrics})
        row.update(
            epochs=self.epochs,
            evaluations=self.evaluations,
            retries=self.retries,
            node_id=self.node_id,
            best_checkpoint=self.best_checkpoint,
            trial_dir=self.trial_dir,
            optuna_number=self.optuna_number,
            optuna_state=self.optuna_state,
        )
        return row


@dataclass
class Summary:
    """Every trial of an experiment, ranked by the objective."""

    space: DesignSpace
    path: str
    rows: list[TrialRow]
    repeats: pd.DataFrame | None = field(default=None)
    # Seed repeats of the top configurations that have not ended (the repeats were interrupted).
    repeats_unfinished: int = 0

    @property
    def metric(self) -> str:
        return self.space.objective.metric

    def score(self, row: TrialRow) -> float:
        value = row.best.get(self.metric, math.nan)
        return -math.inf if value is None or math.isnan(value) else value

    def top(self, k: int, status: str | None = None) -> list[TrialRow]:
        rows = [r for r in self.rows if status is None or r.status == status]
        rows = [r for r in rows if r.status != "error" and self.score(r) > -math.inf]
        return sorted(rows, key=self.score, reverse=True)[:k]

    @property
    def unfinished(self) -> bool:
        """Whether some trial, or some seed repeat, has not ended (the run was interrupted)."""
        return self.repeats_unfinished > 0 or any(r.status == "unfinished" for r in self.rows)

    @property
    def failed(self) -> bool:
        """Whether every trial ended in an error (nothing to rank)."""
        return bool(self.rows) and all(r.status == "error" for r in self.rows)

    def best_row(self) -> TrialRow | None:
        top = self.top(1, status="completed") or self.top(1)
        return top[0] if top else None

    def columns(self) -> list[str]:
        """results.csv's columns, whatever the trials: ``trial_id``, ``status``, ``reason``, one
        ``param.<name>`` per parameter in the design space's order, ``best.*`` and ``last.*`` in
        :attr:`DesignSpace.metrics` order, then the trial's bookkeeping."""
        metrics = self.space.metrics
        params = [f"param.{name}" for name in self.space.parameters]
        seen = {k for r in self.rows for k in r.flat(metrics) if k.startswith("param.")}
        extra = sorted(seen - set(params))  # grid keys without a parameter of that name
        fields = list(TrialRow.__dataclass_fields__)
        tail = fields[fields.index("epochs") :]
        return [
            "trial_id",
            "status",
            "reason",
            *params,
            *extra,
            *(f"best.{m}" for m in metrics),
            *(f"last.{m}" for m in metrics),
            *tail,
        ]

    def frame(self) -> pd.DataFrame:
        metrics = self.space.metrics
        return pd.DataFrame([r.flat(metrics) for r in self.rows], columns=self.columns())

    def report(self, k: int = 5) -> str:
        counts = pd.Series([r.status for r in self.rows]).value_counts().to_dict()
        lines = [
            f"{len(self.rows)} trials: "
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + f"  ->  {self.path}/{RESULTS_FILE}"
        ]
        top = self.top(k)
        if top:
            table = pd.DataFrame(
                [
                    {
                        "trial": r.trial_id,
                        "status": r.status,
                        **{f"best.{m}": r.best.get(m) for m in self.space.metrics},
                        "evals": r.evaluations,
                        **r.params,
                    }
                    for r in top
                ]
            )
            lines.append(f"top {len(top)} by best {self.metric}:")
            lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        best = self.best_row()
        if best is not None:
            lines.append(f"best config: {self.path}/{BEST_CONFIG_FILE}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading an experiment folder


def _fs(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def _read_text(fs: pyarrow.fs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.readall().decode()
    except (FileNotFoundError, OSError):
        return None


def _write_text(base: str, name: str, text: str) -> None:
    fs, root = _fs(base)
    with fs.open_output_stream(f"{root.rstrip('/')}/{name}") as f:
        f.write(text.encode())


def metric_values(row: pd.Series | dict, metrics: Sequence[str]) -> dict[str, float]:
    """The finite ``metrics`` of one report (a row of :func:`mtl.search.experiment.evaluations`)
    as floats; a metric the row lacks, or NaN, is left out."""
    return {m: float(row[m]) for m in metrics if m in row and pd.notna(row[m])}


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # The exception itself is the last line of a traceback.
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else ""


def _optuna_states(study: optuna.Study | None) -> dict[str, optuna.trial.FrozenTrial]:
    if study is None:
        return {}
    # A retried errored trial has two records, its FAIL and the retry's
    # (mtl.search.run.record_retries), both under its Ray trial id: the retry's wins.
    trials = sorted(study.get_trials(), key=lambda t: (RETRY_ATTR in t.user_attrs, t.number))
    return {t.user_attrs[RAY_TRIAL_ATTR]: t for t in trials if RAY_TRIAL_ATTR in t.user_attrs}


def read_rows(space: DesignSpace, exp_path: str, study: optuna.Study | None) -> list[TrialRow]:
    """One :class:`TrialRow` per trial of the experiment at ``exp_path``."""
    analysis = tune.ExperimentAnalysis(exp_path)
    by_ray_id = _optuna_states(study)
    closed = study.user_attrs.get(CLOSED_ATTR, {}) if study is not None else {}
    metric = space.objective.metric
    metrics = space.metrics
    rows = []
    for trial in analysis.trials:
        fs = trial.storage.storage_filesystem
        reports = read_reports(trial.path, fs)
        df = pd.DataFrame(reports)  # every report: the node, a non-finite loss
        evals = evaluations(reports)
        best: dict[str, float] = {}
        last: dict[str, float] = {}
        if len(evals):
            last = metric_values(evals.iloc[-1], metrics)
            best = metric_values(evals.loc[evals[metric].astype(float).idxmax()], metrics)
        outcome = _read_text(fs, f"{trial.path}/{OUTCOME_FILE}")
        ot = by_ray_id.get(trial.trial_id)
        status, reason = _status(trial, outcome, ot, df, closed)
        checkpoint = (
            analysis.get_best_checkpoint(trial, metric=metric, mode="max") if len(evals) else None
        )
        rows.append(
            TrialRow(
                trial_id=trial.trial_id,
                status=status,
                reason=reason,
                params=trial_params(trial.config),
                best=best,
                last=last,
                epochs=float(evals["epoch"].iloc[-1]) if len(evals) else 0.0,
                evaluations=int(evals["evaluation"].iloc[-1]) if len(evals) else 0,
                retries=int(trial.run_metadata.num_failures) - (status == "error"),
                node_id=str(df["node_id"].dropna().iloc[-1])
                if "node_id" in df and df["node_id"].notna().any()
                else "",
                best_checkpoint=checkpoint.path if checkpoint is not None else "",
                trial_dir=trial.path,
                optuna_number=ot.number if ot is not None else None,
                optuna_state=ot.state.name if ot is not None else "",
            )
        )
    return rows


def _status(
    trial: Any, outcome: str | None, ot: Any, df: pd.DataFrame, closed: dict[str, str]
) -> tuple[str, str]:
    if trial.status == "ERROR":
        if NONFINITE_KEY in df and df[NONFINITE_KEY].fillna(0).any():
            errors = df["error"].dropna() if "error" in df else pd.Series(dtype=str)
            return "error", f"non-finite loss: {errors.iloc[-1] if len(errors) else ''}"
        error = trial.get_error()
        return "error", _first_line(str(error)) if error is not None else "error"
    if outcome is not None:
        return "completed", ""
    if trial.status == "TERMINATED":
        if ot is not None and str(ot.number) in closed:
            return "stopped", closed[str(ot.number)]
        if ot is not None and ot.state == optuna.trial.TrialState.PRUNED:
            return "stopped", "ASHA"
        return "stopped", "time budget or interrupted"
    return "unfinished", trial.status.lower()


# ---------------------------------------------------------------------------------------------
# Writing


def summarize(space: DesignSpace, exp_path: str, study: optuna.Study | None) -> Summary:
    """Read the experiment, write results.csv, best_config.yaml and top_trials.txt."""
    summary = Summary(space, exp_path, read_rows(space, exp_path, study))
    write(summary)
    return summary


def best_config(summary: Summary) -> dict[str, Any] | None:
    """The best trial's trainer config, as ``python -m mtl.train`` takes it."""
    best = summary.best_row()
    if best is None:
        return None
    raw = trial_config_dict(summary.space.trial_config({}), summary.space.paths, best.params)
    return build_config(raw, "best config").to_dict()


def write(summary: Summary) -> None:
    buf = io.StringIO()
    summary.frame().to_csv(buf, index=False)
    _write_text(summary.path, RESULTS_FILE, buf.getvalue())
    cfg = best_config(summary)
    if cfg is not None:
        _write_text(summary.path, BEST_CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))
    _write_text(summary.path, TOP_FILE, summary.report() + "\n")


def add_repeats(
    summary: Summary, repeat_rows: list[TrialRow], rpath: str, base_seed: int, top_k: int
) -> Summary:
    """Join the seed repeats with the search's own runs into repeats.csv and its summary.

    ``repeat_rows``: the runs of the repeats experiment at ``rpath`` (:func:`read_rows`).

    repeats.csv has one row per run: ``config`` (the configuration's rank among the top
    ``top_k``), ``seed``, ``trial_id``, ``status``, ``trial_dir``, ``best_checkpoint`` (where the
    analyses find the run: :meth:`analysis.common.ExperimentView.run_row`) and the run's best
    dev metrics under their own names.
    """
    runs, configs, matched = [], [], set()
    for i, top in enumerate(summary.top(top_k, "completed")):
        configs.append({"config": i, **top.params})
        runs.append(
            {
                "config": i,
                "seed": base_seed,
                "trial_id": top.trial_id,
                "status": top.status,
                "trial_dir": top.trial_dir,
                "best_checkpoint": top.best_checkpoint,
                **top.best,
            }
        )
        for row in repeat_rows:
            params = dict(row.params)
            seed = params.pop("seed", None)
            if params == top.params:
                matched.add(row.trial_id)
                runs.append(
                    {
                        "config": i,
                        "seed": seed,
                        "trial_id": row.trial_id,
                        "status": row.status,
                        "trial_dir": row.trial_dir,
                        "best_checkpoint": row.best_checkpoint,
                        **row.best,
                    }
                )
    left_out = [r.trial_id for r in repeat_rows if r.trial_id not in matched]
    if left_out:  # repeats of configurations that left the top when errored trials were retried
        print(
            f"repeats: {len(left_out)} runs in {rpath} repeat configurations no longer among "
            f"the top {top_k}, left out of {REPEATS_FILE}: {', '.join(left_out)}"
        )
    frame = pd.DataFrame(runs)
    _csv(summary.path, REPEATS_FILE, frame)
    done = frame[frame["status"] == "completed"]
    metrics = [m for m in summary.space.metrics if m in done]
    stats = done.groupby("config")[metrics].agg(["mean", "std", "count"])
    stats.columns = [f"{m}.{s}" for m, s in stats.columns]
    merged = pd.DataFrame(configs).merge(stats.reset_index(), on="config", how="left")
    _csv(summary.path, REPEATS_SUMMARY_FILE, merged)
    print(f"repeats: {summary.path}/{REPEATS_SUMMARY_FILE}")
    print(merged.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    summary.repeats = merged
    return summary


def _csv(base: str, name: str, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    _write_text(base, name, buf.getvalue())


def load_results(exp_path: str | Path) -> pd.DataFrame:
    """``results.csv`` of an experiment folder as a DataFrame."""
    fs, root = _fs(str(exp_path))
    text = _read_text(fs, f"{root.rstrip('/')}/{RESULTS_FILE}")
    if text is None:
        raise FileNotFoundError(f"{exp_path}/{RESULTS_FILE}")
    return pd.read_csv(io.StringIO(text))


def read_outcome(trial_dir: str) -> dict[str, Any] | None:
    fs, root = _fs(trial_dir)
    text = _read_text(fs, f"{root}/{OUTCOME_FILE}")
    return json.loads(text) if text else None
