"""The trainer on data files as people have them: stop before training, or finish with every
result kept and every undefined number said to be undefined."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from mtl import data as data_lib
from mtl.cli import main
from mtl.train import train
from tests.test_backbones import LFS_POINTER
from tests.test_train import tiny_config


def _words_for_labels(path: Path) -> None:
    """SST labels written as words, as a spreadsheet user might."""
    words = ["very negative", "negative", "neutral", "positive", "very positive"]
    lines = path.read_text().splitlines()
    rows = [ln.rsplit("\t", 1) for ln in lines[1:]]
    path.write_text("\n".join([lines[0], *[f"{a}\t{words[int(b)]}" for a, b in rows]]) + "\n")


def _latin1_row(path: Path) -> None:
    """One test sentence saved as Latin-1 (``caf\\xe9``) in an otherwise UTF-8 file."""
    lines = path.read_bytes().splitlines()
    lines[2] = lines[2] + b" caf\xe9"
    path.write_bytes(b"\n".join(lines) + b"\n")


def _header_only(path: Path) -> None:
    path.write_bytes(path.read_bytes().splitlines()[0] + b"\n")


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        (
            "ids-sst-dev.csv",
            _words_for_labels,
            r"no usable row: ids-sst-dev\.csv: skipped 1101 of "
            r"1101 rows \(label not a number: 1101 at lines 2, 3, 4, 5, 6, \.\.\.\)",
        ),
        ("sts-test-student.csv", _latin1_row, r"line 3: not UTF-8; a test row cannot be skipped"),
        ("ids-sst-test-student.csv", _latin1_row, r"line 3: not UTF-8; a test row cannot be"),
        ("quora-train.csv", _header_only, r"no data rows after the header"),
    ],
    ids=["dev-labels-as-words", "sts-test-latin1", "sst-test-latin1", "train-header-only"],
)
def test_cli_stops_before_training_naming_the_file(
    tiny_backbone: Path,
    real_data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    name: str,
    damage: Callable[[Path], None],
    expected: str,
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(real_data_dir, data_dir)
    (data_dir / name).chmod(0o644)
    damage(data_dir / name)
    run = tmp_path / "run"
    rc = main(
        [
            "--set", f"model.backbone={tiny_backbone}",
            "--set", f"data.data_dir={data_dir}",
            "--set", "train.progress=false",
            # Small enough that a run which fails to stop ends in seconds.
            "--set", "train.max_steps=1",
            "--set", "data.max_train_examples=8",
            "--output-dir", str(run),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {data_dir / name}: ")
    assert re.search(expected, err[0]), err[0]
    assert not (run / "metrics.json").exists() and not (run / "checkpoint").exists()


def test_undefined_sts_pearson_is_null_warned_and_selection_still_works(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A one-row STS dev set: Pearson is undefined at every evaluation."""
    run = tmp_path / "run"
    cfg = tiny_config(
        tiny_backbone, real_data_dir, run, data={"max_eval_examples": 1}, train={"eval_every": 0.5}
    )
    reported = []
    with caplog.at_level(logging.WARNING, logger="mtl.train"):
        best = train(cfg, lambda m, c: reported.append(m))
    warning = "dev sts_pearson is undefined (1 example): recorded as null; the overall score counts it as 0"
    assert caplog.text.count(warning) == 2
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert len(history) == 2
    for metrics in history:
        assert metrics["sts_pearson"] is None
        expected = (metrics["sst_acc"] + metrics["para_acc"] + 0.5) / 3
        assert metrics["overall"] == pytest.approx(expected)
    assert best["sts_pearson"] is None
    assert best["overall"] == max(m["overall"] for m in history)
    assert (run / "best" / "model.safetensors").is_file()
    assert all(math.isnan(r["sts_pearson"]) and math.isfinite(r["best_overall"]) for r in reported)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb")).Reload()
    scalars = events.Tags()["scalars"]
    assert "dev/sts_pearson" not in scalars and len(events.Scalars("dev/overall")) == 2
    # The test predictions cover one id of each file: MISSING.txt says they are no submission.
    missing = (run / "predictions" / "MISSING.txt").read_text()
    sst_rows = len(data_lib.read_split(real_data_dir, "sst", "test"))
    assert f"sst-test-output.csv: 1 of {sst_rows} test ids" in missing
    assert "Test predictions for a subsample only (data.max_eval_examples):" in missing


def test_resume_from_another_configs_checkpoint_is_one_line(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tiny_config(tiny_backbone, real_data_dir, tmp_path / "first", train={"max_steps": 1})
    train(cfg)
    argv = ["--set", f"model.backbone={tiny_backbone}", "--set", f"data.data_dir={real_data_dir}"]
    argv += ["--set", "data.max_train_examples=8", "--set", "model.head_hidden=8"]
    # Beside its run's config.yaml, the checkpoint's config is compared first (mtl.cli).
    rc = main([*argv, "--resume", str(tmp_path / "first" / "checkpoint")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "a resumed run keeps its configuration" in err[0], err
    # A checkpoint copied away from its run: its weights are what can tell.
    ckpt = tmp_path / "copied" / "checkpoint"
    shutil.copytree(tmp_path / "first" / "checkpoint", ckpt)
    rc = main([*argv, "--resume", str(ckpt), "--output-dir", str(tmp_path / "second")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(
        f"error: {ckpt / 'model.safetensors'} does not fit this run's model (was it written with "
        "another config?): shape mismatch heads."
    )
    assert err[0].endswith("more")
    (ckpt / "model.safetensors").write_text(LFS_POINTER)
    rc = main([*argv, "--resume", str(ckpt), "--output-dir", str(tmp_path / "third")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        f"error: {ckpt / 'model.safetensors'}: cannot be read (Error while deserializing header: "
        "header too large)"
    ]
