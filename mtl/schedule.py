"""The epoch schedule: which batch comes when, when the dev set is evaluated, and which batches
share an optimizer step (section 4.2 of the paper).

* ``sequential``: each epoch runs all batches of the first task, then the second, then the third
  (in ``data.tasks`` order). An epoch is one pass over every task's training set.
* ``round_robin``: each epoch cycles one batch of SST, one of Quora, one of STS, ... With
  ``train.epoch_until: largest`` (default) the cycle runs until the largest set has been seen once;
  a smaller set that runs out is reshuffled and starts again. With ``smallest`` it stops when the
  smallest set is exhausted (the larger sets are subsampled that epoch, differently each epoch).

The data order of every epoch is a pure function of ``(seed, epoch)``, so a checkpoint only has to
record its position in the epoch. The evaluation schedule has one owner here: the trainer
evaluates at :func:`eval_positions`, and the search's ASHA budget is :func:`evaluations_per_run`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from mtl import data as data_lib
from mtl.config import Config


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


def evaluations_in_epoch(epoch: int, cfg: Config) -> int:
    """Dev evaluations scheduled in ``epoch`` (0-based) by ``train.eval_every``: every
    ``eval_every`` epochs and after the last one (whole numbers), or ``round(1 / eval_every)``
    per epoch (fractions)."""
    every = cfg.train.eval_every
    if every >= 1:
        return int((epoch + 1) % int(every) == 0 or epoch + 1 == cfg.train.epochs)
    return max(1, round(1 / every))


def eval_positions(plan_len: int, epoch: int, cfg: Config) -> list[int]:
    """Positions in the epoch (number of batches done) after which to evaluate on dev: the
    :func:`evaluations_in_epoch` spread evenly (an epoch of fewer batches than evaluations
    evaluates once per batch)."""
    count = evaluations_in_epoch(epoch, cfg)
    if cfg.train.eval_every >= 1:
        return [plan_len] * count
    return sorted({math.ceil(j * plan_len / count) for j in range(1, count + 1)})


def evaluations_per_run(cfg: Config) -> int:
    """Dev evaluations in a full run of ``cfg`` (ignoring ``max_steps``): what the search's ASHA
    takes as ``max_t``, so that it agrees with :func:`eval_positions` by construction."""
    return sum(evaluations_in_epoch(epoch, cfg) for epoch in range(cfg.train.epochs))


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
