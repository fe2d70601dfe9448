"""The Ray Tune trial: one call of ``mtl.train.train`` with a reporter that reports to Tune.

What runs where:

* The trainer writes its run folder (config, metrics.json, TensorBoard events, the latest and best
  checkpoints) into a scratch folder on the node (:func:`scratch_root`), removed when the trial
  ends and, for trials that died with the driver, when the experiment next starts or ends. After every evaluation the reporter copies the
  small files into the trial's working directory, which Tune syncs into the experiment folder
  (``SyncConfig(sync_artifacts=True)``), and hands the trainer's checkpoint folder to
  ``tune.report``, which copies it into the experiment folder. The model-sized ``checkpoint/``
  and ``best/`` folders are left out of the artifact sync: Tune's own checkpoints (ranked by the
  objective) are the durable copies.
* A retried trial resumes from ``tune.get_checkpoint()``.
* The tokenized data comes from a :class:`~mtl.search.data_cache.DataCache` actor that builds
  each distinct dataset once per experiment (or loads it from the on-disk tokenized cache an
  earlier run stored, :func:`mtl.data.load_packed_task_data`) and keeps it in Ray's object
  store. The backbone's pretrained weights come from the same actor: read from disk once,
  fetched once per node, shared by the trials there.
* Every Ray worker imports the trainer's heavy modules as it starts
  (:func:`mtl.search.warmup.warm_worker`, Ray's ``worker_process_setup_hook``), and the cache
  starts building the data and reading the weights as soon as the search has started Ray
  (:func:`prefetch`, called by :func:`mtl.search.run.start_data_cache`), so a fresh worker's
  first trial neither imports nor waits from its first line (``benchmarks/trial_startup.py``).
* A non-finite loss reports one result flagged ``nonfinite`` and re-raises; the driver's
  :class:`NoRetryOnNonFinite` callback sees the flag and spends the trial's retries, so the error
  ends the trial at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from mtl import allocator
from mtl.config import build_config, merge
from mtl.data import unpack
from mtl.metrics import best_key
from mtl.search.data_cache import data_key
from mtl.search.space import trial_config_dict

log = logging.getLogger(__name__)

NONFINITE_KEY = "nonfinite"
OUTCOME_FILE = "outcome.json"
TRIAL_FOLDER_KEY = "trial_folder"  # each report names the trial's folder in the experiment
POINT_KEY = "_point"  # grid runs with conditions pass each point as one dict under this key
# Folders of the trainer's run folder that hold model weights: never copied as artifacts.
_HEAVY = ("checkpoint", "checkpoint.tmp", "checkpoint.old", "best", "best.tmp", "resume")


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of one experiment shares (put once into the object store by Tune)."""

    base: dict[str, Any]  # trainer config every trial starts from (with search-level settings)
    paths: dict[str, str]  # parameter name -> config path
    metric: str  # objective metric, e.g. "overall"
    data_cache: Any = None  # DataCache actor handle; None: each trial loads its own data
    settings: dict[str, Any] = field(default_factory=dict)  # forced trainer settings (threads...)
    scratch: str = "default"  # this experiment's folder under scratch_root() on every node


def prefetch(spec: TrialSpec) -> None:
    """Starts the cache building the base config's data and reading its weights, not waiting.

    Skipped for the data when a search parameter changes what the data depends on
    (:func:`data_key`): the trials then ask for their own. Cache actor calls run in order, so a
    trial asking while the build runs waits for it instead of starting a second one.
    """
    if spec.data_cache is None:
        return
    cfg_dict = merge(spec.base, spec.settings)  # as run_trial builds a trial's config
    spec.data_cache.prefetch.remote(
        data_key(cfg_dict) if shares_data(spec) else None,
        cfg_dict,
        build_config(cfg_dict).model.backbone,
    )


def shares_data(spec: TrialSpec) -> bool:
    """Whether every trial reads the base config's data: no search parameter changes what the
    data depends on (:func:`data_key`)."""
    keyed = ("data.", "model.backbone", "model.design", "seed")
    return not any(path.startswith(keyed) for path in spec.paths.values())


def scratch_root() -> Path:
    """Where trials keep their trainer run folders on the node (model and optimizer included)."""
    return Path(tempfile.gettempdir()) / "mtl-search"


def remove_scratch(key: str) -> None:
    """Delete an experiment's scratch folder on this node: trials that died with the driver
    never ran their own clean-up, and a resumed trial restores from Tune's checkpoint instead."""
    shutil.rmtree(scratch_root() / key, ignore_errors=True)
    with contextlib.suppress(OSError):  # other experiments' folders remain
        scratch_root().rmdir()


