"""The search: Ray Tune trials of ``mtl.train.train``, sampled by Optuna, stopped early by ASHA.

``python -m mtl.search search_spaces/quick.yaml`` validates the design-space file
(:mod:`mtl.search.space`), runs it (:mod:`mtl.search.run`, one trial = :mod:`mtl.search.trainable`)
and writes ``results.csv`` and ``best_config.yaml`` (:mod:`mtl.search.results`). The trainer
modules never import this package.
"""
