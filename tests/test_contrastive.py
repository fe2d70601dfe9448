"""Stage 1: the two losses by hand, the Quora split, early stopping and the stage-1 cache."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtl import bert as bert_lib
from mtl import contrastive
from mtl import data as data_lib
from mtl.config import Config, ContrastiveConfig, build_config


def _unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def test_margin_loss_by_hand() -> None:
    u = torch.tensor([_unit(0), _unit(0), _unit(0), _unit(0)])
    v = torch.tensor([_unit(90), _unit(90), _unit(0), [0.9, math.sqrt(1 - 0.81)]])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # d^2 = 2 - 2 cos: 2, 2, 0, 0.2
    expected = [
        0.5 * 2.0,  # duplicate, orthogonal: 0.5 * d^2
        0.0,  # non-duplicate farther than m = 0.5
        0.5 * 0.5**2,  # non-duplicate, identical: 0.5 * m^2
        0.5 * (0.5 - math.sqrt(0.2)) ** 2,
    ]
    loss = contrastive.margin_loss(u, v, y, margin=0.5)
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    # Computed on L2-normalised embeddings: the scale of the raw vectors does not matter.
    assert contrastive.margin_loss(7 * u, 3 * v, y).item() == pytest.approx(loss.item(), rel=1e-6)


def test_margin_loss_gradient_is_finite_for_identical_embeddings() -> None:
    u = torch.tensor([[1.0, 2.0]], requires_grad=True)
    contrastive.margin_loss(u, u.detach().clone(), torch.tensor([0.0])).backward()
    assert torch.isfinite(u.grad).all()


def test_infonce_by_hand() -> None:
    """Every pair's first sentence is an anchor; columns: the positives, then the hard negatives."""
    angles_u, angles_v, angle_view = [0, 50, 100], [20, 60, 130], 55
    u = 3 * torch.tensor([_unit(a) for a in angles_u])
    v = 5 * torch.tensor([_unit(a) for a in angles_v])
    view = 2 * torch.tensor([_unit(angle_view)])  # pair 1's first sentence, another dropout mask
    y = torch.tensor([1, 0, 1])
    tau = 0.5
    positives = [angles_v[0], angle_view, angles_v[2]]
    hard_negatives = [angles_v[1]]  # pair 1 is a non-duplicate: its v is its hard negative
    terms = []
    for i in range(3):
        sims = [math.cos(math.radians(angles_u[i] - b)) / tau for b in positives + hard_negatives]
        terms.append(-(sims[i] - math.log(sum(math.exp(s) for s in sims))))
    loss = contrastive.infonce_loss(u, v, y, temperature=tau, u_view=view)
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-6)


def test_infonce_reads_the_non_duplicates_first_questions() -> None:
    """A non-duplicate pair's first question is an anchor with its partner in its denominator."""
    torch.manual_seed(0)
    u, v, view = torch.randn(8, 16), torch.randn(8, 16), torch.randn(4, 16)
    y = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    loss = contrastive.infonce_loss(u, v, y, 0.05, view)
    changed = u.clone()
    changed[y == 0] = torch.randn(4, 16)
    assert contrastive.infonce_loss(changed, v, y, 0.05, view).item() != pytest.approx(
        loss.item(), rel=1e-4
    )


def test_one_infonce_step_pushes_non_duplicate_pairs_apart(real_data_dir: Path) -> None:
    """One stage-1 step of MiniLM on real Quora pairs lowers the non-duplicates' cosine."""
    from mtl.backbones import load_tokenizer, resolve_backbone
    from mtl.bert import BertModel

    backbone = resolve_backbone("minilm")
    raw = data_lib.subsample(data_lib.read_split(real_data_dir, "para", "train"), 64, 0)
    pairs = data_lib.encode(raw, load_tokenizer(backbone), 32, design=1)
    batch = data_lib.collate(pairs, list(range(len(pairs))))
    negative = ~batch.labels.bool()
    assert 0 < int(negative.sum()) < len(pairs)
    torch.manual_seed(0)
    encoder = BertModel.from_pretrained(str(backbone))

    def cosine() -> float:
        encoder.eval()
        with torch.no_grad():
            u, v, _ = contrastive._cls_pair(encoder, batch)
        encoder.train()
        return torch.cosine_similarity(u[negative], v[negative]).mean().item()

    before = cosine()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    u, v, view = contrastive._cls_pair(encoder, batch, views=True)
    contrastive.infonce_loss(u, v, batch.labels, 0.05, view).backward()
    optimizer.step()
    assert cosine() < before - 0.01


