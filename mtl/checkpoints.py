"""Checkpoints: the resumable state of a run (weights, optimizer, scheduler, SMART's state and every
random generator's state, the position in the epoch) and the best model so far.

With the epoch schedule a pure function of ``(seed, epoch)``, these let a run resumed from any
checkpoint (also one written mid-epoch) reproduce the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtl import smart
from mtl.bert import CheckpointError, key_problems
from mtl.config import Config


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    epoch: int = 0  # current epoch
    position: int = 0  # batches of the current epoch already done
    step: int = 0  # optimizer steps done
    evaluation: int = 0  # evaluations done
    best: float = -math.inf
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    regularizer: smart.Regularizer,
) -> None:
    """Write a resumable checkpoint atomically (temporary folder, then rename).

    ``regularizer`` contributes SMART's random state and its Bregman momentum copy of the
    model, when there is one.
    """
    teacher = regularizer.teacher.model if regularizer.teacher is not None else None
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_weights(model, tmp / "model.safetensors")
    if teacher is not None:
        _save_weights(teacher, tmp / "teacher.safetensors")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_rng": json.dumps(_numpy_state()),
            "python_rng": json.dumps(random.getstate()),
            "smart": regularizer.state_dict(),
        },
        tmp / "trainer.pt",
    )
    (tmp / "train_state.json").write_text(json.dumps(state.__dict__, indent=2))
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _save_weights(model: nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from None
    problems = key_problems(model.state_dict(), state)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{path} does not fit this run's model (was it written with another config?): "
            + "; ".join(problems[:3])
            + more
        )
    model.load_state_dict(state)


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    regularizer: smart.Regularizer,
) -> TrainState:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the loop state.

    Raises:
        CheckpointError: a weights file is unreadable or does not fit this run's model (one
            line naming the file and the first keys).
    """
    _load_weights(model, path / "model.safetensors")
    if regularizer.teacher is not None:
        _load_weights(regularizer.teacher.model, path / "teacher.safetensors")
    extra = torch.load(path / "trainer.pt", weights_only=True)
    if "smart" in extra:  # checkpoints written before SMART had its own generator have none
        regularizer.load_state_dict(extra["smart"])
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    name, keys, pos, has_gauss, cached = json.loads(extra["numpy_rng"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py_state = json.loads(extra["python_rng"])
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    return TrainState(**json.loads((path / "train_state.json").read_text()))


def save_best(best_dir: Path, model: nn.Module, cfg: Config, metrics: dict[str, float]) -> None:
    tmp = best_dir.with_name(best_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_weights(model, tmp / "model.safetensors")
    (tmp / "best.json").write_text(
        json.dumps({"metrics": metrics, "config": cfg.to_dict()}, indent=2)
    )
    shutil.rmtree(best_dir, ignore_errors=True)
    tmp.rename(best_dir)
