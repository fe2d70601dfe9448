"""The task registry: each task's rules in one place, and no other code that switches on a name."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl import smart
from mtl.config import ConfigError, build_config
from mtl.metrics import metric_names, overall_score
from mtl.tasks import BUILTIN, PARA, SST, STS, as_task, from_config, registry

ROOT = Path(__file__).resolve().parents[1]
# The one module allowed to spell a task's name or metric name.
DEFINITIONS = ROOT / "mtl" / "tasks.py"


def _names() -> set[str]:
    return {*BUILTIN, *(t.metric_name for t in BUILTIN.values())}


def _literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant in ``path`` that is a task or metric name."""
    names = _names()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.append((node.lineno, node.value))
    return found


def test_no_code_outside_the_task_definitions_spells_a_task_name() -> None:
    """A task's rules live in mtl/tasks.py: no other module of mtl/ or analysis/ compares with,
    keys a table by, or otherwise spells a built-in task's name or its metric's name as a
    string constant (docstrings and comments are prose, not constants equal to a name)."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for folder in ("mtl", "analysis")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != DEFINITIONS
        for line, value in _literals(path)
    ]
    assert offenders == []


def test_the_grep_finds_a_switch_on_a_task_name(tmp_path: Path) -> None:
    """The check above would catch the switches the registry replaced."""
    path = tmp_path / "switch.py"
    path.write_text(
        'def loss(task):\n    if task == "sst":\n        return 1\n    return {"sts_pearson": 2}\n'
    )
    assert [v for _, v in _literals(path)] == ["sst", "sts_pearson"]


def test_builtin_tasks_keep_their_names_files_and_metrics() -> None:
    assert list(BUILTIN) == ["sst", "para", "sts"]
    assert metric_names(BUILTIN.values()) == ("sst_acc", "para_acc", "sts_pearson", "overall")
    assert SST.file("train") == "ids-sst-train.csv"
    assert PARA.file("test") == "quora-test-student.csv"
    assert STS.file("dev") == "sts-dev.csv"
    assert (SST.num_outputs, PARA.num_outputs, STS.num_outputs) == (5, 1, 1)
    assert STS.prediction_header == "Predicted_Similiary"


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        (SST, "3", (3, None)),
        (SST, "3.0", (3, None)),
        (SST, "5", (None, "label out of range")),
        (SST, "2.5", (None, "label out of range")),
        (PARA, "1", (1.0, None)),
        (PARA, "0.5", (None, "label out of range")),
        (STS, "4.6", (4.6, None)),
        (STS, "5.1", (None, "label out of range")),
        (STS, " ", (None, "empty label")),
        (STS, "x", (None, "label not a number")),
    ],
)
def test_label_parsing(task, text: str, expected: tuple) -> None:
    assert task.parse_label(text) == expected
    value = task.parse_label(text)[0]
    if value is not None:
        assert type(value) is (int if task is SST else float)


def test_rules_match_independent_formulas() -> None:
    logits = torch.tensor([[0.2, 1.5, -0.3, 0.0, 0.7]])
    assert SST.loss(logits, torch.tensor([1])).item() == pytest.approx(
        -torch.log_softmax(logits, -1)[0, 1].item()
    )
    z, y = torch.tensor([0.3, -1.2]), torch.tensor([1.0, 0.0])
    bce = -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    assert PARA.loss(z, y).item() == pytest.approx(bce.item(), rel=1e-6)
    assert STS.loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 5.0])).item() == 2.5
    # The decision from logits and from probabilities agree.
    for task, out in ((SST, logits), (PARA, z), (STS, z)):
        from_probs = task.decide(task.probabilities(out.double()).numpy())
        np.testing.assert_array_equal(from_probs, task.predict(out).numpy())
    # SMART's divergence of a binary logit is the symmetric KL of its two-class softmax.
    a, b = torch.tensor([0.3, -2.0]), torch.tensor([-0.1, 1.0])
    two = torch.stack([torch.zeros(2), a], -1), torch.stack([torch.zeros(2), b], -1)
    torch.testing.assert_close(PARA.divergence(a, b), SST.divergence(*two))
    torch.testing.assert_close(STS.divergence(a, b), F.mse_loss(a, b))
    assert smart.divergence("sts", a, b) == STS.divergence(a, b)


def test_overall_score_is_the_cs224n_formula_and_a_declared_task_adds_a_term() -> None:
    metrics = {"sst_acc": 0.5, "para_acc": 0.8, "sts_pearson": 0.6}
    assert overall_score(metrics) == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    cfg = build_config({"data": {"custom_tasks": [_binary_spec()], "tasks": ["sst", "sst2"]}})
    tasks = registry(cfg.data)
    assert overall_score({"sst_acc": 0.5, "sst2_acc": 0.9}, tasks.values()) == 0.7


def _binary_spec(**overrides: object) -> dict:
    return {
        "name": "sst2",
        "kind": "classification",
        "num_labels": 2,
        "train_file": "sst2-train.csv",
        "dev_file": "sst2-dev.csv",
        "text_columns": ["sentence"],
        "label_column": "label",
        **overrides,
    }


def test_a_declared_task_becomes_a_task() -> None:
    cfg = build_config(
        {
            "data": {"custom_tasks": [_binary_spec()], "tasks": ["sst2"]},
            "train": {"selection_metric": "sst2_acc"},
        }
    )
    task = registry(cfg.data)["sst2"]
    assert task == from_config(cfg.data.custom_tasks[0])
    assert (task.binary, task.num_outputs, task.metric_name, task.file("test")) == (
        True,
        1,
        "sst2_acc",
        None,
    )
    assert task.prediction_header == "Predicted_label"
    with pytest.raises(ValueError, match="unknown task 'sst2'"):
        as_task("sst2")  # only the config knows it


@pytest.mark.parametrize(
    ("data", "train", "match"),
    [
        ({"tasks": ["sst", "nli"]}, {}, r"data\.tasks\.1: unknown task 'nli'"),
        (
            {"custom_tasks": [_binary_spec(name="sst")]},
            {},
            r"the name of a built-in task",
        ),
        (
            {"custom_tasks": [_binary_spec(num_labels=None)]},
            {},
            r"a classification needs num_labels",
        ),
        (
            {"custom_tasks": [_binary_spec(kind="regression", num_labels=None)]},
            {},
            r"a regression needs score_range",
        ),
        (
            {"custom_tasks": [_binary_spec(pair=True)]},
            {},
            r"a pair needs 2 text_columns, got 1",
        ),
        (
            {"custom_tasks": [_binary_spec(metric="pearson")]},
            {},
            r"a classification's metric is accuracy",
        ),
        (
            {"custom_tasks": [_binary_spec(), _binary_spec()]},
            {},
            r"task sst2 is declared twice",
        ),
        (
            {"custom_tasks": [_binary_spec()], "tasks": ["sst"]},
            {"selection_metric": "sst2_acc"},
            r"train\.selection_metric: 'sst2_acc' is a metric of task sst2, which is not in data\.tasks",
        ),
        ({}, {"selection_metric": "nope"}, r"train\.selection_metric: 'nope' is not a metric"),
    ],
)
def test_bad_task_declarations_are_one_line_errors(data: dict, train: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        build_config({"data": data, "train": train}, "bad.yaml")
    assert "\n" not in str(info.value)
