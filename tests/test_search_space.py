"""The design-space file: bad files, conditional sampling, grids, the shipped spaces, PRUNED states."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

from mtl.config import Config, build_config
from mtl.search.__main__ import main
from mtl.search.run import make_searcher
from mtl.search.space import SpaceError, grid_points, holds, load_space, parse_space, suggest

REPO = Path(__file__).resolve().parents[1]

GOOD = """
experiment: {name: t}
parameters:
  mode: {path: train.mode, type: categorical, choices: [pretrain, finetune]}
  lr: {path: train.lr, type: float, low: 1.0e-5, high: 1.0e-3, log: true}
  smart: {path: smart.enabled, type: bool}
  smart_lambda: {path: smart.weight, type: float, low: 0.5, high: 10, when: {smart: true}}
"""


def _space(extra: str = "", drop: str | None = None) -> str:
    raw = yaml.safe_load(GOOD)
    raw = _merge(raw, yaml.safe_load(textwrap.dedent(extra)) or {})
    if drop:
        node = raw
        *parents, last = drop.split(".")
        for p in parents:
            node = node[p]
        del node[last]
    return yaml.safe_dump(raw)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# The shape of the shipped quick.yaml and full_cpu.yaml before the rule: the routine is searched,
# an evaluation every half epoch, ASHA's first rung after one evaluation.
SEQUENTIAL_HALF_EPOCH_RUNG = """
base: {train: {epochs: 2, eval_every: 0.5}}
parameters:
  routine: {path: train.routine, type: categorical, choices: [sequential, round_robin]}
