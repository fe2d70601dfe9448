"""One training step of our encoder against ``transformers.BertModel``, same weights, same batch.

A step is forward, backward and an AdamW update. Before timing, the script asserts that both
models give the same loss and the same gradient for every parameter (dropout off on both).
Steps then alternate between the two models, first a warm-up and then the timed repeats, and
the script prints each model's median step time and the median of the per-repeat ratios
ours/theirs. Hugging Face runs with ``attn_implementation="sdpa"``, its fastest path.

Batches (``--data real``, the default) are drawn from the CS224N training files
($MTL_DATA_DIR), tokenized as the trainer does (design 2: a pair is one sequence), the three
tasks in turn, each batch padded to its own longest sequence as a collator makes them:
``random`` batches are uniform draws (much padding), ``bucketed`` ones come from the trainer's
length buckets (``mtl.data.batch_order``; little padding). Every timed repeat is a new batch,
the same one for both models. ``--data synthetic`` uses fixed BATCHxSEQ shapes (``--shapes``),
lengths drawn from [seq/2, seq], for throughput and MFU figures.

    python benchmarks/encoder_step.py                     # CPU, MiniLM, real batches of 32
    python benchmarks/encoder_step.py --dtype bf16        # the same under bf16 autocast
    python benchmarks/encoder_step.py --device cuda --dtype bf16 --config base --data synthetic
    python benchmarks/encoder_step.py --device cpu --config base --steps 2 --warmup 1 --batch-size 2

On a GPU it also prints tokens per second and model-FLOPs utilisation, with the usual count of
6*N*T + 12*L*H*S*T FLOPs per step (N non-embedding parameters, T tokens, L layers, H hidden,
S sequence length; Chowdhery et al. 2022, PaLM, appendix B) against ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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

from mtl import data as data_lib
from mtl.backbones import load_tokenizer, resolve_backbone
from mtl.bert import BertConfig, BertModel
from mtl.tasks import BUILTIN

REPO = Path(__file__).resolve().parents[1]

# BERT-base's shape, for GPU throughput: random weights, nothing to download.
BASE_SHAPE = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
)
# The ways --modes runs our step (see make_mode_step).
MODES = ("eager", "graph", "compile", "compile-graph")
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@dataclass
class Batch:
    """Token ids, padding mask and segment ids, each (batch, seq)."""

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor
    # True: the model gets no mask (every row is full length), as a collator of unpadded
    # batches would pass it.
    no_mask: bool = False


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
        "--data",
        choices=["real", "synthetic"],
        default=None,
        help="real: batches of the CS224N training files; synthetic: fixed --shapes "
        "(default: synthetic when --shapes is given, else real)",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MTL_DATA_DIR", str(REPO.parent / "shared" / "data" / "cs224n")),
    )
    parser.add_argument(
        "--batching",
        default="random,bucketed",
        help="real data: comma-separated batch orders, random and/or bucketed",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="real data: examples per batch")
    parser.add_argument(
        "--max-length", type=int, default=128, help="real data: tokens per sequence (truncation)"
    )
    parser.add_argument(
        "--optimizer",
        choices=["for-loop", "foreach", "fused"],
        default=None,
        help="AdamW implementation for both models (default: fused on cuda, for-loop on cpu, "
        "torch's default there)",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="synthetic data: comma-separated BATCHxSEQ (default: 32x64,32x128 for minilm, "
        "32x128 for base)",
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
    parser.add_argument(
        "--modes",
        default=None,
        help="synthetic data: comma-separated ways to run OUR step, each timed alone after the "
        "ours-vs-hf comparison: eager, compile (torch.compile), graph (the whole step captured "
        "in one CUDA graph, cuda only), compile-graph (both)",
    )
    parser.add_argument(
        "--no-padding",
        action="store_true",
        help="synthetic data: every row full length and no attention mask, so SDPA may pick a "
        "mask-free kernel (--profile shows which)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --modes: print the top kernels of a few steps of each mode (torch.profiler)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = set((args.modes or "eager").split(",")) - set(MODES)
    if unknown:
        parser.error(
            f"--modes: unknown {', '.join(sorted(unknown))} (choose from {', '.join(MODES)})"
        )
    return args


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
    vocab_size: int,
    batch: int,
    seq: int,
    gen: torch.Generator,
    device: torch.device,
    full: bool = False,
) -> Batch:
    """Random word ids with [CLS]/[SEP], padded to ``seq`` from lengths in [seq/2, seq].

    The first row is full length, so the batch really is ``seq`` wide; the second segment
    (token type 1) is the second half of each row, as for a sentence pair. ``full``: every row
    is ``seq`` long.
    """
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    if full:
        lengths[:] = seq
    positions = torch.arange(seq)
    mask = (positions < lengths[:, None]).long()  # (batch, seq)
    ids = torch.randint(1000, vocab_size, (batch, seq), generator=gen)
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(batch), lengths - 1] = 102  # [SEP]
    ids = ids * mask  # [PAD] is 0
    token_types = ((positions >= (lengths[:, None] // 2)) & mask.bool()).long()
    return Batch(ids.to(device), mask.to(device), token_types.to(device), no_mask=full)


def real_batches(args: argparse.Namespace, vocab_size: int, device: torch.device) -> dict:
    """Batching -> batches of the real training files, the tasks in turn, as many as a run uses.

    Each task's training split is subsampled to 4,000 examples (enough for the run's batches,
    and its lengths follow the whole file's), tokenized with MiniLM's tokenizer (BERT's
    uncased vocabulary, which BERT-base shares) in design 2.
    """
    tokenizer = load_tokenizer(resolve_backbone("minilm"))
    if tokenizer.vocab_size > vocab_size:
        raise SystemExit(f"tokenizer vocabulary {tokenizer.vocab_size} exceeds the model's")
    needed = args.warmup + args.steps + 1
    out = {}
    for batching in args.batching.split(","):
        if batching not in ("random", "bucketed"):
            raise SystemExit(f"--batching: unknown order {batching!r} (random, bucketed)")
        per_task = []
        for task in BUILTIN.values():
            raw = data_lib.read_split(Path(args.data_dir), task, "train")
            enc = data_lib.encode(
                data_lib.subsample(raw, 4000, args.seed), tokenizer, args.max_length, design=2
            )
            gen = torch.Generator().manual_seed(args.seed)
            order = data_lib.batch_order(
                enc.lengths, args.batch_size, gen, bucket=batching == "bucketed"
            )
            full = [i for i in order if len(i) == args.batch_size]
            per_task.append([data_lib.collate(enc, i) for i in full[: needed // len(BUILTIN) + 1]])
        mixed = [b for group in zip(*per_task, strict=True) for b in group][:needed]
        out[batching] = [
            Batch(
                b.input_ids.to(device),
                b.attention_mask.to(device),
                (
                    torch.zeros_like(b.input_ids) if b.token_type_ids is None else b.token_type_ids
                ).to(device),
            )
            for b in mixed
        ]
    return out


def loss_of(model: nn.Module, batch: Batch) -> Tensor:
    """A scalar that touches every output a head reads: pooler energy plus the mean of the real
    tokens' last states (padded positions are read by nothing, and differ by design)."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=None if batch.no_mask else batch.attention_mask,
        token_type_ids=batch.token_type_ids,
    )
    real = batch.attention_mask[..., None].to(torch.float32)  # (batch, seq, 1)
    mean = (out.last_hidden_state.float() * real).sum() / (real.sum() * real.shape[-1])
    return out.pooler_output.float().square().sum() + mean


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


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    """AdamW in one of torch's three implementations."""
    options = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True)}
    return torch.optim.AdamW(model.parameters(), lr=1e-5, **options.get(kind, dict(fused=True)))


