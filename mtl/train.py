"""The multitask training loop: one ``train(cfg, reporter) -> metrics`` for the CLI and for Ray.

Training routines (section 4.2 of the paper):

* ``sequential``: each epoch runs all batches of the first task, then the second, then the third
  (in ``data.tasks`` order). An epoch is one pass over every task's training set.
* ``round_robin``: each epoch cycles one batch of SST, one of Quora, one of STS, ... With
  ``train.epoch_until: largest`` (default) the cycle runs until the largest set has been seen once;
  a smaller set that runs out is reshuffled and starts again. With ``smallest`` it stops when the
  smallest set is exhausted (the larger sets are subsampled that epoch, differently each epoch).

The data order of every epoch is a pure function of ``(seed, epoch)``, so a checkpoint only has to
record its position in the epoch; with the model, optimizer, scheduler and RNG states this lets a
run resumed from any checkpoint (also one written mid-epoch) reproduce the uninterrupted run.

The trainer never imports Ray: a caller passes a ``reporter(metrics, checkpoint_dir)`` that is
called after every dev evaluation.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtl import contrastive, smart
from mtl import data as data_lib
from mtl import pal as pal_lib
from mtl.backbones import Backbone, load_backbone
from mtl.bert import BertModel, CheckpointError, key_problems
from mtl.config import Config
from mtl.heads import MultitaskBert
from mtl.tasks import (
    Task,
    best_key,
    configured,
    metric_names,
    overall_score,
    pearson_undefined,
    registry,
)

log = logging.getLogger("mtl.train")

# The run folder's dev predictions and gold labels at the best evaluation so far.
DEV_PREDICTIONS_FILE = "dev_predictions.csv"


class Reporter(Protocol):
    """Receives the dev metrics and a resumable checkpoint folder after every evaluation.

    An undefined metric (STS Pearson of a constant prediction) is NaN here, null in
    ``metrics.json``.
    """

    def __call__(self, metrics: dict[str, float], checkpoint_dir: Path) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover by retrying."""


# ---------------------------------------------------------------------------------------------
# Run folder and reproducibility records


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


def write_run_info(run_dir: Path, cfg: Config) -> None:
    """Resolved config, command line, git commit, seed and library versions."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    info = {
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "git_commit": _git_commit(),
        "seed": cfg.seed,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Model and optimizer


def build_model(
    cfg: Config,
    backbone_dir: Path,
    encoder_weights: Path | None = None,
    backbone_state: Mapping[str, torch.Tensor] | None = None,
) -> MultitaskBert:
    """The encoder from its pretrained (or stage-1) weights, its PALs, and fresh heads."""
    overrides: dict[str, Any] = {}
    if cfg.model.encoder_dropout is not None:
        overrides = {
            "hidden_dropout_prob": cfg.model.encoder_dropout,
            "attention_probs_dropout_prob": cfg.model.encoder_dropout,
        }
    encoder = BertModel.from_pretrained(str(backbone_dir), state_dict=backbone_state, **overrides)
    if encoder_weights is not None:
        contrastive.load_encoder(encoder, encoder_weights)
    model = MultitaskBert(encoder, cfg.model, registry(cfg.data).values())
    if cfg.train.mode == "pretrain":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    pal_lib.add_pals(model.encoder, cfg.pal, cfg.data.tasks)  # after freezing: PALs train
    return model


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not biases or LayerNorm), trainable only."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name else decay).append(p)
    lr = cfg.train.peak_lr
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return pal_lib.with_pal_lr(groups, model, cfg.pal.lr)


def linear_schedule(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear decay to 0 at ``total_steps``."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


# ---------------------------------------------------------------------------------------------
# Data order


@dataclass(frozen=True)
class Step:
    """One training batch in an epoch plan."""

    task: str
    indices: tuple[int, ...]


def epoch_plan(train: dict[str, data_lib.Encoded], cfg: Config, epoch: int) -> list[Step]:
    """Every batch of one epoch, in order; a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    bs, bucket = cfg.train.batch_size, cfg.data.bucket
    tasks = [t for t in cfg.data.tasks if t in train and len(train[t]) > 0]

    def order(task: str) -> list[list[int]]:
        return data_lib.batch_order(train[task].lengths, bs, gen, bucket)

    if cfg.train.routine == "sequential":
        return [Step(t, tuple(b)) for t in tasks for b in order(t)]

    orders = {t: order(t) for t in tasks}
    sizes = [len(o) for o in orders.values()]
    rounds = max(sizes) if cfg.train.epoch_until == "largest" else min(sizes)
    cursors = dict.fromkeys(tasks, 0)
    plan = []
    for _ in range(rounds):
        for t in tasks:
            if cursors[t] == len(orders[t]):
                orders[t], cursors[t] = order(t), 0  # a smaller set starts again, reshuffled
            plan.append(Step(t, tuple(orders[t][cursors[t]])))
            cursors[t] += 1
    return plan