scheduler: {grace_period: 1, reduction_factor: 2}
"""

# (id, file text, expected message after "<file>: ")
BAD_FILES = [
    ("unknown-top-level-key", _space("serach: {num_samples: 3}"), r"serach: unknown key"),
    (
        "unknown-key-in-section",
        _space("search: {num_sample: 3}"),
        r"search\.num_sample: unknown key",
    ),
    (
        "wrong-type",
        _space("search: {num_samples: many}"),
        r"search\.num_samples: Input should be a valid integer",
    ),
    (
        "empty-choices",
        _space("parameters: {design: {path: model.design, type: categorical, choices: []}}"),
        r"parameters\.design\.choices: must not be empty",
    ),
    (
        "low-above-high",
        _space("parameters: {lr: {low: 0.1, high: 0.001}}"),
        r"parameters\.lr: low 0\.1 is above high 0\.001",
    ),
    (
        "log-needs-positive-low",
        _space("parameters: {lr: {low: 0.0}}"),
        r"parameters\.lr\.low: log scale needs low > 0",
    ),
    (
        "condition-unknown-parameter",
        _space("parameters: {smart_lambda: {when: {smrt: true}}}"),
        r"parameters\.smart_lambda\.when: unknown parameter 'smrt'",
    ),
    (
        "condition-unknown-value",
        _space("parameters: {lr: {when: {mode: fine_tune}}}"),
        r"parameters\.lr\.when\.mode: 'fine_tune' is not a value of mode \(pretrain, finetune\)",
    ),
    (
        "condition-on-float",
        _space("parameters: {smart_lambda: {when: {lr: 0.001}}}"),
        r"parameters\.smart_lambda\.when\.lr: conditions can name categorical, bool or int",
    ),
    (
        "base-unknown-setting",
        _space("base: {train: {learning_rate: 0.001}}"),
        r"base: train\.learning_rate: unknown key",
    ),
    (
        "base-bad-value",
        _space("base: {model: {design: 3}}"),
        r"base: model\.design: Input should be 1 or 2",
    ),
    (
        "parameter-unknown-path",
        _space("parameters: {lr: {path: train.lrate}}"),
        r"parameters\.lr: train\.lrate=1e-05: unknown key",
    ),
    (
        "parameter-value-invalid-at-path",
        _space("parameters: {design: {path: model.design, type: categorical, choices: [1, 3]}}"),
        r"parameters\.design: model\.design=3: Input should be 1 or 2",
    ),
    (
        "parameter-path-is-a-section",
        _space("parameters: {design: {path: model, type: categorical, choices: [1]}}"),
        r"parameters\.design: model=1: Input should be a valid dictionary",
    ),
    (
        "unknown-parameter-type",
        _space("parameters: {lr: {type: floaty}}"),
        r"parameters\.lr: Input tag 'floaty' found using 'type' does not match",
    ),
    ("missing-experiment", _space(drop="experiment"), r"experiment: required key missing"),
    (
        "bad-experiment-name",
        _space("experiment: {name: 'my run'}"),
        r"experiment\.name: use letters, digits",
    ),
    (
        "condition-cycle",
        _space(
            "parameters: {smart: {when: {smart_lambda_on: true}},"
            " smart_lambda_on: {path: smart.bregman, type: bool, when: {smart: true}}}"
        ),
        r"conditions form a cycle \(smart -> smart_lambda_on -> smart\)",
    ),
    (
        "shared-path-not-exclusive",
        _space("parameters: {lr2: {path: train.lr, type: float, low: 1.0e-4, high: 1.0e-2}}"),
        r"parameters\.lr2: sets train\.lr like parameters\.lr; their when: conditions must exclude",
    ),
    (
        "grid-with-asha",
        "experiment: {name: t}\nsearch: {sampler: grid}\n"
        "parameters: {design: {path: model.design, type: categorical, choices: [1, 2]}}\n",
        r"scheduler\.type: sampler grid runs with the fifo scheduler",
    ),
    (
        "grid-with-float",
        _space("search: {sampler: grid}\nscheduler: {type: fifo}"),
        r"parameters\.lr\.type: sampler grid needs categorical or bool parameters",
    ),
    (
        "point-unknown-parameter",
        _space("search: {points_to_evaluate: [{learning_rate: 0.001}]}"),
        r"search\.points_to_evaluate\[0\]\.learning_rate: unknown parameter",
    ),
    (
        "point-outside-range",
        _space("search: {points_to_evaluate: [{lr: 0.5}]}"),
        r"search\.points_to_evaluate\[0\]\.lr: 0\.5 is outside the parameter's values",
    ),
    (
        "point-condition-fails",
        _space("search: {points_to_evaluate: [{smart: false, smart_lambda: 5}]}"),
        r"search\.points_to_evaluate\[0\]\.smart_lambda: its when: condition does not hold",
    ),
    (
        "unknown-objective",
        _space("objective: {metric: accuracy}"),
        r"objective\.metric: 'accuracy' is not a metric \(expected one of sst_acc, para_acc, "
        r"sts_pearson, overall\)",
    ),
    (
        "grace-above-max-t",
        _space("scheduler: {grace_period: 20}"),
        r"scheduler\.grace_period: 20 is above max_t \(10 evaluations\)",
    ),
    (
        "selection-metric-conflict",
        _space("base: {train: {selection_metric: sst_acc}}"),
        r"base\.train\.selection_metric: 'sst_acc' differs from objective\.metric 'overall'",
    ),
    (
        "objective-of-an-absent-task",
        _space("base: {data: {tasks: [sst, para]}}\nobjective: {metric: sts_pearson}"),
        r"objective\.metric: 'sts_pearson' is a metric of task sts, which is not in data\.tasks "
        r"\(sst, para\)",
    ),
    (
        "more-points-than-trials",
        _space(
            "search: {num_samples: 2, points_to_evaluate: [{lr: 0.001}, {lr: 0.0001}, {lr: 0.0002}]}"
        ),
        r"search\.points_to_evaluate: 3 points but num_samples is 2",
    ),
    (
        "more-points-than-the-default-trials",
        _space("search: {points_to_evaluate: [" + ", ".join(["{lr: 0.001}"] * 21) + "]}"),
        r"search\.points_to_evaluate: 21 points but num_samples is 20",
    ),
    ("invalid-yaml", "experiment: {name: t\nparameters: [\n", r"line \d+ invalid YAML"),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file_gets_one_line_and_exit_status_2(tmp_path, capsys, text, expected):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    assert main([str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {path}: "), err
    assert re.search(expected, err), err
    with pytest.raises(SpaceError, match=expected):
        load_space(path)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            SEQUENTIAL_HALF_EPOCH_RUNG,
            r"scheduler\.grace_period: 1 evaluation is 0\.5 of an epoch: ASHA's first rung would "
            r"stop sequential trials \(parameters\.routine allows train\.routine sequential\) .* "
            r"set it to 2 \(one epoch\) or more",
        ),
        (
            "base: {train: {routine: sequential, epochs: 3, eval_every: 0.25}}\n"
            "scheduler: {grace_period: 3}",
            r"scheduler\.grace_period: 3 evaluations is 0\.75 of an epoch: .*"
            r"\(base\.train\.routine allows train\.routine sequential\) .* set it to 4",
        ),
    ],
    ids=["searched-routine", "sequential-base"],
)
def test_asha_judging_sequential_trials_inside_their_first_epoch_is_named(
    tmp_path, capsys, extra, expected
):
    path = tmp_path / "space.yaml"
    path.write_text(_space(extra))
    assert main([str(path), "--check"]) == 0  # a warning: a search run with it still resumes
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"warning: {path}: "), err
    assert re.search(expected, err), err


def test_a_first_rung_at_one_epoch_or_without_sequential_trials_is_not_named(tmp_path, capsys):
    for extra in (
        SEQUENTIAL_HALF_EPOCH_RUNG.replace("grace_period: 1", "grace_period: 2"),
        SEQUENTIAL_HALF_EPOCH_RUNG.replace("sequential, round_robin", "round_robin"),
        SEQUENTIAL_HALF_EPOCH_RUNG.replace("eval_every: 0.5", "eval_every: 1"),
        SEQUENTIAL_HALF_EPOCH_RUNG.replace("grace_period: 1, reduction_factor: 2", "type: fifo"),
    ):
        path = tmp_path / "space.yaml"
        path.write_text(_space(extra))
        assert main([str(path), "--check"]) == 0
        assert capsys.readouterr().err == ""


def test_bad_file_from_the_shell_has_no_traceback(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(_space("base: {train: {learning_rate: 0.001}}"))
    proc = subprocess.run(
        [sys.executable, "-m", "mtl.search", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: {path}: base: train.learning_rate: unknown key\n"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "Ray" not in proc.stdout  # refused before Ray started


def test_set_overrides_values_before_validation(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(_space())
    space = load_space(path, ["base.model.backbone=/some/folder", "experiment.name=other"])
    assert space.base["model"]["backbone"] == "/some/folder"
    assert space.experiment.name == "other"
    with pytest.raises(SpaceError, match=r"\(with --set\): base: train\.nope: unknown key"):
        load_space(path, ["base.train.nope=1"])


DOTTED = """
experiment: {name: t}
parameters:
  model.head_dropout: {type: float, low: 0.0, high: 0.3}
  lr: {path: train.lr, type: float, low: 1.0e-5, high: 1.0e-3, log: true}
