"""Heads, losses and metrics against hand computations and independent implementations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from mtl.bert import BertModel
from mtl.config import ModelConfig
from mtl.data import Batch
from mtl.heads import (
    MultitaskBert,
    pool,
    predict,
    task_loss,
    task_metric,
)
from mtl.metrics import overall_score, pearson, pearson_undefined


def _batch(task: str, design: int, b: int = 3, length: int = 7) -> Batch:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (b, length), generator=gen)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, -2:] = 0
    labels = {
        "sst": torch.tensor([0, 4, 2][:b]),
        "para": torch.tensor([1.0, 0.0, 1.0][:b]),
        "sts": torch.tensor([0.5, 4.2, 3.0][:b]),
    }[task]
    pair1 = task != "sst" and design == 1
    return Batch(
        task=task,
        index=torch.arange(b),
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=None if pair1 or task == "sst" else torch.zeros_like(ids),
        input_ids_b=ids.flip(1)[:, :5] if pair1 else None,
        attention_mask_b=torch.ones(b, 5, dtype=torch.long) if pair1 else None,
        labels=labels,
    )


@pytest.mark.parametrize("design", [1, 2])
@pytest.mark.parametrize("task", ["sst", "para", "sts"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_every_head_and_design_runs_and_backprops(
    tiny_backbone: Path, design: int, task: str, layers: int, pooling: str
) -> None:
    cfg = ModelConfig(design=design, head_layers=layers, head_hidden=16, pooling=pooling)
    model = MultitaskBert(BertModel.from_pretrained(str(tiny_backbone)), cfg)
    batch = _batch(task, design)
    out = model(batch)
    assert out.logits.shape == ((3, 5) if task == "sst" else (3,))
    task_loss(task, out.logits, batch.labels).backward()
    head = model.heads[task]
    assert all(p.grad is not None for p in head.parameters())
    in_features = next(m for m in head.modules() if isinstance(m, torch.nn.Linear)).in_features
    pair_design1 = task != "sst" and design == 1
    assert in_features == (96 if pair_design1 else 32)


def test_design1_features_are_u_absdiff_v(tiny_backbone: Path) -> None:
    model = MultitaskBert(
        BertModel.from_pretrained(str(tiny_backbone)), ModelConfig(design=1, head_layers=1)
    ).eval()
    batch = _batch("para", 1)
    captured = {}
    model.heads["para"].net.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    model(batch)
    enc = model.encoder
    u = enc(batch.input_ids, batch.attention_mask).last_hidden_state[:, 0]
    v = enc(batch.input_ids_b, batch.attention_mask_b).last_hidden_state[:, 0]
    torch.testing.assert_close(
        captured["x"], torch.cat([u, (u - v).abs(), v], -1), atol=1e-5, rtol=0
    )


def test_losses_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 4))
    assert task_loss("sst", logits, torch.tensor([0])).item() == pytest.approx(expected)
    z, y = torch.tensor([0.3, -1.2]), torch.tensor([1.0, 0.0])
    sig = 1 / (1 + np.exp(-z.numpy()))
    bce = -np.mean(y.numpy() * np.log(sig) + (1 - y.numpy()) * np.log(1 - sig))
    assert task_loss("para", z, y).item() == pytest.approx(bce, rel=1e-6)
    assert task_loss("sts", torch.tensor([1.0, 3.0]), torch.tensor([2.0, 5.0])).item() == 2.5


def test_mean_pooling_ignores_padding() -> None:
    hidden = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[1.5, 2.5, 3.5]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[0.0, 1.0, 2.0]]))


def test_metrics_against_numpy_and_scipy() -> None:
    rng = np.random.default_rng(0)
    pred, gold = rng.normal(size=50), rng.normal(size=50)
    assert pearson(pred, gold) == pytest.approx(scipy.stats.pearsonr(pred, gold)[0])
    a, b = rng.integers(0, 5, 40), rng.integers(0, 5, 40)
    assert task_metric("sst", a, b) == pytest.approx(np.mean(a == b))
    assert overall_score({"sst_acc": 0.5, "para_acc": 0.8, "sts_pearson": 0.6}) == pytest.approx(
        (0.5 + 0.8 + 0.8) / 3
    )
    assert predict("para", torch.tensor([-0.1, 0.2])).tolist() == [0, 1]
    assert predict("sst", torch.tensor([[0.0, 3.0, 1.0, 0.0, 0.0]])).tolist() == [1]


@pytest.mark.parametrize(
    ("pred", "gold", "why"),
    [
        ([2.5, 2.5, 2.5], [1.0, 3.0, 4.0], "every prediction is 2.5"),
        ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0], "every gold score is 4"),
        ([3.0], [2.0], "1 example"),
        ([], [], "0 examples"),
    ],
)
def test_undefined_pearson_is_none_and_counts_as_zero_in_overall(
    pred: list[float], gold: list[float], why: str
) -> None:
    assert pearson_undefined(np.array(pred), np.array(gold)) == why
    assert pearson(np.array(pred), np.array(gold)) is None
    assert task_metric("sts", np.array(pred), np.array(gold)) is None
    metrics = {"sst_acc": 0.4, "para_acc": 0.7, "sts_pearson": None}
    assert overall_score(metrics) == pytest.approx((0.4 + 0.7 + 0.5) / 3)
    assert overall_score({"sts_pearson": None}) == 0.5
    assert pearson_undefined(np.array([1.0, 2.0]), np.array([2.0, 1.0])) is None
