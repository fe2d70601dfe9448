"""The dev metrics: each kind's definition and name, the overall score, and the report keys.

Two kinds of metric, as the CS224N multitask project scores its tasks (section 4.1 of the paper):

* ``accuracy``: the share of examples whose predicted class is the gold one (classification).
* ``pearson``: the Pearson correlation r of predicted and gold scores (regression), computed by
  ``scipy.stats.pearsonr``; undefined (None, never a number that looks real) for fewer than two
  examples or a constant side.

A task's metric is named ``<task>_<suffix>`` (``sst_acc``, ``sts_pearson``; :func:`metric_name`,
which :attr:`mtl.tasks.Task.metric_name` uses); ``overall`` is the mean of the tasks' metrics on
a 0..1 scale (:func:`overall_score`), and ``best_<metric>`` the best value so far in a run
(:func:`best_key`). Which metric a task has is the task's (:mod:`mtl.tasks`); every other module
asks this one for names and scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mtl.tasks import Task

# The score of all dev metrics together (see overall_score).
OVERALL = "overall"
OVERALL_TITLE = "Overall Score"
# Short names of the metric kinds, used in each task's metric name (``sst_acc``, ``sts_pearson``).
METRIC_SUFFIX = {"accuracy": "acc", "pearson": "pearson"}
# Column-name endings in tables (``SST Acc.``, ``STS Corr.``).
METRIC_TITLE = {"accuracy": "Acc.", "pearson": "Corr."}


def metric_name(task: str, kind: str) -> str:
    """The key of task ``task``'s metric of kind ``kind`` (``accuracy``/``pearson``), e.g.
    ``sst_acc``: in metrics, results.csv and TensorBoard."""
    return f"{task}_{METRIC_SUFFIX[kind]}"


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    """Share of ``pred`` equal to ``gold`` (same shape, classes)."""
    return float((np.asarray(pred) == np.asarray(gold)).mean())


def pearson_undefined(pred: np.ndarray, gold: np.ndarray) -> str | None:
    """Why the Pearson correlation of ``pred`` and ``gold`` is undefined, or None when it is not.

    It is undefined for fewer than two examples and when either side is constant (a zero
    variance in the denominator).
    """
    pred = np.asarray(pred, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if pred.size < 2:
        return f"{pred.size} example{'' if pred.size == 1 else 's'}"
    if np.ptp(pred) == 0:
        return f"every prediction is {pred[0]:g}"
    if np.ptp(gold) == 0:
        return f"every gold score is {gold[0]:g}"
    return None


def pearson(pred: np.ndarray, gold: np.ndarray) -> float | None:
    """Pearson correlation (``scipy.stats.pearsonr``); None when undefined (see
    :func:`pearson_undefined`), never a number that looks real."""
    if pearson_undefined(pred, gold) is not None:
        return None
    # Imported here: scipy.stats costs a second of CPU, and every process that reads a config
    # imports this module, among them the search's data cache, which a fresh trial waits for.
    # Search workers import it as they start (mtl.search.warmup.WARM_MODULES).
    from scipy import stats

    return float(stats.pearsonr(np.asarray(pred, np.float64), np.asarray(gold, np.float64))[0])


def score(kind: str, pred: np.ndarray, gold: np.ndarray) -> float | None:
    """The metric of ``kind`` on ``pred`` against ``gold`` (None: an undefined Pearson r)."""
    return pearson(pred, gold) if kind == "pearson" else accuracy(pred, gold)


def unit_score(kind: str, value: float | None) -> float:
    """A metric on the overall score's 0..1 scale: an accuracy as it is, a Pearson r as
    (r + 1) / 2 with an undefined r counted as 0 (no correlation)."""
    if kind == "pearson":
        return ((value or 0.0) + 1.0) / 2.0
    return float(value)  # type: ignore[arg-type]


def task_metrics(tasks: Iterable[Task]) -> dict[str, Task]:
    """Metric name -> its task."""
    return {t.metric_name: t for t in tasks}


def metric_names(tasks: Iterable[Task]) -> tuple[str, ...]:
    """The tasks' dev metrics, then ``overall``: the paper's column order (Tables 1 to 6)."""
    return (*(t.metric_name for t in tasks), OVERALL)


def record_metrics(tasks: Iterable[Task]) -> tuple[str, ...]:
    """``overall``, then the tasks' dev metrics: the order of results.csv and a search's records."""
    return (OVERALL, *(t.metric_name for t in tasks))


def best_key(metric: str) -> str:
    """The report key of the best ``metric`` so far in a run (what the trainer reports after each
    evaluation, and what ASHA, Tune's checkpoint ranking and the search board compare)."""
    return f"best_{metric}"


def metric_titles(tasks: Iterable[Task]) -> dict[str, str]:
    """Metric name -> its column name in tables (``SST Acc.``, ..., ``Overall Score``)."""
    return {**{t.metric_name: t.metric_title for t in tasks}, OVERALL: OVERALL_TITLE}


def overall_score(
    metrics: Mapping[str, float | None], tasks: Iterable[Task] | None = None
) -> float:
    """The mean over the tasks present in ``metrics`` of :meth:`mtl.tasks.Task.unit_score`.

    With the built-in tasks, the CS224N overall score
    ``(sst_acc + para_acc + (sts_pearson + 1) / 2) / 3``; with fewer tasks the mean over those
    present, with more (a task declared in the config) one more term of the same weight. An
    undefined Pearson correlation (None) counts as 0, so the score stays a number that
    checkpoint selection can compare.

    Args:
        metrics: Metric name -> value (other keys are ignored).
        tasks: The tasks whose metrics may be present (default: the built-in ones).
    """
    if tasks is None:
        from mtl.tasks import BUILTIN

        tasks = BUILTIN.values()
    known = list(tasks)
    parts = [t.unit_score(metrics[t.metric_name]) for t in known if t.metric_name in metrics]
    return sum(parts) / len(parts)


def unmeasured(metric: str, tasks: Iterable[Task], configured_names: Iterable[str]) -> str | None:
    """Why ``metric`` cannot be measured when training ``configured_names`` (None: it can).

    Args:
        metric: A metric name, e.g. ``sts_pearson`` or ``overall``.
        tasks: Every task the config knows (:func:`mtl.tasks.registry`).
        configured_names: The names in ``data.tasks``.
    """
    names = tuple(configured_names)
    by_metric = task_metrics(tasks)
    if metric == OVERALL:
        return None
    if metric not in by_metric:
        known = ", ".join(metric_names(by_metric.values()))
        return f"{metric!r} is not a metric (expected one of {known})"
    task = by_metric[metric].name
    if task in names:
        return None
    return f"{metric!r} is a metric of task {task}, which is not in data.tasks ({', '.join(names)})"
