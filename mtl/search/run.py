"""Run a design space with Ray Tune: OptunaSearch (define-by-run) or grid, ASHA or FIFO.

``run_search`` checks what exists of the experiment (:mod:`mtl.search.experiment`: a resume must
run the space the experiment saved), starts (or joins) Ray, checks that every node can reach the
storage path, saves the resolved space, starts the data cache, builds the Tuner (or restores it
with ``resume=True``), runs it and writes the results (:mod:`mtl.search.results`), then the seed
repeats of the best configurations.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from mtl.config import build_config, merge
from mtl.metrics import best_key
from mtl.search import results as results_lib
from mtl.search.board import SearchBoard
from mtl.search.data_cache import DataCache
from mtl.search.experiment import (
    REPEATS_SUFFIX,
    RESTORE,
    Experiment,
    evaluations,
    is_uri,
    locate,
    match_saved,
    plan,
    read_reports,
    resolve,
    scratch_key,
    start,
    study_exists,
)
from mtl.search.scheduler import EvaluationASHA
from mtl.search.searcher import (
    CLOSED_ATTR,
    RAY_TRIAL_ATTR,
    RETRY_ATTR,
    STEP_KEY,
    PruningOptunaSearch,
    make_sampler,
)
from mtl.search.space import DesignSpace, SpaceError, finite_values, grid_points, suggest
from mtl.search.trainable import (
    OUTCOME_FILE,
    POINT_KEY,
    NoRetryOnNonFinite,
    TrialSpec,
    prefetch,
    remove_scratch,
    run_trial,
    shares_data,
    trial_dirname,
)
from mtl.search.warmup import WORKER_RUNTIME_ENV

log = logging.getLogger(__name__)

SMOKE_TRIALS = 3


def smoke_space(space: DesignSpace, has_gpu: bool) -> DesignSpace:
    """The same space with a tiny budget: a few trials, tiny data slices, two evaluations each."""
    base = merge(
        space.base,
        {
            "data": {"max_train_examples": 64, "max_eval_examples": 64, "max_length": 64},
            "train": {
                "epochs": 1,
                "eval_every": 0.5,
                "max_steps": None,
                "batch_size": min(16, build_config(space.base).train.batch_size),
                "write_predictions": False,
            },
        },
    )
    search = space.search.model_copy(
        update={
            "num_samples": SMOKE_TRIALS if space.search.sampler != "grid" else 1,
            "points_to_evaluate": space.search.points_to_evaluate[:SMOKE_TRIALS],
            "time_budget_s": None,
            "repeats": None,
        }
    )
    scheduler = space.scheduler.model_copy(update={"max_t": 2, "grace_period": 1})
    resources = space.resources_per_trial
    if not has_gpu:
        resources = resources.model_copy(update={"gpu": 0.0})
    experiment = space.experiment.model_copy(update={"name": space.experiment.name + "-smoke"})
    return space.model_copy(
        update={
            "base": base,
            "search": search,
            "scheduler": scheduler,
            "resources_per_trial": resources,
            "experiment": experiment,
        }
    )


# ---------------------------------------------------------------------------------------------
# Ray and storage


def init_ray(
    address: str | None,
    num_cpus: int | None = None,
    dashboard_host: str = "127.0.0.1",
    include_dashboard: bool | None = None,
) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start a local Ray for this run; either way
    every worker of this job warms its imports as it starts (:func:`mtl.search.warmup.warm_worker`)."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True, runtime_env=WORKER_RUNTIME_ENV)
        return
    ray.init(
        address="local",  # a new Ray for this run, even if `ray start` left one running
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        dashboard_host=dashboard_host,
        runtime_env=WORKER_RUNTIME_ENV,
    )


@ray.remote(num_cpus=0)
def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def probe_storage(storage_path: str, min_nodes: int = 2, timeout_s: float = 60.0) -> None:
    """Refuse a local storage path that some node of the cluster cannot read.

    Each node's trials write their results and checkpoints to the storage path, so on a cluster
    it must be a shared folder (NFS, ...) or a URI. A marker file written here must be readable
    from a task pinned to every node. URIs (s3://, gs://, ...) pass without a probe.
    """
    if is_uri(storage_path):
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < min_nodes:
        return
    Path(storage_path).mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = Path(storage_path) / f".probe-{token}"
    marker.write_text(token)
    try:
        refs = {
            node["NodeID"]: _read_marker.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker))
            for node in nodes
        }
        # All nodes at once; a node whose task cannot start in time counts as unreachable.
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        failing = [
            f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
            for node in nodes
            if refs[node["NodeID"]] not in ready or ray.get(refs[node["NodeID"]]) != token
        ]
        if failing:
            raise SpaceError(
                f"experiment.storage_path: {storage_path} is not reachable from node "
                f"{', '.join(failing)}; use a folder shared by every node or a URI such as "
                "s3://bucket/path"
            )
    finally:
        marker.unlink(missing_ok=True)


@ray.remote(num_cpus=0)
def _remove_scratch(key: str) -> None:
    remove_scratch(key)


def clean_scratch(exp: Experiment, timeout_s: float = 60.0) -> None:
    """Remove the experiment's trial scratch folders on every node (none of its trials runs)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    refs = [
        _remove_scratch.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(scratch_key(exp))
        for node in ray.nodes()
        if node.get("Alive")
    ]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)


