"""Whole training runs in bf16 autocast against fp32: time per epoch and dev scores.

Two workloads on the real local data (``MTL_DATA_DIR``), MiniLM, the trainer's own ``train()``:

* ``quick``: the Quickstart's trial budget: ``search_spaces/quick.yaml``'s base config (as
  shipped: 1,000 training and 200 dev examples per task, max_length 64, batch 16, 2 epochs,
  evaluated every half epoch; RESULTS_precision.md was measured with its earlier 400) with its
  first ``points_to_evaluate`` (design 2, finetune, round-robin, lr 1e-4), once per seed and
  precision. Timed: the whole ``train()`` call (start-up, training, evaluations,
  checkpoints), with the evaluations and the start-up (to the first forward) also timed apart.
  Dev scores of the seed pairs are compared by ``analysis.paired.compare`` (the evidence issue's
  paired bootstrap over dev examples, runs paired by seed).
* ``all``: every training example of the three tasks (30,771), the trainer's defaults (max_length
  128, batch 32, round-robin). A whole epoch (2,024 steps with the largest set seen once) runs for
  hours on 2 cores, so ``train.max_steps`` cuts it to the first ``--all-steps`` steps of the
  real epoch plan (length-bucketed batches of all three tasks, the real mix of lengths); the dev
  evaluation at the cut runs on 200 examples per task and is timed apart. The ratio of the
  training loop is the one that extrapolates to the whole epoch.

fp32 and bf16 runs alternate (fp32, bf16, fp32, bf16, ...) in one process, so load from other
jobs on the machine slows both alike; tokenized data is built once per workload and shared, as a
search shares it. Threads: ``--threads`` (default 1, what a Quickstart trial gets). The script
prints the CPU's model and bf16-relevant flags, what ``train.precision: auto`` chooses on it and
why (``mtl.precision``), the load average before and after, and the ratios fp32 time / bf16 time.

    python benchmarks/precision_epoch.py                        # both workloads, seeds 0 1 2
    python benchmarks/precision_epoch.py --workloads quick --seeds 0
    python benchmarks/precision_epoch.py --workloads all --all-steps 60 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mtl.train as train_lib  # noqa: E402
from benchmarks.scratch import add_keep_argument, run_folder  # noqa: E402
from mtl import precision  # noqa: E402
from mtl.config import Config, build_config  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", nargs="+", choices=("quick", "all"), default=["quick", "all"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="quick workload")
    parser.add_argument("--all-steps", type=int, default=60, help="optimizer steps, all data")
    parser.add_argument("--repeats", type=int, default=2, help="fp32/bf16 pairs, all data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "quick.yaml"))
    parser.add_argument(
        "--out", help="keep the run folders here (default: a temporary folder, removed at the end)"
    )
    add_keep_argument(parser)
    return parser.parse_args(argv)


def _set(raw: dict, path: str, value: object) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        raw = raw.setdefault(key, {})
    raw[leaf] = value


def quick_config(space_file: Path, seed: int, threads: int) -> dict:
    """The Quickstart's first trial (its base plus the first points_to_evaluate), as a raw dict."""
    space = yaml.safe_load(space_file.read_text())
    raw = copy.deepcopy(space["base"])
    for name, value in space["search"]["points_to_evaluate"][0].items():
        _set(raw, space["parameters"][name]["path"], value)
    raw["seed"] = seed
    _set(raw, "train.progress", False)
    _set(raw, "train.num_threads", threads)
    return raw


def all_data_config(steps: int, threads: int) -> dict:
    """The trainer's defaults on every training example, cut to ``steps`` optimizer steps."""
    return {
        "seed": 0,
        "model": {"backbone": "minilm"},
        "data": {"max_eval_examples": 200},
        "train": {
            "epochs": 1,
            "max_steps": steps,
            "lr": 1e-4,
            "write_predictions": False,
            "progress": False,
            "num_threads": threads,
            "device": "cpu",
        },
    }


class Timer:
    """One ``train()`` call, wall and process CPU seconds: start-up (to the first forward) and
    evaluations apart. CPU seconds are what to compare on a machine shared with other jobs."""

    def __init__(self) -> None:
        self.first_forward: tuple[float, float] | None = None
        self.eval = [0.0, 0.0]  # wall, cpu
        self._evaluate = train_lib.evaluate

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def __enter__(self) -> Timer:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if self.first_forward is None:
                self.first_forward = self.now()

        def timed_evaluate(*args, **kwargs):
            begin = self.now()
            try:
                return self._evaluate(*args, **kwargs)
            finally:
                end = self.now()
                self.eval = [e + b - a for e, a, b in zip(self.eval, begin, end, strict=True)]

        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        train_lib.evaluate = timed_evaluate
        self.start = self.now()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self.now()
        self._handle.remove()
        train_lib.evaluate = self._evaluate
        first = self.first_forward or self.start
        # phase -> (wall, cpu) seconds
        self.phases = {
            "total": tuple(b - a for a, b in zip(self.start, end, strict=True)),
            "startup": tuple(b - a for a, b in zip(self.start, first, strict=True)),
            "eval": tuple(self.eval),
        }
        self.phases["loop"] = tuple(
            t - s - e
            for t, s, e in zip(
                self.phases["total"], self.phases["startup"], self.phases["eval"], strict=True
            )
        )

    def line(self) -> str:
        w = {k: v[0] for k, v in self.phases.items()}
        c = {k: v[1] for k, v in self.phases.items()}
        return (
            f"wall {w['total']:6.1f} s (start-up {w['startup']:.1f}, loop {w['loop']:.1f}, "
            f"eval {w['eval']:.1f}); cpu {c['total']:6.1f} s (start-up {c['startup']:.1f}, "
            f"loop {c['loop']:.1f}, eval {c['eval']:.1f})"
        )


