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
``training_iteration``, so a trial retried from its checkpoint continues its curve.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)

STEP_KEY = "evaluation"
RAY_TRIAL_ATTR = "ray_trial_id"
# Study attribute: trial number -> why the driver closed a trial Tune never completed.
CLOSED_ATTR = "closed_by_driver"


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch with PRUNED states for scheduler-stopped trials (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_step: dict[str, int] = {}

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
        self._report(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        if not error and result and self._report(trial_id, result):
            # A result withheld from on_trial_result: the scheduler stopped the trial here.
            try:
                self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            except Exception as exc:  # the study may already hold this trial as finished
                log.warning("could not record trial %s as pruned: %s", trial_id, exc)
            self._completed_trials.add(trial_id)
            return None
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