def autocast(
    device: torch.device, dtype: str, cache: bool = True
) -> contextlib.AbstractContextManager:
    """bf16 autocast or nothing; CUDA graph capture needs ``cache=False``."""
    if dtype != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


def make_step(
    model: nn.Module, device: torch.device, dtype: str, optimizer_kind: str
) -> Callable[[Batch], tuple[float, float]]:
    """A closure running one training step on a batch; returns its (wall, process CPU) seconds."""
    optimizer = make_optimizer(model, optimizer_kind)

    def step(batch: Batch) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast(device, dtype):
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


def run_batches(
    args: argparse.Namespace,
    ours: BertModel,
    theirs: nn.Module,
    label: str,
    batches: list[Batch],
    device: torch.device,
) -> float:
    """Checks on the first batch, warms up and times the rest; prints lines; returns the
    median ratio. ``batches`` holds 1 + warmup + steps batches (or one, reused)."""
    # Earlier runs' AdamW steps may have drifted the two apart; start this one equal.
    theirs.load_state_dict(ours.state_dict())
    assert_same_step(ours, theirs, batches[0])
    kind = args.optimizer or ("fused" if device.type == "cuda" else "for-loop")
    steps = {
        "ours": make_step(ours, device, args.dtype, kind),
        "hf": make_step(theirs, device, args.dtype, kind),
    }

    def batch(i: int) -> Batch:
        return batches[(1 + i) % len(batches)]

    for i in range(args.warmup):
        steps["ours"](batch(i))
        steps["hf"](batch(i))
    timed = [batch(args.warmup + i) for i in range(args.steps)]
    real = sum(int(b.attention_mask.sum()) for b in timed)
    grid = sum(b.attention_mask.numel() for b in timed)
    widths = [b.input_ids.shape[1] for b in timed]
    print(
        f"{label}: {len(timed)} timed batches of {timed[0].input_ids.shape[0]}, padded widths "
        f"{min(widths)}-{max(widths)} (median {statistics.median(widths):.0f}), "
        f"{real / grid:.0%} of positions real; AdamW {kind}",
        flush=True,
    )
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "hf": []}
    for i, b in enumerate(timed):
        # Alternate who goes first so neither always inherits the other's cache state.
        order = ("ours", "hf") if i % 2 == 0 else ("hf", "ours")
        for name in order:
            times[name].append(steps[name](b))
    wall = {name: [t[0] for t in ts] for name, ts in times.items()}
    ratio, line = summarize("wall", wall["ours"], wall["hf"])
    print(f"{label} {line}", flush=True)
    if device.type == "cpu":
        # Process CPU time leaves out the time other jobs on a shared machine hold the cores.
        cpu = {name: [t[1] for t in ts] for name, ts in times.items()}
        ratio, line = summarize("process CPU", cpu["ours"], cpu["hf"])
        print(f"{label} {line}", flush=True)
    elif len(batches) == 1:
        # One fixed shape (synthetic data): MFU on the grid's tokens, padding counted as work.
        batch_size, seq = timed[0].input_ids.shape
        flops = step_flops(ours, batch_size, seq)
        for name, ts in wall.items():
            seconds = statistics.median(ts)
            print(
                f"    {name}: {batch_size * seq / seconds:,.0f} grid tokens/s, "
                f"{flops / seconds / 1e12:.1f} TFLOP/s, "
                f"MFU {flops / seconds / (args.peak_tflops * 1e12):.1%}",
                flush=True,
            )
    else:
        for name, ts in wall.items():
            print(f"    {name}: {real / sum(ts):,.0f} real tokens/s", flush=True)
    return ratio