def test_infonce_with_only_non_duplicates_is_unsupervised_simcse_plus_hard_negatives() -> None:
    torch.manual_seed(0)
    u, v, view = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    cols = F.normalize(torch.cat([view, v]), dim=-1)
    logits = F.normalize(u, dim=-1) @ cols.T / 0.05
    expected = F.cross_entropy(logits, torch.arange(3))
    loss = contrastive.infonce_loss(u, v, torch.zeros(3), 0.05, view)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_views_are_the_non_duplicates_first_sentences(tiny_backbone: Path, real_data_dir: Path):
    """Without dropout the second view equals the first sentence's embedding, row for row."""
    from mtl.backbones import load_tokenizer
    from mtl.bert import BertModel

    raw = data_lib.subsample(data_lib.read_split(real_data_dir, "para", "train"), 16, 0)
    batch = data_lib.collate(
        data_lib.encode(raw, load_tokenizer(tiny_backbone), 24, design=1), list(range(16))
    )
    encoder = BertModel.from_pretrained(str(tiny_backbone)).eval()
    with torch.no_grad():
        u, _, view = contrastive._cls_pair(encoder, batch, views=True)
    negative = ~batch.labels.bool()
    assert view is not None and len(view) == int(negative.sum()) > 0
    torch.testing.assert_close(view, u[negative], rtol=1e-4, atol=1e-5)


def test_infonce_with_only_duplicates_is_finite_and_backpropagates() -> None:
    u = torch.randn(3, 4, requires_grad=True)
    loss = contrastive.infonce_loss(u, torch.randn(3, 4), torch.ones(3))
    loss.backward()
    assert torch.isfinite(loss) and u.grad is not None


def test_split_is_disjoint_deterministic_and_order_free() -> None:
    ids = [f"id{i}" for i in range(1000)]
    first, rest = contrastive.split_ids(ids, 0.15, seed=0)
    assert len(first) == 150 and len(rest) == 850
    assert not first & rest and first | rest == set(ids)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert contrastive.split_ids(shuffled, 0.15, seed=0) == (first, rest)
    assert contrastive.split_ids(ids, 0.15, seed=1)[0] != first


def _pool(data_dir: Path, n: int = 160, seed: int = 5) -> data_lib.RawSplit:
    """The Quora training pairs a run with ``data.max_train_examples: n`` trains on."""
    return data_lib.subsample(data_lib.read_split(data_dir, "para", "train"), n, seed)


def _stage1_config(backbone: Path, data_dir: Path, cache: Path, **stage1: object) -> Config:
    return build_config(
        {
            "seed": 5,
            "model": {"backbone": str(backbone)},
            "data": {"data_dir": str(data_dir)},
            "contrastive": {
                "enabled": True,
                "cache_dir": str(cache),
                "max_val_examples": 24,
                "batch_size": 8,
                "max_length": 16,
                "epochs": 1,
                **stage1,
            },
        }
    )


def test_stage1_fraction_is_held_out_of_quora_training(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path
) -> None:
    from mtl.backbones import load_tokenizer

    cfg = _stage1_config(tiny_backbone, real_data_dir, tmp_path / "cache")
    shared = data_lib.load_task_data(
        cfg.data.model_copy(
            update={"tasks": ("para",), "max_train_examples": 400, "max_eval_examples": 8}
        ),
        load_tokenizer(tiny_backbone),
        design=2,
        seed=cfg.seed,
    )
    before = list(shared.train["para"].ids)
    assert shared.raw_train["para"].ids == before  # the text stage 1 reads is the run's pairs
    result = contrastive.run_stage1(cfg, shared.raw_train["para"])
    # Equal data: stage 1 trains on 15% of exactly the run's 400 pairs, stage 2 on the rest.
    assert len(result.ids) == result.record["train_pairs"] == round(0.15 * len(before))
    stage2 = contrastive.exclude_stage1(shared, result)
    kept = stage2.train["para"]
    assert not set(kept.ids) & result.ids
    assert set(kept.ids) | result.ids == set(before)
    assert len(kept) + len(result.ids) == len(before)
    assert shared.train["para"].ids == before  # the shared data is untouched
    assert len(kept.input_ids) == len(kept.labels) == len(kept.lengths) == len(kept)
    position = before.index(kept.ids[0])
    assert torch.equal(kept.input_ids[0], shared.train["para"].input_ids[position])
    assert contrastive.exclude_stage1(shared, None) is shared