def _cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


# ---------------------------------------------------------------------------------------------
# The Tuner


def _settings(space: DesignSpace) -> dict[str, Any]:
    """Trainer settings forced for trials under Ray."""
    base = build_config(space.base)
    threads = base.train.num_threads or max(1, int(space.resources_per_trial.cpu))
    return {"output_dir": None, "train": {"progress": False, "num_threads": threads}}


def _param_space(space: DesignSpace) -> dict[str, Any]:
    if space.search.sampler != "grid":
        return {}
    if any(p.when for p in space.parameters.values()):
        return {POINT_KEY: tune.grid_search(grid_points(space))}
    return {name: tune.grid_search(finite_values(p) or []) for name, p in space.parameters.items()}


def make_searcher(space: DesignSpace, study_url: str) -> PruningOptunaSearch:
    parallel = (space.search.max_concurrent_trials or 2) > 1
    sampler = make_sampler(
        space.search.sampler, space.experiment.seed, parallel, space.search.startup_trials
    )
    return PruningOptunaSearch(
        space=functools.partial(suggest, space=space),
        metric=best_key(space.objective.metric),
        objective=space.objective.metric,
        metrics=space.metrics,
        mode=space.objective.mode,
        points_to_evaluate=[dict(p) for p in space.search.points_to_evaluate] or None,
        sampler=sampler,
        study_name=space.experiment.name,
        storage=optuna.storages.RDBStorage(study_url),
    )


def make_scheduler(space: DesignSpace) -> FIFOScheduler | EvaluationASHA:
    sched = space.scheduler
    if sched.type == "fifo":
        return FIFOScheduler()
    return EvaluationASHA(
        time_attr=STEP_KEY,
        metric=best_key(space.objective.metric),
        mode=space.objective.mode,
        max_t=space.max_t,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )


def trial_spec(space: DesignSpace, data_cache: Any) -> TrialSpec:
    """What every trial of ``space`` shares."""
    return TrialSpec(
        scratch=scratch_key(locate(space)),
        base=space.trial_config({}),
        paths=space.paths,
        metric=space.objective.metric,
        data_cache=data_cache,
        settings=_settings(space),
    )


