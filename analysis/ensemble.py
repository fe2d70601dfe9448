"""The final ensemble (the paper's Table 6): the best checkpoints of the top trials, averaged.

``python -m analysis.ensemble EXP --top-k K [--with-repeats] [--greedy] [--members ID,ID,...]
[--max-eval-examples N] [--data-dir DIR] [--include-stopped] [--out DIR]``

Each member is a trial's best checkpoint (the one Tune kept, ranked by the objective) rebuilt
with the trial's own trainer config, so members may differ in head design, PAL, backbone and
tokenizer: each encodes the data its own way. The ensemble averages what the members predict per
example: the SST class probabilities (softmax), the paraphrase probability (sigmoid) and the STS
score; it predicts the most probable SST class, a paraphrase when the mean probability is above
0.5, and the mean STS score. An ensemble of one member therefore predicts exactly what that
member predicts.

With ``--with-repeats`` each of the top K trials brings its completed seed repeats
(``search.repeats`` in the design space: the same configuration trained to the full budget with
other seeds, listed in ``EXP/repeats.csv``) as members of their own; under ASHA these are often
the only fully trained runs of a configuration besides the search's own trial.

With ``--greedy`` the members are chosen among these candidates (the top K, with their repeats)
by greedy forward selection on dev (Caruana et al. 2004, here without replacement: each
candidate joins at most once): start from the best single member, add whichever member raises the dev
objective most, stop when none does. Its dev score has then been selected on dev and is
optimistic; the report says by how much, from split-half validation (:func:`greedy_optimism`:
select on one half of dev, score on the other).

Dev is the whole dev set unless ``--max-eval-examples`` subsamples it: by default the examples
the trainer scored every member on (:func:`mtl.data.eval_subsample`), another draw with
``--seed``; test is always whole. Written into ``EXP/analysis/ensemble/``: dev and test
predictions in the CS224N submission format for every test file present (``MISSING.txt`` names
the absent ones), ``ensemble.json``, ``members.csv`` and ``table_6.md`` / ``.tex`` / ``.csv``.
``ensemble.json`` names the data folder as the run named it (:func:`recorded_data_dir`), not
this machine's absolute path: it is committed with the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from analysis.common import (
    COLUMN_NAMES,
    METRICS,
    AnalysisError,
    ExperimentView,
    fmt,
    latex_table,
    load_experiment,
    markdown_table,
    out_dir,
    portable,
    run_main,
    top_trial_ids,
)
from analysis.tables import PAPER_TABLE_6, configuration, label
from mtl import data as data_lib
from mtl.backbones import BackboneError, load_tokenizer, resolve_backbone
from mtl.bert import CheckpointError
from mtl.build import autocast_for, build_model
from mtl.config import Config, ConfigError, build_config
from mtl.evaluation import split_outputs, write_missing, write_predictions
from mtl.heads import MultitaskBert
from mtl.metrics import overall_score
from mtl.tasks import Task, configured, registry

Key = tuple[str, str]  # (task, split)


@dataclass
class Member:
    """One trial's best checkpoint and the config to rebuild it."""

    trial_id: str
    cfg: Config
    checkpoint: Path  # folder with model.safetensors
    configuration: str  # e.g. "design 2 + RR + PAL"
    search_score: float  # the trial's best dev objective in the search


