"""What TensorBoard shows of a search: one HParams view per experiment and the trials' fates.

:class:`SearchBoard` takes the place of Ray Tune's ``TBXLoggerCallback`` (Ray 2.60,
``tune/logger/tensorboardx.py``; Tune adds one unless a callback of that type is given), which
logged every result key as ``ray/tune/*`` (the dev metrics a second time, by Tune's iteration,
and a dozen bookkeeping keys) and wrote an HParams experiment of its own per trial. Here:

* The experiment folder's own event file holds the only HParams experiment summary: one column
  per design-space parameter (under its design-space name), ``fate`` (``completed``,
  ``stopped`` or ``error``) and ``reason`` (e.g. ``ASHA at evaluation 2``, the error's first
  line), and as metrics the trainer's ``dev/*`` curves (group ``tb``: TensorBoard shows the
  last evaluation's value) and the objective ``search/best_<metric>``.
* Each trial folder's event file holds the trial's HParams session, written when the trial
  ends (``fate`` is known only then): its parameter values, session status ``SUCCESS`` or
  ``FAILURE`` (an error), and the curves ``search/best_<metric>`` (the running best that ASHA
  compares) and, for a trial the scheduler stopped, one point ``search/stopped_at`` (the
  evaluation) at the optimizer step where it stopped. Steps are the trainer's optimizer steps,
  as in ``tb/``.
* The trainer's run writes no HParams summary under the search (``mtl.train.train`` with a
  reporter), so TensorBoard finds one experiment, not one per trial.

How a trial ended: Tune passes the result on which the scheduler decided STOP to the callbacks
with ``done`` set (``tune_controller._process_trial_result``); a trial whose function returned
ends on a result the callbacks never see, after which Tune sets ``done`` on the trial's last
result. A trial that ends without either was stopped by Tune's time budget (or an interrupt).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune.logger import TBXLoggerCallback
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp

from mtl.metrics import best_key
from mtl.search.space import BoolParam, CategoricalParam, DesignSpace, FloatParam, IntParam
from mtl.search.trainable import trial_params

FATES = ("completed", "stopped", "error")
TRAINER_GROUP = "tb"  # the trainer's event folder inside a trial folder
STOPPED_TAG = "search/stopped_at"


def objective_tag(metric: str) -> str:
    return f"search/{best_key(metric)}"


def _kind(value: Any) -> type:
    return float if isinstance(value, int | float) and not isinstance(value, bool) else type(value)


def _domain(param: Any) -> hp.Domain | None:
    if isinstance(param, BoolParam):
        return hp.Discrete([False, True])
    if isinstance(param, CategoricalParam):
        values = [v for v in param.choices if v is not None]
        kinds = {_kind(v) for v in values}
        if len(kinds) == 1 and values:
            return hp.Discrete([float(v) if kinds == {float} else v for v in values])
        return None  # mixed types: TensorBoard's Discrete needs one
    if isinstance(param, IntParam):
        return hp.IntInterval(param.low, param.high)
    if isinstance(param, FloatParam):
        return hp.RealInterval(float(param.low), float(param.high))
    return None


def _hparam_info(name: str, domain: hp.Domain | None, description: str = "") -> api_pb2.HParamInfo:
    info = api_pb2.HParamInfo(name=name, description=description)
    if domain is not None:
        domain.update_hparam_info(info)
    else:  # no domain: a string column, filtered by regular expression
        info.type = api_pb2.DATA_TYPE_STRING
    return info


def experiment_summary(space: DesignSpace, extra: tuple[str, ...] = ()) -> summary_pb2.Summary:
    """The HParams experiment: the design space's parameters, the fate, the metrics."""
    infos = [_hparam_info(name, _domain(p)) for name, p in space.parameters.items()]
    infos += [_hparam_info(name, None) for name in extra if name not in space.parameters]
    infos += [
        _hparam_info("fate", hp.Discrete(list(FATES)), "how the trial ended"),
        _hparam_info("reason", None, "who stopped it, at which evaluation, or the error"),
    ]
    metric = space.objective.metric
    metrics = [
        hp.Metric(
            objective_tag(metric),
            display_name=f"objective: best {metric}",
            description="the best dev score over the trial's evaluations (what ASHA compares)",
        )
    ] + [
        hp.Metric(
            f"dev/{m}",
            group=TRAINER_GROUP,
            display_name=f"dev/{m} (last evaluation)",
            dataset_type=hp.Metric.VALIDATION,
        )
        for m in space.metrics
    ]
    experiment = api_pb2.Experiment(
        hparam_infos=infos,
        metric_infos=[m.as_proto() for m in metrics],
        time_created_secs=time.time(),
    )
    return _summary(
        metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)
    )


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    # hparams.summary (v1) does this but needs TensorFlow.
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR
    )
    return summary


