"""The evaluation schedule has one owner: ASHA's budget is the trainer's evaluations."""

from __future__ import annotations

import pytest

from mtl.config import build_config
from mtl.schedule import eval_positions, evaluations_per_run
from mtl.search.space import parse_space


@pytest.mark.parametrize(
    ("epochs", "every"), [(1, 1.0), (3, 1.0), (5, 2.0), (4, 3.0), (2, 0.5), (3, 0.25), (2, 0.3)]
)
def test_evaluations_per_run_counts_the_trainers_evaluations(epochs: int, every: float) -> None:
    cfg = build_config({"train": {"epochs": epochs, "eval_every": every}})
    plan_len = 40  # batches per epoch, more than the evaluations of any epoch here
    trained = sum(len(eval_positions(plan_len, e, cfg)) for e in range(epochs))
    assert evaluations_per_run(cfg) == trained
    space = parse_space(
        {
            "experiment": {"name": "x"},
            "base": {"train": {"epochs": epochs, "eval_every": every}},
            "parameters": {"lr": {"path": "train.lr", "type": "float", "low": 1e-5, "high": 1e-3}},
        }
    )
    assert space.max_t == trained
