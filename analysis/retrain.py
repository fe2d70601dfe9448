"""Re-run the best configurations of a search at a larger budget: the ensemble's members.

A search ranks configurations cheaply (data slices, few epochs, ASHA); the final models are then
trained again with more data. ``python -m analysis.retrain EXP --top-k K`` writes a design-space
file that runs exactly the K best trials' parameters once each (``points_to_evaluate``, every
trial to its end with ``fifo``) as a new experiment, with ``--set`` changing the budget::

    python -m analysis.retrain EXP --top-k 3 --set base.data.max_train_examples=null
    python -m mtl.search EXP/analysis/retrain.yaml
    python -m analysis.ensemble STORAGE/EXP_NAME-retrain --top-k 3

The new experiment is an ordinary one: resumable, on the cluster or the laptop, with its own
results.csv, so every analysis reads it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from analysis.common import AnalysisError, load_experiment, out_dir, run_main, top_trial_ids
from mtl.config import ConfigError, add_set_argument
from mtl.search.space import DesignSpace, apply_overrides, parse_space

RETRAIN_FILE = "retrain.yaml"


def retrain_space(space: DesignSpace, points: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The design space (as a YAML mapping) that runs each of ``points`` once, to its end."""
    raw = space.model_dump(mode="json", by_alias=True, exclude_unset=True)
    raw["experiment"] = {**raw["experiment"], "name": name}
    raw["search"] = {
        "sampler": "random",  # every trial is one of the points; nothing is sampled
        "num_samples": len(points),
        "points_to_evaluate": points,
    }
    if space.search.max_concurrent_trials is not None:
        raw["search"]["max_concurrent_trials"] = space.search.max_concurrent_trials
    raw["scheduler"] = {"type": "fifo"}
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.retrain",
        description="Write a design space that re-runs the top trials' configurations at a new "
        "budget (for example on all the training data), ready for python -m mtl.search.",
    )
    parser.add_argument("exp", help="experiment folder written by python -m mtl.search")
    parser.add_argument("--top-k", type=int, required=True, help="re-run the K best trials")
    parser.add_argument(
        "--include-stopped", action="store_true", help="let trials stopped early be among them"
    )
    parser.add_argument("--name", help="name of the new experiment (default: EXP's name-retrain)")
    parser.add_argument(
        "--out", help=f"the design-space file to write (default EXP/analysis/{RETRAIN_FILE})"
    )
    parser.add_argument(
        "--space",
        help="the design-space file (default: EXP/design_space.yaml, saved by the search)",
    )
    add_set_argument(parser, "base.data.max_train_examples=null")
    args = parser.parse_args(argv)

    exp = load_experiment(args.exp, args.space)
    if exp.space is None:
        raise AnalysisError(f"{exp.path}: its design-space file was not found (pass --space)")
    ids = top_trial_ids(exp, args.top_k, args.include_stopped)
    points = [exp.params(trial_id) for trial_id in ids]
    name = args.name or f"{exp.name}-retrain"
    raw = retrain_space(exp.space, points, name)
    path = Path(args.out) if args.out else out_dir(exp, None) / RETRAIN_FILE
    try:  # the file as mtl.search will read it, overrides included, before anything is written
        raw = apply_overrides(raw, args.overrides)
        space = parse_space(raw, f"{path} (with --set)" if args.overrides else str(path))
    except ConfigError as err:
        raise AnalysisError(str(err)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# The {len(ids)} best configurations of experiment {exp.name} (trials {', '.join(ids)}), once each.\n"
        f"# Written by: {shlex.join(['python', '-m', 'analysis.retrain', *(argv or sys.argv[1:])])}\n"
    )
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    storage = space.experiment.storage_path.rstrip("/")
    print(f"wrote {path}: trials {', '.join(ids)}")
    print(f"next: python -m mtl.search {shlex.quote(str(path))}")
    print(
        f"then: python -m analysis.ensemble {shlex.quote(storage + '/' + name)} --top-k {len(ids)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