def _session_end(status: int) -> summary_pb2.Summary:
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return _summary(
        metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info)
    )


def _hparam_value(value: Any) -> Any:
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return float(value)
    return str(value)


class SearchBoard(TBXLoggerCallback):
    """Ray Tune's TensorBoard logger replaced (see the module docstring).

    Args:
        space: the design space that runs (its parameters become the HParams columns).
        extra: further parameter names a grid passes (the repeats' ``seed``).
    """

    def __init__(self, space: DesignSpace, extra: tuple[str, ...] = ()) -> None:
        # Not TBXLoggerCallback.__init__: this logger writes with torch's SummaryWriter.
        self._space = space
        self._extra = tuple(extra)
        self._metric = space.objective.metric
        self._writers: dict[Any, Any] = {}
        self._stopped: dict[str, tuple[int, int]] = {}  # trial id -> (evaluation, step)
        self._experiment_written = False
        self._started = time.monotonic()

    # Ray's LoggerCallback interface --------------------------------------------------------

    def log_trial_start(self, trial: Any) -> None:
        self._write_experiment(trial)
        if trial.trial_id not in self._writers and trial.run_metadata.num_failures:
            _supersede_ended_attempt(trial)
        self._writer(trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        step = result.get("step")
        if step is None or result.get("evaluation") is None:
            return  # not an evaluation (the non-finite loss report)
        step = int(step)
        writer = self._writer(trial)
        best = result.get(best_key(self._metric))
        if best is not None and not math.isnan(best):
            writer.add_scalar(objective_tag(self._metric), best, step)
        if result.get("done"):
            evaluation = int(result["evaluation"])
            self._stopped[trial.trial_id] = (evaluation, step)
            writer.add_scalar(STOPPED_TAG, evaluation, step)
        writer.flush()

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        fate, reason = self.fate(trial, failed)
        writer = self._writer(trial)
        params = {k: _hparam_value(v) for k, v in trial_params(trial.config).items()}
        hparams = {**params, "fate": fate, "reason": reason}
        file_writer = writer._get_file_writer()
        # The table's "Trial ID" is the trial folder's name, as in the curves' run names.
        file_writer.add_summary(hp.hparams_pb(hparams, trial_id=Path(trial.local_path).name))
        status = api_pb2.STATUS_FAILURE if fate == "error" else api_pb2.STATUS_SUCCESS
        file_writer.add_summary(_session_end(status))
        writer.close()
        del self._writers[trial.trial_id]

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._started = time.monotonic()  # for telling the time budget from an interrupt

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Trials that Tune's time budget stopped end here, after Tune's last sync of the driver's
        # folder to storage (tune.py: checkpoint(force=True), then cleanup()): upload their
        # event files. After an interrupt (Ctrl-C) they stay open: --resume continues them, and
        # TensorBoard keeps a session's first start info, so none is written before the end.
        budget = self._space.search.time_budget_s
        if budget is None or time.monotonic() - self._started < budget:
            trials = []
        for trial in trials:
            if trial.trial_id in self._writers and trial.status in ("TERMINATED", "ERROR"):
                self.log_trial_end(trial, failed=trial.status == "ERROR")
                _upload_events(trial)
        for writer in self._writers.values():  # interrupted: --resume continues them
            writer.close()
        self._writers.clear()

    # -------------------------------------------------------------------------------------------

    def fate(self, trial: Any, failed: bool) -> tuple[str, str]:
        """(``completed`` | ``stopped`` | ``error``, reason) of an ended trial."""
        if failed:
            error = trial.last_result.get("error") if trial.last_result else None
            return "error", str(error or _error_line(trial))[:300]
        if trial.trial_id in self._stopped:
            return "stopped", f"ASHA at evaluation {self._stopped[trial.trial_id][0]}"
        if trial.last_result and trial.last_result.get("done"):
            return "completed", ""
        return "stopped", "time budget or interrupted"

    def _writer(self, trial: Any):
        from torch.utils.tensorboard import SummaryWriter

        if trial.trial_id not in self._writers:
            trial.init_local_path()
            self._writers[trial.trial_id] = SummaryWriter(trial.local_path, flush_secs=30)
        return self._writers[trial.trial_id]

    def _write_experiment(self, trial: Any) -> None:
        """The experiment summary, once per driver, into the experiment folder (Tune syncs the
        driver's staging folder to storage)."""
        if self._experiment_written:
            return
        from torch.utils.tensorboard import SummaryWriter

        root = Path(trial.storage.experiment_driver_staging_path)
        if not any(root.glob("events.out.tfevents.*")):  # a resumed run keeps the first
            writer = SummaryWriter(str(root))
            writer._get_file_writer().add_summary(experiment_summary(self._space, self._extra))
            writer.close()
        self._experiment_written = True

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the Tuner: open writers stay behind.
        return {**self.__dict__, "_writers": {}}


def _supersede_ended_attempt(trial: Any) -> None:
    """Make way in a rerun trial's folder for the rerun's HParams row and curve.

    A trial that ended in an error and runs again (``--resume --retry-errored``, Tune's
    ``resume_errored``) keeps its folder, with the event file of its ended attempt: an HParams
    session (``fate: error``) and its ``search/best_<metric>`` points. TensorBoard keeps a run's
    first session start info (``plugin_event_accumulator``: "We only store the first instance of
    the metadata"), so the rerun's own session would never show. Each such event file is
    rewritten without its session and without the points after the checkpoint the rerun resumes
    from (all of them when it starts afresh), which the rerun writes again.
    """
    import pyarrow.fs
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    fs, folder = trial.storage.storage_filesystem, trial.path
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder))
    except (FileNotFoundError, OSError):
        return
    checkpoint = trial.latest_checkpoint_result
    resumed_at = int(checkpoint.metrics.get("step", 0)) if checkpoint is not None else 0
    session = {metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}
    for info in infos:
        if info.type != pyarrow.fs.FileType.File or "tfevents" not in info.base_name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / info.base_name
            pyarrow.fs.copy_files(info.path, str(local), source_filesystem=fs)
            events = [event_pb2.Event.FromString(r) for r in RawEventFileLoader(str(local)).Load()]
            if not any(v.tag in session for e in events for v in e.summary.value):
                continue  # not an ended attempt's file
            kept = []
            for event in events:
                if event.HasField("summary"):
                    values = [
                        v
                        for v in event.summary.value
                        if v.tag not in session and event.step <= resumed_at
                    ]
                    if not values:
                        continue
                    event.summary.CopyFrom(summary_pb2.Summary(value=values))
                kept.append(event)
            rewritten = Path(tmp) / "rewritten"
            with rewritten.open("wb") as f:
                writer = RecordWriter(f)
                for event in kept:
                    writer.write(event.SerializeToString())
                writer.flush()
            pyarrow.fs.copy_files(str(rewritten), info.path, destination_filesystem=fs)


def _upload_events(trial: Any) -> None:
    import pyarrow.fs

    for path in Path(trial.local_path).glob("events.out.tfevents.*"):
        pyarrow.fs.copy_files(
            str(path),
            f"{trial.storage.trial_fs_path}/{path.name}",
            source_filesystem=pyarrow.fs.LocalFileSystem(),
            destination_filesystem=trial.storage.storage_filesystem,
        )


def _error_line(trial: Any) -> str:
    error = trial.get_error() if hasattr(trial, "get_error") else None
    lines = [ln.strip() for ln in str(error or "error").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "error"
