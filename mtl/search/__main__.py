"""``python -m mtl.search DESIGN_SPACE.yaml [--resume] [--smoke] [--address auto]``."""

from __future__ import annotations

import argparse
import logging
import sys

from mtl.config import add_set_argument
from mtl.search.space import SpaceError, load_space


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtl.search",
        description="Search a design space of multitask BERT with Ray Tune, Optuna and ASHA.",
    )
    parser.add_argument("space", help="design-space YAML file (e.g. search_spaces/quick.yaml)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the interrupted experiment of this file"
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
    add_set_argument(parser, "base.model.backbone=minilm; give the same ones again with --resume")
    args = parser.parse_args(argv)

    try:
        space = load_space(args.space, args.overrides)
    except SpaceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.smoke and args.resume:
        print("error: --smoke starts afresh; it cannot be combined with --resume", file=sys.stderr)
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
            smoke=args.smoke,
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