def prebuild_data(space: DesignSpace) -> threading.Thread | None:
    """Starts tokenizing the trials' data into the tokenized cache in a thread of this process.

    Called before the search starts its local Ray, so that the tokenizing runs while Ray and
    its workers start; the data cache then finds the file, or waits for this build to finish
    and reads it (the cache's file lock, :func:`mtl.data.load_packed_task_data`). None (nothing
    started) when the trials' data differs between trials (:func:`shares_data`) or is not
    cached (``data.cache_tokenized: false``). A failure is only logged: the cache builds
    again and the trials report the error.
    """
    spec = trial_spec(space, None)
    cfg = build_config(merge(spec.base, spec.settings))  # as run_trial builds a trial's config
    if not shares_data(spec) or not cfg.data.cache_tokenized:
        return None

    def build() -> None:
        from mtl.backbones import resolve_backbone
        from mtl.data import resolve_data_dir, tokenized_path

        try:
            folder = resolve_backbone(cfg.model.backbone)
            data_dir = resolve_data_dir(cfg.data.data_dir)
            if tokenized_path(cfg.data, data_dir, folder, cfg.model.design, cfg.seed).is_file():
                return  # stored by an earlier run: the cache reads it
            from mtl.train import load_packed_data

            load_packed_data(cfg)
        except Exception as err:  # the cache's own build raises it again, for the trials
            log.info("building the data ahead failed (%s: %s)", type(err).__name__, err)

    thread = threading.Thread(target=build, name="mtl-prebuild-data", daemon=True)
    thread.start()
    return thread


def start_data_cache(space: DesignSpace) -> Any:
    """A new data cache actor, already building the first trials' data and reading their
    weights (:func:`prefetch`): started as soon as Ray is up, so that it works while the search
    sets up and its workers start, and the first trial finds the data built."""
    data_cache = DataCache.remote()
    prefetch(trial_spec(space, data_cache))
    return data_cache


def make_trainable(space: DesignSpace, data_cache: Any, fn: Any = run_trial, **kwargs: Any):
    """``fn(config, spec=TrialSpec, **kwargs)`` with the trial's resources (benchmarks wrap it);
    the data cache starts building the trials' data now, unless it already has
    (:func:`prefetch`)."""
    spec = trial_spec(space, data_cache)
    prefetch(spec)
    res = space.resources_per_trial
    return tune.with_resources(
        tune.with_parameters(fn, spec=spec, **kwargs), {"cpu": res.cpu, "gpu": res.gpu}
    )


def make_run_config(
    space: DesignSpace, exp: Experiment, verbose: int = 1, extra: tuple[str, ...] = ()
) -> tune.RunConfig:
    """Tune's run settings; ``extra``: grid keys that are not parameters (the repeats' seed)."""
    return tune.RunConfig(
        name=exp.name,
        storage_path=exp.storage_path,
        failure_config=tune.FailureConfig(max_failures=space.failure.max_retries),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=space.checkpoints.num_to_keep,
            checkpoint_score_attribute=space.objective.metric,
            checkpoint_score_order=space.objective.mode,
        ),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        # SearchBoard replaces Tune's TensorBoard logger (mtl.search.board).
        callbacks=[NoRetryOnNonFinite(), SearchBoard(space, extra)],
        verbose=verbose,
    )


def run_tuner(
    space: DesignSpace,
    exp: Experiment,
    *,
    resume: bool,
    data_cache: Any,
    verbose: int = 1,
    retry_errored: bool = False,
) -> tune.ResultGrid:
    """Run (or, with ``resume``, continue) the experiment's Tuner.

    ``retry_errored`` (with ``resume``): run the trials that ended in an error again, each from
    its last checkpoint, or from the start when it has none (Tune's ``resume_errored``: a trial
    without a checkpoint starts afresh, ``TuneController._schedule_trial_restore``). Without it
    errored trials stay errored.
    """
    trainable = make_trainable(space, data_cache)
    param_space = _param_space(space)
    if resume:
        tuner = tune.Tuner.restore(
            exp.path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=retry_errored,
            restart_errored=False,
            param_space=param_space or None,
        )
    else:
        grid = space.search.sampler == "grid"
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=None if grid else make_searcher(space, exp.study_url),
                scheduler=make_scheduler(space),
                num_samples=space.num_samples,
                max_concurrent_trials=space.search.max_concurrent_trials,
                time_budget_s=space.search.time_budget_s,
                # The next trial runs in the same worker process: no second Python, torch and
                # transformers start-up (seconds per trial on CPU; see benchmarks/trial_startup.py).
                reuse_actors=True,
                trial_dirname_creator=trial_dirname,
                metric=best_key(space.objective.metric) if grid else None,
                mode=space.objective.mode if grid else None,
            ),
            run_config=make_run_config(space, exp, verbose),
        )
    return tuner.fit()