def trial_dirname(trial: Any) -> str:
    """A trial's folder name: its number in the experiment and its Tune id, e.g. ``0006-1a1dfdeb``
    (Tune's default, ``run_trial_<id>_<n>_<param=value,...>_<date>``, is cut at 130 characters
    and rounds the values; the trial's parameters are in its ``params.json``)."""
    number = trial.experiment_tag.split("_", 1)[0]
    prefix = trial.trial_id.split("_", 1)[0]
    return f"{int(number):04d}-{prefix}" if number.isdigit() else trial.trial_id


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The parameter values of a trial, whichever way the search laid out its config."""
    if POINT_KEY in config:
        return {**config[POINT_KEY], **{k: v for k, v in config.items() if k != POINT_KEY}}
    return dict(config)


def _shared_weights(spec: TrialSpec, backbone: str) -> dict[str, Any] | None:
    if spec.data_cache is None:
        return None
    try:
        ref = ray.get(spec.data_cache.weights.remote(backbone))[0]
    except ray.exceptions.RayActorError as err:
        log.warning("weights cache unavailable (%s); this trial reads the weights file", err)
        return None
    # A copy out of the read-only shared buffer; the file is not read again.
    return {k: torch.tensor(v) for k, v in ray.get(ref).items()}


def _shared_data(spec: TrialSpec, cfg_dict: dict[str, Any], stage1: bool):
    """The trial's copy of the shared data; None without a cache (the trial loads its own).

    Only stage 1 reads the text kept in ``raw_train`` (Quora's pairs, about 350 bytes each in
    the heap, benchmarks/raw_train_memory.py): a trial without it (``stage1`` False) lets its
    copy go.
    """
    if spec.data_cache is None:
        return None
    try:
        ref = ray.get(spec.data_cache.get.remote(data_key(cfg_dict), cfg_dict))[0]
        data = unpack(ray.get(ref))
    except ray.exceptions.RayActorError as err:
        log.warning("data cache unavailable (%s); this trial loads its own data", err)
        return None
    return data if stage1 else dataclasses.replace(data, raw_train={})


def mirror(run_dir: Path, work_dir: Path) -> None:
    """Copy the trainer's small files (events, metrics, config, predictions) into ``work_dir``.

    Tune may be syncing ``work_dir`` to storage while this runs (when it stops a trial, its forced
    final sync overlaps the trial's last mirror), so a file is never rewritten in place, where a
    reader could catch it half-written: each changed file is copied beside ``work_dir`` and renamed
    over its old copy, and files that have not changed are left alone.
    """
    if not run_dir.is_dir():
        return
    staging = work_dir.parent / f".{work_dir.name}.mirror"
    staging.mkdir(exist_ok=True)
    try:
        for src, name in _mirrored_files(run_dir):
            dst = work_dir / name
            if dst.is_file() and _same_file(src.stat(), dst.stat()):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = staging / "file"
            shutil.copy2(src, tmp)
            tmp.replace(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _mirrored_files(run_dir: Path) -> list[tuple[Path, Path]]:
    """(file, its path in the trial folder): everything but the weights, and best/best.json."""
    files = [
        (p, p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and p.parts[len(run_dir.parts)] not in _HEAVY
    ]
    best = run_dir / "best" / "best.json"
    return [*files, (best, Path("best.json"))] if best.is_file() else files


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _purge_tensorboard(tb_dir: Path, checkpoint_dir: Path) -> None:
    """Drop the lost attempt's TensorBoard points after the checkpoint it resumes from.

    The trial folder keeps the event file mirrored from the attempt that failed, which may hold
    steps after its last checkpoint; the resumed trainer writes those steps again. An event file
    that starts with TensorBoard's ``purge_step`` (a ``SessionLog.START`` at the first step the
    resumed run writes) makes TensorBoard discard every earlier point from that step on.
    """
    from torch.utils.tensorboard import SummaryWriter

    state = json.loads((checkpoint_dir / "train_state.json").read_text())
    SummaryWriter(log_dir=str(tb_dir), purge_step=int(state["step"]) + 1).close()


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The function Tune runs for each trial."""
    from mtl.train import NonFiniteLossError, train

    started = time.time()
    params = trial_params(config)
    cfg_dict = merge(trial_config_dict(spec.base, spec.paths, params), spec.settings)
    cfg = build_config(cfg_dict, "trial config")
    ctx = tune.get_context()
    work_dir = Path.cwd()  # Tune's trial working directory, synced as artifacts
    run_dir = scratch_root() / spec.scratch / ctx.get_trial_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    node_id = ray.get_runtime_context().get_node_id()
    best = best_key(spec.metric)
    last: dict[str, float] = {}

    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        # A retry on this node finds the failed attempt's run folder, with events logged after
        # its last checkpoint: start clean from Tune's checkpoint instead.
        shutil.rmtree(run_dir, ignore_errors=True)
        resume_from = run_dir / "resume"
        checkpoint.to_directory(str(resume_from))
        _purge_tensorboard(run_dir / "tb", resume_from)

    data = _shared_data(spec, cfg_dict, stage1=cfg.contrastive.enabled)
    weights = _shared_weights(spec, cfg.model.backbone)
    setup_s = time.time() - started

    def reporter(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        last.update(metrics)
        mirror(run_dir, work_dir)
        tune.report(
            {**metrics, "node_id": node_id, "setup_s": setup_s, TRIAL_FOLDER_KEY: work_dir.name},
            checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)),
        )

    try:
        best = train(
            cfg,
            reporter,
            resume_from=resume_from,
            run_dir=run_dir,
            data=data,
            backbone_state=weights,
        )
    except NonFiniteLossError as err:
        mirror(run_dir, work_dir)
        tune.report(
            {
                NONFINITE_KEY: 1.0,
                best: last.get(best, math.nan),
                "error": str(err),
                TRIAL_FOLDER_KEY: work_dir.name,
            }
        )
        raise
    finally:
        # Also when Tune stops the trial (SystemExit inside tune.report).
        mirror(run_dir, work_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last trial of the experiment on this node
            run_dir.parent.rmdir()
        # The next trial may run in this same process (reuse_actors): return what this one
        # freed, or the worker's resident memory grows trial after trial.
        gc.collect()
        allocator.release_freed_memory()
    outcome = {"finished": True, "best": best, "params": params, "node_id": node_id}
    (work_dir / OUTCOME_FILE).write_text(json.dumps(outcome, indent=2))


class NoRetryOnNonFinite(tune.Callback):
    """Spends a trial's retries when it reports a non-finite loss, so its error is final."""

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        if result.get(NONFINITE_KEY):
            # Trial.should_recover(): num_failures (incremented by the coming error) <= max_failures
            trial.max_failures = trial.run_metadata.num_failures