def eval_positions(plan_len: int, epoch: int, cfg: Config) -> list[int]:
    """Positions in the epoch (number of batches done) after which to evaluate on dev."""
    every = cfg.train.eval_every
    if every >= 1:
        last = epoch + 1 == cfg.train.epochs
        return [plan_len] if (epoch + 1) % int(every) == 0 or last else []
    per_epoch = max(1, round(1 / every))
    return sorted({math.ceil(j * plan_len / per_epoch) for j in range(1, per_epoch + 1)})


def accumulation_windows(plan_len: int, evals: list[int], accum: int) -> list[int]:
    """Batches in each optimizer step of one epoch, in order.

    Gradients are accumulated over ``accum`` batches, but flushed at each evaluation and at the
    epoch's end, so a window cut short there holds fewer batches; each step averages exactly the
    batches its window holds. 13 batches, ``accum`` 4, evaluations after 7 and 13:
    ``[4, 3, 4, 2]``.
    """
    bounds = sorted({0, *evals, plan_len})
    return [
        min(accum, b - start) for a, b in itertools.pairwise(bounds) for start in range(a, b, accum)
    ]


# ---------------------------------------------------------------------------------------------
# Evaluation and predictions


@torch.no_grad()
def split_outputs(
    model: MultitaskBert,
    enc: data_lib.Encoded,
    batch_size: int,
    device: torch.device,
    autocast,
    output: Callable[[Task, torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """``output(task, logits)`` for every example of one split, in the split's order, as float64.

    Batches are formed in evaluation order (:func:`mtl.data.batch_order` without a generator),
    so every caller (predictions, the ensemble's probabilities) sees the same batches and the
    same logits.
    """
    model.eval()
    task = model.tasks[enc.task]
    out: np.ndarray | None = None
    for indices in data_lib.batch_order(enc.lengths, batch_size, None):
        batch = data_lib.collate(enc, indices).to(device)
        with autocast():
            logits = model(batch).logits
        values = output(task, logits).cpu().numpy()
        if out is None:
            out = np.zeros((len(enc), *values.shape[1:]), dtype=np.float64)
        out[batch.index.cpu().numpy()] = values
    return out if out is not None else np.zeros(0, dtype=np.float64)


def predict_split(
    model: MultitaskBert, enc: data_lib.Encoded, batch_size: int, device: torch.device, autocast
) -> np.ndarray:
    """Predictions (:meth:`mtl.tasks.Task.predict`) for every example of one split, in the
    split's order."""
    return split_outputs(
        model, enc, batch_size, device, autocast, lambda task, logits: task.predict(logits).float()
    )


def evaluate(
    model: MultitaskBert,
    dev: dict[str, data_lib.Encoded],
    batch_size: int,
    device: torch.device,
    autocast,
) -> tuple[dict[str, float | None], dict[str, np.ndarray]]:
    """Dev metrics (per task and overall) and the predictions behind them.

    An undefined Pearson correlation (STS) is None, with a warning that says why; the overall
    score counts it as 0 (:func:`mtl.tasks.overall_score`).
    """
    metrics, preds = {}, {}
    for name, enc in dev.items():
        task = model.tasks[name]
        preds[name] = predict_split(model, enc, batch_size, device, autocast)
        metrics[task.metric_name] = task.score(preds[name], enc.labels.numpy())
        if metrics[task.metric_name] is None:
            log.warning(
                "dev %s is undefined (%s): recorded as null; the overall score counts it as 0",
                task.metric_name,
                pearson_undefined(preds[name], enc.labels.numpy()),
            )
    metrics["overall"] = overall_score(metrics, model.tasks.values())
    return metrics, preds


def write_predictions(path: Path, task: Task, ids: list[str], preds: np.ndarray) -> None:
    """The CS224N submission format: a header line, then ``id , value`` per example."""
    lines = [f"id \t {task.prediction_header} \n"]
    for i, p in zip(ids, preds, strict=True):
        lines.append(f"{i} , {task.format_value(p)} \n")
    path.write_text("".join(lines))


def write_dev_predictions(
    path: Path,
    dev: dict[str, data_lib.Encoded],
    preds: dict[str, np.ndarray],
    tasks: Mapping[str, Task],
) -> None:
    """Every dev prediction beside its gold label: a CSV ``task,id,prediction,gold``.

    Written at each new best evaluation (so also for trials a scheduler stops), whatever
    ``train.write_predictions`` says: :mod:`analysis.paired` compares trials on these rows
    without reloading a model. Floats are written exactly (``repr``); the file is replaced
    atomically.
    """
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["task", "id", "prediction", "gold"])
    for task, enc in dev.items():
        cast = tasks[task].exact
        for row in zip(enc.ids, preds[task].tolist(), enc.labels.tolist(), strict=True):
            out.writerow([task, row[0], repr(cast(row[1])), repr(cast(row[2]))])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Checkpoints


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


# ---------------------------------------------------------------------------------------------
# The loop


def _device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def _autocast(cfg: Config, device: torch.device):
    use_bf16 = cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and device.type == "cuda"
    )
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def autocast_for(cfg: Config, device: torch.device):
    """The autocast context factory of ``cfg.train.precision`` on ``device`` (for callers outside
    the trainer that rebuild a run's model, e.g. the ensemble)."""
    return _autocast(cfg, device)


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tb"))


class _LossMeter:
    """Running mean training loss per task between TensorBoard writes."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, task: str, value: float) -> None:
        self.sums[task] = self.sums.get(task, 0.0) + value
        self.counts[task] = self.counts.get(task, 0) + 1

    def means(self) -> dict[str, float]:
        return {t: self.sums[t] / self.counts[t] for t in self.sums}

    def overall(self) -> float:
        return sum(self.sums.values()) / max(1, sum(self.counts.values()))

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def default_run_dir(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def load_data(cfg: Config, backbone: Backbone | None = None) -> data_lib.TaskData:
    """Tokenized train/dev/test data for ``cfg`` (what a search builds once and shares).

    The backbone is checked against ``cfg`` (:func:`mtl.backbones.load_backbone`) before any
    data is tokenized, unless ``backbone`` is one already checked.
    """
    backbone = backbone if backbone is not None else load_backbone(cfg)
    return data_lib.load_task_data(cfg.data, backbone.tokenizer, cfg.model.design, cfg.seed)


def train(
    cfg: Config,
    reporter: Reporter | None = None,
    *,
    resume_from: str | Path | None = None,
    run_dir: str | Path | None = None,
    data: data_lib.TaskData | None = None,
    backbone_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train one multitask model and return its best dev metrics.

    Args:
        cfg: the validated run configuration.
        reporter: called after every dev evaluation with the metrics and a checkpoint folder.
            The caller that passes one records the run's hyperparameters itself (the search
            writes one TensorBoard HParams view per experiment), so the run's own HParams
            summary is written only without a reporter.
        resume_from: a checkpoint folder written by an earlier run of the same config.
        run_dir: the run folder (default ``cfg.output_dir`` or ``runs/<time>``).
        data: pre-tokenized data (as :func:`load_data` builds it), e.g. shared by a search.
        backbone_state: the backbone's pretrained weights already in memory (as
            :func:`mtl.bert.read_checkpoint` reads them), e.g. shared by a search.

    Returns:
        The dev metrics of the best evaluation by ``cfg.train.selection_metric``, plus
        ``best_evaluation`` and ``best_epoch``.

    Raises:
        NonFiniteLossError: the training loss became NaN or infinite.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_info(run_dir, cfg)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.seed)
    device = _device(cfg)
    autocast = _autocast(cfg, device)

    # The backbone, its config, tokenizer and weights checked once, before any data is tokenized.
    backbone = load_backbone(cfg)
    weights = backbone.read_weights(backbone_state)
    if data is None:
        data = load_data(cfg, backbone)
    stage1 = contrastive.stage1_for_run(cfg, run_dir, data, device, autocast)
    data = contrastive.exclude_stage1(data, stage1)  # a filtered copy; the shared data is intact
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

    model = build_model(cfg, backbone.folder, stage1.path if stage1 else None, weights)
    del weights  # the model holds its own copy
    model = model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.peak_lr)
    tasks = [t for t in cfg.data.tasks if t in data.train]
    train_sets = {t: data.train[t] for t in tasks}
    dev_sets = {t: data.dev[t] for t in tasks if t in data.dev}
    accum = cfg.train.grad_accum_steps
    plans_len = [len(epoch_plan(train_sets, cfg, e)) for e in range(cfg.train.epochs)]
    total_steps = sum(
        len(accumulation_windows(n, eval_positions(n, e, cfg), accum))
        for e, n in enumerate(plans_len)
    )
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(total_steps, cfg.train.warmup_ratio)
    )

    regularizer = smart.Regularizer(cfg.smart, model, total_steps, seed=cfg.seed)
    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from), model, optimizer, scheduler, regularizer)
        log.info("resumed from %s at epoch %d, batch %d", resume_from, state.epoch, state.position)

    writer = _tensorboard(run_dir)
    eval_bs = cfg.train.batch_size * 2
    ckpt_dir = run_dir / "checkpoint"
    best_dir = run_dir / "best"
    meter = _LossMeter()
    sel = cfg.train.selection_metric
    pbar = _progress(cfg, total_steps, state.step)
    pending = 0  # batches whose gradients wait for an optimizer step
    stop = False

    def optimizer_step() -> None:
        nonlocal pending
        if cfg.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], cfg.train.max_grad_norm
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pending = 0
        state.step += 1
        regularizer.after_step(state.step)
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{meter.overall():.4f}")
        if state.step % cfg.train.log_every == 0:
            for task, value in meter.means().items():
                writer.add_scalar(f"train/loss_{task}", value, state.step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], state.step)
            regularizer.log(writer, state.step)
            meter.reset()

    epoch_loss = _LossMeter()
    try:
        while state.epoch < cfg.train.epochs and not stop:
            plan = epoch_plan(train_sets, cfg, state.epoch)
            evals = eval_positions(len(plan), state.epoch, cfg)
            # The size of the window each batch belongs to: its loss is divided by it.
            window = [n for n in accumulation_windows(len(plan), evals, accum) for _ in range(n)]
            model.train()
            for pos in range(state.position, len(plan)):
                item = plan[pos]
                batch = data_lib.collate(train_sets[item.task], item.indices).to(device)
                with autocast():
                    out = model(batch)
                    loss = model.tasks[item.task].loss(out.logits, batch.labels)
                    total = regularizer.add(loss, model, batch, out.logits)
                if not torch.isfinite(total):
                    raise NonFiniteLossError(
                        f"training loss became {total.item()} at step {state.step} "
                        f"(epoch {state.epoch}, task {item.task})"
                    )
                (total / window[pos]).backward()
                meter.add(item.task, loss.item())
                epoch_loss.add(item.task, loss.item())
                pending += 1
                state.position = pos + 1
                at_eval = state.position in evals
                if pending == window[pos]:
                    optimizer_step()
                stop = cfg.train.max_steps is not None and state.step >= cfg.train.max_steps
                if at_eval or stop:
                    model.eval()
                    metrics, preds = evaluate(model, dev_sets, eval_bs, device, autocast)
                    model.train()
                    state.evaluation += 1
                    metrics.update(
                        epoch=state.epoch + state.position / len(plan),
                        step=float(state.step),
                        evaluation=float(state.evaluation),
                        train_loss=epoch_loss.overall(),
                    )
                    epoch_loss.reset()
                    # An undefined metric counts as 0 here, as in the overall score.
                    score = metrics[sel] if metrics[sel] is not None else 0.0
                    if score > state.best:
                        state.best, state.best_metrics = score, dict(metrics)
                        _save_best(best_dir, model, cfg, metrics)
                        write_dev_predictions(
                            run_dir / DEV_PREDICTIONS_FILE, dev_sets, preds, model.tasks
                        )
                    metrics[best_key(sel)] = state.best
                    state.history.append(metrics)
                    for key in metric_names(configured(cfg.data)):
                        if metrics.get(key) is not None:  # no point for an undefined metric
                            writer.add_scalar(f"dev/{key}", metrics[key], state.step)
                    writer.flush()
                    if state.position == len(plan):
                        state.epoch, state.position = state.epoch + 1, 0
                    save_checkpoint(ckpt_dir, model, optimizer, scheduler, state, regularizer)
                    (run_dir / "metrics.json").write_text(
                        json.dumps({"history": state.history, "best": state.best_metrics}, indent=2)
                    )
                    log.info("eval %d: %s", state.evaluation, _fmt(metrics, cfg))
                    if reporter is not None:
                        reporter(
                            {k: math.nan if v is None else v for k, v in metrics.items()}, ckpt_dir
                        )
                if stop:
                    break
            if not stop and state.position == len(plan):
                state.epoch, state.position = state.epoch + 1, 0
    finally:
        if pbar is not None:
            pbar.close()

    if reporter is None:
        _write_hparams(writer, cfg, state.best_metrics)
    writer.close()
    if cfg.train.write_predictions and best_dir.exists():
        model.load_state_dict(load_file(best_dir / "model.safetensors"))
        _write_all_predictions(
            run_dir / "predictions", model, data, tasks, eval_bs, device, autocast
        )
    result = dict(state.best_metrics)
    result["best_evaluation"] = result.pop("evaluation", 0.0)
    result["best_epoch"] = result.pop("epoch", 0.0)
    return result


def _fmt(metrics: Mapping[str, float | None], cfg: Config) -> str:
    keys = metric_names(configured(cfg.data))
    values = {
        k: "undefined" if metrics[k] is None else f"{metrics[k]:.4f}" for k in keys if k in metrics
    }
    return " ".join(f"{k}={v}" for k, v in values.items())


def _progress(cfg: Config, total: int, done: int):
    if not cfg.train.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)


def _save_best(best_dir: Path, model: nn.Module, cfg: Config, metrics: dict[str, float]) -> None:
    tmp = best_dir.with_name(best_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_weights(model, tmp / "model.safetensors")
    (tmp / "best.json").write_text(
        json.dumps({"metrics": metrics, "config": cfg.to_dict()}, indent=2)
    )
    shutil.rmtree(best_dir, ignore_errors=True)
    tmp.rename(best_dir)


def _write_hparams(writer, cfg: Config, best: dict[str, float]) -> None:
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


def _write_all_predictions(
    out_dir: Path,
    model: MultitaskBert,
    data: data_lib.TaskData,
    tasks: list[str],
    batch_size: int,
    device: torch.device,
    autocast,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, sets in (("dev", data.dev), ("test", data.test)):
        for task in tasks:
            if task in sets:
                preds = predict_split(model, sets[task], batch_size, device, autocast)
                write_predictions(
                    out_dir / f"{task}-{split}-output.csv", model.tasks[task], sets[task].ids, preds
                )
    partial = [
        f"{task}-test-output.csv: {len(data.test[task])} of {data.test_rows[task]} test ids"
        for task in tasks
        if task in data.test and len(data.test[task]) < data.test_rows.get(task, 0)
    ]
    write_missing(out_dir, data.missing, partial)


def write_missing(
    out_dir: Path, missing: Sequence[str], partial: Sequence[str] = ()
) -> Path | None:
    """``MISSING.txt`` beside prediction files that are not a whole submission: the absent test
    files, and the test files predicted for a subsample only. Returns its path (None: nothing is
    missing, no file)."""
    notes = []
    if missing:
        notes += ["No test predictions for these absent files:", *missing]
    if partial:
        notes += ["Test predictions for a subsample only (data.max_eval_examples):", *partial]
        log.warning("test predictions are not a whole submission: %s", "; ".join(partial))
    if not notes:
        return None
    path = out_dir / "MISSING.txt"
    path.write_text("\n".join(notes) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """``python -m mtl.train [CONFIG.yaml] [--set key=value ...] [--resume CKPT]``."""
    import argparse

    from mtl.backbones import BackboneError
    from mtl.config import ConfigError, add_set_argument, load_config

    parser = argparse.ArgumentParser(prog="python -m mtl.train", description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", help="YAML config (default: every default)")
    add_set_argument(parser, "train.lr=1e-4")
    parser.add_argument("--resume", metavar="CKPT", help="resume from a checkpoint folder")
    parser.add_argument("--output-dir", help="run folder (overrides output_dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume and not (Path(args.resume) / "train_state.json").is_file():
            raise ConfigError(
                f"--resume {args.resume}: not a checkpoint folder (no train_state.json)"
            )
        run_dir = Path(args.output_dir) if args.output_dir else default_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        metrics = train(cfg, resume_from=args.resume, run_dir=run_dir)
    except (ConfigError, data_lib.DataError, BackboneError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"best dev: {_fmt(metrics, cfg)}  ->  {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
