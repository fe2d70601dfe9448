"""Trials per hour with 1, 2 and 4 MiniLM trials packed onto one GPU (fractional resources).

A MiniLM trial uses a sliver of a large GPU: at batch 16 the step waits on the host (Python,
kernel launches), not on the arithmetic. Ray Tune can place several trials on one GPU with a
fractional ``resources_per_trial.gpu`` (0.5, 0.25). For each packing K this runs the real
command, ``python -m mtl.search search_spaces/quick.yaml``, with ``--set`` overrides: K trials at
a time (``search.max_concurrent_trials=K``, ``resources_per_trial.gpu=1/K``), the same N trials
in every run (``search.sampler=random`` with the file's seed draws the same configurations
whatever the concurrency), no early stopping (``scheduler.type=fifo``: every trial runs its full
budget, so the runs do the same work), the quick budget otherwise (1,200 training and 200 dev
examples per task, 2 epochs, batch 16).

Figures per packing: the search's wall time (Ray's start included), the span from the first
trial's start to the last trial's end (from each trial's ``result.json``), and trials per hour
over that span; the ratio against K=1 is the gain from packing.

    python benchmarks/trial_packing.py --backbone minilm                  # on a GPU machine
    python benchmarks/trial_packing.py --device cpu --packings 1,2 --trials 2 --backbone DIR \
        --set base.data.max_train_examples=40     # a check of the script on a laptop

``--backbone`` is a name or a folder (``tests/tiny.make_tiny_backbone`` writes a random one of
any shape: MiniLM's is hidden 384, 6 layers, 12 heads, 1536; the speed is the shape's, the
weights do not matter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.scratch import add_keep_argument, run_folder  # noqa: E402
from mtl.search.experiment import read_reports  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packings", default="1,2,4", help="trials per GPU, comma-separated")
    parser.add_argument("--trials", type=int, default=8, help="trials per packing (N)")
    parser.add_argument("--backbone", default="minilm", help="backbone name or folder")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the script")
    parser.add_argument("--cpus-per-trial", type=float, default=2)
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "quick.yaml"))
    parser.add_argument(
        "--storage",
        default=None,
        help="experiment folder root (default: temporary, removed at the end)",
    )
    add_keep_argument(parser)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides"
    )
    return parser.parse_args(argv)


def configurations(exp_dir: Path) -> list[str]:
    """The trials' sampled parameters (``params.json``), sorted: what every packing must share."""
    return sorted(p.read_text() for p in exp_dir.glob("*/params.json"))


def trial_span(exp_dir: Path) -> tuple[float, int]:
    """(seconds from the first trial's start to the last one's end, trials that reported).

    A trial's start is its first report's ``timestamp`` less that report's ``time_total_s``.
    """
    starts, ends = [], []
    for trial in sorted(p for p in exp_dir.iterdir() if p.is_dir()):
        reports = read_reports(str(trial))
        if not reports:
            continue
        starts.append(reports[0]["timestamp"] - reports[0]["time_total_s"])
        ends.append(reports[-1]["timestamp"])
    if not starts:
        return float("nan"), 0
    return max(ends) - min(starts), len(starts)


def run_packing(args: argparse.Namespace, packing: int, storage: Path) -> dict[str, float]:
    """Runs one search with ``packing`` trials per GPU; returns its figures."""
    name = f"packing-{packing}"
    gpu = 1.0 / packing if args.device == "cuda" else 0.0
    overrides = {
        "experiment.name": name,
        "experiment.storage_path": str(storage),
        "base.model.backbone": args.backbone,
        "base.train.device": args.device,
        "base.train.progress": "false",
        "search.sampler": "random",
        "search.num_samples": str(args.trials),
        "search.max_concurrent_trials": str(packing),
        "scheduler.type": "fifo",
        "resources_per_trial.gpu": f"{gpu:g}",
        "resources_per_trial.cpu": f"{args.cpus_per_trial:g}",
    }
    command = [sys.executable, "-m", "mtl.search", args.space, "--no-dashboard"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    for extra in args.set:
        command += ["--set", extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"packing {packing}: mtl.search exited with {done.returncode}")
    span, trials = trial_span(storage / name)
    if trials != args.trials:
        raise SystemExit(f"packing {packing}: {trials} of {args.trials} trials reported")
    return {"packing": packing, "wall": wall, "span": span, "trials": trials}


def main(argv: list[str] | None = None) -> None:
    """Runs every packing and prints a table."""
    args = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with run_folder("packing-", args.keep, given=args.storage) as storage:
        rows = run_packings(args, storage)
    report(rows)


def run_packings(args: argparse.Namespace, storage: Path) -> list[dict[str, float]]:
    """Every packing of ``args``, one search each under ``storage``; their figures."""
    rows = []
    first: list[str] | None = None
    for packing in (int(k) for k in args.packings.split(",")):
        row = run_packing(args, packing, storage)
        rows.append(row)
        drawn = configurations(storage / f"packing-{packing}")
        if first is None:
            first = drawn
        elif drawn != first:
            raise SystemExit(
                f"packing {packing}: other configurations than packing {rows[0]['packing']}"
            )
        print(
            f"packing {packing}: {row['trials']} trials, search wall {row['wall']:.1f} s, "
            f"trial span {row['span']:.1f} s, {row['trials'] / row['span'] * 3600:,.0f} "
            "trials/hour",
            flush=True,
        )
    return rows


def report(rows: list[dict[str, float]]) -> None:
    """The table of trials per hour against the first packing."""
    base = rows[0]["trials"] / rows[0]["span"]
    print(
        f"\n| trials per GPU | trials | span s | wall s | trials/hour | vs {rows[0]['packing']} |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        rate = row["trials"] / row["span"]
        print(
            f"| {row['packing']} | {row['trials']} | {row['span']:.1f} | {row['wall']:.1f} | "
            f"{rate * 3600:,.0f} | {rate / base:.2f}x |"
        )
    spans = [r["span"] for r in rows]
    print(f"(median span {statistics.median(spans):.1f} s)")


if __name__ == "__main__":
    main()
