"""The command line of one training run: ``python -m mtl.train [CONFIG.yaml] [--set key=value ...]
[--resume CKPT]``; a user mistake is one line and exit status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mtl import data as data_lib
from mtl import train as train_lib
from mtl.bert import CheckpointError
from mtl.evaluation import format_metrics
from mtl.run_record import default_run_dir
from mtl.train import NonFiniteLossError, train


def main(argv: list[str] | None = None) -> int:
    """``python -m mtl.train [CONFIG.yaml] [--set key=value ...] [--resume CKPT]``."""
    import argparse

    from mtl.backbones import BackboneError
    from mtl.config import ConfigError, add_set_argument, load_config

    parser = argparse.ArgumentParser(
        prog="python -m mtl.train", description=train_lib.__doc__.split("\n")[0]
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: every default)")
    add_set_argument(parser, "train.lr=1e-4")
    parser.add_argument("--resume", metavar="CKPT", help="resume from a checkpoint folder")
    parser.add_argument("--output-dir", help="run folder (overrides output_dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume and not (Path(args.resume) / "train_state.json").is_file():
            raise ConfigError(
                f"--resume {args.resume}: not a checkpoint folder (no train_state.json)"
            )
        run_dir = Path(args.output_dir) if args.output_dir else default_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        metrics = train(cfg, resume_from=args.resume, run_dir=run_dir)
    except (ConfigError, data_lib.DataError, BackboneError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"best dev: {format_metrics(metrics, cfg)}  ->  {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
