"""The user's plain alternative: one Hugging Face fine-tune per task, no multitask model, no search.

Three separate ``AutoModelForSequenceClassification`` fine-tunes of the same backbone on the same
local split the multitask trainer reads (:func:`mtl.data.read_split`, so the same rows are used
and skipped): SST-5 as 5-way classification of one sentence, Quora as 2-way classification of the
pair, STS as regression (one output, mean squared error) of the pair, each pair encoded jointly
as ``[CLS] a [SEP] b [SEP]``. The loop follows Hugging Face's
``examples/pytorch/text-classification/run_glue_no_trainer.py``: AdamW, a linear decay to 0 with
no warm-up, dynamic padding, the dev set scored after the last epoch (never chosen on dev).
Defaults are that script's usual ones (lr 2e-5, batch 32, 128 tokens) and 2 epochs.

The scores are the multitask trainer's: SST and Quora accuracy, STS Pearson correlation, and the
CS224N overall score (:func:`mtl.metrics.overall_score`).

    python -m analysis.hf_baseline --out results/hf_baseline            # MiniLM, all local data
    python -m analysis.hf_baseline --out /tmp/b --max-train-examples 200 --max-eval-examples 100

Writes ``OUT/scores.json`` (per task: metric, examples, seconds, each epoch's dev score; the
overall; the settings and library versions) and ``OUT/scores.md``. Exit status 2 with one line
for a data or backbone folder that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mtl.backbones import BackboneError, resolve_backbone
from mtl.data import DataError, RawSplit, eval_subsample, read_split, resolve_data_dir, subsample
from mtl.metrics import overall_score
from mtl.tasks import BUILTIN, Task

TASKS: tuple[Task, ...] = tuple(BUILTIN.values())


def hf_num_labels(task: Task) -> int:
    """``num_labels`` of the task's ``AutoModelForSequenceClassification``: a class count for a
    classification (2 for a binary one: run_glue's softmax over two logits), 1 for a regression."""
    return task.num_labels if task.kind == "classification" else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for scores.json/.md")
    parser.add_argument("--backbone", default="minilm", help="as model.backbone (default minilm)")
    parser.add_argument("--data-dir", default=None, help="as data.data_dir (default MTL_DATA_DIR)")
    parser.add_argument("--tasks", nargs="+", default=[t.name for t in TASKS])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-examples", type=int, default=None, help="per task")
    parser.add_argument("--max-eval-examples", type=int, default=None, help="per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    unknown = set(args.tasks) - {t.name for t in TASKS}
    if unknown:
        parser.error(f"--tasks: unknown {sorted(unknown)}; choose from sst, para, sts")
    return args


def _features(tokenizer, split: RawSplit, max_length: int) -> list[dict[str, list[int]]]:
    """One tokenized example per row: a single sentence, or the pair encoded jointly."""
    if split.text_b is None:
        enc = tokenizer(split.text_a, truncation=True, max_length=max_length)
    else:
        enc = tokenizer(split.text_a, split.text_b, truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc} for i in range(len(split))]


def _batches(tokenizer, feats, labels, batch_size: int, order: list[int], regression: bool):
    """Dynamically padded batches in ``order`` (run_glue's DataCollatorWithPadding)."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad([feats[i] for i in idx], return_tensors="pt")
        if labels is not None:
            dtype = torch.float32 if regression else torch.long
            batch["labels"] = torch.tensor([labels[i] for i in idx], dtype=dtype)
        yield batch


def fine_tune(spec: Task, backbone: Path, train: RawSplit, dev: RawSplit, args) -> dict:
    """Fine-tunes one task and scores its dev split after each epoch.

    Returns:
        ``{"metric", "score", "epochs": [dev score per epoch], "train_examples",
        "dev_examples", "seconds"}``; ``score`` is the last epoch's.
    """
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    regression = spec.kind == "regression"
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone,
        num_labels=hf_num_labels(spec),
        problem_type="regression" if regression else "single_label_classification",
    )
    train_feats = _features(tokenizer, train, args.max_length)
    dev_feats = _features(tokenizer, dev, args.max_length)
    train_labels = [float(x) if regression else int(x) for x in train.labels]
    steps_per_epoch = -(-len(train) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps_per_epoch * args.epochs)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    per_epoch: list[float | None] = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        bar = tqdm(
            _batches(tokenizer, train_feats, train_labels, args.batch_size, order, regression),
            total=steps_per_epoch,
            desc=f"{spec.name} epoch {epoch + 1}/{args.epochs}",
            file=sys.stderr,
        )
        for batch in bar:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        outputs = []
        with torch.no_grad():
            dev_order = list(range(len(dev)))
            for batch in _batches(tokenizer, dev_feats, None, 128, dev_order, regression):
                outputs.append(model(**batch).logits)
        logits = torch.cat(outputs)
        preds = logits.squeeze(-1).numpy() if regression else logits.argmax(-1).numpy()
        per_epoch.append(spec.score(preds, np.asarray(dev.labels)))
    return {
        "metric": spec.metric_name,
        "score": per_epoch[-1],
        "epochs": per_epoch,
        "train_examples": len(train),
        "dev_examples": len(dev),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the fine-tunes and writes OUT/scores.json and OUT/scores.md."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        backbone = resolve_backbone(args.backbone)
        data_dir = resolve_data_dir(args.data_dir)
        splits = {
            t: (
                subsample(
                    read_split(data_dir, BUILTIN[t], "train"), args.max_train_examples, args.seed
                ),
                eval_subsample(read_split(data_dir, BUILTIN[t], "dev"), args.max_eval_examples),
            )
            for t in args.tasks
        }
    except (BackboneError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = {}
    for spec in TASKS:
        if spec.name in splits:
            train, dev = splits[spec.name]
            results[spec.name] = fine_tune(spec, backbone, train, dev, args)
    metrics = {results[t]["metric"]: results[t]["score"] for t in results}
    import transformers

    record = {
        "overall": overall_score(metrics),
        "tasks": results,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    record["settings"]["out"] = Path(args.out).name
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "| task | metric | dev | train examples | dev examples | minutes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        score = "undefined" if r["score"] is None else f"{r['score']:.3f}"
        lines.append(
            f"| {name} | {r['metric']} | {score} | {r['train_examples']:,} | "
            f"{r['dev_examples']:,} | {r['seconds'] / 60:.1f} |"
        )
    lines.append(f"| **overall** | | **{record['overall']:.3f}** | | | |")
    (args.out / "scores.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