def test_second_run_with_the_same_key_hits_the_cache(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cfg = _stage1_config(tiny_backbone, real_data_dir, cache)
    pool = _pool(real_data_dir)
    first = contrastive.run_stage1(cfg, pool)
    assert not first.cache_hit and first.steps == 3  # 24 of 160 pairs in batches of 8, one epoch
    assert sorted(p.name for p in cache.glob("*.safetensors")) == [f"{first.key}.safetensors"]
    # The same weights under another path share the entry: the backbone enters by content.
    moved = shutil.copytree(tiny_backbone, tmp_path / "elsewhere")
    second = contrastive.run_stage1(_stage1_config(moved, real_data_dir, cache), pool)
    assert second.cache_hit and second.steps == 0
    assert second.key == first.key and second.ids == first.ids
    assert second.record["steps"] == 3
    # Another seed or another stage-1 setting is another key.
    reseeded = contrastive.run_stage1(cfg.model_copy(update={"seed": 6}), pool)
    assert not reseeded.cache_hit and reseeded.key != first.key
    other_loss = contrastive.run_stage1(
        _stage1_config(tiny_backbone, real_data_dir, cache, loss="infonce"), pool
    )
    assert not other_loss.cache_hit and other_loss.key not in (first.key, reseeded.key)
    # Another subsample of Quora (another data.max_train_examples) is another key.
    other_pool = contrastive.run_stage1(cfg, _pool(real_data_dir, 200))
    assert not other_pool.cache_hit and other_pool.key != first.key


def test_runs_that_miss_the_cache_together_train_stage1_once(
    tiny_backbone: Path,
    real_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    trained = []
    real = contrastive.train_stage1

    def slow_train(*args, **kwargs):  # long enough that the other run misses the cache too
        trained.append(threading.get_ident())
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(contrastive, "train_stage1", slow_train)
    cfg = _stage1_config(tiny_backbone, real_data_dir, tmp_path / "cache")
    start = threading.Barrier(2)
    results = []

    def run() -> None:
        start.wait()
        results.append(contrastive.run_stage1(cfg, _pool(real_data_dir)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="mtl.contrastive"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(trained) == 1
    assert sorted(r.cache_hit for r in results) == [False, True]
    assert results[0].key == results[1].key and results[0].ids == results[1].ids
    # The run that found the lock held said so (the other trains for a second under it).
    waits = [r.getMessage() for r in caplog.records if "waiting for it" in r.getMessage()]
    assert waits == [
        f"stage 1: another run is training {results[0].key}.safetensors; waiting for it"
    ]


def test_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "key.safetensors"
    tensors = {"w": torch.ones(2)}
    contrastive.save_atomic(target, tensors, {"steps": 1})
    assert contrastive.read_record(target) == {"steps": 1}

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        contrastive.save_atomic(tmp_path / "other.safetensors", tensors, {})
    # Nothing half-written under the final name, no temporary file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.safetensors"]


def test_early_stopping_waits_patience_epochs(tiny_backbone: Path, real_data_dir: Path) -> None:
    from mtl.backbones import load_tokenizer
    from mtl.bert import BertModel

    tokenizer = load_tokenizer(tiny_backbone)
    raw = data_lib.subsample(data_lib.read_split(real_data_dir, "para", "dev"), 16, 0)
    pairs = data_lib.encode(raw, tokenizer, 16, design=1)
    cfg = ContrastiveConfig(lr=1e-12, epochs=10, patience=2, batch_size=8)
    encoder = BertModel.from_pretrained(str(tiny_backbone))
    # A learning rate of ~0 never lowers the validation loss after the first epoch.
    state, record = contrastive.train_stage1(encoder, pairs, pairs, cfg, 0, torch.device("cpu"))
    assert record["epochs"] == 3 and record["steps"] == 6
    assert set(state) == set(encoder.state_dict())


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[tuple]:
    """Record every call of ``module.name``, wherever an ``mtl`` module bound it by name."""
    real = getattr(module, name)
    calls: list[tuple] = []

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    for mod in [m for n, m in sys.modules.items() if n == "mtl" or n.startswith("mtl.")]:
        if getattr(mod, name, None) is real:
            monkeypatch.setattr(mod, name, counted)
    return calls


def test_a_run_resolves_its_backbone_and_data_once_and_reads_quora_train_once(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtl import backbones
    from mtl.train import train
    from tests.test_train import tiny_config

    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "mtl-cache"))  # no tokenized-cache hit
    backbone_calls = _count_calls(monkeypatch, backbones, "resolve_backbone")
    data_dir_calls = _count_calls(monkeypatch, data_lib, "resolve_data_dir")
    reads = _count_calls(monkeypatch, data_lib, "read_split")
    weights_reads = _count_calls(monkeypatch, bert_lib, "read_checkpoint")
    cfg = tiny_config(
        tiny_backbone,
        real_data_dir,
        tmp_path / "run",
        contrastive={"enabled": True, "cache_dir": str(tmp_path / "cache"), "epochs": 1},
    )
    train(cfg)
    record = json.loads((tmp_path / "run" / "stage1.json").read_text())
    assert not record["cache_hit"] and record["steps"] > 0  # a miss: stage 1 trained here
    assert len(backbone_calls) == 1
    assert len(data_dir_calls) == 1
    assert len(weights_reads) == 1
    files = [data_lib.split_file(task, split) for _, task, split in reads]
    assert files.count("quora-train.csv") == 1
    # Every training file once; stage 1's validation pairs are its own subsample of Quora dev.
    assert sorted(f for f in files if "train" in f) == sorted(
        data_lib.split_file(t, "train") for t in cfg.data.tasks
    )
