"""Two real experiments on the tiny BERT for the analysis tests (built once per session by the
``analysis_experiments`` fixture of test_analysis.py).

* ``search``: TPE + ASHA over design, routine, learning rate (one value cannot learn, so ASHA
  stops it; one makes the loss NaN, an error), head layers, head width (conditional on two
  layers) and head dropout, then the top two configurations again with seed 1; every trial writes
  its dev and test predictions.
* ``grid``: the shipped Table 3 grid (``search_spaces/ablations/table_3_design_smart.yaml``) with
  its base swapped for the tiny BERT and a one-epoch budget, and two of its three seeds (0, 1).

Both run ``python -m mtl.search`` in a subprocess (its own local Ray), as in test_search_run.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from mtl.config import merge
from tests.conftest import REPO
from tests.test_search_run import run_cli, tiny_space

GRID_FILE = REPO / "search_spaces" / "ablations" / "table_3_design_smart.yaml"


@dataclass(frozen=True)
class Experiments:
    search: Path  # the TPE + ASHA experiment folder
    search_space: Path  # its design-space file
    grid: Path  # the Table 3 grid's experiment folder
    data_dir: Path


def search_space(root: Path, backbone: Path, data_dir: Path) -> Path:
    path = tiny_space(root, backbone, data_dir, "analysis")
    raw = yaml.safe_load(path.read_text())
    raw["base"]["train"]["write_predictions"] = True
    raw["parameters"] = {
        "design": {"path": "model.design", "type": "categorical", "choices": [1, 2]},
        "routine": {
            "path": "train.routine",
            "type": "categorical",
            "choices": ["sequential", "round_robin"],
        },
        "lr": {"path": "train.lr", "type": "categorical", "choices": [0.0, 1e30, 1e-3, 3e-3]},
        "head_layers": {"path": "model.head_layers", "type": "categorical", "choices": [1, 2]},
        "head_hidden": {
            "path": "model.head_hidden",
            "type": "categorical",
            "choices": [16, 32],
            "when": {"head_layers": 2},
        },
        "head_dropout": {"path": "model.head_dropout", "type": "float", "low": 0.0, "high": 0.3},
    }
    raw["search"].update(
        num_samples=7,
        points_to_evaluate=[
            {"design": 2, "routine": "round_robin", "lr": 3e-3, "head_layers": 2},
            {"design": 2, "routine": "round_robin", "lr": 0.0, "head_layers": 1},
            {"design": 1, "routine": "sequential", "lr": 3e-3, "head_layers": 2},
            {"lr": 1e30},
        ],
    )
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def grid_space(root: Path, backbone: Path, data_dir: Path) -> Path:
    raw = yaml.safe_load(GRID_FILE.read_text())
    raw["experiment"]["storage_path"] = str(root / "results")
    raw["base"] = merge(
        raw["base"],
        {
            "model": {"backbone": str(backbone), "head_hidden": 32},
            "data": {
                "data_dir": str(data_dir),
                "max_train_examples": 64,
                "max_eval_examples": 48,
                "max_length": 40,
            },
            "train": {"epochs": 1, "eval_every": 1, "batch_size": 32, "write_predictions": False},
        },
    )
    raw["parameters"]["seed"]["choices"] = [0, 1]
    raw["search"]["max_concurrent_trials"] = 1
    raw["resources_per_trial"] = {"cpu": 1, "gpu": 0}
    path = root / GRID_FILE.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def build_experiments(root: Path, backbone: Path, data_dir: Path) -> Experiments:
    """Run both searches under ``root`` (about a minute each on two cores)."""
    space = search_space(root, backbone, data_dir)
    run_cli(space)
    grid = grid_space(root, backbone, data_dir)
    run_cli(grid)
    name = yaml.safe_load(grid.read_text())["experiment"]["name"]
    return Experiments(root / "results" / "analysis", space, root / "results" / name, data_dir)
