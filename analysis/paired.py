"""Paired comparisons of two configurations on the same dev examples.

Every run keeps its dev predictions and gold labels at its best evaluation
(``dev_predictions.csv``, written by :func:`mtl.evaluation.write_dev_predictions`). Two sides A (the
base) and B (the base plus one choice) are compared by the difference ``B - A`` of each dev metric
(SST accuracy, paraphrase accuracy, STS Pearson) and of the overall score, computed on the
examples both sides predicted:

* **95% confidence interval**: a paired bootstrap over dev examples (Efron and Tibshirani 1993;
  Koehn 2004 for its use in NLP), by :func:`scipy.stats.bootstrap` with the percentile method
  (BCa is undefined for the degenerate distribution of identical predictions). Each resample draws
  every task's examples with replacement, independently per task, and scores *both* sides on the
  same drawn examples; STS Pearson is recomputed on each resample, and the overall score is the
  CS224N formula (:func:`mtl.metrics.overall_score`) of the resampled task metrics.
* **p-value**: a two-sided paired permutation test (approximate randomization: Noreen 1989;
  Dror et al. 2018), by :func:`scipy.stats.permutation_test` with ``permutation_type='samples'``:
  under the null hypothesis the two sides are exchangeable on each example, so each permutation
  swaps A's and B's predictions of a random subset of examples.
* **Seeds**: with runs of both sides under several seeds, runs are paired by seed (the same seed
  sees the same data order, initialisation and dev subsample), and every statistic is the mean
  over seed pairs of the per-pair difference, on the same resampled (or swapped) examples. The
  examples are then the only resampled source of noise: the seeds enter as a fixed set of paired
  runs, so an interval says how much the dev examples move the mean difference *of these seeds*,
  not how much a new seed would.

An interval that excludes 0 marks a difference as *significant* (on these dev examples: a finding
about this dev set, not a prediction for new data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from analysis.common import COLUMN_NAMES, AnalysisError, ExperimentView, save_figure
from mtl.evaluation import DEV_PREDICTIONS_FILE
from mtl.metrics import OVERALL, metric_names
from mtl.tasks import BUILTIN, Task

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 9999
BATCH = 250  # bootstrap resamples scored at once (memory: batch x examples counts)
# Permutations scored at once: scipy's paired ("samples") test loops in Python over the examples
# once per batch, so large batches matter (memory: batch x examples swap indicators).
PERMUTATION_BATCH = 2000
_TOLERANCE = 1e-12  # an interval end this close to 0 counts as 0
_CONSTANT = 1e-12  # a variance this small relative to the mean square: a constant side
# Runs whose dev examples only partly overlap (per task and seed pair) must share this many: a
# bootstrap resample draws from the union of examples, and one that draws none a seed pair shares
# leaves that pair's metric undefined (NaN: an interval of NaN); with s shared of n that happens
# with probability (1 - s/n)^n < e^-s per resample: about 0.5 over 9999 resamples at s = 10,
# 1e-9 at s = 30. Runs that share every example cannot meet it, and need only MIN_EXAMPLES.
MIN_SHARED = 30
MIN_EXAMPLES = 10  # fewer dev examples of a task: too few to compare at all


# ---------------------------------------------------------------------------------------------
# Reading the runs' predictions


def read_dev_predictions(path: Path, tasks: Mapping[str, Task] = BUILTIN) -> pd.DataFrame:
    """A ``dev_predictions.csv``: columns task, id, prediction, gold (one row per dev example,
    in the dev file's order; prediction and gold as floats).

    ``tasks``: the tasks the run may have predicted (:attr:`ExperimentView.tasks`).

    Raises:
        AnalysisError: the file is unreadable, lacks a column, names an unknown task, or has a
            prediction or gold label that is not a finite number (one line naming the file, and
            the line for a bad cell).
    """
    try:
        frame = pd.read_csv(path, dtype={"task": str, "id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise AnalysisError(f"{path}: unreadable ({type(err).__name__})") from None
    missing = sorted({"task", "id", "prediction", "gold"} - set(frame.columns))
    if missing:
        raise AnalysisError(f"{path}: missing columns {', '.join(missing)}")
    unknown = sorted(set(frame["task"]) - set(tasks), key=str)
    if unknown:
        raise AnalysisError(f"{path}: unknown task {unknown[0]!r}")
    if frame["id"].isna().any():
        raise AnalysisError(
            f"{path}: line {int(frame['id'].isna().to_numpy().argmax()) + 2}: no id"
        )
    for column in ("prediction", "gold"):
        # An empty or unparsable cell would be a NaN that makes every difference and interval
        # NaN (and the permutation test's p-value about 2 / resamples).
        values = pd.to_numeric(frame[column], errors="coerce").astype(float)
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            row = int(bad.argmax())
            raise AnalysisError(
                f"{path}: line {row + 2}: {column} {frame[column].iloc[row]!r} "
                "is not a finite number"
            )
        frame[column] = values
    return frame


def prediction_file(exp: ExperimentView, trial_id: str) -> Path | None:
    """The run folder's ``dev_predictions.csv`` of a trial of the search or of a seed repeat's
    run (:meth:`~analysis.common.ExperimentView.trial_dir`); None when absent."""
    try:
        path = exp.trial_dir(trial_id) / DEV_PREDICTIONS_FILE
    except AnalysisError:  # a run neither results.csv nor repeats.csv nor its folder knows
        return None
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Aligned predictions


class NotComparable(Exception):
    """The two sides cannot be compared on the same dev examples (the message says why)."""


@dataclass(frozen=True)
class TaskPairs:
    """One task's predictions of both sides, aligned by example id.

    Attributes:
        task: The task.
        gold: (n,) gold labels of the union of examples any run predicted.
        a: (pairs, n) side A's predictions, one row per seed pair (0 where not predicted).
        b: (pairs, n) side B's predictions.
        both: (pairs, n) whether both runs of the pair predicted the example.
    """

    task: Task
    gold: np.ndarray
    a: np.ndarray
    b: np.ndarray
    both: np.ndarray

    @property
    def n(self) -> int:
        return len(self.gold)


def align(
    pairs: Sequence[tuple[pd.DataFrame, pd.DataFrame]],
    source: str,
    tasks: Mapping[str, Task] = BUILTIN,
) -> list[TaskPairs]:
    """The tasks the runs predicted, each as :class:`TaskPairs` over the union of examples.

    An example is its id and, for an id the dev file repeats (:mod:`mtl.data` keeps such rows and
    the trainer scores each), its occurrence: the k-th row with that id in one run's file meets
    the k-th in another's (every run writes the dev examples in the file's order).

    Args:
        pairs: (side A, side B) prediction frames (:func:`read_dev_predictions`), one per seed.
        source: what the frames are, for the error message.
        tasks: the tasks the runs may have predicted, in the order to compare them.

    Raises:
        NotComparable: a task some runs predicted and others did not.
        AnalysisError: one example with two different gold labels.
    """
    key = ["id", "occurrence"]  # an example: its id, and which row with that id in its file
    frames = [f for pair in pairs for f in pair]
    present = [t for t in tasks.values() if any((f["task"] == t.name).any() for f in frames)]
    for task in present:
        # A task only some runs predicted would drop out of the overall score of the ones that
        # did: the overall difference would compare unlike scores.
        lacking = [
            f"side {'AB'[i % 2]} of seed pair {i // 2 + 1}"
            for i, f in enumerate(frames)
            if not (f["task"] == task.name).any()
        ]
        if lacking:
            raise NotComparable(
                f"{task.name} has no dev predictions in {', '.join(lacking)} (the runs "
                "trained different data.tasks, or a predictions file lacks the task)"
            )
    out = []
    for task in present:
        rows = [f[f["task"] == task.name] for f in frames]
        rows = [r.assign(occurrence=r.groupby("id").cumcount()) for r in rows]
        gold = pd.concat([r[[*key, "gold"]] for r in rows]).drop_duplicates()
        if gold.duplicated(key).any():
            bad = gold.loc[gold.duplicated(key), "id"].iloc[0]
            raise AnalysisError(f"{source}: {task.name} example {bad} has two gold labels")
        index = pd.MultiIndex.from_frame(gold[key])

        def spread(r: pd.DataFrame, index: pd.Index = index) -> tuple[np.ndarray, np.ndarray]:
            where = index.get_indexer(pd.MultiIndex.from_frame(r[key]))
            values, seen = np.zeros(len(index)), np.zeros(len(index), dtype=bool)
            values[where], seen[where] = r["prediction"].to_numpy(float), True
            return values, seen

        a, b, both = [], [], []
        for ra, rb in zip(rows[0::2], rows[1::2], strict=True):
            (va, sa), (vb, sb) = spread(ra), spread(rb)
            a.append(va)
            b.append(vb)
            both.append(sa & sb)
        out.append(
            TaskPairs(task, gold["gold"].to_numpy(float), np.array(a), np.array(b), np.array(both))
        )
    return out


# ---------------------------------------------------------------------------------------------
# Metrics from per-example sums
#
# Each metric is a function of a few sums over examples (accuracy: the count and the correct
# count; Pearson: the count and the sums of x, x^2, xy, y, y^2). A bootstrap resample weighs each
# example by how often it was drawn, and a permutation swaps A and B on some examples, which
# (predictions being 0/1-selected) is linear in the swap indicator too: so every resample and
# every permutation is one matrix product, (batch, n) @ (n, features), instead of a gather of
# (pairs, batch, n) predictions.


def features(
    task: Task, pred: np.ndarray, gold: np.ndarray, weight: np.ndarray, center: np.ndarray
) -> np.ndarray:
    """(pairs, n, F) per-example terms whose sums give the task's metric (:func:`from_sums`).

    Args:
        pred: (pairs, n) predictions; gold: (n,) labels; weight: (pairs, n) 1 where the example
            counts; center: (pairs, 1) subtracted from STS predictions (the same for both sides,
            so that swapping predictions swaps their terms) for better-conditioned sums.
    """
    if task.metric == "accuracy":
        return np.stack([weight, weight * (pred == gold)], axis=-1)
    x = pred - center
    y = np.broadcast_to(gold - gold.mean(), x.shape)
    terms = [weight, weight * x, weight * x * x, weight * x * y, weight * y, weight * y * y]
    return np.stack(terms, axis=-1)


def from_sums(task: Task, sums: np.ndarray) -> np.ndarray:
    """The metric from (..., F) sums of :func:`features`: accuracy, or Pearson's r (0 where
    either side is constant: the overall score counts an undefined correlation as 0, as
    :func:`mtl.metrics.overall_score` does)."""
    n = sums[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        if task.metric == "accuracy":
            return sums[..., 1] / n
        mx, my = sums[..., 1] / n, sums[..., 4] / n
        sxx, syy = sums[..., 2] / n, sums[..., 5] / n
        vx, vy = sxx - mx * mx, syy - my * my
        r = (sums[..., 3] / n - mx * my) / np.sqrt(vx * vy)
    constant = (vx <= _CONSTANT * sxx) | (vy <= _CONSTANT * syy)
    return np.where(constant, 0.0, np.clip(r, -1.0, 1.0))


def _difference(tasks: list[TaskPairs], metric: str, sums: Callable[[int], tuple]) -> np.ndarray:
    """Mean over seed pairs of ``metric(B) - metric(A)``; ``sums(i)`` gives task ``i``'s (A's,
    B's) sums, each (pairs, ..., F), as one resample or permutation sees them."""
    parts = []
    for i, tp in enumerate(tasks):
        if metric not in (OVERALL, tp.task.metric_name):
            continue
        sa, sb = sums(i)
        diff = from_sums(tp.task, sb) - from_sums(tp.task, sa)  # (pairs, ...)
        if metric == OVERALL:
            # The overall score counts each metric on a 0..1 scale, an affine map (Pearson:
            # (r + 1) / 2): a difference scales by its slope.
            diff = diff * (tp.task.unit_score(1.0) - tp.task.unit_score(0.0))
        parts.append(diff.mean(0))  # over seed pairs
    return parts[0] if metric != "overall" else sum(parts) / len(parts)


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass(frozen=True)
class Comparison:
    """``B - A`` for one metric: the difference on the dev examples, its 95% bootstrap interval
    and the permutation test's p-value."""

    metric: str
    difference: float
    low: float
    high: float
    p_value: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (by more than floating-point noise)."""
        return self.low > _TOLERANCE or self.high < -_TOLERANCE


def compare(
    pairs: Sequence[tuple[pd.DataFrame, pd.DataFrame]],
    source: str,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    tasks: Mapping[str, Task] = BUILTIN,
) -> tuple[list[Comparison], dict[str, int]]:
    """Paired bootstrap interval and permutation p-value of ``B - A`` for each metric.

    Args:
        pairs: (A, B) dev prediction frames (:func:`read_dev_predictions`), one per seed pair.
        source: what is compared, for error messages.
        resamples: bootstrap resamples and permutations (scipy's default 9999).
        seed: seeds both tests (``numpy.random.default_rng(seed)``); every metric is computed
            from the same resampled examples and the same permutations.
        tasks: the tasks the runs may have predicted (:attr:`ExperimentView.tasks`).

    Returns:
        One :class:`Comparison` per metric present (per task, then overall), and
        the number of examples per task both sides predicted (the union over seed pairs).

    Raises:
        NotComparable: a task where a seed pair shares fewer than ``MIN_EXAMPLES`` examples,
            or fewer than ``MIN_SHARED`` but not all of them, or that some runs predicted and
            others did not.
        AnalysisError: no task predicted, or an example with two gold labels.
    """
    known = tasks
    tasks = align(pairs, source, known)
    if not tasks:
        raise AnalysisError(f"{source}: no task predicted")
    for tp in tasks:
        shared = int(tp.both.sum(1).min())
        if shared < MIN_EXAMPLES:
            raise NotComparable(f"{tp.task.name}: only {shared} dev examples in common")
        if shared < min(MIN_SHARED, tp.n):
            raise NotComparable(
                f"{tp.task.name}: only {shared} of {tp.n} dev examples in common (the runs "
                "evaluated different dev subsamples: a different data.max_eval_examples)"
            )
    samples = tuple(np.arange(tp.n) for tp in tasks)
    offsets = np.cumsum([0] + [tp.n for tp in tasks])
    total = int(offsets[-1])

    weight = [tp.both.astype(float) for tp in tasks]
    center = [(tp.a + tp.b).mean(1, keepdims=True) / 2 for tp in tasks]
    xa, xb = (
        [
            features(tp.task, getattr(tp, side), tp.gold, w, c)
            for tp, w, c in zip(tasks, weight, center, strict=True)
        ]
        for side in ("a", "b")
    )

    def resampled(i: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # idx: (..., n) drawn positions -> counts: (..., n) draws of each example
        n = tasks[i].n
        rows = idx.reshape(-1, n)
        flat = (np.arange(len(rows))[:, None] * n + rows).ravel()
        counts = np.bincount(flat, minlength=rows.size).reshape(idx.shape).astype(float)
        # (pairs, n, F) summed with the counts: (pairs, ..., F)
        return tuple(np.einsum("...n,knf->k...f", counts, x[i]) for x in (xa, xb))

    def swapped(i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # x: (..., total) codes; a code >= total means this example's A and B trade places
        swap = (x[..., offsets[i] : offsets[i + 1]] >= total).astype(float)  # (..., n)
        # Swapping is linear in the indicator: A' = A + swap (B - A), B' = B - swap (B - A).
        delta = np.einsum("...n,knf->k...f", swap, xb[i] - xa[i])
        base_a, base_b = xa[i].sum(1), xb[i].sum(1)  # (pairs, F)
        extra = (slice(None),) + (None,) * (swap.ndim - 1)
        return base_a[extra] + delta, base_b[extra] - delta

    metrics = [m for m in metric_names(known.values()) if m == OVERALL or _has(tasks, m)]

    def differences(sums: Callable[[int], tuple], axis: int) -> np.ndarray:
        return np.stack([_difference(tasks, m, sums) for m in metrics], axis=axis)

    # All metrics in one call of each test, from the same resamples and permutations: the
    # bootstrap stacks a vector statistic first, (metrics, batch); the permutation test
    # concatenates batches along the first axis, so there it is (batch, metrics).
    def boot_stat(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return differences(lambda i: resampled(i, idx[i]), axis=0)

    def perm_stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return differences(lambda i: swapped(i, x), axis=-1)

    observed = boot_stat(*samples)
    boot = stats.bootstrap(
        samples,
        boot_stat,
        n_resamples=resamples,
        batch=BATCH,
        vectorized=True,
        paired=False,  # each task's examples are drawn on their own; both sides share them
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    perm = stats.permutation_test(
        (np.arange(total), np.arange(total) + total),
        perm_stat,
        permutation_type="samples",
        n_resamples=resamples,
        batch=PERMUTATION_BATCH,
        vectorized=True,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    low, high = (
        np.atleast_1d(boot.confidence_interval.low),
        np.atleast_1d(boot.confidence_interval.high),
    )
    pvalue = np.atleast_1d(perm.pvalue)
    out = [
        Comparison(m, float(observed[k]), float(low[k]), float(high[k]), float(pvalue[k]))
        for k, m in enumerate(metrics)
    ]
    return out, {tp.task.name: int(tp.both.any(0).sum()) for tp in tasks}


def _has(tasks: list[TaskPairs], metric: str) -> bool:
    return any(tp.task.metric_name == metric for tp in tasks)


# ---------------------------------------------------------------------------------------------
# Display


def fmt_diff(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:+.3f}"


def cell(row: dict, metric: str) -> str:
    """``+0.012 [-0.004, +0.030] p=0.14`` and a ``*`` when the interval excludes 0."""
    diff = row.get(f"{metric}_diff", math.nan)
    if diff is None or math.isnan(diff):
        return "—"
    mark = "*" if row[f"{metric}_significant"] else ""
    low, high, p = row[f"{metric}_low"], row[f"{metric}_high"], row[f"{metric}_p"]
    return f"{fmt_diff(diff)}{mark} [{fmt_diff(low)}, {fmt_diff(high)}] p={p:.3g}"


def forest_plot(
    frame: pd.DataFrame, title: str, png: Path, columns: Mapping[str, str] = COLUMN_NAMES
) -> Path:
    """Each comparison's difference with its 95% interval, one panel per task and overall.

    ``frame``: one row per comparison with ``comparison`` and ``<metric>_diff/_low/_high/
    _significant`` columns; ``columns``: metric -> its name (:attr:`ExperimentView.column_names`).
    Written with its data beside it (same name, .csv).
    """
    metrics = [m for m in columns if f"{m}_diff" in frame and frame[f"{m}_diff"].notna().any()]
    shown = frame[frame["overall_diff"].notna()] if "overall_diff" in frame else frame
    fig, axes = plt.subplots(
        1,
        max(1, len(metrics)),
        figsize=(3.2 * max(1, len(metrics)) + 2.5, 0.45 * max(1, len(shown)) + 1.6),
        sharey=True,
        squeeze=False,
    )
    y = np.arange(len(shown))[::-1]
    data = []
    for ax, m in zip(axes[0], metrics, strict=False):
        diff = shown[f"{m}_diff"].to_numpy(float)
        low, high = shown[f"{m}_low"].to_numpy(float), shown[f"{m}_high"].to_numpy(float)
        sig = shown[f"{m}_significant"].to_numpy(bool)
        ax.errorbar(
            diff, y, xerr=[diff - low, high - diff], fmt="none", ecolor="0.3", capsize=3, lw=1
        )
        ax.scatter(diff[sig], y[sig], color="C3", zorder=3, label="interval excludes 0")
        ax.scatter(diff[~sig], y[~sig], facecolor="white", edgecolor="C0", zorder=3)
        ax.axvline(0, color="k", lw=0.8, ls="--")
        ax.set_title(columns[m], fontsize=9)
        ax.set_xlabel("difference (95% CI)", fontsize=8)
        for c, d, lo, hi, s in zip(shown["comparison"], diff, low, high, sig, strict=True):
            data.append(
                {"comparison": c, "metric": m, "difference": d, "low": lo, "high": hi, "sig": s}
            )
    axes[0][0].set_yticks(y, list(shown["comparison"]), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, pd.DataFrame(data).rename(columns={"sig": "significant"}), png)