def record_retries(study: optuna.Study, trials: list[Any], space: DesignSpace) -> int:
    """Add to ``study`` the outcome of each errored trial that ``--retry-errored`` ran again.

    Its Optuna trial was told FAIL and cannot change state, and Tune never passes the retry's
    completion to the searcher (Ray's ``ConcurrencyLimiter.on_trial_complete`` drops a trial it
    did not start in this run; ``OptunaSearch`` drops a second completion). So the retry becomes
    a new Optuna trial with the same parameters, read from the Tune trial's reports: COMPLETE
    with the final ``best_<metric>`` when the trainer finished (its outcome file), else PRUNED,
    with every evaluation's value, the FAIL trial's attributes, and ``retry_of`` (:data:`RETRY_ATTR`)
    naming the FAIL trial, whose ``ray_trial_id`` it shares (results.csv's row then shows the
    retry). A retry already recorded, or one that errored again, adds nothing. Returns how many
    were added. ``trials``: the experiment's Tune trials (``ExperimentAnalysis.trials``).
    """
    key, objective = best_key(space.objective.metric), space.objective.metric
    retried = {t.user_attrs[RETRY_ATTR] for t in study.trials if RETRY_ATTR in t.user_attrs}
    failed = {
        t.user_attrs[RAY_TRIAL_ATTR]: t
        for t in study.get_trials(states=(TrialState.FAIL,))
        if RAY_TRIAL_ATTR in t.user_attrs and t.number not in retried
    }
    added = 0
    for trial in trials:
        source = failed.get(trial.trial_id)
        if source is None or trial.status != "TERMINATED":
            continue
        fs = trial.storage.storage_filesystem
        evals = evaluations(read_reports(trial.path, fs))
        evals = evals[evals[key].notna()] if key in evals else evals.iloc[0:0]
        if not len(evals):
            continue
        values = {int(e): float(v) for e, v in zip(evals[STEP_KEY], evals[key], strict=True)}
        # The trainer writes its outcome file when it returns: the retry ran to its end.
        done = fs.get_file_info(f"{trial.path}/{OUTCOME_FILE}").type == pyarrow.fs.FileType.File
        best_row = evals.loc[evals[objective].astype(float).idxmax()]
        attrs = {
            **source.user_attrs,
            RETRY_ATTR: source.number,
            "fate": "completed" if done else "stopped",
            "reason": "" if done else "ASHA or interrupted",
            "best": results_lib.metric_values(best_row, (*space.metrics, STEP_KEY)),
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=source.params,
                distributions=source.distributions,
                value=float(evals[key].iloc[-1]) if done else None,
                state=TrialState.COMPLETE if done else TrialState.PRUNED,
                intermediate_values=values,
                user_attrs=attrs,
            )
        )
        added += 1
    return added


def finish_study(exp: Experiment, space: DesignSpace) -> optuna.Study | None:
    """Close Optuna trials left RUNNING by a finished experiment, and record retried trials
    (:func:`record_retries`).

    Tune's time budget stops trials without telling the searcher, and a driver restarted after a
    crash may have asked Optuna for trials that Tune never registered. Once every Tune trial has
    ended, such a trial becomes PRUNED (keeping its last intermediate value) or, without one,
    FAIL, and the study attribute ``closed_by_driver`` records it. After an interrupted run
    (Ctrl-C) nothing is closed: ``--resume`` continues those trials.
    """
    if not study_exists(exp.study_url, exp.name):
        return None
    study = optuna.load_study(study_name=exp.name, storage=exp.study_url)
    trials = tune.ExperimentAnalysis(exp.path).trials
    record_retries(study, trials, space)
    statuses = {t.status for t in trials}
    if not statuses <= {"TERMINATED", "ERROR"}:
        return study
    closed = dict(study.user_attrs.get(CLOSED_ATTR, {}))
    for t in study.get_trials(states=(TrialState.RUNNING,)):
        closed[str(t.number)] = "time budget or interrupted"
        # As the searcher sets them (mtl.search.searcher); Optuna's public setters need the
        # Trial object of the process that asked for the trial, gone with Tune.
        study._storage.set_trial_user_attr(t._trial_id, "fate", "stopped")
        study._storage.set_trial_user_attr(t._trial_id, "reason", closed[str(t.number)])
        study.tell(t.number, state=TrialState.PRUNED if t.intermediate_values else TrialState.FAIL)
    if closed:  # an empty record is noise on the dashboard's study page
        study.set_user_attr(CLOSED_ATTR, closed)
    return study


