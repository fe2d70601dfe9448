"""The tasks: one :class:`Task` per task holds everything that differs between tasks.

A task is data, as MT-DNN's ``task_def.yml`` declares its tasks: its files and columns, how a
label is parsed, how many outputs its head has, its loss, probabilities and decision, its dev
metric's kind (the metric itself and its name: :mod:`mtl.metrics`), the divergence SMART measures on
its outputs, and its submission file's header and number format. The rest of the code asks the task;
no other module compares a task's name (``tests/test_tasks.py`` greps for it).

Three tasks are built in (:data:`BUILTIN`), the CS224N multitask project's (section 4.1 of the
paper):

* ``sst``: SST-5 sentiment, 5-way classification of one sentence (cross-entropy, accuracy).
* ``para``: Quora paraphrase detection, a binary classification of a pair (one logit, binary
  cross-entropy, accuracy).
* ``sts``: STS similarity, a 0..5 regression of a pair (mean-squared error, Pearson correlation).

A further task is declared in the trainer config (``data.custom_tasks``, see
:class:`mtl.config.TaskConfig` and README's "Adding a task") and built by :func:`from_config`.
The rules are those of the three built-in tasks, chosen by the task's kind: a classification
with 2 labels has one logit (like ``para``), with more a logit per class (like ``sst``); a
regression predicts its score directly (like ``sts``).

The overall score (:func:`mtl.metrics.overall_score`) is the mean over the configured tasks of each task's
metric on a 0..1 scale: an accuracy as it is, a Pearson correlation r as (r + 1) / 2. With the
three built-in tasks this is the CS224N formula ``(sst_acc + para_acc + (sts_pearson + 1) / 2) / 3``;
a fourth task adds a fourth term with the same weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtl import metrics as metrics_lib

if TYPE_CHECKING:
    from mtl.config import DataConfig, TaskConfig

SPLITS: tuple[str, ...] = ("train", "dev", "test")


@dataclass(frozen=True)
class Task:
    """One task: its data, its head's output, loss, decision, metric and submission format.

    Attributes:
        name: The task's key in configs, batches, heads and PALs, e.g. ``sst``.
        title: The task's name in tables and plots, e.g. ``SST``.
        kind: ``classification`` (labels 0..num_labels-1) or ``regression`` (a score).
        pair: Whether an example is a pair of sentences (else one sentence).
        files: Split -> file name in the data folder (``test`` may be absent).
        text_columns: The sentence column, or the two sentence columns of a pair.
        label_column: The gold label's column (train and dev files).
        id_column: The example id's column.
        num_labels: Classes of a classification; None for a regression.
        score_range: (lowest, highest) gold score of a regression; None for a classification.
        metric: ``accuracy`` (classification) or ``pearson`` (regression).
        metric_title: The metric's column name in tables, e.g. ``SST Acc.``.
        prediction_header: The value column's name in the submission file.
        label_names: Names of the classes for plots (None: the class numbers).
        quoted_twice: Sentences were quoted once more before the csv writer quoted them (the
            published Quora files): a well-formed field is unquoted once more after parsing.
    """

    name: str
    title: str
    kind: Literal["classification", "regression"]
    pair: bool
    files: Mapping[str, str]
    text_columns: tuple[str, ...]
    label_column: str
    id_column: str = "id"
    num_labels: int | None = None
    score_range: tuple[float, float] | None = None
    metric: Literal["accuracy", "pearson"] = "accuracy"
    metric_title: str = ""
    prediction_header: str = ""
    label_names: tuple[str, ...] | None = None
    quoted_twice: bool = False

    def __post_init__(self) -> None:
        if self.kind == "classification" and (self.num_labels or 0) < 2:
            raise ValueError(f"task {self.name}: a classification needs num_labels >= 2")
        if self.kind == "regression" and self.score_range is None:
            raise ValueError(f"task {self.name}: a regression needs score_range")
        if len(self.text_columns) != (2 if self.pair else 1):
            raise ValueError(f"task {self.name}: {len(self.text_columns)} text columns")
        if not self.metric_title:
            object.__setattr__(
                self, "metric_title", f"{self.title} {metrics_lib.METRIC_TITLE[self.metric]}"
            )
        if not self.prediction_header:
            object.__setattr__(self, "prediction_header", f"Predicted_{self.label_column}")

    def __hash__(self) -> int:
        return hash((self.name, self.kind, self.pair, tuple(self.files.items())))

    # ------------------------------------------------------------------------- names

    @property
    def metric_name(self) -> str:
        """The dev metric's key in metrics, results.csv and TensorBoard, e.g. ``sst_acc``."""
        return metrics_lib.metric_name(self.name, self.metric)

    # ------------------------------------------------------------------------- files and labels

    def file(self, split: str) -> str | None:
        """The file name of ``split`` (None: the task has no such file, e.g. no test file)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return self.files.get(split)

    def columns(self, split: str) -> tuple[str, ...]:
        """Columns a file of ``split`` must have (test files have no label)."""
        label = () if split == "test" else (self.label_column,)
        return (self.id_column, *self.text_columns, *label)

    def parse_label(self, text: str) -> tuple[int | float | None, str | None]:
        """``(label, None)`` or ``(None, reason)`` for one gold label as written in a file.

        A classification label is a whole number 0..num_labels-1 (``3`` or ``3.0``), returned as
        an int when the head has a logit per class and as a float 0.0/1.0 for one binary logit
        (:func:`mtl.data.encode` makes ints long and floats float32 tensors); a regression label
        is a number in ``score_range``, returned as a float.
        """
        text = text.strip()
        if not text:
            return None, "empty label"
        try:
            value = float(text)
        except ValueError:
            return None, "label not a number"
        if self.kind == "regression":
            assert self.score_range is not None
            low, high = self.score_range
            return (value, None) if low <= value <= high else (None, "label out of range")
        assert self.num_labels is not None
        if not (value.is_integer() and 0 <= value < self.num_labels):
            return None, "label out of range"
        return (float(value), None) if self.binary else (int(value), None)

    # ------------------------------------------------------------------------- the head's output

    @property
    def binary(self) -> bool:
        """A classification of 2 labels: one logit, the log-odds of label 1."""
        return self.kind == "classification" and self.num_labels == 2

    @property
    def num_outputs(self) -> int:
        """Outputs of the head: a logit per class, else one (a binary logit or a score)."""
        return self.num_labels if self.kind == "classification" and not self.binary else 1  # type: ignore[return-value]

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean loss of one batch: cross-entropy, binary cross-entropy on the logit, or MSE.

        Args:
            logits: (batch, num_labels) class logits, or (batch,) binary logits or scores.
            labels: (batch,) long classes, or float 0/1 labels or scores.
        """
        if self.kind == "regression":
            return F.mse_loss(logits.float(), labels.float())
        if self.binary:
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def predict(self, logits: Tensor) -> Tensor:
        """Submission-format predictions from logits: the class, 0/1, or the raw score."""
        if self.kind == "regression":
            return logits.float()
        if self.binary:
            return (logits > 0).long()
        return logits.argmax(-1)

    def probabilities(self, logits: Tensor) -> Tensor:
        """What an ensemble averages: softmax (batch, num_labels), sigmoid (batch,) or the
        score (batch,)."""
        if self.kind == "regression":
            return logits
        if self.binary:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Submission-format predictions from (mean) :meth:`probabilities`."""
        if self.kind == "regression":
            return probabilities
        if self.binary:
            return (probabilities > 0.5).astype(np.int64)
        return probabilities.argmax(-1)

    def divergence(self, logits: Tensor, other: Tensor) -> Tensor:
        """SMART's l_s between two outputs of the head: the symmetric KL divergence of the class
        distributions (classification) or the squared error (regression); see
        :func:`mtl.smart.divergence`."""
        from mtl.smart import binary_log_probs, squared_error, symmetric_kl

        if self.kind == "regression":
            return squared_error(logits, other)
        if self.binary:
            return symmetric_kl(binary_log_probs(logits), binary_log_probs(other))
        return symmetric_kl(F.log_softmax(logits, -1), F.log_softmax(other, -1))

    # ------------------------------------------------------------------------- metric and files

    def score(self, pred: np.ndarray, gold: np.ndarray) -> float | None:
        """The dev metric: accuracy, or the Pearson correlation (None when undefined)."""
        return metrics_lib.score(self.metric, pred, gold)

    def unit_score(self, value: float | None) -> float:
        """The metric on the overall score's 0..1 scale: an accuracy as it is, a Pearson r as
        (r + 1) / 2 with an undefined r counted as 0 (no correlation)."""
        return metrics_lib.unit_score(self.metric, value)

    def format_value(self, prediction: float) -> str:
        """One prediction as the submission file writes it: a class or 6 decimals."""
        return f"{prediction:.6f}" if self.kind == "regression" else str(int(prediction))

    def exact(self, value: float) -> int | float:
        """A prediction or gold label as an exact Python number (int for a class)."""
        return float(value) if self.kind == "regression" else int(value)


def _cs224n_files(prefix: str) -> dict[str, str]:
    return {
        "train": f"{prefix}-train.csv",
        "dev": f"{prefix}-dev.csv",
        "test": f"{prefix}-test-student.csv",
    }


SST = Task(
    name="sst",
    title="SST",
    kind="classification",
    num_labels=5,
    pair=False,
    files=_cs224n_files("ids-sst"),
    text_columns=("sentence",),
    label_column="sentiment",
    metric="accuracy",
    prediction_header="Predicted_Sentiment",
    label_names=(
        "0 negative",
        "1 somewhat negative",
        "2 neutral",
        "3 somewhat positive",
        "4 positive",
    ),
)
PARA = Task(
    name="para",
    title="Quora",
    kind="classification",
    num_labels=2,
    pair=True,
    files=_cs224n_files("quora"),
    text_columns=("sentence1", "sentence2"),
    label_column="is_duplicate",
    metric="accuracy",
    metric_title="Paraphrase Acc.",
    prediction_header="Predicted_Is_Paraphrase",
    label_names=("not paraphrase", "paraphrase"),
    quoted_twice=True,
)
STS = Task(
    name="sts",
    title="STS",
    kind="regression",
    score_range=(0.0, 5.0),
    pair=True,
    files=_cs224n_files("sts"),
    text_columns=("sentence1", "sentence2"),
    label_column="similarity",
    metric="pearson",
    prediction_header="Predicted_Similiary",  # sic: the CS224N grader's spelling
)
# The built-in tasks, in the paper's order (its tables' columns, the default data.tasks).
BUILTIN: dict[str, Task] = {t.name: t for t in (SST, PARA, STS)}
# The task whose duplicate pairs stage-1 contrastive pretraining trains on (section 4.5).
STAGE1_TASK = PARA.name


def from_config(spec: TaskConfig) -> Task:
    """The :class:`Task` a trainer config declares (``data.custom_tasks``)."""
    files = {"train": spec.train_file, "dev": spec.dev_file}
    if spec.test_file is not None:
        files["test"] = spec.test_file
    metric = spec.metric or ("pearson" if spec.kind == "regression" else "accuracy")
    return Task(
        name=spec.name,
        title=spec.title or spec.name,
        kind=spec.kind,
        pair=spec.pair,
        files=files,
        text_columns=tuple(spec.text_columns),
        label_column=spec.label_column,
        id_column=spec.id_column,
        num_labels=spec.num_labels,
        score_range=tuple(spec.score_range) if spec.score_range is not None else None,  # type: ignore[arg-type]
        metric=metric,
        prediction_header=spec.prediction_header or "",
        label_names=tuple(spec.label_names) if spec.label_names else None,
    )


def registry(data: DataConfig | None = None) -> dict[str, Task]:
    """Every task a config knows: the built-in ones, then those ``data.custom_tasks`` declares
    (in that order: the order of the model's heads)."""
    tasks = dict(BUILTIN)
    for spec in data.custom_tasks if data is not None else ():
        tasks[spec.name] = from_config(spec)
    return tasks


def configured(data: DataConfig) -> list[Task]:
    """The tasks of ``data.tasks``, in that order."""
    known = registry(data)
    return [known[name] for name in data.tasks]


def as_task(task: Task | str) -> Task:
    """``task`` itself, or the built-in task of that name (a task a config declares has to be
    passed as a :class:`Task`: only the config knows it)."""
    if isinstance(task, Task):
        return task
    if task not in BUILTIN:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(BUILTIN)}")
    return BUILTIN[task]
