"""One training step of our encoder against ``transformers.BertModel``, same weights, same batch.

A step is forward, backward and an AdamW update. Before timing, the script asserts that both
models give the same loss and the same gradient for every parameter (dropout off on both).
Steps then alternate between the two models, first a warm-up and then the timed repeats, and
the script prints each model's median step time and the median of the per-repeat ratios
ours/theirs. Hugging Face runs with ``attn_implementation="sdpa"``, its fastest path.

    python benchmarks/encoder_step.py                     # CPU, MiniLM weights, 32x64 and 32x128
    python benchmarks/encoder_step.py --device cuda --dtype bf16 --config base   # GPU, + MFU
    python benchmarks/encoder_step.py --device cpu --config base --steps 2 --warmup 1 --shapes 2x16

On a GPU it also prints tokens per second and model-FLOPs utilisation, with the usual count of
6*N*T + 12*L*H*S*T FLOPs per step (N non-embedding parameters, T tokens, L layers, H hidden,
S sequence length; Chowdhery et al. 2022, PaLM, appendix B) against ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl.backbones import resolve_backbone
from mtl.bert import BertConfig, BertModel

# BERT-base's shape, for GPU throughput: random weights, nothing to download.
BASE_SHAPE = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@dataclass
class Batch:
    """Token ids, padding mask and segment ids, each (batch, seq)."""

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Reads the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 runs the step under autocast (float32 master weights)",
    )
    parser.add_argument(
        "--config",
        choices=["minilm", "base"],
        default="minilm",
        help="minilm: the packaged weights; base: BERT-base shape, random weights",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated BATCHxSEQ (default: 32x64,32x128 for minilm, 32x128 for base)",
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="peak dense bf16 TFLOP/s for MFU (H100 SXM: 989)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_models(config: str, device: torch.device) -> tuple[BertModel, nn.Module]:
    """Ours and Hugging Face's encoder with identical weights and no dropout."""
    if config == "minilm":
        folder = resolve_backbone("minilm")
        ours = BertModel.from_pretrained("minilm", **NO_DROPOUT)
        theirs = transformers.BertModel.from_pretrained(
            str(folder), attn_implementation="sdpa", **NO_DROPOUT
        )
    else:
        hf_config = transformers.BertConfig(**BASE_SHAPE, **NO_DROPOUT)
        hf_config._attn_implementation = "sdpa"
        theirs = transformers.BertModel(hf_config)
        ours = BertModel(BertConfig(**BASE_SHAPE, **NO_DROPOUT))
        ours.load_hf_state_dict(theirs.state_dict())
    if theirs.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF model uses {theirs.config._attn_implementation}, not sdpa")
    return ours.to(device).train(), theirs.to(device).train()