def make_mode_step(
    model: BertModel, batch: Batch, device: torch.device, dtype: str, mode: str
) -> Callable[[Batch], None]:
    """One training step of ``model`` run as ``mode`` (see ``--modes``), fused AdamW.

    ``graph`` and ``compile-graph`` capture forward, backward and the optimizer step in one
    CUDA graph for ``batch``'s shape (PyTorch's whole-network capture: warm-up on a side
    stream, gradients allocated inside the capture, AdamW ``capturable=True``); each call copies
    its batch into the captured inputs and replays the graph. The returned step does not
    synchronize.
    """
    fn: nn.Module = torch.compile(model, dynamic=False) if mode.startswith("compile") else model
    graph = mode.endswith("graph")
    if graph and device.type != "cuda":
        raise ValueError(f"mode {mode}: CUDA graphs need --device cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True, capturable=graph)

    def run(b: Batch) -> None:
        with autocast(device, dtype, cache=not graph):
            loss = loss_of(fn, b)
        loss.backward()
        optimizer.step()

    if not graph:

        def step(b: Batch) -> None:
            run(b)
            optimizer.zero_grad(set_to_none=True)

        return step
    static = Batch(
        *(t.clone() for t in (batch.input_ids, batch.attention_mask, batch.token_type_ids)),
        no_mask=batch.no_mask,
    )
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles (compile-graph) and lets AdamW build its state
            optimizer.zero_grad(set_to_none=True)
            run(static)
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(cuda_graph):
        run(static)

    def replay(b: Batch) -> None:
        static.input_ids.copy_(b.input_ids)
        static.attention_mask.copy_(b.attention_mask)
        static.token_type_ids.copy_(b.token_type_ids)
        cuda_graph.replay()

    return replay


def run_modes(
    args: argparse.Namespace, model: BertModel, batch: Batch, device: torch.device
) -> None:
    """Times our step in each of ``--modes`` on one fixed batch; prints ms, tokens/s and MFU.

    Each mode gets a fresh copy of the weights. Compilation and capture happen in the
    warm-up, which is not timed; a mode that fails prints its error and the rest still run.
    Times are the median over ``--steps`` of CUDA-event (or host, on CPU) step times.
    """
    batch_size, seq = batch.input_ids.shape
    flops = step_flops(model, batch_size, seq)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in args.modes.split(","):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)  # no gradients left over from the previous mode
        started = time.perf_counter()
        try:
            step = make_mode_step(model, batch, device, args.dtype, mode)
            for _ in range(args.warmup):
                step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # report it and go on to the next mode
            print(f"  {mode}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        setup = time.perf_counter() - started
        times = []
        for _ in range(args.steps):
            if device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                step(batch)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step(batch)
                times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        print(
            f"  {batch_size}x{seq} {mode}: {seconds * 1e3:.2f} ms a step "
            f"(range {min(times) * 1e3:.2f}-{max(times) * 1e3:.2f}; warm-up and compile "
            f"{setup:.0f} s), {batch_size * seq / seconds:,.0f} grid tokens/s, "
            f"{flops / seconds / 1e12:.1f} TFLOP/s, "
            f"MFU {flops / seconds / (args.peak_tflops * 1e12):.1%}",
            flush=True,
        )
        if args.profile and not mode.endswith("graph"):  # a replay hides its kernels
            profile_steps(step, batch, device, label=f"{batch_size}x{seq} {mode}")
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_steps(
    step: Callable[[Batch], None], batch: Batch, device: torch.device, label: str
) -> None:
    """Prints the kernels that took most device time over three steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"  profile of 3 steps, {label}:", flush=True)
    print(
        prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70), flush=True
    )


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark for every requested shape."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    ours, theirs = build_models(args.config, device)
    print(
        f"{args.config} on {device} ({args.dtype}, {torch.get_num_threads()} CPU threads), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per model"
    )
    if (args.data or ("synthetic" if args.shapes else "real")) == "real":
        for label, batches in real_batches(args, ours.config.vocab_size, device).items():
            run_batches(args, ours, theirs, label, batches, device)
        return
    shapes = args.shapes or ("32x64,32x128" if args.config == "minilm" else "32x128")
    for shape in shapes.split(","):
        batch_size, seq = (int(x) for x in shape.lower().split("x"))
        gen = torch.Generator().manual_seed(args.seed)
        batch = make_batch(
            ours.config.vocab_size, batch_size, seq, gen, device, full=args.no_padding
        )
        run_batches(args, ours, theirs, f"{batch_size}x{seq}", [batch], device)
        if args.modes:
            run_modes(args, ours, batch, device)


if __name__ == "__main__":
    main()
