"""Ray's ``worker_process_setup_hook`` for search workers: import what a trial will import.

A module of its own that imports nothing heavy itself: Ray imports the hook's module in every
worker process of the search, the data cache's too, which skips the warm-up (a trial waits for
the cache, and importing the trial's modules there cost it 1.4 s of CPU,
benchmarks/RESULTS_search.md).
"""

from __future__ import annotations

import importlib
import logging
import os

log = logging.getLogger(__name__)

# What a trial imports on its way to its first optimizer step, slowest first (seconds of CPU on
# a fresh worker, benchmarks/trial_startup.py): the trial function's module (Ray Tune); torch.optim's
# step wrapper and torch's meta-device init import torch._dynamo; the trainer, its TensorBoard
# writer, and transformers' BERT tokenizer; SciPy for the first evaluation (mtl.metrics imports
# it where it computes a Pearson correlation).
WARM_MODULES = (
    "mtl.search.trainable",
    "torch._dynamo",
    "mtl.train",
    "torch.utils.tensorboard",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.bert.tokenization_bert",
    "scipy.stats",
)
# The runtime_env that runs warm_worker in every worker process of a search, as it starts.
WORKER_RUNTIME_ENV = {"worker_process_setup_hook": "mtl.search.warmup.warm_worker"}
# Set (in its runtime_env) for a worker that should start without the warm-up: the data cache's,
# which tokenizes and reads weights but never steps an optimizer, and which the first trial
# waits for.
NO_WARM_ENV = "MTL_NO_WARM_IMPORTS"


def warm_worker() -> None:
    """Imports :data:`WARM_MODULES`, unless :data:`NO_WARM_ENV` is set.

    Ray runs it once per worker process before the worker takes its first task, while the
    driver still sets up the trial and the data cache builds the data, so the first trial in
    the worker starts with the imports done. A module that fails to import is only logged:
    the trial then imports it itself and reports the real error.
    """
    if os.environ.get(NO_WARM_ENV):
        return
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            log.warning("warm-up import of %s failed: %s", name, err)
