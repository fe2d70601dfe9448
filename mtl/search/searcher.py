"""Ray Tune's OptunaSearch, recording trials that ASHA stopped as PRUNED.

Ray's ``OptunaSearch.on_trial_complete`` tells Optuna ``COMPLETE`` with the last reported value for
every trial that ends without an error, also for a trial the scheduler stopped after two
evaluations of ten. TPE would then compare partial-budget scores with full-budget ones. Optuna's
own convention is that an early-stopped trial is ``PRUNED`` and keeps its last intermediate value.

Tune never passes the result on which the scheduler decided STOP to ``Searcher.on_trial_result``
(tune_controller.py, ``_process_trial_result``), only to ``on_trial_complete``. A trial that ends
with a result the searcher has not seen was therefore stopped by the scheduler; one whose final
result it has seen ran to its own end (the trainer returned). The search's ASHA
(:class:`mtl.search.scheduler.EvaluationASHA`) has no rung at or above ``max_t`` and lets a trial
that reached ``max_t`` run to its end, so a scheduler STOP always comes before the full budget and
is a prune. (Ray's own ASHA with ``stop_last_trials=False`` is not enough: when ``max_t /
grace_period`` is a power of ``reduction_factor`` it keeps a rung at ``max_t`` and stops trials
there.) Trials that Tune's time budget stops never reach the searcher at all; the driver closes
them afterwards (``mtl.search.run.finish_study``).

Intermediate values are keyed by the trainer's ``evaluation`` count, not Tune's
``training_iteration``, so a trial retried from its checkpoint continues its curve. Each is the
value ASHA compares, ``best_<metric>``: the best dev score up to that evaluation (a running
best, never decreasing), not that evaluation's own score (which is in the trial's TensorBoard
curve ``dev/<metric>`` and its ``result.json``). A PRUNED trial's value is its last one.

What optuna-dashboard shows of a trial besides its parameters: the objective's name
(``Study.set_metric_names``) and the user attributes (:data:`FATE_ATTRS`): ``fate``
(``completed``, ``stopped`` or ``error``), ``reason`` (``ASHA at evaluation k``, the error),
``trial_folder`` (its folder in the experiment folder) and ``best``: every dev metric and the
evaluation number at the trial's best evaluation by the objective (one attribute: the
dashboard's attribute box shows about six rows).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from mtl.search.trainable import TRIAL_FOLDER_KEY

log = logging.getLogger(__name__)

STEP_KEY = "evaluation"
RAY_TRIAL_ATTR = "ray_trial_id"
# A retried errored trial's record (mtl.search.run.record_retries): its FAIL trial's number.
RETRY_ATTR = "retry_of"
# Study attribute: trial number -> why the driver closed a trial Tune never completed.
CLOSED_ATTR = "closed_by_driver"
FATE_ATTRS = ("best", "fate", "reason", "trial_folder")


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch with PRUNED states for scheduler-stopped trials (see the module docstring)."""

    def __init__(self, *args: Any, objective: str, metrics: Sequence[str], **kwargs: Any) -> None:
        """``objective``: the dev metric whose running best is the searcher's ``metric``;
        ``metrics``: the dev metrics a trial reports (``DesignSpace.metrics``), kept for the
        best evaluation in the trial's user attributes."""
        super().__init__(*args, **kwargs)
        self._metrics = tuple(metrics)
        self._last_step: dict[str, int] = {}
        self._objective = objective
        self._best_dev: dict[str, dict[str, float]] = {}  # trial id -> dev metrics, best eval
        self._seen: dict[str, dict[str, Any]] = {}  # trial id -> its folder, last error
        if self._ot_study is not None and self._ot_study.metric_names is None:
            with warnings.catch_warnings():  # set_metric_names is experimental in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names([self.metric])

    def _track(self, trial_id: str, result: dict | None) -> None:
        """Keep what the trial's user attributes will hold: folder, error, best dev metrics."""
        if not result:
            return
        seen = self._seen.setdefault(trial_id, {})
        for key in (TRIAL_FOLDER_KEY, "error"):
            if isinstance(result.get(key), str):
                seen[key] = result[key]
        score = result.get(self._objective)
        if score is None or math.isnan(score) or result.get(STEP_KEY) is None:
            return
        best = self._best_dev.get(trial_id)
        if best is None or score > best[self._objective]:
            self._best_dev[trial_id] = {
                m: float(result[m])
                for m in (*self._metrics, STEP_KEY)
                if isinstance(result.get(m), int | float) and not math.isnan(result[m])
            }

    def _annotate(self, trial_id: str, fate: str, reason: str) -> None:
        """Set the trial's user attributes (before it is told: a finished trial is read-only)."""
        ot_trial = self._ot_trials[trial_id]
        seen = self._seen.get(trial_id, {})
        attrs = {
            "fate": fate,
            "reason": reason,
            "trial_folder": seen.get(TRIAL_FOLDER_KEY, ""),
        }
        if trial_id in self._best_dev:
            attrs["best"] = self._best_dev[trial_id]
        try:
            for key, value in attrs.items():
                ot_trial.set_user_attr(key, value)
        except Exception as exc:  # never lose the trial's state for its attributes
            log.warning("could not set the attributes of trial %s: %s", trial_id, exc)

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if params is not None and ot_trial is not None:
            ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return params

    def _report(self, trial_id: str, result: dict) -> bool:
        """Record ``result`` as an intermediate value; False if it is not a new evaluation."""
        step, value = result.get(STEP_KEY), result.get(self.metric)
        if step is None or value is None or trial_id not in self._ot_trials:
            return False
        step = int(step)
        if step <= self._last_step.get(trial_id, 0):
            return False
        self._ot_trials[trial_id].report(float(value), step)
        self._last_step[trial_id] = step
        return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:
            return
        self._track(trial_id, result)
        self._report(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        self._track(trial_id, result)
        if not error and result and self._report(trial_id, result):
            # A result withheld from on_trial_result: the scheduler stopped the trial here.
            self._annotate(trial_id, "stopped", f"ASHA at evaluation {int(result[STEP_KEY])}")
            try:
                self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            except Exception as exc:  # the study may already hold this trial as finished
                log.warning("could not record trial %s as pruned: %s", trial_id, exc)
            self._completed_trials.add(trial_id)
            return None
        if error:
            reason = self._seen.get(trial_id, {}).get("error", "the trial raised an exception")
            self._annotate(trial_id, "error", reason[:300])
        else:
            self._annotate(trial_id, "completed", "")
        return super().on_trial_complete(trial_id, result, error)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


def make_sampler(name: str, seed: int, parallel: bool, startup_trials: int | None):
    """The Optuna sampler for ``search.sampler`` (grid runs without Optuna)."""
    samplers = optuna.samplers
    if name == "tpe":
        kwargs: dict[str, Any] = {"seed": seed, "constant_liar": parallel}
        if startup_trials is not None:
            kwargs["n_startup_trials"] = startup_trials
        return samplers.TPESampler(**kwargs)
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    raise ValueError(f"no Optuna sampler for {name!r}")
