"""The command line of one training run: ``python -m mtl.train [CONFIG.yaml] [--set key=value ...]
[--resume RUN/checkpoint] [--output-dir DIR]``; a user mistake is one line and exit status 2.

``--resume RUN/checkpoint`` continues run RUN in its own folder with its own ``config.yaml`` (the
checkpoint's folder beside it), as ``Trainer(resume_from_checkpoint=...)`` or Lightning's
``ckpt_path`` continue a run. A CONFIG or ``--set`` may change only where and how the run is
carried out (:data:`RESUME_FREE`: device, threads, precision, data folder, progress and logging,
output folder); any other key that differs from the run's config is refused, naming it, so that a
resume never mixes two configurations in one run (the search's ``--resume`` refuses the same way).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mtl import data as data_lib
from mtl import train as train_lib
from mtl.backbones import BackboneError
from mtl.bert import CheckpointError
from mtl.config import Config, ConfigError, add_set_argument, first_difference, load_config, lookup
from mtl.evaluation import format_metrics
from mtl.run_record import default_run_dir
from mtl.train import NonFiniteLossError, train

# Keys a resumed run may change: where and how it runs and reports, not what it computes.
RESUME_FREE = (
    "output_dir",
    "data.data_dir",
    "data.cache_tokenized",
    "train.device",
    "train.num_threads",
    "train.precision",
    "train.progress",
    "train.log_every",
    "contrastive.cache_dir",
)


def resume_config(
    checkpoint: Path, config: str | None, overrides: list[str] | None
) -> tuple[Config, Path | None]:
    """The config a resumed run continues with, and the run folder it continues in (None: the
    checkpoint has no run folder with a ``config.yaml`` beside it, so nothing to continue in).

    Without CONFIG the run's own ``config.yaml`` (``--set`` applied on top); with one, that file.
    Raises :class:`~mtl.config.ConfigError` when the result differs from the run's config in a
    key outside :data:`RESUME_FREE`, naming the first such key.
    """
    saved_path = checkpoint.parent / "config.yaml"
    if not saved_path.is_file():
        return load_config(config, overrides), None
    cfg = load_config(config if config is not None else saved_path, overrides)
    saved = load_config(saved_path).to_dict()
    given = cfg.to_dict()
    for key in RESUME_FREE:
        section, _, name = key.rpartition(".")
        (given[section] if section else given)[name] = (saved[section] if section else saved)[name]
    key = first_difference(given, saved)
    if key is not None:
        raise ConfigError(
            f"--resume {checkpoint}: {key} is {lookup(given, key)!r} here but "
            f"{lookup(saved, key)!r} in {saved_path}; a resumed run keeps its configuration "
            f"(drop the CONFIG and --set, or start a new run)"
        )
    return cfg, checkpoint.parent


def main(argv: list[str] | None = None) -> int:
    """``python -m mtl.train [CONFIG.yaml] [--set key=value ...] [--resume RUN/checkpoint]
    [--output-dir DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mtl.train", description=train_lib.__doc__.split("\n")[0]
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: every default)")
    add_set_argument(parser, "train.lr=1e-4")
    parser.add_argument(
        "--resume",
        metavar="RUN/checkpoint",
        help="continue a run from its checkpoint folder, in its own folder with its own config",
    )
    parser.add_argument(
        "--output-dir",
        help="run folder (overrides output_dir; default runs/<date>-<time>, or RUN with --resume)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run_dir = None
        if args.resume:
            if not (Path(args.resume) / "train_state.json").is_file():
                raise ConfigError(
                    f"--resume {args.resume}: not a checkpoint folder (no train_state.json)"
                )
            cfg, run_dir = resume_config(Path(args.resume), args.config, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        if args.output_dir:
            run_dir = Path(args.output_dir)
        elif run_dir is None:
            run_dir = default_run_dir(cfg)
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