def make_batch(
    vocab_size: int, batch: int, seq: int, gen: torch.Generator, device: torch.device
) -> Batch:
    """Random word ids with [CLS]/[SEP], padded to ``seq`` from lengths in [seq/2, seq].

    The first row is full length, so the batch really is ``seq`` wide; the second segment
    (token type 1) is the second half of each row, as for a sentence pair.
    """
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    positions = torch.arange(seq)
    mask = (positions < lengths[:, None]).long()  # (batch, seq)
    ids = torch.randint(1000, vocab_size, (batch, seq), generator=gen)
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(batch), lengths - 1] = 102  # [SEP]
    ids = ids * mask  # [PAD] is 0
    token_types = ((positions >= (lengths[:, None] // 2)) & mask.bool()).long()
    return Batch(ids.to(device), mask.to(device), token_types.to(device))


def loss_of(model: nn.Module, batch: Batch) -> Tensor:
    """A scalar that touches every output: pooler energy plus the mean last state."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        token_type_ids=batch.token_type_ids,
    )
    return out.pooler_output.float().square().sum() + out.last_hidden_state.float().mean()


def assert_same_step(ours: BertModel, theirs: nn.Module, batch: Batch) -> None:
    """Asserts equal losses and equal gradients for every parameter, in float32."""
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    loss_ours = loss_of(ours, batch)
    loss_theirs = loss_of(theirs, batch)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-5)
    loss_ours.backward()
    loss_theirs.backward()
    theirs_params = dict(theirs.named_parameters())
    assert theirs_params.keys() == dict(ours.named_parameters()).keys()
    # GPU kernels reorder sums more freely than the CPU ones.
    rel = 1e-5 if batch.input_ids.device.type == "cpu" else 1e-4
    worst = 0.0
    for name, p in ours.named_parameters():
        g_ours, g_theirs = p.grad, theirs_params[name].grad
        # Relative to the gradient's own scale (element-wise rtol fails on near-zero entries),
        # with an absolute floor for the key biases, whose exact gradient is zero
        # (softmax ignores a shift shared by all keys).
        scale = g_theirs.abs().max().item()
        diff = (g_ours - g_theirs).abs().max().item()
        if scale > 1e-4:
            worst = max(worst, diff / scale)
        assert diff <= rel * scale + 1e-6, (
            f"gradient of {name}: max diff {diff:.2e}, max |grad| {scale:.2e}"
        )
    print(
        f"check: loss {loss_ours.item():.6f} vs {loss_theirs.item():.6f}; gradients of all "
        f"{len(theirs_params)} parameters agree (worst max-diff/max-grad {worst:.1e})"
    )
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)


def make_step(
    model: nn.Module, batch: Batch, device: torch.device, dtype: str
) -> Callable[[], tuple[float, float]]:
    """A closure running one training step; returns its (wall, process CPU) seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step() -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if dtype == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    return step


def summarize(clock: str, ours: list[float], theirs: list[float]) -> tuple[float, str]:
    """Median times and the median of per-repeat ratios ours/theirs, as a line."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    ratio = statistics.median(ratios)
    line = (
        f"{clock}: ours {statistics.median(ours) * 1e3:.1f} ms, "
        f"hf {statistics.median(theirs) * 1e3:.1f} ms, median ratio ours/hf {ratio:.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    return ratio, line


def step_flops(model: BertModel, batch: int, seq: int) -> float:
    """Model FLOPs of one training step: 6*N*T + 12*L*H*S*T."""
    cfg = model.config
    tokens = batch * seq
    n = model.num_parameters(exclude_embeddings=True)
    return 6 * n * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq * tokens


def run_shape(
    args: argparse.Namespace,
    ours: BertModel,
    theirs: nn.Module,
    batch_size: int,
    seq: int,
    device: torch.device,
) -> float:
    """Checks, warms up and times one shape; prints a line; returns the median ratio."""
    gen = torch.Generator().manual_seed(args.seed)
    batch = make_batch(ours.config.vocab_size, batch_size, seq, gen, device)
    # Earlier shapes' AdamW steps may have drifted the two apart; start this one equal.
    theirs.load_state_dict(ours.state_dict())
    assert_same_step(ours, theirs, batch)
    steps = {
        "ours": make_step(ours, batch, device, args.dtype),
        "hf": make_step(theirs, batch, device, args.dtype),
    }
    for _ in range(args.warmup):
        steps["ours"]()
        steps["hf"]()
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "hf": []}
    for i in range(args.steps):
        # Alternate who goes first so neither always inherits the other's cache state.
        order = ("ours", "hf") if i % 2 == 0 else ("hf", "ours")
        for name in order:
            times[name].append(steps[name]())
    wall = {name: [t[0] for t in ts] for name, ts in times.items()}
    ratio, line = summarize("wall", wall["ours"], wall["hf"])
    print(f"{batch_size}x{seq} {line}", flush=True)
    if device.type == "cpu":
        # Process CPU time leaves out the time other jobs on a shared machine hold the cores.
        cpu = {name: [t[1] for t in ts] for name, ts in times.items()}
        ratio, line = summarize("process CPU", cpu["ours"], cpu["hf"])
        print(f"{batch_size}x{seq} {line}", flush=True)
    else:
        flops = step_flops(ours, batch_size, seq)
        for name, ts in wall.items():
            seconds = statistics.median(ts)
            print(
                f"    {name}: {batch_size * seq / seconds:,.0f} tokens/s, "
                f"{flops / seconds / 1e12:.1f} TFLOP/s, "
                f"MFU {flops / seconds / (args.peak_tflops * 1e12):.1%}",
                flush=True,
            )
    return ratio


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark for every requested shape."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = args.shapes or ("32x64,32x128" if args.config == "minilm" else "32x128")
    ours, theirs = build_models(args.config, device)
    print(
        f"{args.config} on {device} ({args.dtype}, {torch.get_num_threads()} CPU threads), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per model"
    )
    for shape in shapes.split(","):
        batch_size, seq = (int(x) for x in shape.lower().split("x"))
        run_shape(args, ours, theirs, batch_size, seq, device)


if __name__ == "__main__":
    main()
