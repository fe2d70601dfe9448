"""The design-space file: its schema, one-line validation errors, and define-by-run sampling.

A design space is a YAML file with these sections (every one but ``experiment`` and
``parameters`` has defaults)::

    experiment: {name, storage_path, seed, study_storage}
    base:       a trainer config, the schema of ``python -m mtl.train`` (mtl/config.py)
    parameters: name -> {type, choices | low/high/log/step, path, when}
    objective:  {metric, mode}
    search:     {sampler, num_samples, max_concurrent_trials, startup_trials,
                 points_to_evaluate, time_budget_s, repeats}
    scheduler:  {type, max_t, grace_period, reduction_factor}
    resources_per_trial: {cpu, gpu}
    failure:    {max_retries}
    checkpoints: {num_to_keep}

A parameter writes its value to a config ``path`` (``train.lr``, ``model.design``, ``seed``); the
path defaults to the parameter's name, so ``model.design: {type: categorical, choices: [1, 2]}``
needs no ``path``. Because a path is just a key of the trainer config, sections added to the
trainer later (``smart``, ``pal``, ...) need no change here. A ``when`` condition names other
parameters and the values they must have::

    when: {mode: finetune}                 # equal
    when: {pal: [paper, standard]}         # one of
    when: {pal: {not: none}}               # none of

A parameter whose condition fails is not sampled at all (define-by-run), so a trial's config holds
only the parameters that apply. Two parameters may share a path when their conditions exclude each
other (for example one learning-rate range per ``mode``).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from mtl.config import (
    Config,
    ConfigError,
    build_config,
    load_yaml,
    merge,
    parse_override,
)
from mtl.metrics import record_metrics, unmeasured
from mtl.schedule import evaluations_in_epoch, evaluations_per_run
from mtl.tasks import registry

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def _yaml_number(value: Any) -> Any:
    # PyYAML (YAML 1.1) reads 1e-5 without a dot as a string; a design space means the number.
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_yaml_number(v) for v in value]
    return value


Scalar = Annotated[str | int | float | bool | None, BeforeValidator(_yaml_number)]


class SpaceError(ConfigError):
    """A mistake in a design-space file: one line naming the file, the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Parameters


class NotCondition(_Strict):
    # The named parameter must have none of these values.
    not_: Scalar | list[Scalar] = Field(alias="not")

    @property
    def values(self) -> list[Scalar]:
        return self.not_ if isinstance(self.not_, list) else [self.not_]


Condition = NotCondition | list[Scalar] | Scalar


class _Param(_Strict):
    # Config key the value is written to, e.g. "train.lr"; default: the parameter's name.
    path: str | None = None
    # Sample only when each named parameter was sampled with an allowed value.
    when: dict[str, Condition] = Field(default_factory=dict)


class CategoricalParam(_Param):
    type: Literal["categorical"]
    # The values to choose from (strings, numbers, booleans or null).
    choices: list[Scalar]


class BoolParam(_Param):
    type: Literal["bool"]


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    # Sample on a log scale (needs low >= 1).
    log: bool = False
    step: int = Field(1, gt=0)


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    # Sample on a log scale (needs low > 0).
    log: bool = False
    # Grid step (None: continuous); not allowed with log.
    step: float | None = Field(None, gt=0)


Parameter = Annotated[
    CategoricalParam | BoolParam | IntParam | FloatParam, Field(discriminator="type")
]


def finite_values(
    param: CategoricalParam | BoolParam | IntParam | FloatParam,
) -> list[Scalar] | None:
    """Every value a categorical or bool parameter can take (None for numeric ranges)."""
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, BoolParam):
        return [False, True]
    return None


def _allowed(cond: Condition) -> tuple[bool, list[Scalar]]:
    """(negated, values) of one condition."""
    if isinstance(cond, NotCondition):
        return True, cond.values
    return False, cond if isinstance(cond, list) else [cond]