def check_fits(space: DesignSpace, available: dict[str, float]) -> None:
    """Refuse a trial that a local Ray, which cannot grow, could never schedule.

    A cluster that autoscales may add the resources later, so this is only for a local Ray.
    """
    want = space.resources_per_trial
    for key, name in (("cpu", "CPU"), ("gpu", "GPU")):
        asked, have = getattr(want, key), available.get(name, 0.0)
        if asked > have:
            raise SpaceError(
                f"resources_per_trial.{key}: a trial asks for {asked:g} {name} but this machine's "
                f"Ray has {have:g}; lower it (--set resources_per_trial.{key}={have:g}) "
                "or join a cluster with --address"
            )


def run_search(
    space: DesignSpace,
    *,
    resume: bool = False,
    retry_errored: bool = False,
    smoke: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard_host: str = "127.0.0.1",
    include_dashboard: bool | None = None,
    verbose: int = 1,
) -> results_lib.Summary:
    """Run (or resume) the search of ``space`` and write its results; returns the summary.

    ``retry_errored`` (with ``resume``): also rerun the trials that ended in an error
    (:func:`run_tuner`).

    Raises:
        SpaceError: a mistake found before the first trial (one line): ``--resume`` with a space
            other than the experiment's, an existing experiment or orphaned study without
            ``--resume``/``--overwrite``, a trial this machine cannot schedule, an unreachable
            storage path.
    """
    # Every trial checkpoints at every evaluation: Tune's warning about frequent snapshots is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Before Ray starts, so that a refusal is one line and quick.
    if resume:
        space = match_saved(space)
    if not smoke:
        space = resolve(space)
        action = plan(locate(space), resume=resume, overwrite=overwrite)
    if not smoke and address is None and not os.environ.get("RAY_ADDRESS"):
        # The local Ray this search starts shares this machine's tokenized cache.
        prebuild_data(space)
    init_ray(address, num_cpus, dashboard_host, include_dashboard)
    if smoke:
        # On a cluster that autoscales from zero workers no GPU is there yet: keep the trial's.
        joined = address is not None or bool(os.environ.get("RAY_ADDRESS"))
        space = resolve(smoke_space(space, joined or _cluster_has_gpu()))
        action = plan(locate(space), resume=False, overwrite=True)
    if address is None and not os.environ.get("RAY_ADDRESS"):
        check_fits(space, ray.cluster_resources())
    exp = locate(space)
    # The data cache starts on the first trials' data and weights now, while the storage is
    # probed, the experiment and its study are set up and the scratch folders are cleaned (each
    # a Ray task that waits for a worker to start): the first trial then finds the data built
    # instead of waiting for the tokenizing (benchmarks/trial_startup.py).
    data_cache = start_data_cache(space)
    try:
        probe_storage(exp.storage_path)
        start(space, exp, action)
    except BaseException:
        ray.kill(data_cache)
        raise
    print(f"experiment: {exp.path}")
    print(f"  tensorboard --logdir {exp.path}")
    if exp.study_url:
        print(f"  optuna-dashboard {exp.study_url}")
    if space.scheduler.type == "asha":
        print(make_scheduler(space).describe())

    clean_scratch(exp)
    run_tuner(
        space,
        exp,
        resume=action == RESTORE,
        data_cache=data_cache,
        verbose=verbose,
        retry_errored=retry_errored,
    )
    clean_scratch(exp)
    study = finish_study(exp, space)
    summary = results_lib.summarize(space, exp.path, study)
    print(summary.report())
    if summary.unfinished:
        print(f"interrupted: continue with  python -m mtl.search --resume {exp.path}")
        ray.kill(data_cache)
        return summary
    if space.search.repeats is not None:
        summary = run_repeats(
            space,
            exp,
            summary,
            data_cache,
            resume=resume,
            verbose=verbose,
            retry_errored=retry_errored,
        )
    ray.kill(data_cache)
    return summary


