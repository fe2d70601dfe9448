"""``python -m mtl.search DESIGN_SPACE.yaml [--smoke | --overwrite] [--address auto]``, or
``python -m mtl.search --resume EXPERIMENT_DIR [--retry-errored]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mtl.config import add_set_argument
from mtl.search.experiment import is_uri, load_saved
from mtl.search.space import SpaceError, load_space, premature_rung


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtl.search",
        description="Search a design space of multitask BERT with Ray Tune, Optuna and ASHA.",
    )
    parser.add_argument(
        "space",
        help="design-space YAML file (e.g. search_spaces/quick.yaml), or with --resume an "
        "experiment folder (e.g. ray_results/quick)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted experiment of this folder (or file: it must be the space "
        "the experiment saved)",
    )
    parser.add_argument(
        "--retry-errored",
        action="store_true",
        help="with --resume: run the trials that ended in an error again, each from its last "
        "checkpoint or, without one, from the start (e.g. after fixing what made them fail)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the experiment folder and Optuna study of this name, then start afresh",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny budget (3 trials, tiny data slices) to check the file before a long run",
    )
    parser.add_argument(
        "--address",
        help="join a running Ray cluster ('auto', or host:port); default: $RAY_ADDRESS"
        " or a local Ray started for this run",
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="interface of the local Ray dashboard (default 127.0.0.1: this machine only)",
    )
    parser.add_argument("--no-dashboard", action="store_true", help="start no Ray dashboard")
    parser.add_argument("--check", action="store_true", help="validate the file and exit")
    add_set_argument(parser, "base.model.backbone=minilm")
    args = parser.parse_args(argv)
    if args.retry_errored and not args.resume:
        print(
            "error: --retry-errored reruns an experiment's trials; pass --resume", file=sys.stderr
        )
        return 2

    try:
        if Path(args.space).is_dir() or is_uri(args.space):
            if not args.resume:
                raise SpaceError(
                    f"{args.space}: a folder; pass --resume to continue its experiment"
                )
            space = load_saved(args.space, args.overrides)
        else:
            space = load_space(args.space, args.overrides)
    except SpaceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problem = premature_rung(space)
    if problem is not None:
        # A warning, not a refusal: a search run with it must still resume as it ran.
        print(f"warning: {args.space}: {problem[0]}: {problem[1]}", file=sys.stderr)
    for flag in ("smoke", "overwrite"):
        if getattr(args, flag) and args.resume:
            print(
                f"error: --{flag} starts afresh; it cannot be combined with --resume",
                file=sys.stderr,
            )
            return 2
    if args.check:
        print(f"{args.space}: ok ({len(space.parameters)} parameters)")
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from mtl.search.run import run_search

    try:
        summary = run_search(
            space,
            resume=args.resume,
            retry_errored=args.retry_errored,
            smoke=args.smoke,
            overwrite=args.overwrite,
            address=args.address,
            num_cpus=args.num_cpus,
            dashboard_host=args.dashboard_host,
            include_dashboard=False if args.no_dashboard else None,
        )
    except SpaceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary.failed:
        print(
            f"error: all {len(summary.rows)} trials failed; their reasons are in results.csv",
            file=sys.stderr,
        )
        return 1
    return 1 if summary.unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
