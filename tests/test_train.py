"""The training loop on a tiny random BERT and small slices of the real data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import scipy.stats
import torch
import yaml

from mtl import data as data_lib
from mtl.config import Config, build_config
from mtl.evaluation import DEV_PREDICTIONS_FILE
from mtl.schedule import epoch_plan, eval_positions
from mtl.train import load_data, train


def tiny_config(backbone: Path, data_dir: Path, out: Path, **sections: dict) -> Config:
    raw = {
        "seed": 3,
        "output_dir": str(out),
        "model": {"backbone": str(backbone), "head_hidden": 16},
        "data": {
            "data_dir": str(data_dir),
            "max_train_examples": 24,
            "max_eval_examples": 16,
            "max_length": 32,
        },
        # fp32: auto would train in bf16 on a CPU with bf16 instructions (mtl/precision.py), and
        # these tests compare against fp32 recomputations on any machine.
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "lr": 1e-3,
            "progress": False,
            "log_every": 1,
            "precision": "fp32",
        },
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return build_config(raw)


def _encoded(task: str, n: int) -> data_lib.Encoded:
    ids = [torch.tensor([101, 1000 + i, 102]) for i in range(n)]
    return data_lib.Encoded(
        task=task,
        split="train",
        ids=[str(i) for i in range(n)],
        labels=torch.zeros(n),
        input_ids=ids,
        token_type_ids=None,
        input_ids_b=None,
        lengths=torch.full((n,), 3),
    )


@pytest.mark.parametrize(("until", "rounds"), [("largest", 5), ("smallest", 1)])
def test_round_robin_cycles_tasks_batch_by_batch(until: str, rounds: int) -> None:
    train_sets = {
        "sst": _encoded("sst", 10),
        "para": _encoded("para", 4),
        "sts": _encoded("sts", 2),
    }
    cfg = build_config({"train": {"batch_size": 2, "epoch_until": until}})
    plan = epoch_plan(train_sets, cfg, epoch=0)
    assert [s.task for s in plan] == ["sst", "para", "sts"] * rounds
    if until == "largest":
        sst = sorted(i for s in plan if s.task == "sst" for i in s.indices)
        assert sst == list(range(10))  # the largest set exactly once
        sts = [i for s in plan if s.task == "sts" for i in s.indices]
        assert len(sts) == 10 and sorted(set(sts)) == [0, 1]  # the smallest one repeated
    assert epoch_plan(train_sets, cfg, epoch=0) == plan  # a pure function of (seed, epoch)
    assert epoch_plan(train_sets, cfg, epoch=1) != plan


def test_sequential_runs_each_task_whole() -> None:
    train_sets = {"sst": _encoded("sst", 6), "para": _encoded("para", 4), "sts": _encoded("sts", 2)}
    cfg = build_config({"train": {"batch_size": 2, "routine": "sequential"}})
    tasks = [s.task for s in epoch_plan(train_sets, cfg, 0)]
    assert tasks == ["sst"] * 3 + ["para"] * 2 + ["sts"]


@pytest.mark.parametrize(
    ("every", "epoch", "expected"),
    [(1.0, 0, [12]), (0.5, 0, [6, 12]), (0.25, 0, [3, 6, 9, 12]), (2.0, 0, []), (2.0, 1, [12])],
)
def test_eval_positions(every: float, epoch: int, expected: list[int]) -> None:
    cfg = build_config({"train": {"eval_every": every, "epochs": 3}})
    assert eval_positions(12, epoch, cfg) == expected


def test_pretrain_mode_trains_heads_only(tiny_backbone: Path, real_data_dir: Path, tmp_path: Path):
    cfg = tiny_config(tiny_backbone, real_data_dir, tmp_path, train={"mode": "pretrain"})
    seen = {}

    def reporter(metrics: dict, ckpt: Path) -> None:
        seen["ckpt"] = ckpt

    train(cfg, reporter)
    from safetensors.torch import load_file

    after = load_file(seen["ckpt"] / "model.safetensors")
    before = load_file(tiny_backbone / "model.safetensors")
    for key, value in before.items():
        assert torch.equal(after[f"encoder.{key}"], value), key
    assert any(k.startswith("heads.") for k in after)


def test_pretrain_mode_leaves_encoder_without_gradients(tiny_backbone: Path) -> None:
    from mtl.build import build_model
    from mtl.heads import task_loss
    from tests.test_heads import _batch

    cfg = build_config({"train": {"mode": "pretrain"}, "model": {"head_hidden": 8}})
    model = build_model(cfg, tiny_backbone)
    batch = _batch("sts", 2)
    task_loss("sts", model(batch).logits, batch.labels).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.heads["sts"].parameters())


def test_run_folder_predictions_and_tensorboard(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_backbone, real_data_dir, tmp_path / "run", train={"eval_every": 0.5})
    reports = []
    metrics = train(cfg, lambda m, c: reports.append(m))
    run = tmp_path / "run"
    assert len(reports) == 2 and reports[-1]["epoch"] == 1.0
    assert metrics["overall"] == max(r["overall"] for r in reports)
    for name in ("config.yaml", "run_info.json", "metrics.json", "best/model.safetensors"):
        assert (run / name).exists(), name
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 3 and "torch" in info["versions"]
    # Submission format: header, then "id , value" for every dev and test example present.
    data = load_data(cfg)
    for task, header in (("sst", "Predicted_Sentiment"), ("sts", "Predicted_Similiary")):
        lines = (run / "predictions" / f"{task}-test-output.csv").read_text().splitlines()
        assert lines[0].split() == ["id", header]
        assert [ln.split(" , ")[0] for ln in lines[1:]] == data.test[task].ids
    assert not (run / "predictions" / "para-test-output.csv").exists()
    assert "quora-test-student.csv" in (run / "predictions" / "MISSING.txt").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb")).Reload()
    assert len(events.Scalars("dev/overall")) == 2
    assert {"train/loss_sst", "train/loss_para", "train/loss_sts", "train/lr"} <= set(
        events.Tags()["scalars"]
    )


@pytest.mark.parametrize("reporter", [None, lambda m, c: None], ids=["cli", "search"])
def test_hparams_summary_only_for_a_run_without_reporter(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, reporter
) -> None:
    """A plain run keeps its HParams view; under a reporter (the search) the search writes it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = tiny_config(tiny_backbone, real_data_dir, tmp_path / "run", train={"max_steps": 2})
    train(cfg, reporter)
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    if reporter is not None:
        with pytest.raises(KeyError, match="hparams"):
            events.PluginTagToContent("hparams")
        assert not [t for t in events.Tags()["scalars"] if t.startswith("hparam/")]
        return
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["train.max_steps"].number_value == 2
    assert "_hparams_/experiment" in content


