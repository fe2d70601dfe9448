"""Where an experiment lives and what its folder holds: the one owner of the folder's format.

The search writes the folder and :mod:`analysis.common` reads it back, both through this module:
its file names (:data:`RESULTS_FILE` and the others below), the reader of a trial's reports
(:func:`read_reports`, :func:`evaluations`), the saved design space (:func:`read_saved`) and where
the study is (:func:`study_urls`). ASHA's rungs belong to the scheduler
(:func:`mtl.search.scheduler.asha_rungs`).

An experiment is the folder ``<storage_path>/<name>`` (a local or shared folder, or a URI such as
``s3://bucket/path``) and, unless it is a grid, the Optuna study ``<name>`` at
``experiment.study_storage``. Both are fixed before the first trial and never guessed again:

* :func:`resolve` makes the storage path absolute and fills in the study's location: a SQLite file
  ``<storage_path>/<name>.optuna.db`` beside a local folder, or, for a URI (SQLite cannot live on
  object storage), ``$MTL_CACHE_DIR/studies/<hash of the URI>/<name>.optuna.db`` (default
  ``~/.cache/mtl``) on the driver, whatever the working directory.
* The resolved space is written into the folder as ``design_space.yaml`` before the first trial
  (:func:`start`, after :func:`plan` has checked what exists). ``--resume`` reads it back: a design-space file whose space differs from it is
  refused naming the first differing key (:func:`check_same`), and ``python -m mtl.search --resume
  EXPERIMENT_DIR`` resumes from it alone (:func:`load_saved`).
* :func:`scratch_key` names the experiment's scratch folder on every node (see
  :mod:`mtl.search.trainable`), so that the driver can remove what killed trials left there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pyarrow.fs
import yaml

from mtl.cache import cache_root
from mtl.config import ConfigError, build_config, first_difference, lookup, merge
from mtl.search.space import DesignSpace, SpaceError, apply_overrides, parse_space

log = logging.getLogger(__name__)

SPACE_FILE = "design_space.yaml"  # the resolved design space, written before the first trial
RESULTS_FILE = "results.csv"  # one row per trial (mtl.search.results.Summary.columns)
BEST_CONFIG_FILE = "best_config.yaml"  # the best trial's trainer config
TOP_FILE = "top_trials.txt"  # the table printed at the end of a search
REPEATS_FILE = "repeats.csv"  # with search.repeats: every run of the top configurations
REPEATS_SUMMARY_FILE = "repeats_summary.csv"  # their mean, std and count per configuration
REPORTS_FILE = "result.json"  # in each trial folder: Ray Tune's record of every report, one a line
REPEATS_SUFFIX = "-repeats"  # <name>-repeats: the seed repeats of the top configurations
STATE_PREFIX = "experiment_state-"  # Ray Tune's experiment state files: what --resume restores
# Keys that locate the experiment: they are how its saved space was found, not part of the search.
_LOCATION_KEYS = ("experiment.name", "experiment.storage_path")


@dataclass(frozen=True)
class Experiment:
    """Where an experiment lives."""

    name: str
    storage_path: str  # absolute local folder or URI
    study_url: str | None  # SQLAlchemy URL of the Optuna study (None: grid, no study)

    @property
    def path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def is_local(self) -> bool:
        return not is_uri(self.storage_path)


def is_uri(path: str) -> bool:
    return "://" in path


def _fs(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def default_study_url(storage_path: str, name: str) -> str:
    """The study's SQLite URL when ``experiment.study_storage`` is not set (see module doc)."""
    if is_uri(storage_path):
        digest = hashlib.sha1(storage_path.rstrip("/").encode()).hexdigest()[:12]
        folder = cache_root() / "studies" / digest
    else:
        folder = Path(storage_path)
    return f"sqlite:///{folder.resolve() / (name + '.optuna.db')}"


def _absolute_sqlite(url: str) -> str:
    # sqlite:///relative.db is relative to the working directory: pin it to this one.
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            return f"sqlite:///{Path(path).expanduser().resolve()}"
    return url


def resolve(space: DesignSpace, study_storage: str | None = None) -> DesignSpace:
    """``space`` with an absolute storage path and its study's location filled in.

    ``study_storage`` is the location to use when the file sets none (a resume passes the one its
    experiment recorded).
    """
    exp = space.experiment
    storage = exp.storage_path
    if not is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    study = exp.study_storage or study_storage
    if study is None and space.search.sampler != "grid":
        study = default_study_url(storage, exp.name)
    if study is not None:
        study = _absolute_sqlite(study)
    update = {"storage_path": storage, "study_storage": study}
    return space.model_copy(update={"experiment": exp.model_copy(update=update)})


def locate(space: DesignSpace) -> Experiment:
    """The folder and study of ``space`` (resolved first)."""
    exp = resolve(space).experiment
    return Experiment(exp.name, exp.storage_path, exp.study_storage)