def repeats_space(space: DesignSpace, summary: results_lib.Summary) -> DesignSpace | None:
    """The top-K configurations of a finished search, each with every further seed (a grid)."""
    rep = space.search.repeats
    assert rep is not None
    top = summary.top(rep.top_k, status="completed")
    if not top:
        return None
    return space.model_copy(
        update={
            "experiment": space.experiment.model_copy(
                update={"name": space.experiment.name + REPEATS_SUFFIX}
            ),
            "search": space.search.model_copy(
                update={
                    "sampler": "grid",
                    "num_samples": 1,
                    "points_to_evaluate": [],
                    "repeats": None,
                }
            ),
            "scheduler": space.scheduler.model_copy(update={"type": "fifo"}),
        }
    )


def _point_id(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True, default=str)


def _warn_unrepeated(points: list[dict[str, Any]], rexp: Experiment, top_k: int) -> None:
    """Say which of ``points`` the existing repeats experiment at ``rexp`` never runs.

    Its grid was fixed when it started (a restored Tuner runs only its saved trials), but the
    top configurations change when ``--retry-errored`` completes trials that had errored.
    """
    ran = {
        _point_id(t.config[POINT_KEY])
        for t in tune.ExperimentAnalysis(rexp.path).trials
        if POINT_KEY in t.config
    }
    missing = [p for p in points if _point_id(p) not in ran]
    if missing:
        print(
            f"repeats: the top {top_k} configurations changed since {rexp.path} started "
            f"(errored trials retried): {len(missing)} of their seed runs are not in it; move "
            "that folder aside and --resume again to repeat the new top configurations"
        )


def run_repeats(
    space: DesignSpace,
    exp: Experiment,
    summary: results_lib.Summary,
    data_cache: Any,
    *,
    resume: bool,
    verbose: int,
    retry_errored: bool = False,
) -> results_lib.Summary:
    rep = space.search.repeats
    assert rep is not None
    rspace = repeats_space(space, summary)
    if rspace is None:
        print("repeats: no completed trial to repeat")
        return summary
    points = [
        {**params, "seed": seed}
        for params in (row.params for row in summary.top(rep.top_k, status="completed"))
        for seed in rep.seeds
    ]
    rexp = Experiment(rspace.experiment.name, exp.storage_path, None)
    trainable = make_trainable(rspace, data_cache)
    param_space = {POINT_KEY: tune.grid_search(points)}
    restored = resume and tune.Tuner.can_restore(rexp.path)
    if restored:
        _warn_unrepeated(points, rexp, rep.top_k)
        tuner = tune.Tuner.restore(
            rexp.path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=retry_errored,  # as run_tuner
            param_space=param_space,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                scheduler=FIFOScheduler(),
                num_samples=1,
                max_concurrent_trials=space.search.max_concurrent_trials,
                reuse_actors=True,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=make_run_config(rspace, rexp, verbose, extra=("seed",)),
        )
    clean_scratch(rexp)
    tuner.fit()
    clean_scratch(rexp)
    repeat_rows = results_lib.read_rows(rspace, rexp.path, None)
    summary = results_lib.add_repeats(
        summary, repeat_rows, rexp.path, base_seed=build_config(space.base).seed, top_k=rep.top_k
    )
    # An interrupted Tuner returns like a finished one: count the seed runs that have not ended
    # (started and cut, or never started), so that the search exits 1 and is resumed, not taken
    # as finished with some of its repeats missing. A new grid holds every point; a restored
    # one only those it started with (_warn_unrepeated named the others, which --resume cannot run).
    cut = sum(r.status == "unfinished" for r in repeat_rows)
    if not restored:
        held = {_point_id(r.params) for r in repeat_rows}
        cut += sum(_point_id(p) not in held for p in points)
    summary.repeats_unfinished = cut
    if summary.repeats_unfinished:
        print(
            f"interrupted: {summary.repeats_unfinished} of {len(points)} seed repeats have not "
            f"ended; continue with  python -m mtl.search --resume {exp.path}"
        )
    return summary