def test_dev_predictions_are_kept_at_the_best_evaluation(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path
) -> None:
    """Without write_predictions, the run folder still holds the best evaluation's dev
    predictions and gold labels, from which its recorded dev metrics follow exactly."""
    cfg = tiny_config(
        tiny_backbone,
        real_data_dir,
        tmp_path / "run",
        train={"epochs": 2, "eval_every": 0.5, "lr": 3e-3, "write_predictions": False},
    )
    path = tmp_path / "run" / DEV_PREDICTIONS_FILE
    snapshots = []
    metrics = train(cfg, lambda m, c: snapshots.append((m, path.read_text())))
    assert not (tmp_path / "run" / "predictions").exists()
    best = next(text for m, text in snapshots if m["evaluation"] == metrics["best_evaluation"])
    assert path.read_text() == best  # rewritten only when the evaluation improved
    frame = pd.read_csv(path, dtype={"id": str})
    scores = {}
    for task in ("sst", "para", "sts"):
        rows = frame[frame["task"] == task]
        raw = data_lib.subsample(
            data_lib.read_split(real_data_dir, task, "dev"), 16, data_lib.EVAL_SUBSAMPLE_SEED
        )
        assert list(rows["id"]) == raw.ids and list(rows["gold"]) == pytest.approx(raw.labels)
        if task == "sts":
            scores[task] = scipy.stats.pearsonr(rows["prediction"], rows["gold"]).statistic
        else:
            scores[task] = (rows["prediction"] == rows["gold"]).mean()
    assert scores["sst"] == metrics["sst_acc"] and scores["para"] == metrics["para_acc"]
    assert scores["sts"] == pytest.approx(metrics["sts_pearson"], abs=1e-12)