def run(raw: dict, prec: str, data, out: Path) -> tuple[Timer, dict, Path]:
    """One ``train()`` at ``prec``; its timer, best metrics and run folder."""
    raw = copy.deepcopy(raw)
    _set(raw, "train.precision", prec)
    cfg: Config = build_config(raw)
    run_dir = out / f"seed{cfg.seed}-{prec}-{time.monotonic_ns()}"
    with Timer() as timer:
        metrics = train_lib.train(cfg, run_dir=run_dir, data=data)
    return timer, metrics, run_dir


def warm_up(raw: dict, data, out: Path) -> None:
    """Two steps in each precision, untimed: the first run's lazy imports and allocations."""
    raw = copy.deepcopy(raw)
    _set(raw, "train.max_steps", 2)
    for prec in PRECISIONS:
        run(raw, prec, data, out)


def summary(name: str, timers: dict[str, list[Timer]]) -> None:
    """Per-precision medians and the fp32/bf16 ratios of each phase, wall and CPU seconds."""
    print(f"{name}: median of {len(timers['fp32'])} runs, fp32 / bf16 seconds and ratio")
    for phase in ("total", "startup", "loop", "eval"):
        cells = []
        for i, kind in enumerate(("wall", "cpu")):
            f = statistics.median(t.phases[phase][i] for t in timers["fp32"])
            b = statistics.median(t.phases[phase][i] for t in timers["bf16"])
            cells.append(f"{kind} {f:7.1f} {b:7.1f} {f / b:5.2f}x")
        print(f"  {phase:<8} " + "   ".join(cells))


def main(argv: list[str] | None = None) -> None:
    """Runs the workloads and prints the machine, the timings, ratios and dev scores."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = precision.cpu_info()
    auto = precision.choose_precision("auto", torch.device("cpu"), cpu)
    flags = " ".join(f for f, on in cpu.relevant_flags().items() if on)
    print(f"CPU: {cpu.model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}")
    print(f"  flags: {flags or '(none known)'}; capability {cpu.capability}")
    print(f"  train.precision auto -> {auto.name}: {auto.reason}")
    print(f"  threads {args.threads}; load average before: {os.getloadavg()}")
    with run_folder("precision_epoch-", args.keep, given=args.out) as out:
        measure(args, out)
    print(f"load average after: {os.getloadavg()}")


def measure(args: argparse.Namespace, out: Path) -> None:
    """The workloads of ``args``, their run folders under ``out``."""
    if "quick" in args.workloads:
        raw0 = quick_config(Path(args.space), args.seeds[0], args.threads)
        data = train_lib.load_data(build_config(raw0))
        warm_up(raw0, data, out)
        timers: dict[str, list[Timer]] = {p: [] for p in PRECISIONS}
        dirs: dict[str, list[Path]] = {p: [] for p in PRECISIONS}
        print(f"quick: {Path(args.space).name}'s first trial, seeds {args.seeds}")
        for seed in args.seeds:
            # The slices are seed 0's draw for every seed; the seed moves init and data order.
            for prec in PRECISIONS:
                timer, metrics, run_dir = run(
                    quick_config(Path(args.space), seed, args.threads), prec, data, out
                )
                timers[prec].append(timer)
                dirs[prec].append(run_dir)
                sts = metrics["sts_pearson"]
                print(
                    f"  seed {seed} {prec}: {timer.line()}; dev overall {metrics['overall']:.4f} "
                    f"(sst {metrics['sst_acc']:.3f} para {metrics['para_acc']:.3f} sts "
                    f"{'undefined' if sts is None else f'{sts:.3f}'})",
                    flush=True,
                )
        summary("quick", timers)
        _compare(dirs)

    if "all" in args.workloads:
        raw = all_data_config(args.all_steps, args.threads)
        data = train_lib.load_data(build_config(raw))
        warm_up(raw, data, out)
        n = sum(len(e) for e in data.train.values())
        print(f"all: {n} training examples, first {args.all_steps} steps of epoch 0's plan")
        timers = {p: [] for p in PRECISIONS}
        for _ in range(args.repeats):
            for prec in PRECISIONS:
                timer, _, _ = run(raw, prec, data, out)
                timers[prec].append(timer)
                loop_cpu = timer.phases["loop"][1] / args.all_steps
                print(f"  {prec}: {timer.line()}; {loop_cpu:.2f} cpu s/step", flush=True)
        summary("all", timers)


def _compare(dirs: dict[str, list[Path]]) -> None:
    """bf16 - fp32 dev scores, paired by seed (analysis.paired)."""
    from analysis.paired import compare, read_dev_predictions

    pairs = [
        (
            read_dev_predictions(a / train_lib.DEV_PREDICTIONS_FILE),
            read_dev_predictions(b / train_lib.DEV_PREDICTIONS_FILE),
        )
        for a, b in zip(dirs["fp32"], dirs["bf16"], strict=True)
    ]
    comparisons, shared = compare(pairs, "fp32 vs bf16", resamples=2000)
    print(f"  bf16 - fp32, mean over {len(pairs)} seed pairs, 95% paired bootstrap interval:")
    for c in comparisons:
        print(
            f"    {c.metric:<12} {c.difference:+.4f} [{c.low:+.4f}, {c.high:+.4f}] "
            f"p={c.p_value:.3f} (dev examples per task: {min(shared.values())})"
        )


if __name__ == "__main__":
    main()