@dataclass
class Outputs:
    """Per (task, split): example ids and scores (:meth:`mtl.tasks.Task.probabilities`; sst:
    (n, 5) probabilities; para: (n,) probabilities; sts: (n,) similarity), in the split's order."""

    ids: dict[Key, list[str]]
    values: dict[Key, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Members


def select_members(
    exp: ExperimentView,
    top_k: int | None,
    trial_ids: list[str] | None = None,
    include_stopped: bool = False,
    metric: str | None = None,
    with_repeats: bool = False,
) -> list[Member]:
    """The named trials or seed repeats' runs (an id may come twice), or the top ``top_k``
    trials by the objective; ``with_repeats``: each chosen trial followed by its completed seed
    repeats (``search.repeats``, repeats.csv), each a member trained to the full budget.

    Raises :class:`AnalysisError` for an unknown id, a missing checkpoint or config, or
    ``with_repeats`` on an experiment without seed repeats.
    """
    if trial_ids is None:
        trial_ids = top_trial_ids(exp, top_k, include_stopped, metric, need_checkpoint=True)
    if with_repeats:
        if exp.repeats is None:
            raise AnalysisError(
                f"--with-repeats: {exp.path} has no repeats.csv (its design space has no "
                "search.repeats, or the search stopped before them)"
            )
        repeats = {t: [i for i, _ in exp.repeat_ids(t)] for t in trial_ids}
        alone = [t for t in trial_ids if not repeats[t]]
        if alone:  # outside search.repeats' top configurations, or its runs did not complete
            print(
                f"--with-repeats: no completed seed repeats of {', '.join(alone)}: they join alone",
                file=sys.stderr,
            )
        trial_ids = [r for t in trial_ids for r in (t, *repeats[t])]
    members = []
    for trial_id in trial_ids:
        row = exp.run_row(trial_id)
        ckpt = exp.checkpoint_dir(trial_id)
        if ckpt is None or not (ckpt / "model.safetensors").is_file():
            raise AnalysisError(
                f"trial {trial_id}: no checkpoint weights at {ckpt}/model.safetensors"
            )
        raw = exp.trial_config(trial_id)
        if raw is None:
            raise AnalysisError(f"trial {trial_id}: no config.yaml in {exp.trial_dir(trial_id)}")
        try:
            cfg = build_config(raw, f"trial {trial_id} config")
        except ConfigError as err:
            raise AnalysisError(str(err)) from None
        name = label(configuration(raw), backbone=True)
        if "seed" in row.index and pd.notna(row["seed"]):  # a seed repeat's run
            name += f", seed {int(row['seed'])}"
        members.append(
            Member(trial_id, cfg, ckpt, name, exp.best_score(trial_id, metric or exp.metric))
        )
    return members


def load_member(member: Member, device: torch.device) -> MultitaskBert:
    """The member's model: its architecture from its config, its weights from the checkpoint."""
    try:
        model = build_model(member.cfg, resolve_backbone(member.cfg.model.backbone))
    except (BackboneError, CheckpointError, OSError) as err:
        raise AnalysisError(f"trial {member.trial_id}: {err}") from None
    state = load_file(member.checkpoint / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise AnalysisError(
            f"trial {member.trial_id}: checkpoint does not fit its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Data and scores


@dataclass(frozen=True)
class EvalData:
    """Which examples the ensemble is scored on."""

    data_dir: Path
    max_eval_examples: int | None  # dev subsample (None: the whole dev set)
    seed: int = data_lib.EVAL_SUBSAMPLE_SEED  # seeds the dev subsample (default: the trainer's)
    # The folder as the run named it (--data-dir, else the first member's data.data_dir); None:
    # $MTL_DATA_DIR or the downloaded copy chose it (mtl.data.resolve_data_dir).
    named: str | None = None


def recorded_data_dir(exp: ExperimentView, data: EvalData) -> str | None:
    """The data folder as ``ensemble.json`` records it, naming no folder of this machine unless
    the run did: the folder as named, through :func:`~analysis.common.portable` (a folder in or
    beside the experiment becomes ``EXP/...``); ``"$MTL_DATA_DIR"`` when that variable chose
    it; None for the downloaded copy. :func:`~analysis.common.local_path` reads it back."""
    if data.named is not None:
        return portable(exp, data.named)
    return "$MTL_DATA_DIR" if os.environ.get("MTL_DATA_DIR") else None


def encode_splits(cfg: Config, data: EvalData) -> dict[Key, data_lib.Encoded]:
    """Dev (maybe subsampled) and whole test splits of ``cfg``'s tasks, tokenized its way."""
    try:
        tokenizer = load_tokenizer(resolve_backbone(cfg.model.backbone))
        out = {}
        for task in configured(cfg.data):
            raw = data_lib.read_split(data.data_dir, task, "dev")
            raw = data_lib.subsample(raw, data.max_eval_examples, data.seed)
            out[(task.name, "dev")] = data_lib.encode(
                raw, tokenizer, cfg.data.max_length, cfg.model.design
            )
            test = task.file("test")
            if test is not None and (data.data_dir / test).is_file():
                raw = data_lib.read_split(data.data_dir, task, "test")
                out[(task.name, "test")] = data_lib.encode(
                    raw, tokenizer, cfg.data.max_length, cfg.model.design
                )
    except (data_lib.DataError, BackboneError) as err:
        raise AnalysisError(str(err)) from None
    return out


def split_scores(
    model: MultitaskBert, enc: data_lib.Encoded, batch_size: int, device: torch.device, autocast
) -> np.ndarray:
    """:meth:`mtl.tasks.Task.probabilities` (float64) for every example, in the split's order.

    The trainer's :func:`mtl.evaluation.split_outputs` forms the batches, exactly as for its own
    predictions, so the decisions equal the trainer's predictions bit for bit.
    """
    return split_outputs(
        model,
        enc,
        batch_size,
        device,
        autocast,
        lambda task, logits: task.probabilities(logits.float().cpu().double()),
    )


def member_outputs(
    member: Member, data: EvalData, device: torch.device, cache: dict[Any, dict[Key, Any]]
) -> Outputs:
    """One member's scores on every split (tokenized splits are shared by members that encode
    the same way)."""
    cfg = member.cfg
    key = (
        str(resolve_backbone(cfg.model.backbone)),
        cfg.model.design,
        cfg.data.max_length,
        cfg.data.tasks,
    )
    if key not in cache:
        cache[key] = encode_splits(cfg, data)
    splits = cache[key]
    model = load_member(member, device)
    autocast = autocast_for(cfg, device)
    batch_size = cfg.train.batch_size * 2  # the trainer's evaluation batch size
    values = {
        k: split_scores(model, enc, batch_size, device, autocast) for k, enc in splits.items()
    }
    return Outputs({k: enc.ids for k, enc in splits.items()}, values)


def gold_labels(cache: dict[Any, dict[Key, Any]]) -> dict[str, np.ndarray]:
    """Dev labels per task (the same examples for every encoding)."""
    splits = next(iter(cache.values()))
    return {t: enc.labels.numpy() for (t, s), enc in splits.items() if s == "dev"}


# ---------------------------------------------------------------------------------------------
# Combining


def same_splits(members: list[Member], outputs: list[Outputs]) -> None:
    """Raise :class:`AnalysisError` naming the first member that scored other (task, split)s
    than the first member did (members that trained different ``data.tasks``): averaging only
    the splits all share would drop a task from the ensemble's overall score unsaid."""
    first = set(outputs[0].values)
    for m, o in zip(members[1:], outputs[1:], strict=True):
        differ = sorted(first ^ set(o.values))
        if differ:
            task, split = differ[0]
            has, lacks = (m, members[0]) if (task, split) in o.values else (members[0], m)
            raise AnalysisError(
                f"member {lacks.trial_id} has no {task} {split} scores and member "
                f"{has.trial_id} has (members must train the same data.tasks)"
            )


def average(outputs: list[Outputs]) -> Outputs:
    """The members' mean scores; every member must cover the same splits (:func:`same_splits`)
    and examples, in the same order."""
    first = outputs[0]
    keys = list(first.values)
    for o in outputs[1:]:
        if set(o.values) != set(keys):
            raise AnalysisError(
                f"members scored different splits: {sorted(set(keys) ^ set(o.values))[0]}"
            )
        for k in keys:
            if o.ids[k] != first.ids[k]:
                raise AnalysisError(f"members disagree on the examples of {k[0]} {k[1]}")
    values = {k: np.mean(np.stack([o.values[k] for o in outputs]), axis=0) for k in keys}
    return Outputs({k: first.ids[k] for k in keys}, values)


def evaluate(
    outputs: Outputs, gold: dict[str, np.ndarray], tasks: dict[str, Task]
) -> dict[str, float]:
    """Dev metrics of (mean) scores: each task's :meth:`~mtl.tasks.Task.score` of its
    :meth:`~mtl.tasks.Task.decide`, and the overall score."""
    metrics = {}
    for (name, split), values in outputs.values.items():
        if split == "dev" and name in gold:
            task = tasks[name]
            metrics[task.metric_name] = task.score(task.decide(values), gold[name])
    metrics["overall"] = overall_score(metrics, tasks.values())
    return metrics


def greedy(
    outputs: list[Outputs], gold: dict[str, np.ndarray], metric: str, tasks: dict[str, Task]
) -> tuple[list[int], list[dict[str, Any]]]:
    """Greedy forward selection on dev (without replacement); returns the chosen indices and
    the dev score after each step."""

    def score_of(o: Outputs) -> float:
        value = evaluate(o, gold, tasks)[metric]
        return 0.0 if value is None else value  # an undefined Pearson ranks as 0, as in overall

    scores = [score_of(o) for o in outputs]
    chosen = [int(np.argmax(scores))]
    steps = [{"added": chosen[0], metric: scores[chosen[0]]}]
    best = scores[chosen[0]]
    while len(chosen) < len(outputs):
        trials = {
            i: score_of(average([outputs[j] for j in [*chosen, i]]))
            for i in range(len(outputs))
            if i not in chosen
        }
        i, score = max(trials.items(), key=lambda kv: kv[1])
        if score <= best:
            break
        chosen.append(i)
        best = score
        steps.append({"added": i, metric: score})
    return chosen, steps


def dev_subset(
    outputs: Outputs, gold: dict[str, np.ndarray], picks: dict[str, np.ndarray]
) -> tuple[Outputs, dict[str, np.ndarray]]:
    """Only the dev examples ``picks[task]`` (positions in the dev order) of every task; test
    is dropped. Returns the subset's outputs and gold labels."""
    keys = [(name, split) for (name, split) in outputs.values if split == "dev" and name in picks]
    ids = {k: [outputs.ids[k][i] for i in picks[k[0]]] for k in keys}
    values = {k: outputs.values[k][picks[k[0]]] for k in keys}
    return Outputs(ids, values), {name: gold[name][picks[name]] for name in picks}


def greedy_optimism(
    outputs: list[Outputs],
    gold: dict[str, np.ndarray],
    metric: str,
    tasks: dict[str, Task],
    halvings: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """How much greedy selection on dev flatters its own dev score: the selection's optimism
    (Efron 1983) estimated by repeated 2-fold cross-validation (Dietterich 1998).

    Each of ``halvings`` random halvings splits every task's dev examples in two halves A and B
    (seeded; the halves differ by at most one example). Greedy selection (:func:`greedy`) runs
    on A; its ensemble is scored on A (``selected_on``: what a report on the data it chose on
    measures) and on B (``held_out``: what data it did not see measures); then the same with A
    and B swapped, 2 * ``halvings`` selections in all. ``optimism`` is the mean gap
    ``selected_on - held_out``. A selection on half the examples is noisier than one on all of
    dev, so its gap tends to be larger than the full-dev selection's (about twice, on members
    that predict noise: tests/test_analysis.py): the full-dev greedy score less ``optimism`` is
    a cautious estimate, not a bound. Not covered: how the candidates themselves were chosen
    (the search ranked its trials, and picked their checkpoints, on the same dev set), and the
    dev score's own sampling error.

    Args:
        outputs: the candidates' scores, each covering the same dev examples in the same order.
        gold: dev labels per task, in that order.
        metric: the objective greedy maximises (e.g. "overall").
        tasks: the task registry (:func:`mtl.tasks.registry`).
        halvings: random halvings (each gives two selections).
        seed: seeds the halvings.

    Returns:
        ``selected_on`` and ``held_out`` (means over the selections, in ``metric``'s units),
        ``optimism`` (their difference), ``gap_sd`` (the standard deviation of the per-selection
        gaps: their spread, not the uncertainty of the mean, since the selections share
        examples), ``selections`` (2 * ``halvings``) and ``halvings``.
    """

    def score_of(o: Outputs, g: dict[str, np.ndarray]) -> float:
        value = evaluate(o, g, tasks)[metric]
        return 0.0 if value is None else value

    rng = np.random.default_rng(seed)
    sizes = {name: len(labels) for name, labels in gold.items()}
    inside, outside = [], []
    for _ in range(halvings):
        order = {name: rng.permutation(n) for name, n in sizes.items()}
        halves = [
            {name: np.sort(o[: sizes[name] // 2]) for name, o in order.items()},
            {name: np.sort(o[sizes[name] // 2 :]) for name, o in order.items()},
        ]
        # Each member's outputs on each half, cut once: a half is selected on in one direction
        # and scored on in the other.
        cuts = [[dev_subset(o, gold, half) for o in outputs] for half in halves]
        subsets = [[part for part, _ in cut] for cut in cuts]
        half_gold = [cut[0][1] for cut in cuts]
        for pick, other in ((0, 1), (1, 0)):
            chosen, _ = greedy(subsets[pick], half_gold[pick], metric, tasks)
            inside.append(score_of(average([subsets[pick][i] for i in chosen]), half_gold[pick]))
            outside.append(score_of(average([subsets[other][i] for i in chosen]), half_gold[other]))
    gaps = np.array(inside) - np.array(outside)
    return {
        "selected_on": float(np.mean(inside)),
        "held_out": float(np.mean(outside)),
        "optimism": float(gaps.mean()),
        "gap_sd": float(gaps.std(ddof=1)),
        "selections": len(gaps),
        "halvings": halvings,
    }


# ---------------------------------------------------------------------------------------------
# Writing


def write_outputs(folder: Path, outputs: Outputs, tasks: list[Task]) -> list[Path]:
    """Dev and test predictions in the CS224N format (the trainer's writer); MISSING.txt for
    absent test files (the trainer's note)."""
    by_name = {t.name: t for t in tasks}
    written = []
    for (name, split), values in outputs.values.items():
        task = by_name[name]
        path = folder / f"{name}-{split}-output.csv"
        write_predictions(path, task, outputs.ids[(name, split)], task.decide(values))
        written.append(path)
    missing = [
        test
        for t in tasks
        if (t.name, "test") not in outputs.values and (test := t.file("test")) is not None
    ]
    note = write_missing(folder, missing)
    return written + ([note] if note is not None else [])


def table_6(
    members: list[Member],
    member_metrics: list[dict],
    chosen: list[int],
    metrics: dict,
    names: tuple[str, ...] = METRICS,
) -> pd.DataFrame:
    rows = []
    for i, (m, mm) in enumerate(zip(members, member_metrics, strict=True)):
        used = "" if i in chosen else " (not selected)"
        rows.append({"": f"member {m.trial_id}: {m.configuration}{used}", **mm})
    rows.append({"": f"ensemble of {len(chosen)}: dev", **metrics})
    rows.append({"": f"ensemble of {len(chosen)}: test", **dict.fromkeys(names, math.nan)})
    return pd.DataFrame(rows)


def _table_files(
    folder: Path, frame: pd.DataFrame, note: str, columns: dict[str, str] = COLUMN_NAMES
) -> list[Path]:
    shown = pd.DataFrame({"": frame[""], **{c: frame[m].map(fmt) for m, c in columns.items()}})
    paper = pd.DataFrame(
        [
            {"": k, **{COLUMN_NAMES[m]: f"{v:.3f}" for m, v in zip(METRICS, vals, strict=True)}}
            for k, vals in PAPER_TABLE_6.items()
        ]
    )
    title = "Table 6: the ensemble on dev (test labels are not public: submit the test files)"
    md = f"### {title}\n\n{markdown_table(shown)}\n{note}\n\nThe paper's final ensemble:\n\n{markdown_table(paper)}"
    paths = [folder / "table_6.md", folder / "table_6.tex", folder / "table_6.csv"]
    paths[0].write_text(md)
    paths[1].write_text(latex_table(shown, title + ". " + note, "tab:table_6"))
    frame.rename(columns={"": "row"}).to_csv(paths[2], index=False)
    return paths


def run(
    exp: ExperimentView,
    members: list[Member],
    data: EvalData,
    out: str | None = None,
    use_greedy: bool = False,
    device: str = "cpu",
    command: str = "",
) -> tuple[list[Path], dict[str, Any]]:
    """Score the members, combine them, write predictions and Table 6."""
    folder = out_dir(exp, out, "ensemble")
    dev = torch.device(device)
    cache: dict[Any, dict[Key, Any]] = {}
    outputs = []
    for m in members:
        print(f"member {m.trial_id} ({m.configuration}): scoring dev and test", flush=True)
        outputs.append(member_outputs(m, data, dev, cache))
    same_splits(members, outputs)
    gold = gold_labels(cache)
    tasks = registry(members[0].cfg.data)
    member_metrics = [evaluate(o, gold, tasks) for o in outputs]
    steps: list[dict[str, Any]] = []
    chosen = list(range(len(members)))
    optimism = None
    if use_greedy:
        chosen, steps = greedy(outputs, gold, exp.metric, tasks)
        optimism = greedy_optimism(outputs, gold, exp.metric, tasks)
    combined = average([outputs[i] for i in chosen])
    metrics = evaluate(combined, gold, tasks)
    written = write_outputs(folder, combined, configured(members[0].cfg.data))

    note = (
        f"Dev: {'the whole dev set' if data.max_eval_examples is None else f'{data.max_eval_examples} examples per task (seed {data.seed})'}. "
        + (
            "Members chosen by greedy forward selection on dev, so the ensemble's dev score is optimistic"
            + (
                f": chosen on one half of dev, ensembles score {optimism['held_out']:.3f} "
                f"{exp.metric} on the other half against {optimism['selected_on']:.3f} on "
                f"their own ({optimism['selections']} selections on random halves), an "
                f"optimism of {optimism['optimism']:+.3f}; optimism-corrected estimate "
                f"{metrics[exp.metric] - optimism['optimism']:.3f} (cautious: a half flatters "
                "more than the whole; the search's own selection of candidates on this dev "
                "set is not corrected for)."
                if optimism is not None and metrics.get(exp.metric) is not None
                else "."
            )
            if use_greedy
            else "Every member averaged with equal weight."
        )
    )
    frame = table_6(members, member_metrics, chosen, metrics, exp.metrics)
    written += _table_files(folder, frame, note, exp.column_names)
    frame = pd.DataFrame(
        [
            {
                "trial_id": m.trial_id,
                "configuration": m.configuration,
                "backbone": m.cfg.model.backbone,
                "selected": i in chosen,
                "search_best": m.search_score,
                **{f"dev.{k}": v for k, v in mm.items()},
            }
            for i, (m, mm) in enumerate(zip(members, member_metrics, strict=True))
        ]
    )
    frame.to_csv(folder / "members.csv", index=False)
    summary = {
        "experiment": exp.name,
        "command": portable(exp, command),
        "members": [m.trial_id for m in members],
        "selected": [members[i].trial_id for i in chosen],
        "greedy": [
            {"added": members[s["added"]].trial_id, exp.metric: s[exp.metric]} for s in steps
        ],
        "dev": metrics,
        "greedy_optimism": optimism,
        "data_dir": recorded_data_dir(exp, data),
        "max_eval_examples": data.max_eval_examples,
        "seed": data.seed,
        "predictions": [p.name for p in written if p.name.endswith("-output.csv")],
    }
    (folder / "ensemble.json").write_text(json.dumps(summary, indent=2))
    return [*written, folder / "members.csv", folder / "ensemble.json"], summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.ensemble",
        description="Average the best checkpoints of the top trials; dev scores and submission files.",
    )
    parser.add_argument("exp", help="experiment folder written by python -m mtl.search")
    parser.add_argument("--top-k", type=int, help="members: the K best trials by the objective")
    parser.add_argument(
        "--members", help="members: these trial ids, comma-separated (repeats allowed)"
    )
    parser.add_argument(
        "--greedy", action="store_true", help="greedy forward selection among them on dev"
    )
    parser.add_argument(
        "--include-stopped", action="store_true", help="let trials stopped early be members"
    )
    parser.add_argument(
        "--with-repeats",
        action="store_true",
        help="each chosen trial's completed seed repeats (search.repeats) join as members",
    )
    parser.add_argument(
        "--max-eval-examples", type=int, help="subsample dev to N per task (default: all)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=data_lib.EVAL_SUBSAMPLE_SEED,
        help="seed of the dev subsample (default: the trainer's, so the members' own dev examples)",
    )
    parser.add_argument(
        "--data-dir", help="CS224N data folder (default: the first member's data.data_dir)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", help="output folder (default EXP/analysis)")
    parser.add_argument(
        "--space",
        help="the design-space file (default: EXP/design_space.yaml, saved by the search)",
    )
    args = parser.parse_args(argv)
    if (args.top_k is None) == (args.members is None):
        raise AnalysisError("give exactly one of --top-k K and --members ID,ID,...")
    if args.max_eval_examples is not None and args.max_eval_examples < 1:
        raise AnalysisError("--max-eval-examples: must be at least 1")
    exp = load_experiment(args.exp, args.space)
    ids = [t.strip() for t in args.members.split(",") if t.strip()] if args.members else None
    members = select_members(exp, args.top_k, ids, args.include_stopped, None, args.with_repeats)
    first = members[0].cfg
    named = args.data_dir or first.data.data_dir
    try:
        data_dir = data_lib.resolve_data_dir(named)
    except data_lib.DataError as err:
        raise AnalysisError(f"{err} (pass --data-dir)") from None
    data = EvalData(data_dir, args.max_eval_examples, args.seed, named)
    given = argv if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "-m", "analysis.ensemble", *given])
    written, _ = run(exp, members, data, args.out, args.greedy, args.device, command)
    print(written[0].parent.joinpath("table_6.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