def _same(a: Scalar, b: Scalar) -> bool:
    # YAML's true/1 and false/0 are different values here, unlike Python's ==.
    return (type(a) is type(b) and a == b) or (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def holds(when: dict[str, Condition], values: dict[str, Any]) -> bool:
    """Whether a ``when`` condition holds for the parameters sampled so far."""
    for name, cond in when.items():
        if name not in values:
            return False
        negated, allowed = _allowed(cond)
        hit = any(_same(values[name], v) for v in allowed)
        if hit == negated:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The other sections


class ExperimentSection(_Strict):
    # Folder name of the experiment under storage_path (letters, digits, ".", "_", "-").
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # Local folder (relative to the current directory) or a URI Ray Tune accepts (s3://...).
    storage_path: str = "ray_results"
    # Seeds the Optuna sampler on the driver (each trial is seeded by base.seed).
    seed: int = 0
    # SQLAlchemy URL of the Optuna study; None: a SQLite file beside the experiment folder.
    study_storage: str | None = None


class ObjectiveSection(_Strict):
    # Dev metric the search ranks trials by; also the trainer's train.selection_metric: overall
    # or a task's metric (sst_acc, para_acc, sts_pearson, a declared task's <name>_acc, ...).
    metric: str = "overall"
    # Every metric is higher-is-better and the trainer keeps the highest, so only max.
    mode: Literal["max"] = "max"


class RepeatsSection(_Strict):
    # Re-run this many of the best completed configurations after the search.
    top_k: int = Field(3, gt=0)
    # ... once with each of these further seeds (written to the config's top-level seed).
    seeds: list[int] = Field(min_length=1)


class SearchSection(_Strict):
    # tpe (constant_liar when trials run in parallel), random, qmc (Sobol), or grid (Ray Tune's
    # grid_search over every categorical/bool combination that satisfies the conditions).
    sampler: Literal["tpe", "random", "qmc", "grid"] = "tpe"
    # Trials to run (grid: how many times to run the whole grid). Default: 20, grid 1.
    num_samples: int | None = Field(None, gt=0)
    # Trials running at once (None: as many as the resources allow).
    max_concurrent_trials: int | None = Field(None, gt=0)
    # TPE's random start-up trials (None: Optuna's default, 10).
    startup_trials: int | None = Field(None, ge=0)
    # Parameter values to try first (e.g. the paper's best); missing parameters are sampled.
    points_to_evaluate: list[dict[str, Scalar]] = Field(default_factory=list)
    # Stop starting and running trials after this many seconds.
    time_budget_s: float | None = Field(None, gt=0)
    # Re-run the top configurations with further seeds, for mean and standard deviation.
    repeats: RepeatsSection | None = None


class SchedulerSection(_Strict):
    # asha: stop weak trials early (counting evaluations); fifo: run every trial to its end.
    type: Literal["asha", "fifo"] = "asha"
    # Evaluations of a full-budget trial (None: computed from base.train epochs and eval_every).
    max_t: int | None = Field(None, gt=0)
    # Evaluations before a trial can be stopped.
    grace_period: int = Field(1, gt=0)
    # Keep the top 1/reduction_factor of trials at each rung.
    reduction_factor: float = Field(3.0, gt=1)


class ResourcesSection(_Strict):
    # CPUs per trial (fractions allowed); also the trainer's torch threads (at least 1).
    cpu: float = Field(1.0, ge=0)
    # GPUs per trial (fractions share a GPU).
    gpu: float = Field(0.0, ge=0)


class FailureSection(_Strict):
    # Retries of a failed trial from its last checkpoint (not for a non-finite loss).
    max_retries: int = Field(2, ge=0)


class CheckpointsSection(_Strict):
    # Checkpoints kept per trial, ranked by the objective (the latest is also kept while running).
    num_to_keep: int = Field(1, gt=0)


class DesignSpace(_Strict):
    experiment: ExperimentSection
    base: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    objective: ObjectiveSection = ObjectiveSection()
    search: SearchSection = SearchSection()
    scheduler: SchedulerSection = SchedulerSection()
    resources_per_trial: ResourcesSection = ResourcesSection()
    failure: FailureSection = FailureSection()
    checkpoints: CheckpointsSection = CheckpointsSection()

    # -- derived views -------------------------------------------------------------------------

    def path_of(self, name: str) -> str:
        return self.parameters[name].path or name

    @property
    def order(self) -> list[str]:
        """Parameter names, each after every parameter its condition names."""
        return _topological(self.parameters)

    @property
    def num_samples(self) -> int:
        if self.search.num_samples is not None:
            return self.search.num_samples
        return 1 if self.search.sampler == "grid" else 20

    @property
    def max_t(self) -> int:
        """Evaluations in a full-budget trial (ASHA's max_t)."""
        if self.scheduler.max_t is not None:
            return self.scheduler.max_t
        return evaluations_per_run(build_config(self.base))

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every dev metric a trial reports (``overall``, then each task's the base config
        knows, built-in or declared): the columns of results.csv and the search's records."""
        return record_metrics(registry(build_config(self.base).data).values())

    @property
    def paths(self) -> dict[str, str]:
        """Parameter name -> its config path (a parameter without one is a config key)."""
        return {name: self.path_of(name) for name in self.parameters}

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The trainer config (as a dict) of one trial: base, then each parameter at its path
        (:func:`trial_config_dict`), with the objective as the selection metric."""
        raw = trial_config_dict(self.base, self.paths, params)
        return merge(raw, {"train": {"selection_metric": self.objective.metric}})


def trial_config_dict(base: dict, paths: dict[str, str], params: dict[str, Any]) -> dict:
    """``base``, then each parameter at its path (a parameter without a path is a config key):
    the one rule by which the driver (:meth:`DesignSpace.trial_config`) and each trial
    (:mod:`mtl.search.trainable`) build a trial's trainer config."""
    raw = dict(base)
    for name, value in params.items():
        raw = merge(raw, nest(paths.get(name, name), value))
    return raw


def nest(path: str, value: Any) -> dict[str, Any]:
    """``nest("train.lr", 1e-4) == {"train": {"lr": 1e-4}}``."""
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


# ---------------------------------------------------------------------------------------------
# Loading and validation


_TAGS = {"categorical", "bool", "int", "float"}


def _format_pydantic(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    # A discriminated union puts the tag in the location: parameters.lr.float.low
    if len(loc) >= 3 and loc[0] == "parameters" and loc[2] in _TAGS:
        del loc[2]
    if (
        len(loc) >= 2
        and loc[0] == "experiment"
        and loc[1] == "name"
        and first["type"] == ("string_pattern_mismatch")
    ):
        first = {**first, "msg": "use letters, digits, '.', '_' and '-' only"}
    key = ".".join(loc) or "<root>"
    msg = first["msg"]
    if first["type"] == "union_tag_not_found" and loc[0] == "parameters":
        msg = (
            "no type (categorical, bool, int or float); --set reaches a parameter whose name has "
            "dots only if the file has it: add a new one with a plain name and path: a.b"
        )
    elif first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key missing"
    return f"{key}: {msg}"


def load_space(path: str | Path, overrides: list[str] | None = None) -> DesignSpace:
    """Read and validate a design-space file; raises :class:`SpaceError` (one line).

    ``overrides`` are ``key=value`` strings applied to the file before validation, such as
    ``base.model.backbone=minilm`` or ``resources_per_trial.gpu=0``.
    """
    source = str(path) + (" (with --set)" if overrides else "")
    try:
        raw = apply_overrides(load_yaml(path), overrides)
    except ConfigError as err:
        raise SpaceError(str(err)) from None
    return parse_space(raw, source)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``raw`` with each ``key=value`` of ``overrides`` set.

    A key is split at its dots, except where the dotted words name a key that exists in ``raw``:
    ``parameters.model.head_dropout.high=0.2`` sets ``high`` of the parameter named
    ``model.head_dropout``.
    """
    for item in overrides or []:
        key, value = parse_override(item)
        out: Any = value
        for part in reversed(_existing_keys(raw, key.split("."))):
            out = {part: out}
        raw = merge(raw, out)
    return raw


def _existing_keys(raw: dict[str, Any], parts: list[str]) -> list[str]:
    keys: list[str] = []
    node: Any = raw
    i = 0
    while i < len(parts):
        # The longest run of dotted words that is a key here, else one word.
        n = next(
            (
                n
                for n in range(len(parts) - i, 1, -1)
                if isinstance(node, dict) and ".".join(parts[i : i + n]) in node
            ),
            1,
        )
        keys.append(".".join(parts[i : i + n]))
        node = node.get(keys[-1]) if isinstance(node, dict) else None
        i += n
    return keys


def parse_space(raw: dict[str, Any], source: str = "design space") -> DesignSpace:
    """Validate a design-space mapping; raises :class:`SpaceError` naming ``source`` and the key."""
    try:
        space = DesignSpace.model_validate(raw)
    except ValidationError as err:
        raise SpaceError(f"{source}: {_format_pydantic(err)}") from None
    try:
        _check(space)
    except SpaceError as err:
        raise SpaceError(f"{source}: {err}") from None
    return space


def premature_rung(space: DesignSpace) -> tuple[str, str] | None:
    """(key, problem) where ASHA's first rung would judge a sequential trial before it trained
    every task; None where it would not.

    The sequential routine (:mod:`mtl.schedule`) trains all of one task, then the next, in every
    epoch: an evaluation inside the first epoch scores the heads of the tasks still to come at
    their initialisation (STS, trained last, near Pearson 0). ASHA stops trials at its rungs
    (``grace_period`` evaluations, then that times ``reduction_factor``), so with a first rung
    before one epoch it stops every sequential trial for what it has not trained yet, and the
    searcher learns the same. The first rung must therefore come at one epoch or later.
    """
    if space.scheduler.type != "asha":
        return None
    base = build_config(space.base)
    if len(base.data.tasks) < 2:
        return None
    routines: list[Any] = [base.train.routine]
    every: list[Any] = [base.train.eval_every]
    where = "base.train.routine"
    for name, p in space.parameters.items():
        values = finite_values(p)
        if space.path_of(name) == "train.routine" and values is not None:
            routines, where = values, f"parameters.{name}"
        if space.path_of(name) == "train.eval_every" and values is not None:
            every = values
    if "sequential" not in routines:
        return None
    # Evaluations in the first epoch, as the trainer schedules them (0 or 1 for whole epochs).
    per_epoch = max(
        evaluations_in_epoch(0, build_config(merge(space.base, {"train": {"eval_every": e}})))
        for e in every
    )
    grace = space.scheduler.grace_period
    if grace >= per_epoch:
        return None
    return (
        "scheduler.grace_period",
        f"{grace} evaluation{'s' if grace > 1 else ''} is {grace / per_epoch:g} of an epoch: "
        f"ASHA's first rung would stop sequential trials ({where} allows train.routine "
        "sequential) before they have trained every task (each epoch trains the tasks one "
        f"after the other); set it to {per_epoch} (one epoch) or more",
    )


def _fail(key: str, problem: str) -> SpaceError:
    return SpaceError(f"{key}: {problem}")


def _check(space: DesignSpace) -> None:
    try:
        base = build_config(space.base, "base")
    except ConfigError as err:
        raise SpaceError(str(err)) from None
    problem = unmeasured(space.objective.metric, registry(base.data).values(), base.data.tasks)
    if problem is not None:
        raise _fail("objective.metric", problem)
    selection = space.base.get("train", {}).get("selection_metric")
    if selection is not None and selection != space.objective.metric:
        raise _fail(
            "base.train.selection_metric",
            f"{selection!r} differs from objective.metric {space.objective.metric!r} "
            "(the search sets it; leave it out)",
        )
    params = space.parameters
    for name, p in params.items():
        key = f"parameters.{name}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
            raise _fail(key, "use letters, digits, '_' and '.' only")
        _check_range(key, p)
        for ref, cond in p.when.items():
            if ref == name:
                raise _fail(f"{key}.when", "a parameter cannot depend on itself")
            if ref not in params:
                raise _fail(f"{key}.when", f"unknown parameter {ref!r}")
            values = finite_values(params[ref])
            if values is None and not isinstance(params[ref], IntParam):
                raise _fail(
                    f"{key}.when.{ref}",
                    "conditions can name categorical, bool or int parameters only",
                )
            for v in _allowed(cond)[1]:
                if values is not None and not any(_same(v, c) for c in values):
                    shown = ", ".join(str(c) for c in values)
                    raise _fail(f"{key}.when.{ref}", f"{v!r} is not a value of {ref} ({shown})")
                if isinstance(params[ref], IntParam) and not _int_in(params[ref], v):
                    raise _fail(f"{key}.when.{ref}", f"{v!r} is not a value of {ref}")
        _check_path(key, space, name, p)
    order = _topological(params)  # raises on a cycle
    _check_shared_paths(space)
    _check_points(space, order)
    _check_search(space, base)


def _int_in(p: IntParam, v: Any) -> bool:
    return (
        isinstance(v, int)
        and not isinstance(v, bool)
        and p.low <= v <= p.high
        and (v - p.low) % p.step == 0
    )


def _check_range(key: str, p: Any) -> None:
    if isinstance(p, CategoricalParam):
        if not p.choices:
            raise _fail(f"{key}.choices", "must not be empty")
        for a, b in itertools.combinations(p.choices, 2):
            if _same(a, b):
                raise _fail(f"{key}.choices", f"{a!r} appears twice")
    if isinstance(p, IntParam | FloatParam):
        if p.low > p.high:
            raise _fail(key, f"low {p.low} is above high {p.high}")
        if p.log and p.low <= 0:
            raise _fail(f"{key}.low", f"log scale needs low > 0, got {p.low}")
        if isinstance(p, FloatParam) and p.log and p.step is not None:
            raise _fail(f"{key}.step", "a step cannot be combined with log: true")
        if isinstance(p, FloatParam) and not (math.isfinite(p.low) and math.isfinite(p.high)):
            raise _fail(key, "low and high must be finite")


def _probe_values(p: Any) -> list[Any]:
    values = finite_values(p)
    return values if values is not None else [p.low, p.high]


def _check_path(key: str, space: DesignSpace, name: str, p: Any) -> None:
    path = p.path or name
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", path):
        raise _fail(f"{key}.path", f"{path!r} is not a dotted config key")
    for value in _probe_values(p):
        raw = merge(space.base, nest(path, value))
        try:
            cfg = build_config(raw, "x")
        except ConfigError as err:
            problem = str(err).split(": ", 2)[-1]  # "x: <key>: <problem>"
            raise _fail(key, f"{path}={value!r}: {problem}") from None
        node: Any = cfg
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, BaseModel):
            raise _fail(f"{key}.path", f"{path} is a config section, not a setting")


def _topological(params: dict[str, Any]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1: visiting, 2: done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            raise _fail(f"parameters.{name}.when", f"conditions form a cycle ({cycle})")
        state[name] = 1
        for ref in params[name].when:
            if ref in params:
                visit(ref, [*trail, name])
        state[name] = 2
        order.append(name)

    for name in params:
        visit(name, [])
    return order


def _exclusive(a: dict[str, Condition], b: dict[str, Condition], params: dict[str, Any]) -> bool:
    """Whether two conditions can never hold together (they split some finite parameter)."""
    for ref in set(a) & set(b):
        values = finite_values(params[ref])
        if values is None:
            continue
        ok_a = {i for i, v in enumerate(values) if holds({ref: a[ref]}, {ref: v})}
        ok_b = {i for i, v in enumerate(values) if holds({ref: b[ref]}, {ref: v})}
        if not ok_a & ok_b:
            return True
    return False


def _check_shared_paths(space: DesignSpace) -> None:
    by_path: dict[str, list[str]] = {}
    for name in space.parameters:
        by_path.setdefault(space.path_of(name), []).append(name)
    for path, names in by_path.items():
        for a, b in itertools.combinations(names, 2):
            pa, pb = space.parameters[a], space.parameters[b]
            if not _exclusive(pa.when, pb.when, space.parameters):
                raise _fail(
                    f"parameters.{b}",
                    f"sets {path} like parameters.{a}; their when: conditions must exclude each other",
                )


def _contains(p: Any, v: Any) -> bool:
    values = finite_values(p)
    if values is not None:
        return any(_same(v, c) for c in values)
    if isinstance(p, IntParam):
        return _int_in(p, v)
    return isinstance(v, int | float) and not isinstance(v, bool) and p.low <= v <= p.high


def _check_points(space: DesignSpace, order: list[str]) -> None:
    for i, point in enumerate(space.search.points_to_evaluate):
        key = f"search.points_to_evaluate[{i}]"
        for name, value in point.items():
            if name not in space.parameters:
                raise _fail(f"{key}.{name}", "unknown parameter")
            if not _contains(space.parameters[name], value):
                raise _fail(f"{key}.{name}", f"{value!r} is outside the parameter's values")
        seen: dict[str, Any] = {}
        for name in order:
            if holds(space.parameters[name].when, {**seen, **point}):
                if name in point:
                    seen[name] = point[name]
                else:
                    seen[name] = _probe_values(space.parameters[name])[0]
            elif name in point:
                raise _fail(f"{key}.{name}", "its when: condition does not hold in this point")


def _check_search(space: DesignSpace, base: Config) -> None:
    search, sched = space.search, space.scheduler
    if search.sampler == "grid":
        for name, p in space.parameters.items():
            if finite_values(p) is None:
                raise _fail(
                    f"parameters.{name}.type",
                    "sampler grid needs categorical or bool parameters (list the grid values)",
                )
        if sched.type != "fifo":
            raise _fail("scheduler.type", "sampler grid runs with the fifo scheduler")
        if search.points_to_evaluate:
            raise _fail(
                "search.points_to_evaluate", "not used by sampler grid (the grid is every point)"
            )
    if len(search.points_to_evaluate) > space.num_samples:
        raise _fail(
            "search.points_to_evaluate",
            f"{len(search.points_to_evaluate)} points but num_samples is {space.num_samples}; "
            "every point is one trial (raise num_samples or drop points)",
        )
    if sched.type == "asha":
        budget_params = [
            n for n in space.parameters if space.path_of(n) in ("train.epochs", "train.eval_every")
        ]
        if budget_params and sched.max_t is None:
            raise _fail(
                "scheduler.max_t",
                f"required when parameters.{budget_params[0]} changes the number of evaluations",
            )
        if sched.grace_period > space.max_t:
            raise _fail(
                "scheduler.grace_period",
                f"{sched.grace_period} is above max_t ({space.max_t} evaluations)",
            )
    if search.repeats is not None and "seed" in {space.path_of(n) for n in space.parameters}:
        raise _fail("search.repeats", "cannot re-run with further seeds when a parameter sets seed")
    del base


# ---------------------------------------------------------------------------------------------
# Sampling


def suggest(trial: Any, space: DesignSpace) -> None:
    """Define-by-run sampling: ask ``trial`` for each parameter whose condition holds.

    ``trial`` is an ``optuna.Trial`` (Ray's ``OptunaSearch`` passes a wrapper that records every
    ``suggest_*`` call as the trial's config), so conditional parameters that do not apply are
    never suggested and never appear in the config.
    """
    values: dict[str, Any] = {}
    for name in space.order:
        p = space.parameters[name]
        if not holds(p.when, values):
            continue
        if isinstance(p, CategoricalParam):
            values[name] = trial.suggest_categorical(name, p.choices)
        elif isinstance(p, BoolParam):
            values[name] = trial.suggest_categorical(name, [False, True])
        elif isinstance(p, IntParam):
            values[name] = trial.suggest_int(name, p.low, p.high, step=p.step, log=p.log)
        else:
            values[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)


def grid_points(space: DesignSpace) -> list[dict[str, Any]]:
    """Every combination of categorical/bool values whose conditions hold (for sampler grid)."""

    def expand(i: int, values: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if i == len(order):
            yield dict(values)
            return
        name = order[i]
        p = space.parameters[name]
        if not holds(p.when, values):
            yield from expand(i + 1, values)
            return
        for v in finite_values(p) or []:
            yield from expand(i + 1, {**values, name: v})

    order = space.order
    return list(expand(0, {}))
