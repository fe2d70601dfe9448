"""The typed config: defaults, overrides, and one-line errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mtl.config import Config, ConfigError, build_config, load_config, parse_overrides


def test_defaults_are_the_papers() -> None:
    cfg = Config()
    assert cfg.model.backbone == "minilm"
    assert cfg.model.head_hidden == 512 and cfg.model.head_layers == 2
    assert cfg.train.peak_lr == 1e-5
    assert load_config(None, ["train.mode=pretrain"]).train.peak_lr == 1e-3
    assert cfg.data.tasks == ("sst", "para", "sts")


def test_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  design: 1\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=3e-5", "model.design=2", "data.bucket=false"])
    assert cfg.train.lr == 3e-5 and cfg.model.design == 2 and cfg.data.bucket is False
    assert cfg.train.epochs == 3
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    ("text", "override", "match"),
    [
        ("model:\n  desing: 1\n", None, r"model\.desing: unknown key"),
        ("train:\n  lr: fast\n", None, r"train\.lr: .*number"),
        ("model:\n  design: 3\n", None, r"model\.design: "),
        ("train:\n  eval_every: 1.5\n", None, r"whole number"),
        ("train:\n  batch_size: 0\n", None, r"train\.batch_size: .*greater than 0"),
        ("data:\n  tasks: [sst, mnli]\n", None, r"data\.tasks\.1: "),
        ("- a\n- b\n", None, r"mapping at the top level"),
        ("model: [\n", None, r"invalid YAML"),
        ("", "train.nope=1", r"train\.nope: unknown key"),
        ("", "train.lr", r"expected key=value"),
        (
            "data:\n  tasks: [sst, para]\ntrain:\n  selection_metric: sts_pearson\n",
            None,
            r"bad\.yaml: train\.selection_metric: 'sts_pearson' is a metric of task sts, which is "
            r"not in data\.tasks \(sst, para\)$",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(
    tmp_path: Path, text: str, override: str | None, match: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, [override] if override else None)
    assert "\n" not in str(info.value)


def test_cli_config_error_exits_2_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mtl.train", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: train.epochs: Input should be greater than 0"
    ]


def test_cli_refuses_a_selection_metric_its_tasks_cannot_produce(tmp_path: Path) -> None:
    # Before any data is read or any run folder made (it used to train up to its first evaluation).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtl.train",
            "--set",
            "data.tasks=[sst, para]",
            "--set",
            "train.selection_metric=sts_pearson",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert not (tmp_path / "runs").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: config (with --set): train.selection_metric: 'sts_pearson' is a metric of task "
        "sts, which is not in data.tasks (sst, para)"
    ]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            {"contrastive": {"max_examples": 1000}},
            r"contrastive: .*max_examples was removed: .* max_val_examples",
        ),
        (
            {"contrastive": {"enabled": True}, "data": {"tasks": ["sst", "sts"]}},
            r"contrastive.enabled needs the para task",
        ),
    ],
)
def test_stage1_settings_that_cannot_hold_are_one_line(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config(raw)
