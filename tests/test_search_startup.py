"""A fresh trial's start-up: warm imports in every Ray worker, and data built before it is asked.

A real local Ray in this process (1 CPU, no dashboard), started as the search starts it
(:func:`mtl.search.run.init_ray`), a real :class:`DataCache` actor, the tiny BERT and the real
data files. The seconds themselves are measured in ``benchmarks/trial_startup.py``.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import ray

from mtl.config import build_config, merge
from mtl.data import tokenized_path, unpack
from mtl.search.data_cache import DataCache, data_key
from mtl.search.run import _settings, init_ray, make_trainable, prebuild_data, start_data_cache
from mtl.search.space import parse_space
from mtl.search.trainable import TrialSpec, _shared_data
from mtl.search.warmup import WARM_MODULES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    assert not ray.is_initialized()
    init_ray(None, num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=1)
def _imported(names: tuple[str, ...]) -> dict[str, bool]:
    # This module imports mtl.search (torch, Ray Tune), but neither the trainer nor dynamo.
    return {name: name in sys.modules for name in names}


def test_a_fresh_worker_has_the_trainer_imported_before_its_first_task(local_ray) -> None:
    assert all(ray.get(_imported.remote(WARM_MODULES)).values())


# What a trial needs and the data cache does not: the first trial waits for the cache, so none of
# these may be on the cache's path (its process imports them in seconds of CPU).
NOT_FOR_THE_CACHE = ("torch._dynamo", "ray.tune", "scipy", "mtl.search.trainable")
# Sent by value (a lambda): a function of this module would make the actor import this module.
_loaded = lambda _: [name for name in NOT_FOR_THE_CACHE if name in sys.modules]  # noqa: E731


def test_the_data_cache_starts_without_the_warm_up(local_ray) -> None:
    cache = DataCache.remote()
    try:
        assert ray.get(cache.__ray_call__.remote(_loaded)) == []
    finally:
        ray.kill(cache)


def test_the_data_cache_builds_without_the_trials_imports(
    local_ray, tmp_path, tiny_backbone, real_data_dir
) -> None:
    """Building the data and reading the weights import no more than they need."""
    cache = DataCache.remote()
    try:
        space = space_for(tmp_path, tiny_backbone, real_data_dir, LR)
        trial = merge(space.trial_config({}), _settings(space))
        ray.get(cache.prefetch.remote(data_key(trial), trial, str(tiny_backbone)))
        assert ray.get(cache.cached.remote()) == {
            "data": [data_key(trial)],
            "weights": [str(tiny_backbone)],
        }
        assert ray.get(cache.__ray_call__.remote(_loaded)) == []
    finally:
        ray.kill(cache)


def space_for(root: Path, backbone: Path, data_dir: Path, parameters: dict) -> object:
    return parse_space(
        {
            "experiment": {"name": "startup", "storage_path": str(root / "results")},
            "base": {
                "model": {"backbone": str(backbone), "head_hidden": 32},
                "data": {
                    "data_dir": str(data_dir),
                    "max_train_examples": 32,
                    "max_eval_examples": 16,
                    "max_length": 32,
                },
            },
            "parameters": parameters,
            "search": {"sampler": "random", "num_samples": 1},
            "scheduler": {"type": "fifo"},
            "resources_per_trial": {"cpu": 1},
        }
    )


LR = {"lr": {"path": "train.lr", "type": "float", "low": 1e-5, "high": 1e-3, "log": True}}
MAX_LENGTH = {"max_length": {"path": "data.max_length", "type": "categorical", "choices": [16]}}


@pytest.mark.parametrize(("parameters", "data_prefetched"), [(LR, True), (MAX_LENGTH, False)])
def test_making_the_trainable_starts_the_cache_on_the_trials_data(
    local_ray, tmp_path, tiny_backbone, real_data_dir, parameters, data_prefetched
) -> None:
    cache = DataCache.remote()
    try:
        space = space_for(tmp_path, tiny_backbone, real_data_dir, parameters)
        make_trainable(space, cache)
        # Actor calls run in order: whatever make_trainable asked for is done by now.
        held = ray.get(cache.cached.remote())
        assert held["weights"] == [str(tiny_backbone)]
        # The key a trial computes (run_trial: the base, the forced settings, its parameters).
        trial = merge(space.trial_config({}), _settings(space))
        assert build_config(trial).data.max_length == 32
        assert held["data"] == ([data_key(trial)] if data_prefetched else [])
    finally:
        ray.kill(cache)


def test_the_search_starts_its_cache_on_the_trials_data_before_the_trainable(
    local_ray, tmp_path, tiny_backbone, real_data_dir
) -> None:
    """run_search starts the cache as soon as Ray is up; making the trainable later finds the
    data and weights there and builds nothing again."""
    space = space_for(tmp_path, tiny_backbone, real_data_dir, LR)
    cache = start_data_cache(space)
    try:
        trial = merge(space.trial_config({}), _settings(space))
        built = {"data": [data_key(trial)], "weights": [str(tiny_backbone)]}
        assert ray.get(cache.cached.remote()) == built
        first = ray.get(cache.get.remote(data_key(trial), trial))[0]
        make_trainable(space, cache)
        assert ray.get(cache.cached.remote()) == built
        assert ray.get(cache.get.remote(data_key(trial), trial))[0] == first  # the same object
    finally:
        ray.kill(cache)


@pytest.mark.parametrize(("parameters", "builds"), [(LR, True), (MAX_LENGTH, False)])
def test_the_driver_tokenizes_ahead_into_the_tokenized_cache(
    tmp_path, tiny_backbone, real_data_dir, monkeypatch, parameters, builds
) -> None:
    """prebuild_data (before Ray starts) stores the trials' data where the cache looks for it,
    unless the trials' data differs between trials; a second call finds the file and stores
    nothing again."""
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    space = space_for(tmp_path, tiny_backbone, real_data_dir, parameters)
    thread = prebuild_data(space)
    assert (thread is not None) == builds
    if thread is None:
        return
    thread.join(timeout=120)
    trial = build_config(merge(space.trial_config({}), _settings(space)))
    path = tokenized_path(trial.data, real_data_dir, tiny_backbone, trial.model.design, trial.seed)
    assert assert_loads(path, trial)
    stored = path.stat().st_mtime_ns
    again = prebuild_data(space)
    again.join(timeout=120)
    assert path.stat().st_mtime_ns == stored


def assert_loads(path: Path, trial) -> bool:
    """The stored file is what the trainer's own loading gives for the trial's config."""
    # Imported here: Ray workers import this module (for _imported), which must not import the
    # trainer itself.
    from mtl.train import load_data

    with path.open("rb") as fh:
        stored = pickle.load(fh)
    fresh = load_data(trial)
    return all(
        [t.tolist() for t in unpack(stored).train[task].input_ids]
        == [t.tolist() for t in fresh.train[task].input_ids]
        for task in fresh.train
    )


def test_a_failed_prefetch_leaves_the_error_to_the_trials(local_ray, tmp_path, tiny_backbone):
    cache = DataCache.remote()
    try:
        space = space_for(tmp_path, tiny_backbone, tmp_path / "no-data", LR)
        make_trainable(space, cache)  # no error here: nothing waits on the prefetch
        assert ray.get(cache.cached.remote()) == {"data": [], "weights": [str(tiny_backbone)]}
        trial = merge(space.trial_config({}), _settings(space))
        with pytest.raises(ray.exceptions.RayTaskError, match="no-data: no such folder"):
            ray.get(cache.get.remote(data_key(trial), trial))
    finally:
        ray.kill(cache)


@pytest.mark.parametrize("stage1", [True, False])
def test_a_trial_keeps_quoras_text_only_for_stage1(
    local_ray, tmp_path, tiny_backbone, real_data_dir, stage1
) -> None:
    cache = DataCache.remote()
    try:
        space = space_for(tmp_path, tiny_backbone, real_data_dir, LR)
        trial = merge(space.trial_config({}), _settings(space))
        spec = TrialSpec(base={}, paths={}, metric="overall", data_cache=cache)
        data = _shared_data(spec, trial, stage1=stage1)
        # The shared data holds the text (any trial may run stage 1); a trial without stage 1
        # drops its copy.
        assert list(data.raw_train) == (["para"] if stage1 else [])
        assert len(data.train["para"]) == 32
    finally:
        ray.kill(cache)
