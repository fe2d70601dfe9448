"""The search's data cache: one Ray actor that builds each distinct tokenized dataset and reads
each backbone's weights once per experiment, and keeps them in Ray's object store for the trials.

A module of its own, importing no more than building the data needs (no Ray Tune, no trainer,
no SciPy), because a fresh trial waits for this actor: its process starts with the search and
its imports are on that path (``benchmarks/trial_startup.py``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import ray

from mtl.config import build_config
from mtl.search.warmup import NO_WARM_ENV

log = logging.getLogger(__name__)


def data_key(cfg_dict: dict[str, Any]) -> str:
    """What the tokenized data depends on: tokenizer (backbone), data settings, design, seed."""
    cfg = build_config(cfg_dict)
    return json.dumps(
        [cfg.model.backbone, cfg.data.model_dump(mode="json"), cfg.model.design, cfg.seed],
        sort_keys=True,
    )


@ray.remote(num_cpus=0, runtime_env={"env_vars": {NO_WARM_ENV: "1"}})
class DataCache:
    """Builds (or loads from disk) each distinct tokenized dataset once and keeps it, packed
    (:func:`mtl.data.pack`), in the object store."""

    def __init__(self) -> None:
        self._refs: dict[str, ray.ObjectRef] = {}
        self._weights: dict[str, ray.ObjectRef] = {}

    def get(self, key: str, cfg_dict: dict[str, Any]) -> list[ray.ObjectRef]:
        # A list, so that Ray hands the caller the reference instead of resolving it here.
        if key not in self._refs:
            from mtl.train import load_packed_data

            self._refs[key] = ray.put(load_packed_data(build_config(cfg_dict)))
        return [self._refs[key]]

    def weights(self, backbone: str) -> list[ray.ObjectRef]:
        """The backbone's pretrained weights as NumPy arrays: each node fetches them once into
        its object store and every trial there reads them from shared memory, not from disk."""
        if backbone not in self._weights:
            from mtl.backbones import resolve_backbone
            from mtl.bert import read_checkpoint

            state = read_checkpoint(resolve_backbone(backbone))
            self._weights[backbone] = ray.put({k: v.numpy() for k, v in state.items()})
        return [self._weights[backbone]]

    def prefetch(self, key: str | None, cfg_dict: dict[str, Any], backbone: str) -> None:
        """:meth:`get` unless ``key`` is None, then :meth:`weights`, ahead of the trials.

        The data first: a trial asks for it first, and unpacks it while this reads the weights.
        A failure (a missing data file, a broken backbone) is only logged here: nothing waits
        on this call, and each trial's own call builds again and fails with the real error,
        which the trial reports.
        """
        steps = [lambda: self.get(key, cfg_dict)] if key is not None else []
        for step in [*steps, lambda: self.weights(backbone)]:
            try:
                step()
            except Exception as err:  # each trial's own call raises it again, and reports it
                log.info(
                    "prefetch failed (%s: %s); the trials will report it", type(err).__name__, err
                )

    def cached(self) -> dict[str, list[str]]:
        """The data keys (``data``) and backbones (``weights``) built so far."""
        return {"data": list(self._refs), "weights": list(self._weights)}
