"""Cost of one training step with each extension, as a ratio against the plain step.

Variants, all built by the trainer's own ``build_model`` / ``param_groups`` / ``Regularizer``
from MiniLM's weights, in one process on one batch:

* ``plain``: the baseline (design 2, finetune);
* ``smart``: SMART at the paper's defaults, K = 1 (one ascent run and one perturbed run more);
* ``smart_bregman``: the same plus the Bregman term against a momentum teacher;
* ``pal_paper`` / ``pal_standard``: the two PAL variants (PALs for all three tasks; one runs).

A step is forward, task loss (plus the regularizer), backward and an AdamW update, with dropout
on as in training. Steps alternate between the variants (the order rotates every repeat), and
the script prints each variant's median step time and the median of its per-repeat ratios
against ``plain``.

    python benchmarks/extensions_step.py                          # CPU, 32x64, para
    python benchmarks/extensions_step.py --device cuda --dtype bf16 --steps 30
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl import smart
from mtl.backbones import resolve_backbone
from mtl.build import build_model, param_groups
from mtl.config import Config, build_config
from mtl.data import Batch
from mtl.heads import task_loss
from mtl.pal import pal_parameters

VARIANTS: dict[str, dict] = {
    "plain": {},
    "smart": {"smart": {"enabled": True}},
    "smart_bregman": {"smart": {"enabled": True, "bregman": True}},
    "pal_paper": {"pal": {"variant": "paper"}},
    "pal_standard": {"pal": {"variant": "standard"}},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, as on GPU"
    )
    parser.add_argument(
        "--backbone", default="minilm", help="minilm, or a folder with MiniLM's config and weights"
    )
    parser.add_argument("--shape", default="32x64", help="BATCHxSEQ")
    parser.add_argument("--task", choices=["sst", "para", "sts"], default="para")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_batch(task: str, batch: int, seq: int, gen: torch.Generator) -> Batch:
    """Random full-length rows ([CLS] ... [SEP]) with random labels; design 2 pairs."""
    ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102
    labels = {
        "sst": torch.randint(0, 5, (batch,), generator=gen),
        "para": torch.randint(0, 2, (batch,), generator=gen).float(),
        "sts": torch.rand(batch, generator=gen) * 5,
    }[task]
    token_types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)
    return Batch(
        task=task,
        index=torch.arange(batch),
        input_ids=ids,
        attention_mask=torch.ones(batch, seq, dtype=torch.long),
        token_type_ids=None if task == "sst" else token_types.contiguous(),
        labels=labels,
    )


def make_step(
    cfg: Config, batch: Batch, device: torch.device, dtype: str
) -> tuple[Callable[[], float], int]:
    """One variant's step closure (returns seconds) and its number of added PAL parameters."""
    model = build_model(cfg, resolve_backbone(cfg.model.backbone)).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg), fused=device.type == "cuda" or None)
    regularizer = smart.Regularizer(cfg.smart, model, total_steps=1000)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if dtype == "bf16"
        else contextlib.nullcontext
    )

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast():
            out = model(batch)
            loss = task_loss(batch.task, out.logits, batch.labels)
            loss = regularizer.add(loss, model, batch, out.logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        regularizer.after_step(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step, sum(p.numel() for p in pal_parameters(model))


def main(argv: list[str] | None = None) -> None:
    """Times every variant and prints the ratios against the plain step."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    batch_size, seq = (int(x) for x in args.shape.lower().split("x"))
    batch = make_batch(args.task, batch_size, seq, torch.Generator().manual_seed(args.seed))
    batch = batch.to(device)
    steps, added = {}, {}
    for name, sections in VARIANTS.items():
        torch.manual_seed(args.seed)
        cfg = build_config(
            {"model": {"backbone": args.backbone}, "train": {"lr": 1e-5}, **sections}
        )
        steps[name], added[name] = make_step(cfg, batch, device, args.dtype)
    print(
        f"{args.backbone} on {device} ({args.dtype}, {torch.get_num_threads()} CPU threads), "
        f"task {args.task}, batch {batch_size}x{seq}, torch {torch.__version__}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant"
    )
    names = list(steps)
    for _ in range(args.warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.steps):
        # Rotate the order so no variant always runs right after the same one.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(steps[name]())
    base = statistics.median(times["plain"])
    for name in names:
        ratios = [t / p for t, p in zip(times[name], times["plain"], strict=True)]
        extra = f", +{added[name] / 1e6:.2f}M PAL parameters" if added[name] else ""
        print(
            f"{name:>13}: {statistics.median(times[name]) * 1e3:8.1f} ms, "
            f"ratio {statistics.median(ratios):.2f} "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}){extra}"
        )
    print(f"(plain median {base * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
