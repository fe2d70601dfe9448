"""The multitask training loop: one ``train(cfg, reporter) -> metrics`` for the CLI and for Ray.

The loop alone lives here; each of its other jobs has its module: the run folder's records
(:mod:`mtl.run_record`), the model, optimizer groups, device and precision (:mod:`mtl.build`),
the epoch schedule (:mod:`mtl.schedule`), evaluation and prediction files
(:mod:`mtl.evaluation`), checkpoints with their random states (:mod:`mtl.checkpoints`), and the
command line (:mod:`mtl.cli`; ``python -m mtl.train`` runs it).

The trainer never imports Ray: a caller passes a ``reporter(metrics, checkpoint_dir)`` that is
called after every dev evaluation.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file

from mtl import allocator, contrastive, smart
from mtl import data as data_lib
from mtl import precision as precision_lib
from mtl.backbones import Backbone, load_backbone
from mtl.build import build_model, linear_schedule, param_groups, resolve_device
from mtl.checkpoints import TrainState, load_checkpoint, save_best, save_checkpoint
from mtl.config import Config
from mtl.evaluation import (
    DEV_PREDICTIONS_FILE,
    evaluate,
    format_metrics,
    write_all_predictions,
    write_dev_predictions,
)
from mtl.metrics import best_key, metric_names
from mtl.run_record import (
    default_run_dir,
    open_tensorboard,
    seed_everything,
    write_data_report,
    write_hparams,
    write_metrics,
    write_run_info,
)
from mtl.schedule import accumulation_windows, epoch_plan, eval_positions
from mtl.tasks import configured

log = logging.getLogger("mtl.train")


class Reporter(Protocol):
    """Receives the dev metrics and a resumable checkpoint folder after every evaluation.

    An undefined metric (STS Pearson of a constant prediction) is NaN here, null in
    ``metrics.json``.
    """

    def __call__(self, metrics: dict[str, float], checkpoint_dir: Path) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover by retrying."""


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


def load_packed_data(cfg: Config, backbone: Backbone | None = None) -> data_lib.TaskData:
    """Tokenized train/dev/test data for ``cfg``, packed (what a search builds once and shares),
    from the tokenized cache when an earlier run built the same (:func:`mtl.data.load_packed_task_data`).

    The backbone is checked against ``cfg`` (:func:`mtl.backbones.load_backbone`) before any
    data is tokenized, unless ``backbone`` is one already checked.
    """
    backbone = backbone if backbone is not None else load_backbone(cfg)
    return data_lib.load_packed_task_data(
        cfg.data, backbone.tokenizer, backbone.folder, cfg.model.design, cfg.seed
    )


def load_data(cfg: Config, backbone: Backbone | None = None) -> data_lib.TaskData:
    """:func:`load_packed_data`, unpacked: per-example tensors, as the trainer reads them."""
    return data_lib.unpack(load_packed_data(cfg, backbone))


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
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg)
    if device.type == "cpu":
        allocator.keep_freed_memory()
    precision = precision_lib.choose_precision(cfg.train.precision, device)
    write_run_info(run_dir, cfg, precision_lib.run_record(precision, device))
    seed_everything(cfg.seed)
    autocast = precision_lib.autocast(precision, device)

    # The backbone, its config, tokenizer and weights checked once, before any data is tokenized.
    backbone = load_backbone(cfg)
    weights = backbone.read_weights(backbone_state)
    if data is None:
        data = load_data(cfg, backbone)
    stage1 = contrastive.stage1_for_run(cfg, run_dir, data, device, autocast, backbone, weights)
    data = contrastive.exclude_stage1(data, stage1)  # a filtered copy; the shared data is intact
    write_data_report(run_dir, data)

    model = build_model(cfg, backbone.folder, stage1.path if stage1 else None, weights)
    del weights  # the model holds its own copy
    model = model.to(device)
    # Fused AdamW updates each tensor in one pass: on CPU 0.03 s a step for MiniLM's 22M
    # parameters against 0.2 s for the default per-tensor loop (benchmarks/RESULTS_precision.md).
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.train.peak_lr, fused=device.type in ("cpu", "cuda")
    )
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

    writer = open_tensorboard(run_dir)
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
                        save_best(best_dir, model, cfg, metrics)
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
                    write_metrics(run_dir, state.history, state.best_metrics)
                    log.info("eval %d: %s", state.evaluation, format_metrics(metrics, cfg))
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
        write_hparams(writer, cfg, state.best_metrics)
    writer.close()
    if cfg.train.write_predictions and best_dir.exists():
        model.load_state_dict(load_file(best_dir / "model.safetensors"))
        write_all_predictions(
            run_dir / "predictions", model, data, tasks, eval_bs, device, autocast
        )
    result = dict(state.best_metrics)
    result["best_evaluation"] = result.pop("evaluation", 0.0)
    result["best_epoch"] = result.pop("epoch", 0.0)
    return result


def _progress(cfg: Config, total: int, done: int):
    if not cfg.train.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)


if __name__ == "__main__":
    from mtl.cli import main

    sys.exit(main())