def scratch_key(exp: Experiment) -> str:
    """The experiment's scratch folder name on each node: its name and a hash of its path, so
    two experiments of one name (other storage paths) never share or delete each other's."""
    return f"{exp.name}-{hashlib.sha1(exp.path.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------
# The saved space


def canonical(space: DesignSpace) -> dict[str, Any]:
    """Every setting of ``space``, defaults included, with ``base`` as the trainer resolves it."""
    raw = space.model_dump(mode="json", by_alias=True)
    selection = {"train": {"selection_metric": space.objective.metric}}
    raw["base"] = build_config(merge(space.base, selection), "base").to_dict()
    return raw


def check_same(given: DesignSpace, saved: DesignSpace, where: str) -> None:
    """Refuse ``given`` unless it is the experiment's saved space (location keys aside)."""
    a, b = canonical(given), canonical(saved)
    for key in _LOCATION_KEYS:
        section, field = key.split(".")
        a[section][field] = b[section][field]
    key = first_difference(a, b)
    if key is not None:
        raise SpaceError(
            f"--resume: {key} is {lookup(a, key)!r} here but {lookup(b, key)!r} in {where}, "
            "the space this experiment ran; resume with `python -m mtl.search --resume "
            f"{where.rsplit('/', 1)[0]}` (no file, no --set) or start a new experiment"
        )


def match_saved(space: DesignSpace) -> DesignSpace:
    """``space`` resolved with its experiment's recorded study, if it is the experiment's saved
    space; raises :class:`SpaceError` naming the first differing key otherwise."""
    found = locate(space)
    saved = read_saved(found.path)
    if saved is None:
        if _has_state(found):
            log.warning("%s has no %s (an older experiment): not compared", found.path, SPACE_FILE)
        return space
    space = resolve(space, saved.experiment.study_storage)
    check_same(space, saved, f"{found.path}/{SPACE_FILE}")
    return space


def _read(path: str, fs: pyarrow.fs.FileSystem | None = None) -> str | None:
    fs, root = _fs(path) if fs is None else (fs, path)
    try:
        with fs.open_input_stream(root) as f:
            return f.readall().decode()
    except (FileNotFoundError, OSError):
        return None


def _yaml(text: str, where: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise SpaceError(f"{where}:{line} invalid YAML") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: expected a mapping at the top level")
    return raw


def read_saved(exp_path: str) -> DesignSpace | None:
    """The space saved in the experiment folder (None: none saved)."""
    where = f"{exp_path.rstrip('/')}/{SPACE_FILE}"
    text = _read(where)
    if text is None:
        return None
    return parse_space(_yaml(text, where), where)


def load_saved(exp_dir: str, overrides: list[str] | None = None) -> DesignSpace:
    """The space of the experiment in ``exp_dir`` (with ``--set`` ``overrides``), located where the
    folder is now."""
    exp_dir = exp_dir.rstrip("/")
    if not is_uri(exp_dir):
        exp_dir = str(Path(exp_dir).expanduser().resolve())
    where = f"{exp_dir}/{SPACE_FILE}"
    text = _read(where)
    if text is None:
        raise SpaceError(f"{exp_dir}: no {SPACE_FILE}; resume it with its design-space file")
    raw = _yaml(text, where)
    if overrides:
        try:
            raw = apply_overrides(raw, overrides)
        except ConfigError as err:
            raise SpaceError(str(err)) from None
        where += " (with --set)"
    saved = parse_space(raw, where)
    storage, name = exp_dir.rsplit("/", 1)
    if name != saved.experiment.name:
        raise SpaceError(
            f"{exp_dir}/{SPACE_FILE}: experiment.name is {saved.experiment.name!r}, not the "
            f"folder's name {name!r}"
        )
    update = {"storage_path": storage or "/"}
    return saved.model_copy(update={"experiment": saved.experiment.model_copy(update=update)})


def write_saved(space: DesignSpace, exp: Experiment) -> None:
    fs, root = _fs(exp.path)
    fs.create_dir(root, recursive=True)
    text = yaml.safe_dump(canonical(space), sort_keys=False)
    with fs.open_output_stream(f"{root}/{SPACE_FILE}") as f:
        f.write(text.encode())


def study_urls(exp_dir: str | Path, saved: DesignSpace | None) -> list[str]:
    """Where the study of the experiment folder ``exp_dir`` may be, most likely first.

    The location its saved space recorded (``experiment.study_storage``), then
    ``<name>.optuna.db`` beside the folder (:func:`default_study_url`): where the search keeps it,
    and where a folder copied off its machine finds the copy of its study.
    """
    path = Path(exp_dir)
    urls = [saved.experiment.study_storage] if saved and saved.experiment.study_storage else []
    beside = default_study_url(str(path.parent), path.name)
    return urls if beside in urls else [*urls, beside]


# ---------------------------------------------------------------------------------------------
# A trial's reports


def read_reports(trial_path: str, fs: pyarrow.fs.FileSystem | None = None) -> list[dict[str, Any]]:
    """Every report a trial made, in order, from its ``result.json``.

    ``trial_path``: the trial folder, a local path or URI, or a path in ``fs`` (Ray's
    ``trial.storage.storage_filesystem`` with ``trial.path``).

    One JSON object a line, as Ray Tune appends them: a retried trial's reports follow its first
    attempt's, so an evaluation may appear twice. A line cut by a crash (the last one, unparsable)
    is left out; no file is no report.
    """
    text = _read(f"{trial_path.rstrip('/')}/{REPORTS_FILE}", fs)
    reports = []
    for line in (text or "").splitlines():
        try:
            report = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict):
            reports.append(report)
    return reports


