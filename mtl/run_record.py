"""The run folder's records: what a run was (config, command, commit, seed, versions), what it read
(data_report.json), what it measured (metrics.json, TensorBoard, the HParams view), and where
it goes (``runs/<date>-<time>`` by default).

The Google tuning playbook's rule: untracked experiments might as well not exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mtl import data as data_lib
from mtl.config import Config
from mtl.metrics import metric_names
from mtl.tasks import configured


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "numpy", "ray", "optuna"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return versions


def write_run_info(run_dir: Path, cfg: Config, extra: Mapping[str, Any] | None = None) -> None:
    """Resolved config, command line, git commit, seed, library versions, and ``extra``."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    info = {
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "git_commit": _git_commit(),
        "seed": cfg.seed,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        **(extra or {}),
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_dir(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def write_data_report(run_dir: Path, data: data_lib.TaskData) -> None:
    """``data_report.json``: skipped rows per file and reason, absent test files, examples."""
    (run_dir / "data_report.json").write_text(
        json.dumps(
            {
                "skipped": [r.to_dict() for r in data.reports],
                "missing_test_files": data.missing,
                "train_examples": {t: len(e) for t, e in data.train.items()},
                "dev_examples": {t: len(e) for t, e in data.dev.items()},
            },
            indent=2,
        )
    )


def write_metrics(run_dir: Path, history: list[dict], best: dict) -> None:
    """``metrics.json``: the dev metrics after every evaluation, and the best one's."""
    (run_dir / "metrics.json").write_text(json.dumps({"history": history, "best": best}, indent=2))


def open_tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tb"))


def write_hparams(writer, cfg: Config, best: dict[str, float]) -> None:
    """HParams dashboard entry in the run's own event file (no extra sub-run folder)."""
    from torch.utils.tensorboard.summary import hparams

    flat = _flatten(cfg.to_dict())
    hp = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
    names = metric_names(configured(cfg.data))
    metric = {f"hparam/{k}": v for k, v in best.items() if k in names and v is not None}
    exp, ssi, sei = hparams(hp, metric)
    fw = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        fw.add_summary(summary)
    for k, v in metric.items():
        writer.add_scalar(k, v)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif v is not None:
            out[key] = v
    return out
