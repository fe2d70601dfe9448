"""Evaluation and prediction files: dev metrics, and the predictions behind them written as the
CS224N submission files, ``dev_predictions.csv`` and ``MISSING.txt``.

Every task's decision, metric, header and number format is the task's own (:mod:`mtl.tasks`).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mtl import data as data_lib
from mtl.config import Config
from mtl.heads import MultitaskBert
from mtl.metrics import metric_names, overall_score, pearson_undefined
from mtl.tasks import Task, configured

log = logging.getLogger("mtl.train")


# The run folder's dev predictions and gold labels at the best evaluation so far.
DEV_PREDICTIONS_FILE = "dev_predictions.csv"


@torch.no_grad()
def split_outputs(
    model: MultitaskBert,
    enc: data_lib.Encoded,
    batch_size: int,
    device: torch.device,
    autocast,
    output: Callable[[Task, torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """``output(task, logits)`` for every example of one split, in the split's order, as float64.

    Batches are formed in evaluation order (:func:`mtl.data.batch_order` without a generator),
    so every caller (predictions, the ensemble's probabilities) sees the same batches and the
    same logits.
    """
    model.eval()
    task = model.tasks[enc.task]
    out: np.ndarray | None = None
    for indices in data_lib.batch_order(enc.lengths, batch_size, None):
        batch = data_lib.collate(enc, indices).to(device)
        with autocast():
            logits = model(batch).logits
        values = output(task, logits).cpu().numpy()
        if out is None:
            out = np.zeros((len(enc), *values.shape[1:]), dtype=np.float64)
        out[batch.index.cpu().numpy()] = values
    return out if out is not None else np.zeros(0, dtype=np.float64)


def predict_split(
    model: MultitaskBert, enc: data_lib.Encoded, batch_size: int, device: torch.device, autocast
) -> np.ndarray:
    """Predictions (:meth:`mtl.tasks.Task.predict`) for every example of one split, in the
    split's order."""
    return split_outputs(
        model, enc, batch_size, device, autocast, lambda task, logits: task.predict(logits).float()
    )


def evaluate(
    model: MultitaskBert,
    dev: dict[str, data_lib.Encoded],
    batch_size: int,
    device: torch.device,
    autocast,
) -> tuple[dict[str, float | None], dict[str, np.ndarray]]:
    """Dev metrics (per task and overall) and the predictions behind them.

    An undefined Pearson correlation (STS) is None, with a warning that says why; the overall
    score counts it as 0 (:func:`mtl.metrics.overall_score`).
    """
    metrics, preds = {}, {}
    for name, enc in dev.items():
        task = model.tasks[name]
        preds[name] = predict_split(model, enc, batch_size, device, autocast)
        metrics[task.metric_name] = task.score(preds[name], enc.labels.numpy())
        if metrics[task.metric_name] is None:
            log.warning(
                "dev %s is undefined (%s): recorded as null; the overall score counts it as 0",
                task.metric_name,
                pearson_undefined(preds[name], enc.labels.numpy()),
            )
    metrics["overall"] = overall_score(metrics, model.tasks.values())
    return metrics, preds


def write_predictions(path: Path, task: Task, ids: list[str], preds: np.ndarray) -> None:
    """The CS224N submission format: a header line, then ``id , value`` per example."""
    lines = [f"id \t {task.prediction_header} \n"]
    for i, p in zip(ids, preds, strict=True):
        lines.append(f"{i} , {task.format_value(p)} \n")
    path.write_text("".join(lines))


def write_dev_predictions(
    path: Path,
    dev: dict[str, data_lib.Encoded],
    preds: dict[str, np.ndarray],
    tasks: Mapping[str, Task],
) -> None:
    """Every dev prediction beside its gold label: a CSV ``task,id,prediction,gold``.

    Written at each new best evaluation (so also for trials a scheduler stops), whatever
    ``train.write_predictions`` says: :mod:`analysis.paired` compares trials on these rows
    without reloading a model. Floats are written exactly (``repr``); the file is replaced
    atomically.
    """
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["task", "id", "prediction", "gold"])
    for task, enc in dev.items():
        cast = tasks[task].exact
        for row in zip(enc.ids, preds[task].tolist(), enc.labels.tolist(), strict=True):
            out.writerow([task, row[0], repr(cast(row[1])), repr(cast(row[2]))])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def write_all_predictions(
    out_dir: Path,
    model: MultitaskBert,
    data: data_lib.TaskData,
    tasks: list[str],
    batch_size: int,
    device: torch.device,
    autocast,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, sets in (("dev", data.dev), ("test", data.test)):
        for task in tasks:
            if task in sets:
                preds = predict_split(model, sets[task], batch_size, device, autocast)
                write_predictions(
                    out_dir / f"{task}-{split}-output.csv", model.tasks[task], sets[task].ids, preds
                )
    partial = [
        f"{task}-test-output.csv: {len(data.test[task])} of {data.test_rows[task]} test ids"
        for task in tasks
        if task in data.test and len(data.test[task]) < data.test_rows.get(task, 0)
    ]
    write_missing(out_dir, data.missing, partial)


def write_missing(
    out_dir: Path, missing: Sequence[str], partial: Sequence[str] = ()
) -> Path | None:
    """``MISSING.txt`` beside prediction files that are not a whole submission: the absent test
    files, and the test files predicted for a subsample only. Returns its path (None: nothing is
    missing, no file)."""
    notes = []
    if missing:
        notes += ["No test predictions for these absent files:", *missing]
    if partial:
        notes += ["Test predictions for a subsample only (data.max_eval_examples):", *partial]
        log.warning("test predictions are not a whole submission: %s", "; ".join(partial))
    if not notes:
        return None
    path = out_dir / "MISSING.txt"
    path.write_text("\n".join(notes) + "\n")
    return path


def format_metrics(metrics: Mapping[str, float | None], cfg: Config) -> str:
    keys = metric_names(configured(cfg.data))
    values = {
        k: "undefined" if metrics[k] is None else f"{metrics[k]:.4f}" for k in keys if k in metrics
    }
    return " ".join(f"{k}={v}" for k, v in values.items())