def evaluations(reports: list[dict[str, Any]]) -> pd.DataFrame:
    """The reports that carry an evaluation (the trainer's ``evaluation`` key), one row per
    evaluation in order: a retried trial's later report of an evaluation replaces the earlier.
    Columns: every key the reports hold (nested ones as ``a/b``), ``evaluation`` as int."""
    rows = [r for r in reports if r.get("evaluation") is not None]
    frame = pd.json_normalize(rows, sep="/") if rows else pd.DataFrame(columns=["evaluation"])
    frame["evaluation"] = frame["evaluation"].astype(int)
    return (
        frame.drop_duplicates("evaluation", keep="last")
        .sort_values("evaluation", kind="stable")
        .reset_index(drop=True)
    )


# ---------------------------------------------------------------------------------------------
# Starting, resuming, overwriting


def study_exists(url: str | None, name: str) -> bool:
    if url is None:
        return False
    try:
        names = optuna.study.get_all_study_names(storage=url)
    except Exception:  # no database yet
        return False
    return name in names


def _folder_exists(exp: Experiment) -> bool:
    fs, root = _fs(exp.path)
    return fs.get_file_info(root).type != pyarrow.fs.FileType.NotFound


def _has_state(exp: Experiment) -> bool:
    fs, root = _fs(exp.path)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root))
    except (FileNotFoundError, OSError):
        return False
    return any(Path(i.path).name.startswith(STATE_PREFIX) for i in infos)


def remove(exp: Experiment) -> None:
    """Delete the experiment folder (local or URI), its seed repeats' folder and its study."""
    for path in (exp.path, exp.path + REPEATS_SUFFIX):
        fs, root = _fs(path)
        if fs.get_file_info(root).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(root)
    if study_exists(exp.study_url, exp.name):
        optuna.delete_study(study_name=exp.name, storage=exp.study_url)


def _orphan(exp: Experiment) -> SpaceError:
    return SpaceError(
        f"experiment.name: the study {exp.name!r} in {exp.study_url} has no experiment folder "
        f"{exp.path} (deleted?); pass --overwrite to delete the study and start afresh, "
        "or choose another experiment.name"
    )


RESTORE, NEW, REPLACE = "restore", "new", "replace"  # what start() does with an experiment


def plan(exp: Experiment, *, resume: bool, overwrite: bool) -> str:
    """What to do with what exists of the experiment, or a one-line refusal; changes nothing.

    ``overwrite`` (also ``--smoke``) replaces the folder and the study. ``resume`` restores the
    experiment; one that stopped before Ray Tune saved any trial (no ``experiment_state-*`` file,
    perhaps only ``tuner.pkl``) is replaced by a fresh run of its saved space, since Ray Tune would
    restore it as a one-trial experiment.

    Raises:
        SpaceError: ``--resume`` without an experiment, an existing experiment without
            ``--resume``, or a study whose folder is gone (both name ``--overwrite``).
    """
    if overwrite:
        return REPLACE
    if resume:
        if _has_state(exp):
            return RESTORE
        if _folder_exists(exp):
            print(f"{exp.path}: the first run stopped before any trial was saved; starting afresh")
            return REPLACE
        if study_exists(exp.study_url, exp.name):
            raise _orphan(exp)
        raise SpaceError(f"--resume: no experiment to resume at {exp.path}")
    if _folder_exists(exp):
        raise SpaceError(
            f"experiment.name: {exp.path} already exists; pass --resume to continue it, "
            "--overwrite to delete it and start afresh, or choose another name"
        )
    if study_exists(exp.study_url, exp.name):
        raise _orphan(exp)
    return NEW


def start(space: DesignSpace, exp: Experiment, action: str) -> None:
    """Carry out :func:`plan`'s ``action``: save the space of a new run before its first trial."""
    if exp.is_local:
        Path(exp.storage_path).mkdir(parents=True, exist_ok=True)
    if exp.study_url and exp.study_url.startswith("sqlite:///"):
        Path(exp.study_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if action == REPLACE:
        remove(exp)
    if action != RESTORE:
        write_saved(space, exp)
