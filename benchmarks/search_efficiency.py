"""TPE + ASHA against random search + FIFO: trial-epochs spent and best dev score found.

The same design space and number of trials for both, over 3 sampler seeds: a tiny random-weight
BERT (hidden 32, 2 layers, the tests' backbone) on small slices of the real CS224N data, CPU, two
trials at a time. Each full trial trains 8 epochs with one dev evaluation per epoch; ASHA (grace 1,
reduction factor 4) may stop a trial after its 1st or 4th evaluation. Trial-epochs are the epochs
every trial trained, summed (``results.csv``: ``epochs``); the best score is the experiment's best
dev ``overall``.

Target (issue 4): TPE + ASHA spends at most 40% of random + FIFO's trial-epochs and its mean best
score is not more than 0.01 below.

    python benchmarks/search_efficiency.py                # 16 trials x 2 strategies x 3 seeds
    python benchmarks/search_efficiency.py --trials 24 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import ray

from mtl.search.run import run_search
from mtl.search.space import parse_space

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.scratch import add_keep_argument, run_folder, stop_ray  # noqa: E402

EPOCHS = 8

PARAMETERS = {
    "lr": {"path": "train.lr", "type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "pooling": {"path": "model.pooling", "type": "categorical", "choices": ["cls", "mean"]},
    "head_layers": {"path": "model.head_layers", "type": "categorical", "choices": [1, 2]},
    "head_hidden": {"path": "model.head_hidden", "type": "categorical", "choices": [16, 32, 64]},
    "head_dropout": {"path": "model.head_dropout", "type": "float", "low": 0.0, "high": 0.3},
    "batch_size": {"path": "train.batch_size", "type": "categorical", "choices": [16, 32]},
}


def space(
    name: str, root: Path, backbone: Path, data_dir: str, seed: int, trials: int, smart: bool
):
    return parse_space(
        {
            "experiment": {"name": name, "storage_path": str(root), "seed": seed},
            "base": {
                "seed": seed,
                "model": {"backbone": str(backbone)},
                "data": {
                    "data_dir": data_dir,
                    "max_train_examples": 256,
                    "max_eval_examples": 128,
                    "max_length": 48,
                },
                "train": {"epochs": EPOCHS, "eval_every": 1, "write_predictions": False},
            },
            "parameters": PARAMETERS,
            "search": {
                "sampler": "tpe" if smart else "random",
                "num_samples": trials,
                "max_concurrent_trials": 2,
                "startup_trials": trials // 4,
            },
            "scheduler": (
                {"type": "asha", "grace_period": 1, "reduction_factor": 4}
                if smart
                else {"type": "fifo"}
            ),
            "resources_per_trial": {"cpu": 1},
            "failure": {"max_retries": 0},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MTL_DATA_DIR", str(REPO.parent / "shared" / "data" / "cs224n")),
    )
    add_keep_argument(parser)
    args = parser.parse_args()
    with run_folder("search-efficiency-", args.keep, before_removal=stop_ray) as root:
        rows = run_searches(args, root)
    report(args, rows)


def run_searches(args: argparse.Namespace, root: Path) -> list[dict]:
    """Both strategies for every seed, each search under ``root``; one row per search."""
    from tests.tiny import make_tiny_backbone

    backbone = make_tiny_backbone(root / "tiny-bert")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Our own Ray, even if `ray start` left one running: it stops when the run ends.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for seed in args.seeds:
        for smart in (True, False):
            label = "tpe+asha" if smart else "random+fifo"
            name = f"{label.replace('+', '-')}-{seed}"
            sp = space(name, root, backbone, args.data_dir, seed, args.trials, smart)
            started = time.time()
            summary = run_search(sp, verbose=0)
            df = summary.frame()
            rows.append(
                {
                    "strategy": label,
                    "seed": seed,
                    "trial_epochs": float(df["epochs"].sum()),
                    "best_overall": float(df["best.overall"].max()),
                    "stopped": int((df["status"] == "stopped").sum()),
                    "wall_s": time.time() - started,
                }
            )
            print(rows[-1], flush=True)
    ray.shutdown()
    return rows


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    """The table, the means and the verdicts against the targets."""
    print(
        f"\n{args.trials} trials of up to {EPOCHS} epochs per search, tiny BERT, CPU, 2 at a time"
    )
    print(
        f"{'seed':>4} {'strategy':12} {'trial-epochs':>13} {'best overall':>13} {'stopped':>8} {'wall s':>7}"
    )
    for r in rows:
        print(
            f"{r['seed']:>4} {r['strategy']:12} {r['trial_epochs']:13.1f} {r['best_overall']:13.4f}"
            f" {r['stopped']:>8} {r['wall_s']:7.0f}"
        )
    mean = {
        s: (
            statistics.mean(r["trial_epochs"] for r in rows if r["strategy"] == s),
            statistics.mean(r["best_overall"] for r in rows if r["strategy"] == s),
        )
        for s in ("tpe+asha", "random+fifo")
    }
    ratio = mean["tpe+asha"][0] / mean["random+fifo"][0]
    gap = mean["tpe+asha"][1] - mean["random+fifo"][1]
    print(
        f"mean trial-epochs: tpe+asha {mean['tpe+asha'][0]:.1f}, random+fifo "
        f"{mean['random+fifo'][0]:.1f}: ratio {ratio:.2f} (target <= 0.40: "
        f"{'met' if ratio <= 0.40 else 'missed'})"
    )
    print(
        f"mean best overall: tpe+asha {mean['tpe+asha'][1]:.4f}, random+fifo "
        f"{mean['random+fifo'][1]:.4f}: difference {gap:+.4f} (target >= -0.01: "
        f"{'met' if gap >= -0.01 else 'missed'})"
    )


if __name__ == "__main__":
    main()