def test_resume_mid_epoch_reproduces_uninterrupted_run(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        tiny_backbone,
        real_data_dir,
        tmp_path / "full",
        train={"epochs": 2, "eval_every": 0.5, "grad_accum_steps": 2},
    )
    saved = tmp_path / "saved"
    history = []

    def keep_first(metrics: dict, ckpt: Path) -> None:
        history.append(metrics)
        if len(history) == 1:  # the middle of epoch 0
            shutil.copytree(ckpt, saved)

    full = train(cfg, keep_first)
    assert 0 < history[0]["epoch"] < 1
    resumed_history = []
    resumed = train(
        cfg, lambda m, c: resumed_history.append(m), resume_from=saved, run_dir=tmp_path / "resumed"
    )
    assert resumed_history == history[1:]
    assert resumed == full


def _interrupted_run(tiny_backbone: Path, real_data_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(the folder of a whole run, a copy of that folder as it was after its first evaluation,
    in the middle of epoch 0: what an interrupted run leaves)."""
    full = tmp_path / "full"
    cfg = tiny_config(tiny_backbone, real_data_dir, full, train={"epochs": 2, "eval_every": 0.5})
    cut = tmp_path / "cut"
    seen = []

    def keep_first(metrics: dict, ckpt: Path) -> None:
        seen.append(metrics)
        if len(seen) == 1:
            shutil.copytree(ckpt.parent, cut)

    train(cfg, keep_first, run_dir=full)
    return full, cut


def test_cli_resume_continues_the_run_in_its_folder_with_its_config(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``python -m mtl.train --resume RUN/checkpoint``, nothing else: RUN's config, in RUN."""
    from mtl.cli import main

    full, cut = _interrupted_run(tiny_backbone, real_data_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["--resume", str(cut / "checkpoint"), "--set", "train.num_threads=1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"->  {cut}")
    assert not (tmp_path / "runs").exists()  # no new run folder
    done = json.loads((full / "metrics.json").read_text())
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed == done  # every evaluation, as if never interrupted
    for task in ("sst", "sts"):
        name = f"predictions/{task}-test-output.csv"
        assert (cut / name).read_bytes() == (full / name).read_bytes()


def test_cli_resume_refuses_another_configuration_naming_the_key(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, capsys
) -> None:
    from mtl.cli import main

    _, cut = _interrupted_run(tiny_backbone, real_data_dir, tmp_path)
    before = {p: p.read_bytes() for p in cut.rglob("*") if p.is_file()}
    argv = ["--resume", str(cut / "checkpoint"), "--set", "train.lr=0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr is 0.5 here but 0.001 in" in err[0]
    assert str(cut / "config.yaml") in err[0]
    other = tmp_path / "other.yaml"  # a whole config file with one value changed
    raw = yaml.safe_load((cut / "config.yaml").read_text())
    raw["model"]["head_dropout"] = 0.3
    other.write_text(yaml.safe_dump(raw))
    assert main([str(other), "--resume", str(cut / "checkpoint")]) == 2
    assert "model.head_dropout is 0.3 here but 0.1" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in cut.rglob("*") if p.is_file()} == before  # untouched


@pytest.mark.slow
def test_one_epoch_on_real_data_with_minilm(real_data_dir: Path, tmp_path: Path) -> None:
    cfg = build_config(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {
                "data_dir": str(real_data_dir),
                "max_train_examples": 128,
                "max_eval_examples": 64,
                "max_length": 64,
            },
            "train": {"epochs": 1, "batch_size": 16, "lr": 1e-4, "progress": False},
        }
    )
    metrics = train(cfg)
    assert set(metrics) >= {"sst_acc", "para_acc", "sts_pearson", "overall"}
    # Pretrained MiniLM features carry STS signal after a handful of steps (0.16 seen here).
    assert metrics["sts_pearson"] > 0.05
    assert 0.0 <= metrics["overall"] <= 1.0
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    quora = next(r for r in report["skipped"] if r["file"] == "quora-train.csv")
    assert quora["skipped"] == {"empty label": 2}


def test_weights_given_in_memory_replace_the_file(tiny_backbone: Path) -> None:
    """What a search shares through Ray's object store is what the model starts from."""
    from mtl.bert import read_checkpoint
    from mtl.build import build_model

    state = read_checkpoint(tiny_backbone)
    state = {k: torch.full_like(v, 0.5) if "pooler" in k else v for k, v in state.items()}
    cfg = build_config({"model": {"head_hidden": 8}})
    model = build_model(cfg, tiny_backbone, backbone_state=state)
    assert torch.all(model.encoder.pooler.dense.weight == 0.5)
    from_file = build_model(cfg, tiny_backbone)
    assert not torch.all(from_file.encoder.pooler.dense.weight == 0.5)


def test_accumulation_windows_are_cut_at_evaluations_and_the_epoch_end() -> None:
    from mtl.schedule import accumulation_windows

    assert accumulation_windows(13, [7, 13], 4) == [4, 3, 4, 2]
    assert accumulation_windows(12, [12], 1) == [1] * 12
    assert accumulation_windows(5, [], 8) == [5]


def test_each_optimizer_step_averages_exactly_the_batches_it_holds(
    tmp_path: Path, real_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accumulated gradient equals the mean of its window's per-batch gradients, recomputed
    independently, also in windows cut short by an evaluation or the epoch's end."""
    from mtl.heads import MultitaskBert, task_loss
    from tests.tiny import make_tiny_backbone

    backbone = make_tiny_backbone(
        tmp_path / "no-dropout", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    cfg = tiny_config(
        backbone,
        real_data_dir,
        tmp_path / "run",
        model={"head_dropout": 0.0},
        train={"eval_every": 0.5, "grad_accum_steps": 4, "max_grad_norm": None},
    )
    window: list = []  # (model, batch) of each training forward since the last step
    sizes: list[int] = []
    checked: list[float] = []

    recomputing = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        training = module.training and torch.is_grad_enabled() and not recomputing
        if isinstance(module, MultitaskBert) and training:
            window.append((module, args[0]))

    def check(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        recomputing.append(True)
        model = window[0][0]
        params = [p for p in model.parameters() if p.requires_grad]
        expected = [torch.zeros_like(p) for p in params]
        for _, batch in window:
            loss = task_loss(batch.task, model(batch).logits, batch.labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for e, g in zip(expected, grads, strict=True):
                if g is not None:
                    e.add_(g / len(window))
        for p, e in zip(params, expected, strict=True):
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got, e, rtol=1e-4, atol=1e-7)
        checked.append(max(e.abs().max().item() for e in expected))
        sizes.append(len(window))
        window.clear()
        recomputing.clear()

    class Checked(torch.optim.AdamW):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.register_step_pre_hook(check)

    monkeypatch.setattr(torch.optim, "AdamW", Checked)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(cfg)
    finally:
        handle.remove()
    assert any(s < 4 for s in sizes), sizes  # windows were cut
    assert max(sizes) == 4 and min(checked) > 0
