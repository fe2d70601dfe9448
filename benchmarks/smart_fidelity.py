"""What SMART's perturbation is on MiniLM with real sentences, and what R_s does in a short run.

Two parts, for each update rule (``normalized_step``, SMART's Algorithm 1, and ``unit_norm``,
vat-pytorch's rescaling; mtl/smart.py):

1. The perturbation at the paper's settings (sigma 1e-5, eta 1e-3, epsilon 1e-6, K 1) on batches
   of 8 real dev sentences per task, in train mode (dropout on, as SMART runs in training) and in
   eval mode: the median per-token ||delta||_2 / ||h||_2 over real tokens (h: the embedding
   layer's output), the median cosine of clean and perturbed token vectors, the share of batches
   whose ascent raised the divergence over the initial noise (eval mode only: with dropout on,
   the two passes differ by their dropout masks), and the median R_s.
2. A short multitask run per rule (and one without SMART, the baseline): the task losses and R_s
   of the first and last logged optimizer steps, read back from TensorBoard, and the dev scores.

    python benchmarks/smart_fidelity.py                      # 200 examples per task, 1 epoch
    python benchmarks/smart_fidelity.py --examples 400 --out /tmp/smart
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scratch import add_keep_argument, run_folder
from mtl import data as data_lib
from mtl import smart
from mtl.backbones import resolve_backbone
from mtl.build import build_model
from mtl.config import SmartConfig, build_config
from mtl.train import load_data, train

RULES = ("normalized_step", "unit_norm")
TASKS = ("sst", "para", "sts")


def perturbation_figures(data_dir: str, batches: int) -> dict:
    cfg = build_config({"data": {"data_dir": data_dir, "max_eval_examples": 8 * batches}})
    data = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, resolve_backbone("minilm"))
    out: dict = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        for update in RULES:
            rule = SmartConfig(enabled=True, update=update)
            ratios, cosines, r_s, raised, n = [], [], [], 0, 0
            for task in TASKS:
                for b in range(batches):
                    batch = data_lib.collate(data.dev[task], list(range(8 * b, 8 * b + 8)))
                    mask = batch.attention_mask.bool()
                    torch.manual_seed(n)
                    with torch.no_grad():
                        clean = model(batch).logits
                        (hidden, _) = model.embedding_output(batch)
                    torch.manual_seed(n)
                    noise = smart.initial_noise(hidden, rule.sigma)
                    torch.manual_seed(n)
                    (delta,) = smart.adversarial_perturbation(model, batch, [hidden], clean, rule)
                    ratios.append((delta.norm(dim=-1) / hidden.norm(dim=-1))[mask])
                    cosines.append(F.cosine_similarity(hidden, hidden + delta, dim=-1)[mask])
                    with torch.no_grad():
                        before = smart.divergence(
                            task, model(batch, (hidden + noise, None)).logits, clean
                        )
                        after = smart.divergence(
                            task, model(batch, (hidden + delta, None)).logits, clean
                        )
                    r_s.append(after.item())
                    raised += int(after > before)
                    n += 1
            out[f"{mode}/{update}"] = {
                "median_delta_over_h": torch.cat(ratios).median().item(),
                "median_cosine": torch.cat(cosines).median().item(),
                "raised": f"{raised}/{n}",
                "median_r_s": statistics.median(r_s),
            }
    return out


def short_run(data_dir: str, examples: int, out: Path, smart_section: dict) -> dict:
    cfg = build_config(
        {
            "output_dir": str(out),
            "smart": smart_section,
            "data": {
                "data_dir": data_dir,
                "max_train_examples": examples,
                "max_eval_examples": 200,
                "max_length": 64,
            },
            "train": {
                "epochs": 1,
                "batch_size": 16,
                "lr": 1e-4,
                "num_threads": 1,
                "progress": False,
                "log_every": 3,
                "write_predictions": False,
            },
        }
    )
    metrics = train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload()
    tags = events.Tags()["scalars"]
    row = {"dev_overall": metrics["overall"]}
    for task in TASKS:
        for name in (f"loss_{task}", f"smart_{task}"):
            if f"train/{name}" in tags:
                points = events.Scalars(f"train/{name}")
                row[name] = (points[0].value, points[-1].value)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="CS224N data (default $MTL_DATA_DIR)")
    parser.add_argument("--batches", type=int, default=8, help="batches of 8 per task (part 1)")
    parser.add_argument("--examples", type=int, default=200, help="training examples per task")
    parser.add_argument(
        "--out", default=None, help="folder for the runs (default: temporary, removed at the end)"
    )
    add_keep_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_dir = str(data_lib.resolve_data_dir(args.data_dir))
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print(f"# avx512_bf16: {'avx512_bf16' in flags}, amx_bf16: {'amx_bf16' in flags}")
    print(json.dumps({"perturbation": perturbation_figures(data_dir, args.batches)}, indent=2))
    runs = {"off": {}, **{u: {"enabled": True, "update": u} for u in RULES}}
    with run_folder("smart-fidelity-", args.keep, given=args.out) as root:
        results = {
            name: short_run(data_dir, args.examples, root / name, s) for name, s in runs.items()
        }
    print(json.dumps({"short_runs": results}, indent=2))


if __name__ == "__main__":
    main()
