"""Ray Tune's ASHA, with no rung at max_t and its rung records rebuilt after ``--resume``.

Two corrections to ``ray.tune.schedulers.AsyncHyperBandScheduler`` (Ray 2.60,
``schedulers/async_hyperband.py``):

* **No rung at or above max_t.** ``_Bracket`` places rungs at ``grace_period * rf**k`` for
  ``k < int(log(max_t / grace_period) / log(rf)) + 1``, so when ``max_t / grace_period`` is a
  power of ``reduction_factor`` the last rung sits exactly at ``max_t``; ``stop_last_trials=False``
  only skips the separate "reached max_t" stop, not that rung. A trial below the cutoff at its last
  evaluation was then stopped after running its whole budget (no predictions, no ``outcome.json``,
  PRUNED in Optuna). Here a trial at ``max_t`` always continues to its own end, and the rungs are
  those strictly below ``max_t`` (:attr:`EvaluationASHA.rungs`; :func:`asha_rungs` for an
  experiment's, as the analyses ask).
* **Rung records survive a resume.** Tune saves the searcher's state but not the scheduler's
  (``TuneController.save_to_dir``); ``Tuner.restore`` unpickles the scheduler as it was before the
  first trial, so its rungs start empty and trials the first run would have stopped run on. Tune
  passes every restored trial to ``on_trial_add``; a trial that already has results gets them
  replayed from its ``result.json`` into the rungs, in order, as the first run recorded them.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

from mtl.search.experiment import read_reports

log = logging.getLogger(__name__)


class EvaluationASHA(AsyncHyperBandScheduler):
    """ASHA that never stops a trial at ``max_t`` and rebuilds its rungs on resume.

    Args:
        time_attr: the monotone progress key of each result (here the trainer's ``evaluation``).
        metric: the result key ranked at each rung, e.g. ``best_overall``.
        mode: ``"max"`` or ``"min"``.
        max_t: ``time_attr`` of a full-budget trial.
        grace_period: ``time_attr`` of the first rung.
        reduction_factor: keep the top ``1 / reduction_factor`` at each rung.
    """

    def __init__(
        self,
        *,
        time_attr: str,
        metric: str,
        mode: str,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
    ) -> None:
        super().__init__(
            time_attr=time_attr,
            metric=metric,
            mode=mode,
            max_t=max_t,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            stop_last_trials=False,
        )
        for bracket in self._brackets:
            bracket._rungs = [(m, rec) for m, rec in bracket._rungs if m < max_t]

    @property
    def rungs(self) -> list[float]:
        """Positions (in ``time_attr`` units) where a trial can be stopped, ascending."""
        return sorted(float(m) for m, _ in self._brackets[0]._rungs)

    def describe(self) -> str:
        """One line for the console: the rungs and what happens at ``max_t``."""
        if not self.rungs:
            return f"ASHA: no rung below max_t {self._max_t}; every trial runs to its end"
        where = ", ".join(f"{m:g}" for m in self.rungs)
        return (
            f"ASHA: rungs at {self._time_attr} {where} of max_t {self._max_t}; "
            "a trial that reaches max_t runs to its end"
        )

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._max_t:
            return self.CONTINUE  # its whole budget: never a prune
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.last_result and self._time_attr in trial.last_result:
            self._replay(trial)

    def _replay(self, trial: Any) -> None:
        """Feed a restored trial's earlier results into its bracket, as the first run did."""
        reports = read_reports(trial.storage.trial_fs_path, trial.storage.storage_filesystem)
        if not reports:
            log.warning("ASHA: no results of restored trial %s to replay", trial)
            return
        bracket = self._trial_info[trial.trial_id]
        for result in reports:  # every report in order: the first one past a rung is its record
            t, value = result.get(self._time_attr), result.get(self._metric)
            if t is None or value is None or t >= self._max_t:
                continue
            bracket.on_result(trial, t, self._metric_op * value)


def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[float]:
    """The rungs of :class:`EvaluationASHA` with these settings, ascending, in evaluations: where
    it compares trials and may stop one (none at or above ``max_t``).

    Asks the scheduler itself, so that the analyses show the rungs the search ran with.
    """
    scheduler = EvaluationASHA(
        time_attr="evaluation",
        metric="score",
        mode="max",
        max_t=max_t,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )
    return scheduler.rungs
