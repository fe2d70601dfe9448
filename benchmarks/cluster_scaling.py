"""Trials finished per hour on a local multi-node Ray cluster: one worker node against two.

A real cluster of `ray start` processes on this machine (tests/multinode.py): a head node with no
CPU that runs the driver, and one or two worker nodes with one CPU each. The same search runs on
both: ``--trials`` equal trials (tiny random-weight BERT, 1024-example training slices of the real data,
4 evaluations, FIFO so that no trial is cut short, one thread per trial), as many at a time as
there are worker nodes, through ``python -m mtl.search ... --address``.

Throughput is trials finished per hour over the trials' makespan (first trial start to last trial
end, from Tune's result rows; the cluster's and the driver's start-up are left out) and, for
reference, over the whole command. Target (issue 5): two worker nodes finish at least 1.5x the
trials per hour of one; the ratio to the ideal 2x is printed too.

The machine's two cores may be shared with other work, and two trainings at once contend for its
caches and memory bandwidth, which caps any speed-up below 2x whatever Ray does. So each repeat
also measures the machine's own ceiling: the same trials trained without Ray (``mtl.train.train``
on data loaded beforehand), in one process, then in two at once; the cluster's speed-up divided by
that ceiling is the part that Ray and the search lose.

    python benchmarks/cluster_scaling.py                  # 8 trials per run, 1 repeat
    python benchmarks/cluster_scaling.py --trials 12 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.multinode import LocalCluster  # noqa: E402
from tests.tiny import make_tiny_backbone  # noqa: E402

EVALS = 4
TRAIN_EXAMPLES = 1024
TARGET = 1.5


def _bare_trials(cfg_dict: dict, trials: int, barrier, queue) -> None:
    """Train ``trials`` trials one after another in this process, without Ray; report seconds."""
    from mtl.config import build_config
    from mtl.train import load_data, train

    cfg = build_config(cfg_dict)
    data = load_data(cfg)
    barrier.wait()  # data loaded everywhere: time the training only
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(trials):
            train(cfg, None, run_dir=Path(tmp) / str(i), data=data)
    queue.put(time.perf_counter() - started)


def bare_ceiling(cfg_dict: dict, trials: int) -> tuple[float, float]:
    """Trials per hour of the same training without Ray in one process and in two at once."""
    ctx = multiprocessing.get_context("spawn")
    rates = []
    for procs in (1, 2):
        barrier, queue = ctx.Barrier(procs), ctx.Queue()
        workers = [
            ctx.Process(target=_bare_trials, args=(cfg_dict, trials // procs, barrier, queue))
            for _ in range(procs)
        ]
        for w in workers:
            w.start()
        seconds = max(queue.get() for _ in workers)
        for w in workers:
            w.join()
        rates.append(trials / seconds * 3600)
    return rates[0], rates[1]


def trial_config(backbone: Path, data_dir: str) -> dict:
    """The trainer config of every trial (the search's base plus what it forces)."""
    return {
        "model": {"backbone": str(backbone), "head_hidden": 32},
        "data": {
            "data_dir": data_dir,
            "max_train_examples": TRAIN_EXAMPLES,
            "max_eval_examples": 64,
            "max_length": 48,
        },
        "train": {
            "epochs": EVALS // 2,
            "eval_every": 0.5,
            "batch_size": 32,
            "write_predictions": False,
            "log_every": 4,
            "lr": 2e-3,
            "progress": False,
            "num_threads": 1,
        },
    }


def write_space(root: Path, backbone: Path, data_dir: str, name: str, trials: int, workers: int):
    base = trial_config(backbone, data_dir)
    for key in ("lr", "progress", "num_threads"):  # sampled, or set by the search
        del base["train"][key]
    raw = {
        "experiment": {"name": name, "storage_path": str(root / "results"), "seed": 0},
        "base": base,
        "parameters": {
            "lr": {"path": "train.lr", "type": "float", "low": 1e-3, "high": 3e-3, "log": True},
        },
        "objective": {"metric": "overall"},
        "search": {"sampler": "random", "num_samples": trials, "max_concurrent_trials": workers},
        "scheduler": {"type": "fifo"},
        "resources_per_trial": {"cpu": 1},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def timings(exp: Path) -> tuple[float, float]:
    """Seconds from the first trial's start to the last trial's last result, and the mean
    seconds a trial ran."""
    starts, ends, durations = [], [], []
    for result in exp.glob("run_trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        last = rows[-1]
        ends.append(last["timestamp"])
        starts.append(last["timestamp"] - last["time_total_s"])
        durations.append(last["time_total_s"])
    return max(ends) - min(starts), statistics.mean(durations)


def run(workers: int, trials: int, backbone: Path, data_dir: str, root: Path, tag: str) -> dict:
    name = f"scale-{workers}w-{tag}"
    space = write_space(root, backbone, data_dir, name, trials, workers)
    with LocalCluster() as cluster:
        for _ in range(workers):
            cluster.add_worker(num_cpus=1)
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "mtl.search", str(space), "--address", cluster.address],
            cwd=root,
            env=cluster.env,
            capture_output=True,
            text=True,
        )
        wall = time.time() - started
        worker_ids = {n.node_id for n in cluster.nodes if n is not cluster.head}
    if proc.returncode != 0:
        raise SystemExit(f"{name}: search failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    exp = root / "results" / name
    df = pd.read_csv(exp / "results.csv")
    done = int((df["status"] == "completed").sum())
    assert done == trials, df[["trial_id", "status", "reason"]]
    assert set(df["node_id"]) <= worker_ids and len(set(df["node_id"])) == workers
    span, trial_s = timings(exp)
    return {
        "trial_s": trial_s,
        "workers": workers,
        "trials": done,
        "makespan_s": span,
        "wall_s": wall,
        "per_hour": done / span * 3600,
        "per_hour_wall": done / wall * 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--data-dir", default=os.environ.get("MTL_DATA_DIR", "/work/shared/data/cs224n")
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cluster-scaling-") as tmp:
        root = Path(tmp)
        backbone = make_tiny_backbone(root / "tiny-bert")
        cfg = trial_config(backbone, args.data_dir)
        print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        bare: list[tuple[float, float]] = []
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for rep in range(args.repeats):
            bare.append(bare_ceiling(cfg, args.trials))
            print(
                f"  repeat {rep}: without Ray, {args.trials} trials: one process "
                f"{bare[-1][0]:.0f} trials/h, two at once {bare[-1][1]:.0f} trials/h "
                f"({bare[-1][1] / bare[-1][0]:.2f}x)",
                flush=True,
            )
            for workers in (1, 2) if rep % 2 == 0 else (2, 1):  # alternate the order
                r = run(workers, args.trials, backbone, args.data_dir, root, f"r{rep}")
                runs[workers].append(r)
                print(
                    f"  repeat {rep}: {workers} worker node(s): {r['trials']} trials, "
                    f"{r['trial_s']:.1f} s each, "
                    f"makespan {r['makespan_s']:.1f} s -> {r['per_hour']:.0f} trials/h "
                    f"(whole command {r['wall_s']:.1f} s -> {r['per_hour_wall']:.0f} trials/h)",
                    flush=True,
                )
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")

    ceiling = statistics.mean(two / one for one, two in bare)
    one = statistics.mean(r["per_hour"] for r in runs[1])
    two = statistics.mean(r["per_hour"] for r in runs[2])
    one_wall = statistics.mean(r["per_hour_wall"] for r in runs[1])
    two_wall = statistics.mean(r["per_hour_wall"] for r in runs[2])
    speedup, speedup_wall = two / one, two_wall / one_wall
    print()
    print(f"{'worker nodes':>12}  {'trials/h (makespan)':>20}  {'trials/h (whole command)':>25}")
    print(f"{1:>12}  {one:>20.0f}  {one_wall:>25.0f}")
    print(f"{2:>12}  {two:>20.0f}  {two_wall:>25.0f}")
    print(
        f"two against one: {speedup:.2f}x over the makespan ({speedup / 2:.0%} of the ideal 2x), "
        f"{speedup_wall:.2f}x over the whole command; target >= {TARGET}x: "
        f"{'met' if speedup >= TARGET else 'NOT met'}"
    )
    print(
        f"the same trials without Ray, two processes against one on this machine: {ceiling:.2f}x; "
        f"the cluster reached {speedup / ceiling:.0%} of that"
    )


if __name__ == "__main__":
    main()
