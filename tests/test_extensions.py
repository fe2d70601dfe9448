"""A short training run of every extension with every design, mode and routine (tiny configs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl import contrastive
from mtl.config import Config, build_config
from mtl.train import load_data, train

EXTENSIONS = {
    "smart": {"smart": {"enabled": True, "bregman": True}},
    "pal_paper": {"pal": {"variant": "paper", "heads": 4, "lr": 1e-2}},
    "pal_standard": {"pal": {"variant": "standard", "heads": 4, "lr": 1e-2}},
    "contrastive_margin": {"contrastive": {"enabled": True, "loss": "margin"}},
    "contrastive_infonce": {"contrastive": {"enabled": True, "loss": "infonce"}},
}
STAGE1 = {"max_val_examples": 16, "batch_size": 4, "max_length": 16, "epochs": 1}


def _config(
    backbone: Path, data_dir: Path, out: Path, cache: Path, design: int, **sections: dict
) -> Config:
    raw: dict = {
        "seed": 1,
        "output_dir": str(out),
        "model": {"backbone": str(backbone), "head_hidden": 8, "design": design},
        "data": {
            "data_dir": str(data_dir),
            "max_train_examples": 32,
            "max_eval_examples": 8,
            "max_length": 24,
        },
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "lr": 1e-3,
            "progress": False,
            "log_every": 1,
            "write_predictions": False,
        },
        "contrastive": {"cache_dir": str(cache), **STAGE1},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return build_config(raw)


@pytest.fixture(scope="module")
def shared(tiny_backbone: Path, real_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Pre-tokenized data per design, shared by all runs as a search shares it between trials."""
    root = tmp_path_factory.mktemp("extensions")
    cache = root / "stage1-cache"
    data = {
        design: load_data(_config(tiny_backbone, real_data_dir, root, cache, design))
        for design in (1, 2)
    }
    return data, cache


@pytest.mark.parametrize("routine", ["round_robin", "sequential"])
@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
@pytest.mark.parametrize("design", [1, 2])
@pytest.mark.parametrize("extension", list(EXTENSIONS))
def test_short_run(
    tiny_backbone: Path,
    real_data_dir: Path,
    tmp_path: Path,
    shared,
    extension: str,
    design: int,
    mode: str,
    routine: str,
) -> None:
    data, cache = shared
    sections = EXTENSIONS[extension]
    cfg = _config(
        tiny_backbone,
        real_data_dir,
        tmp_path,
        cache,
        design,
        train={"mode": mode, "routine": routine},
        **sections,
    )
    before = {t: list(e.ids) for t, e in data[design].train.items()}
    metrics = train(cfg, data=data[design])
    assert 0.0 <= metrics["overall"] <= 1.0
    assert {t: list(e.ids) for t, e in data[design].train.items()} == before  # shared: untouched

    tags = set(EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"])
    state = load_file(tmp_path / "best" / "model.safetensors")
    pretrained = load_file(tiny_backbone / "model.safetensors")
    if extension == "smart":
        assert {f"train/smart_{t}" for t in ("sst", "para", "sts")} <= tags
        assert {f"train/bregman_{t}" for t in ("sst", "para", "sts")} <= tags
    if extension.startswith("pal"):
        pal_keys = [k for k in state if ".pal." in k]
        assert pal_keys and "encoder.pal.sst.up.weight" in state
        assert state["encoder.pal.sst.up.weight"].abs().max() > 0  # V_up left zero: it trained
    if extension.startswith("contrastive"):
        # Equal data: stage 1 takes 15% of exactly the pairs the run without it trains on,
        # stage 2 the other 85%.
        record = json.loads((tmp_path / "stage1.json").read_text())
        stage1_ids, stage2_ids = contrastive.split_ids(
            before["para"], cfg.contrastive.fraction, cfg.seed
        )
        assert record["stage1_pairs"] == len(stage1_ids) == round(0.15 * len(before["para"]))
        assert record["stage2_pairs"] == len(stage2_ids) == len(before["para"]) - len(stage1_ids)
        assert record["quora_ids_sha256"] == contrastive.ids_digest(before["para"])
        assert record["stage1_ids_sha256"] == contrastive.ids_digest(stage1_ids)
        report = json.loads((tmp_path / "data_report.json").read_text())
        assert report["train_examples"]["para"] == len(stage2_ids)
        stage1_weights = load_file(record["path"])
        assert any(not torch.equal(stage1_weights[k], pretrained[k]) for k in pretrained)
    if mode == "pretrain":  # the encoder starts from (and keeps) its backbone or stage-1 weights
        start = load_file(record["path"]) if extension.startswith("contrastive") else pretrained
        for key, value in start.items():
            assert torch.equal(state[f"encoder.{key}"], value), key


def test_stage1_is_trained_once_per_key(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, shared
) -> None:
    """Two runs with the same stage-1 key: the second reuses the first's encoder."""
    data, _ = shared
    cache = tmp_path / "cache"
    sections = {"contrastive": {"enabled": True}}
    records = []
    for name in ("first", "second"):
        cfg = _config(tiny_backbone, real_data_dir, tmp_path / name, cache, 2, **sections)
        train(cfg, data=data[2])
        records.append(json.loads((tmp_path / name / "stage1.json").read_text()))
    assert [r["cache_hit"] for r in records] == [False, True]
    assert records[0]["steps"] == 2 and records[1]["steps"] == 0  # 5 pairs in batches of 4
    assert records[0]["key"] == records[1]["key"]


def test_all_extensions_together(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, shared
) -> None:
    data, cache = shared
    cfg = _config(
        tiny_backbone,
        real_data_dir,
        tmp_path,
        cache,
        1,
        smart={"enabled": True, "weight": 1.0, "steps": 2, "norm": "l2"},
        pal={"variant": "standard", "heads": 4},
        contrastive={"enabled": True, "loss": "infonce"},
        train={"grad_accum_steps": 2, "eval_every": 0.5},
    )
    metrics = train(cfg, data=data[1])
    assert metrics["best_evaluation"] >= 1.0


def test_resume_with_smart_and_pals_reproduces_the_uninterrupted_run(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, shared
) -> None:
    """SMART's generator and the Bregman teacher are saved beside the model."""
    data, cache = shared
    cfg = _config(
        tiny_backbone,
        real_data_dir,
        tmp_path / "full",
        cache,
        2,
        smart={"enabled": True, "weight": 1.0, "bregman": True},
        pal={"variant": "paper", "heads": 4, "lr": 1e-2},
        train={"epochs": 2, "eval_every": 0.5},
    )
    saved = tmp_path / "saved"
    history: list[dict] = []

    def keep_first(metrics: dict, ckpt: Path) -> None:
        history.append(metrics)
        if len(history) == 1:
            shutil.copytree(ckpt, saved)

    full = train(cfg, keep_first, data=data[2])
    resumed_history: list[dict] = []
    resumed = train(
        cfg,
        lambda m, c: resumed_history.append(m),
        resume_from=saved,
        run_dir=tmp_path / "resumed",
        data=data[2],
    )
    assert resumed_history == history[1:]
    assert resumed == full