"""


def test_set_reaches_a_parameter_whose_name_has_dots(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(DOTTED)
    space = load_space(path, ["parameters.model.head_dropout.high=0.2", "parameters.lr.low=2.0e-5"])
    assert space.parameters["model.head_dropout"].high == 0.2
    assert space.parameters["lr"].low == 2.0e-5
    assert set(space.parameters) == {"model.head_dropout", "lr"}


def test_set_of_an_unknown_dotted_parameter_says_how_to_write_it(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text(DOTTED)
    assert main([str(path), "--check", "--set", "parameters.model.encoder_dropout.high=0.2"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: {path} (with --set): parameters.model: no type (categorical, bool, int or "
        "float); --set reaches a parameter whose name has dots only if the file has it: add a "
        "new one with a plain name and path: a.b"
    ]


def test_good_file_is_valid(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(_space())
    space = load_space(path)
    assert space.max_t == 10  # trainer defaults: 10 epochs, one evaluation each
    assert space.order.index("smart") < space.order.index("smart_lambda")


# ---------------------------------------------------------------------------------------------
# Conditional parameters

CONDITIONAL = {
    "experiment": {"name": "cond"},
    "parameters": {
        "mode": {"path": "train.mode", "type": "categorical", "choices": ["pretrain", "finetune"]},
        "lr_pretrain": {
            "path": "train.lr",
            "type": "float",
            "low": 1e-4,
            "high": 3e-3,
            "log": True,
            "when": {"mode": "pretrain"},
        },
        "lr_finetune": {
            "path": "train.lr",
            "type": "float",
            "low": 5e-6,
            "high": 1e-4,
            "log": True,
            "when": {"mode": "finetune"},
        },
        "smart": {"path": "smart.enabled", "type": "bool"},
        "smart_lambda": {
            "path": "smart.weight",
            "type": "float",
            "low": 0.5,
            "high": 10,
            "when": {"smart": True},
        },
        "pal": {
            "path": "pal.variant",
            "type": "categorical",
            "choices": ["none", "paper", "standard"],
        },
        "pal_lr": {
            "path": "pal.lr",
            "type": "float",
            "low": 1e-5,
            "high": 1e-3,
            "log": True,
            "when": {"pal": {"not": "none"}},
        },
        "heads": {
            "path": "pal.heads",
            "type": "int",
            "low": 4,
            "high": 12,
            "step": 4,
            "when": {"pal": ["paper", "standard"], "mode": "finetune"},
        },
    },
}


def _expected_keys(params: dict) -> set[str]:
    keys = {
        "mode",
        "smart",
        "pal",
        "lr_pretrain" if params["mode"] == "pretrain" else "lr_finetune",
    }
    if params["smart"]:
        keys.add("smart_lambda")
    if params["pal"] != "none":
        keys.add("pal_lr")
        if params["mode"] == "finetune":
            keys.add("heads")
    return keys


def _uses_known_sections(space) -> bool:
    sections = set(Config.model_fields)
    return all(space.path_of(n).split(".")[0] in sections for n in space.parameters)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("sampler", ["random", "tpe", "qmc"])
def test_conditional_parameters_appear_only_when_their_condition_holds(sampler):
    space = parse_space(CONDITIONAL)
    study = optuna.create_study(
        sampler={
            "random": optuna.samplers.RandomSampler(seed=0),
            "tpe": optuna.samplers.TPESampler(seed=0, n_startup_trials=10),
            "qmc": optuna.samplers.QMCSampler(seed=0, warn_independent_sampling=False),
        }[sampler],
        direction="maximize",
    )
    seen = set()
    for i in range(60):
        trial = study.ask()
        suggest(trial, space)
        params = trial.params
        assert set(params) == _expected_keys(params)
        cfg = build_config(space.trial_config(params))
        assert cfg.train.mode == params["mode"]
        assert cfg.train.lr == params.get("lr_pretrain", params.get("lr_finetune"))
        assert cfg.smart.enabled == params["smart"]
        if "smart_lambda" in params:
            assert cfg.smart.weight == params["smart_lambda"]
        seen.add(frozenset(params))
        study.tell(trial, float(i % 7))
    assert len(seen) >= 6  # every branch was visited


def test_ray_searcher_config_holds_only_applicable_parameters(tmp_path):
    space = parse_space(CONDITIONAL)
    searcher = make_searcher(space, f"sqlite:///{tmp_path / 's.db'}")
    for i in range(25):
        config = searcher.suggest(f"t{i}")
        assert set(config) == _expected_keys(config)
        searcher.on_trial_result(f"t{i}", {"evaluation": 1.0, "best_overall": 0.1 * (i % 5)})
        searcher.on_trial_complete(f"t{i}", {"evaluation": 1.0, "best_overall": 0.1 * (i % 5)})
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in searcher.study.trials)


def test_holds_treats_bool_and_int_apart():
    assert holds({"x": True}, {"x": True})
    assert not holds({"x": True}, {"x": 1})
    assert holds({"x": 1}, {"x": 1.0})
    assert not holds({"x": {"not": ["a", "b"]}}, {"x": "a"})
    assert not holds({"x": "a"}, {})  # a parameter that was not sampled satisfies nothing


def test_grid_points_respect_conditions():
    raw = {
        "experiment": {"name": "g"},
        "parameters": {
            "design": {"path": "model.design", "type": "categorical", "choices": [1, 2]},
            "pal": {"path": "pal.variant", "type": "categorical", "choices": ["none", "paper"]},
            "pal_lr": {
                "path": "pal.lr",
                "type": "categorical",
                "choices": [1e-4, 1e-3],
                "when": {"pal": "paper"},
            },
        },
        "search": {"sampler": "grid"},
        "scheduler": {"type": "fifo"},
    }
    points = grid_points(parse_space(raw))
    assert len(points) == 2 * (1 + 2)
    assert {"design": 1, "pal": "none"} in points
    assert {"design": 2, "pal": "paper", "pal_lr": 1e-3} in points


def test_yaml_exponent_without_dot_is_a_number():
    raw = yaml.safe_load(
        "experiment: {name: x}\nparameters: {lr: {path: train.lr, type: categorical, choices: [1e-5, 3e-5]}}"
    )
    space = parse_space(raw)
    assert space.parameters["lr"].choices == [1e-5, 3e-5]


# ---------------------------------------------------------------------------------------------
# PRUNED, COMPLETE and FAIL in the study (the searcher alone, with a real SQLite study)


def test_scheduler_stopped_trial_is_pruned_with_its_last_value(tmp_path):
    space = parse_space(CONDITIONAL)
    searcher = make_searcher(space, f"sqlite:///{tmp_path / 's.db'}")
    for tid in ("done", "stopped", "failed"):
        searcher.suggest(tid)
    # Ran to its end: Tune passes the final result to on_trial_result, then completes the trial.
    for step, value in ((1, 0.40), (2, 0.50)):
        searcher.on_trial_result("done", {"evaluation": float(step), "best_overall": value})
    searcher.on_trial_complete("done", {"evaluation": 2.0, "best_overall": 0.50})
    # Stopped by the scheduler at its second evaluation: that result never reached on_trial_result.
    searcher.on_trial_result("stopped", {"evaluation": 1.0, "best_overall": 0.30})
    searcher.on_trial_complete("stopped", {"evaluation": 2.0, "best_overall": 0.35})
    searcher.on_trial_complete("failed", None, error=True)

    study = optuna.load_study(study_name="cond", storage=f"sqlite:///{tmp_path / 's.db'}")
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert by_id["done"].state == optuna.trial.TrialState.COMPLETE
    assert by_id["done"].value == pytest.approx(0.50)
    assert by_id["stopped"].state == optuna.trial.TrialState.PRUNED
    assert by_id["stopped"].value == pytest.approx(0.35)
    assert by_id["stopped"].intermediate_values == {1: 0.30, 2: 0.35}
    assert by_id["failed"].state == optuna.trial.TrialState.FAIL


# ---------------------------------------------------------------------------------------------
# The shipped design spaces

SHIPPED = sorted((REPO / "search_spaces").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_space_is_valid(path):
    raw = yaml.safe_load(path.read_text())
    sections = set(Config.model_fields)
    missing = {
        (p.get("path") or n).split(".")[0] for n, p in raw.get("parameters", {}).items()
    } - sections
    if missing:
        pytest.skip(f"the trainer has no {sorted(missing)} section yet")
    space = load_space(path)
    assert _uses_known_sections(space)
    if space.search.sampler == "grid":
        assert grid_points(space)
    for point in space.search.points_to_evaluate:
        build_config(space.trial_config(point))


def test_ablation_grids_cover_the_paper_tables():
    sizes = {
        p.name: len(grid_points(load_space(p)))
        for p in sorted((REPO / "search_spaces" / "ablations").glob("*.yaml"))
    }
    assert sizes == {  # every cell of the paper's table under seeds 0, 1 and 2
        "table_3_design_smart.yaml": 4 * 3,
        "table_4_design_routine_pal.yaml": 8 * 3,
        "table_5_design_routine_contrastive.yaml": 4 * 3 * 3,  # stage 1 off, margin, infonce
        "tables_1_2_design_mode_routine.yaml": 8 * 3,
    }
    for p in (REPO / "search_spaces" / "ablations").glob("*.yaml"):
        points = grid_points(load_space(p))
        cells = {tuple(sorted((k, v) for k, v in q.items() if k != "seed")) for q in points}
        for cell in cells:
            seeds = [q["seed"] for q in points if all(q[k] == v for k, v in cell)]
            assert sorted(seeds) == [0, 1, 2], (p.name, cell)


@pytest.mark.parametrize(
    ("resources", "available", "match"),
    [
        (
            {"cpu": 4},
            {"CPU": 2.0},
            r"resources_per_trial\.cpu: a trial asks for 4 CPU but .* has 2",
        ),
        ({"cpu": 1, "gpu": 1}, {"CPU": 2.0}, r"resources_per_trial\.gpu: .* 1 GPU but .* has 0"),
        ({"cpu": 0.5, "gpu": 0.5}, {"CPU": 2.0, "GPU": 1.0}, None),
    ],
)
def test_a_trial_a_local_ray_cannot_schedule_is_refused(tmp_path, resources, available, match):
    from mtl.search.run import check_fits

    path = tmp_path / "space.yaml"
    path.write_text(_space())
    overrides = [f"resources_per_trial.{k}={v}" for k, v in resources.items()]
    space = load_space(path, overrides)
    if match is None:
        check_fits(space, available)
    else:
        with pytest.raises(SpaceError, match=match):
            check_fits(space, available)
