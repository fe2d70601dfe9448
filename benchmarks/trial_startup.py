"""Seconds from a trial's start to its first optimizer step: shared data against per-trial loading.

A search builds the tokenized data once (the :class:`mtl.search.data_cache.DataCache` actor) and
hands it to each trial through Ray's object store; the baseline lets every trial read the csv
files and tokenize them itself (``data_cache=None``, what ``mtl.train`` does alone). Both run the
real trial function (:func:`mtl.search.trainable.run_trial`) under a real Tuner on a local Ray,
one trial at a time, MiniLM on CPU (1 CPU per trial), ``train.max_steps: 1``.

Three clocks:

* ``function``: from the trial function's first line to the end of the first
  ``optimizer.step()`` (a global ``torch.optim`` post-hook): config, checkpoint lookup, data,
  weights, model, first batch. This is the part the search controls; the 3-second target.
* ``process`` (first trial only): from the start of the Ray worker process that runs the trial
  (``/proc/self/stat``), adding Python, Ray, torch and transformers start-up and the imports that
  :func:`mtl.search.warmup.warm_worker` makes as the worker starts (Ray's
  ``worker_process_setup_hook``, as ``mtl.search`` starts Ray). Later trials reuse that process
  (``reuse_actors=True``, as ``mtl.search`` runs them), so they do not pay it.
* ``from search`` (first trial only): from the setting's start to the first step: with
  ``--fresh-ray``, Ray's start included, as each ``python -m mtl.search`` starts its own Ray.

Each setting follows ``mtl.search``'s order (:func:`mtl.search.run.run_search`): with
``--fresh-ray`` the driver starts tokenizing before Ray (:func:`mtl.search.run.prebuild_data`),
the data cache starts (:func:`mtl.search.run.start_data_cache`), the scratch folders are
cleaned, the Tuner starts. By default one Ray serves every setting, so after the first setting the first trial
finds an idle worker that started (and warmed its imports) long before; ``--fresh-ray`` starts
Ray for each setting, so the first trial's worker and the cache start with the search, as in
a user's first search on new data.

On a loaded machine both clocks measure the other jobs as much as ours, so two CPU figures go
with them: the first trial's process's CPU seconds from its start to its first step (all its
threads), the data cache's process's CPU seconds, all of them (start, imports, weights, the
data built or read once), and the driver's over the setting (the Tuner, and with
``--fresh-ray`` the tokenizing it starts before Ray).

The first trial also builds the cache in the shared run; it is reported apart from the later
trials' median. Two data sizes: the quick.yaml slices (400 training and 200 dev examples per
task) and every training example of the CS224N files (dev still 200 per task: evaluation is not
timed).

The tokenized data is also cached on disk between runs (:func:`mtl.data.load_packed_task_data`,
in ``$MTL_CACHE_DIR/tokenized``; the benchmark points ``MTL_CACHE_DIR`` at its own temporary
folder). Each mode runs cold (that folder emptied first: the first search on some data) or warm
(the previous run of the same data left its file: every later search, ablation cell, resume and
trainer run on the same data): ``own`` and ``shared`` are cold, ``own-warm`` and ``shared-warm``
warm. Within a cold ``own`` run, the trials after the first find the first one's file.

    python benchmarks/trial_startup.py              # 4 trials per setting, about 10 minutes
    python benchmarks/trial_startup.py --trials 3 --modes shared shared-warm
    python benchmarks/trial_startup.py --trials 3 --modes shared --data full --fresh-ray

Everything a run writes (the trials' experiment folders with their checkpoints, 2-3 GB with
MiniLM, and the tokenized cache) goes into one new temporary folder, removed at the end, also
after an error or Ctrl-C, unless ``--keep`` (the run then says where it is); the Ray this process
started stops first, so that none of its processes outlives the run. The trials' run folders in
the node's scratch folder (:func:`mtl.search.trainable.scratch_root`) go after each setting, as
a search removes them after its Tuner.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import ray
from ray import tune
from torch.optim.optimizer import register_optimizer_step_post_hook

from mtl.data import tokenized_cache_dir
from mtl.search.run import (
    clean_scratch,
    locate,
    make_run_config,
    make_trainable,
    prebuild_data,
    start_data_cache,
)
from mtl.search.space import parse_space
from mtl.search.trainable import run_trial
from mtl.search.warmup import WORKER_RUNTIME_ENV

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.scratch import add_keep_argument, run_folder, stop_ray  # noqa: E402


def _process_start() -> float:
    """When this process started (Linux), in time.time() seconds."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    boot = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> float:
    """This process's CPU seconds so far (user + system, all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_trial(config: dict, spec, out: str) -> None:
    """run_trial, recording when the first optimizer step ends."""
    started = time.time()
    marks: dict[str, float] = {}

    def first_step(optimizer, args, kwargs) -> None:
        if "first_step" not in marks:
            marks["first_step"] = time.time()
            marks["cpu_at_first_step"] = _cpu_seconds()

    handle = register_optimizer_step_post_hook(first_step)
    try:
        run_trial(config, spec)
    finally:
        handle.remove()
        record = {
            "function_start": started,
            "process_start": _process_start(),
            **marks,
            "trial_id": tune.get_context().get_trial_id(),
        }
        Path(out, f"{record['trial_id']}.json").write_text(json.dumps(record))


MODES = ("own", "own-warm", "shared", "shared-warm")
SETTINGS = ("quick", "full")


def init() -> None:
    """Starts a local Ray as mtl.search.run.init_ray does: every worker warms its imports."""
    ray.init(
        address="local",  # our own Ray, even if `ray start` left one running: we stop it after
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=WORKER_RUNTIME_ENV,
    )


def run(
    setting: str,
    mode: str,
    trials: int,
    root: Path,
    data_dir: str,
    fresh_ray: bool,
    backbone: str = "minilm",
) -> list[dict]:
    shared = mode.startswith("shared")
    if not mode.endswith("-warm"):  # cold: no tokenized data from an earlier run
        shutil.rmtree(tokenized_cache_dir(), ignore_errors=True)
    name = f"{setting}-{mode}"
    out = root / name / "timings"
    out.mkdir(parents=True)
    train_examples = 400 if setting == "quick" else None
    space = parse_space(
        {
            "experiment": {"name": name, "storage_path": str(root / "results")},
            "base": {
                "model": {"backbone": backbone, "head_hidden": 256},
                "data": {
                    "data_dir": data_dir,
                    "max_train_examples": train_examples,
                    "max_eval_examples": 200,
                    "max_length": 64,
                },
                "train": {
                    "max_steps": 1,
                    "batch_size": 16,
                    "device": "cpu",
                    "write_predictions": False,
                },
            },
            "search": {"sampler": "random"},
            "scheduler": {"type": "fifo"},
            "resources_per_trial": {"cpu": 1},
            "failure": {"max_retries": 0},
        }
    )
    search_start, driver_start = time.time(), _cpu_seconds()
    # In mtl.search's order (run_search): a search that starts its own Ray starts tokenizing
    # before it; the cache starts as soon as Ray is up, then the scratch folders are cleaned (a
    # Ray task per node) and the Tuner starts.
    if fresh_ray:
        if shared:
            prebuild_data(space)
        init()
    cache = start_data_cache(space) if shared else None
    clean_scratch(locate(space))
    run_config = make_run_config(space, locate(space), verbose=0)
    tuner = tune.Tuner(
        make_trainable(space, cache, fn=timed_trial, out=str(out)),
        # As mtl.search runs trials: later trials reuse the first one's worker process.
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1, reuse_actors=True),
        run_config=run_config,
    )
    try:
        tuner.fit()
        driver_cpu = _cpu_seconds() - driver_start
    finally:
        # As run_search does after its Tuner: the trials' run folders (model and optimizer) in
        # each node's scratch folder, outside the run's own folder.
        clean_scratch(locate(space))
    cache_cpu = None
    if cache is not None:
        # Everything the cache's process did: start, imports, weights, data (one build).
        cache_cpu = ray.get(cache.__ray_call__.remote(lambda _: _cpu_seconds()))
        ray.kill(cache)
    if fresh_ray:
        ray.shutdown()
    rows = []
    for path in sorted(out.glob("*.json")):
        rec = json.loads(path.read_text())
        rows.append(
            {
                "from_function": rec["first_step"] - rec["function_start"],
                "from_process": rec["first_step"] - rec["process_start"],
                "from_search": rec["first_step"] - search_start,
                "function_start": rec["function_start"],
                "worker_cpu": rec["cpu_at_first_step"],
                "cache_cpu": cache_cpu,
                "driver_cpu": driver_cpu,
            }
        )
    return sorted(rows, key=lambda r: r["function_start"])


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--trials",
        type=int,
        default=4,
        help="trials per setting (default 4; with 1, no later trials to take the median of)",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MTL_DATA_DIR", str(REPO.parent / "shared" / "data" / "cs224n")),
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="(default: all, in order)"
    )
    parser.add_argument(
        "--fresh-ray",
        action="store_true",
        help="start Ray for each setting, as each `python -m mtl.search` does (default: one Ray"
        " for all, whose idle workers the later settings' first trials find warm)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        choices=SETTINGS,
        default=list(SETTINGS),
        help="quick: 400 training examples per task; full: all of them (default: both)",
    )
    parser.add_argument(
        "--backbone",
        default="minilm",
        help="the trials' model.backbone (default minilm; tests run a tiny one)",
    )
    add_keep_argument(parser)
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials: must be at least 1")
    with run_folder("trial-startup-", args.keep, before_removal=stop_ray) as root:
        measure(args, root)


def measure(args: argparse.Namespace, root: Path) -> None:
    """Every setting and mode of ``args``, printed as a table; all files under ``root``."""
    # Before Ray starts, so that every worker inherits it.
    os.environ["MTL_CACHE_DIR"] = str(root / "cache")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not args.fresh_ray:
        init()
    print(
        f"{args.backbone} on CPU, {args.trials} trials per setting, one at a time;"
        " seconds to first step"
    )
    print(
        f"{'data':6} {'mode':11} {'first: function':>16} {'first: process':>15}"
        f" {'later: function':>16} {'worker CPU':>11} {'cache CPU':>10} {'driver CPU':>11}"
        f" {'from search':>12}"
    )
    firsts, medians = {}, {}
    for setting in args.data:
        for mode in args.modes:
            rows = run(
                setting, mode, args.trials, root, args.data_dir, args.fresh_ray, args.backbone
            )
            firsts[(setting, mode)] = rows[0]["from_function"]
            later = [r["from_function"] for r in rows[1:]]
            medians[(setting, mode)] = statistics.median(later) if later else None
            print(
                f"{setting:6} {mode:11} {rows[0]['from_function']:16.2f}"
                f" {rows[0]['from_process']:15.2f} {_seconds(medians[(setting, mode)]):>16}"
                f" {rows[0]['worker_cpu']:11.2f} {_seconds(rows[0]['cache_cpu']):>10}"
                f" {rows[0]['driver_cpu']:11.2f} {rows[0]['from_search']:12.2f}",
                flush=True,
            )
    print(
        "(later: the median of the trials after the first; worker CPU: CPU seconds of the first"
        " trial's process from its start to its first step; cache CPU: of the data cache's"
        " process, all of it; driver CPU: of this process over the setting (the Tuner, and"
        " the tokenizing it starts before Ray with --fresh-ray); from search: from the"
        " setting's start, Ray's start included with --fresh-ray, to the first trial's first"
        " step)"
    )
    for setting in args.data:
        if {"own", "shared"} <= set(args.modes) and args.trials > 1:
            own, shared = medians[(setting, "own")], medians[(setting, "shared")]
            print(f"{setting}: later trials shared/own = {shared / own:.2f}")
        for mode in ("shared", "shared-warm"):
            if mode in args.modes:
                first = firsts[(setting, mode)]
                verdict = "meets" if first <= 3.0 else "misses"
                print(f"{setting} {mode}: first trial {first:.2f} s {verdict} the 3 s target")
        if {"shared", "shared-warm"} <= set(args.modes):
            cold, warm = firsts[(setting, "shared")], firsts[(setting, "shared-warm")]
            print(f"{setting}: first trial shared warm/cold = {warm / cold:.2f}")


if __name__ == "__main__":
    main()
