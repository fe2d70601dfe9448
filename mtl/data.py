"""Readers, validation, download, tokenization and batching for the CS224N multitask data.

The three tasks (SST-5 sentiment, Quora paraphrase, STS similarity) come as tab-separated files
with a header, a leading unnamed index column, then ``id`` and the task's columns. The csv module
parses them (any line ending, quoted line breaks), and each reader validates every row itself:
a train or dev row that cannot be used is skipped and counted by reason in a
:class:`SkipReport`, never dropped silently and never a crash (the course starter's habit); a
test row that cannot be used, or a split with no usable row, stops with a :class:`DataError`
naming the file and line.

Batches are single-task and padded to the longest sequence in the batch. Training batches are
length-bucketed (:func:`batch_order`), so examples of similar length share a batch and little
compute is spent on padding.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import requests
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from mtl.cache import atomic_write, cache_root, exclusive, sha256_file
from mtl.tasks import BUILTIN, SPLITS, STAGE1_TASK, Task, as_task, configured

if TYPE_CHECKING:
    from mtl.config import DataConfig

logger = logging.getLogger("mtl.data")
# A split as read or as tokenized (see take).
_Split = TypeVar("_Split", "RawSplit", "Encoded")

# A byte that is not UTF-8, as ``errors="surrogateescape"`` decodes it.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
# Line numbers kept per skip reason, for the report.
_MAX_EXAMPLES = 5
# Batches per bucket: a bucket of batch_size * 50 shuffled examples is sorted by length.
BUCKET_BATCHES = 50

# The published data: github.com/gpoesia/minbert-default-final-project, folder data/.
DATA_COMMIT = "7ac8260577fc12a86c7aaf38918056c30054ef39"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project"
# sha256 of the published files that we hold a copy of (shared/data/cs224n-original).
SHA256: dict[str, str] = {
    "ids-sst-train.csv": "03b2b625c090f94a6afd59f114cde5282e2053aab0b101e87ed695d8a0c5b1df",
    "ids-sst-dev.csv": "a186ce94577635fbe10beaaddd50f16cccf6c30973221cefdf90deed2a584bfe",
    "ids-sst-test-student.csv": "bdd5a767faa0c26782117e37767ece154c30d5d04fb8727d09c71e3850a55c7b",
    "quora-dev.csv": "bfa3cc954a9ba300ae776a980141de65f622a3c1b97e3fd905d63245bc36d5ad",
    "sts-train.csv": "15d12efc2d656fffb1d61ac1f08ec4227f43925fd16f420c037cbd063699c21b",
    "sts-dev.csv": "ce3cad6f16062586ac7ba462c28b010a9be10c530fd5074165860d7b7ab4e93d",
    "sts-test-student.csv": "dee455745b72e9ca3ff74e7c056bd73e34bad5b8d5641045a2c1e7e131866f47",
}
# Files without a known checksum are checked for their header columns and a plausible number of
# data rows (lines after the header). The published sizes are 141,506 and 40,431 pairs.
MIN_ROWS: dict[str, int] = {"quora-train.csv": 100_000, "quora-test-student.csv": 30_000}
# The published files: every split of every built-in task.
DATA_FILES: tuple[str, ...] = tuple(
    name for task in BUILTIN.values() for split in SPLITS if (name := task.file(split))
)


class DataError(ValueError):
    """A problem with the data files: the message is one line naming the file (and column/row)."""


@dataclass
class SkipReport:
    """Rows a reader skipped, per reason.

    Attributes:
        file: File name, e.g. ``quora-train.csv``.
        rows: Rows read after the header (kept + skipped).
        skipped: Reason -> count, e.g. ``{"empty label": 2}``.
        examples: Reason -> the first few 1-based file line numbers (the header is line 1).
        duplicate_ids: Kept rows whose id an earlier row of the file already had.
        duplicate_examples: The first few of those as (line, line of the earlier row).
    """

    file: str
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)
    duplicate_ids: int = 0
    duplicate_examples: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_skipped(self) -> int:
        """Number of rows skipped for any reason."""
        return sum(self.skipped.values())

    def add(self, reason: str, line: int) -> None:
        """Count one skipped row."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        lines = self.examples.setdefault(reason, [])
        if len(lines) < _MAX_EXAMPLES:
            lines.append(line)

    def add_duplicate(self, line: int, first: int) -> None:
        """Count one kept row whose id already appeared at line ``first``."""
        self.duplicate_ids += 1
        if len(self.duplicate_examples) < _MAX_EXAMPLES:
            self.duplicate_examples.append((line, first))

    def duplicates_warning(self) -> str | None:
        """One line on the repeated ids, or None when every id is unique."""
        if not self.duplicate_ids:
            return None
        where = ", ".join(f"line {a} repeats line {b}" for a, b in self.duplicate_examples)
        more = ", ..." if self.duplicate_ids > len(self.duplicate_examples) else ""
        n = self.duplicate_ids
        return (
            f"{self.file}: {n} row{'s' if n > 1 else ''} repeat an earlier row's id "
            f"({where}{more}); predictions for a repeated id are ambiguous to a grader"
        )

    def to_dict(self) -> dict[str, Any]:
        """The report for ``data_report.json``."""
        return {
            "file": self.file,
            "rows": self.rows,
            "skipped": self.skipped,
            "duplicate_ids": self.duplicate_ids,
        }

    def __str__(self) -> str:
        head = f"{self.file}: skipped {self.total_skipped} of {self.rows} rows"
        if not self.skipped:
            return head
        parts = []
        for reason, count in self.skipped.items():
            lines = self.examples.get(reason, [])
            where = ", ".join(str(n) for n in lines) + (", ..." if count > len(lines) else "")
            parts.append(f"{reason}: {count} at line{'s' if count > 1 else ''} {where}")
        return f"{head} ({'; '.join(parts)})"


@dataclass
class RawSplit:
    """One task's split as read from disk, validated.

    Attributes:
        task: The task's name (:attr:`mtl.tasks.Task.name`), e.g. ``sst``.
        split: ``train``, ``dev`` or ``test``.
        ids: Example ids, in file order.
        text_a: First (or only) sentence, whitespace-stripped.
        text_b: Second sentence for pairs; None for a single sentence.
        labels: As :meth:`mtl.tasks.Task.parse_label` returns them (sst: int 0..4; para: float
            0.0/1.0; sts: float 0..5); None for test.
        report: What the reader skipped.
    """

    task: str
    split: str
    ids: list[str]
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float] | None
    report: SkipReport

    def __len__(self) -> int:
        return len(self.ids)


def split_file(task: Task | str, split: str) -> str:
    """File name of a task's split, e.g. ``quora-test-student.csv`` for Quora's test split.

    Raises:
        ValueError: an unknown split, or a split the task has no file for.
    """
    task = as_task(task)
    name = task.file(split)
    if name is None:
        raise ValueError(f"task {task.name} has no {split} file")
    return name


def _required_columns(task: Task, split: str) -> tuple[str, ...]:
    return task.columns(split)


def _unquote(text: str) -> str:
    """Undo one extra level of csv quoting, only when the field is well-formed for it."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"').strip()
    return text


def _records(path: Path) -> Iterator[tuple[int, int, list[str]]]:
    """Yield ``(first line, last line, fields)`` per record of a tab-separated file, header first.

    The csv module does the parsing: it accepts LF, CRLF and bare-CR line endings and reads a
    quoted field that holds a line break as one record (numbered by the line it starts on).
    Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) so that a bad
    row is found and reported by itself, not by failing the whole file; see :func:`_not_utf8`.
    """
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        start = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataError(f"{path}: line {start}: cannot be parsed ({err})") from None
            yield start, reader.line_num, row
            start = reader.line_num + 1


def _not_utf8(row: list[str]) -> bool:
    return any(_UNDECODABLE.search(value) for value in row)


def _header(path: Path, records: Iterator[tuple[int, int, list[str]]]) -> list[str]:
    first = next(records, None)
    if first is None or not "".join(first[2]).strip():
        raise DataError(f"{path}: empty file or empty header line")
    if _not_utf8(first[2]):
        raise DataError(f"{path}: header line is not UTF-8")
    return first[2]


def _read_header(path: Path) -> list[str]:
    with contextlib.closing(_records(path)) as records:
        return _header(path, records)


def _locate_columns(path: Path, header: list[str], task: Task, split: str) -> dict[str, int]:
    names = [name.strip() for name in header]
    where = {}
    for column in _required_columns(task, split):
        if column not in names:
            raise DataError(f"{path}: missing column {column!r} (header: {names})")
        where[column] = names.index(column)
    return where


def read_split(data_dir: Path, task: Task | str, split: str) -> RawSplit:
    """Read and validate one split.

    The csv module parses the file (tab-separated; LF, CRLF or bare-CR line endings; a quoted
    field may hold tabs, quotes and line breaks). Columns are located by header name. A row is
    unusable when it is a blank line, is not UTF-8, has a column count other than the header's,
    has an empty id, or (train/dev) has an empty label, a label that is not a number, or a label
    out of range (:meth:`mtl.tasks.Task.parse_label`; sst: an integer 0..4, para: 0 or 1, sts:
    0..5). In train and dev such a row is
    skipped and counted by reason; in test only a blank line may be skipped, since a submission
    must cover every test id. Sentences are whitespace-stripped and may be empty; Quora's
    sentences are unquoted once more (:attr:`mtl.tasks.Task.quoted_twice`). Ids that repeat an earlier row's
    id are kept and counted in the report (:meth:`SkipReport.duplicates_warning`).

    Args:
        data_dir: Folder with the csv files.
        task: The task (or a built-in task's name: ``sst``, ``para`` or ``sts``).
        split: ``train``, ``dev`` or ``test`` (the ``*-test-student.csv`` file).

    Returns:
        The validated split with its :class:`SkipReport`.

    Raises:
        DataError: The file is missing, has no header, lacks a required column, has no data
            row, has no usable row, or (test) has a row that is unusable; the message names the
            file (and the line and reason).
    """
    task = as_task(task)
    path = Path(data_dir) / split_file(task, split)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with contextlib.closing(_records(path)) as records:
        header = _header(path, records)
        cols = _locate_columns(path, header, task, split)
        report, ids, texts, labels = _read_rows(path, records, header, cols, task, split)
    if report.rows == 0:
        raise DataError(f"{path}: no data rows after the header")
    if not ids and split != "test":
        raise DataError(f"{path}: no usable row: {report}")
    return RawSplit(
        task=task.name,
        split=split,
        ids=ids,
        text_a=texts[0],
        text_b=texts[1] if len(texts) > 1 else None,
        labels=labels,
        report=report,
    )


def _read_rows(
    path: Path,
    records: Iterator[tuple[int, int, list[str]]],
    header: list[str],
    cols: dict[str, int],
    task: Task,
    split: str,
) -> tuple[SkipReport, list[str], list[list[str]], list[Any] | None]:
    text_cols = [cols[c] for c in task.text_columns]
    label_col = cols.get(task.label_column)
    unquote = task.quoted_twice

    report = SkipReport(file=path.name)
    ids: list[str] = []
    first_line: dict[str, int] = {}
    texts: list[list[str]] = [[] for _ in text_cols]
    labels: list[Any] = []
    for lineno, last, row in records:
        report.rows += 1
        reason = _unusable(row, len(header), cols[task.id_column], multiline=last > lineno)
        label = None
        if reason is None and label_col is not None:
            label, reason = task.parse_label(row[label_col])
        if reason is not None:
            if split == "test" and reason != "blank line":
                raise DataError(
                    f"{path}: line {lineno}: {reason}; a test row cannot be skipped, since the "
                    "submission must hold a prediction for every test id"
                )
            report.add(reason, lineno)
            continue
        example_id = row[cols[task.id_column]].strip()
        if example_id in first_line:
            report.add_duplicate(lineno, first_line[example_id])
        else:
            first_line[example_id] = lineno
        if label_col is not None:
            labels.append(label)
        ids.append(example_id)
        for out, col in zip(texts, text_cols, strict=True):
            text = row[col].strip()
            out.append(_unquote(text) if unquote else text)
    return report, ids, texts, labels if label_col is not None else None


def _unusable(row: list[str], columns: int, id_col: int, multiline: bool) -> str | None:
    """Why a parsed row cannot be used whatever the split, or None."""
    if not row or not "".join(row).strip():
        return "blank line"
    if _not_utf8(row):
        return "not UTF-8"
    if len(row) != columns:
        # A quote that opens a field and never closes makes the csv module read on over the
        # following lines: name that likely cause, at the line where the record starts.
        if multiline:
            return "wrong column count over several lines (unclosed quote?)"
        return "wrong column count"
    if not row[id_col].strip():
        return "empty id"
    return None


def take(split: _Split, keep: Sequence[int]) -> _Split:
    """The examples of ``split`` at positions ``keep``, in that order: the one way to take a
    subset of a split, read (:class:`RawSplit`) or tokenized (:class:`Encoded`). Every
    per-example field (a list or a tensor) is picked; the rest (task, split, report) is kept.

    Used by :func:`subsample` and by the contrastive stage's pairs (:mod:`mtl.contrastive`:
    stage 1's share of the run's Quora pairs, and stage 2's training split without them).
    """
    index = torch.as_tensor(list(keep), dtype=torch.long)
    picked: dict[str, Any] = {}
    for f in fields(split):
        value = getattr(split, f.name)
        if isinstance(value, list):
            picked[f.name] = [value[i] for i in keep]
        elif isinstance(value, torch.Tensor):
            picked[f.name] = value[index]
    return replace(split, **picked)


# The dev and test subsamples (``data.max_eval_examples``) do not depend on the run's seed.
EVAL_SUBSAMPLE_SEED = 0


def subsample(raw: RawSplit, n: int | None, seed: int) -> RawSplit:
    """Deterministic subsample of ``n`` examples, kept in file order (built on :func:`take`).

    The training policy (seeded by the run); :func:`eval_subsample` is the dev and test one.

    Args:
        raw: The split.
        n: Examples to keep; None or at least ``len(raw)`` returns ``raw`` unchanged.
        seed: Seeds the choice (a ``torch.Generator``).

    Returns:
        A split with ``min(n, len(raw))`` examples and the same report.
    """
    if n is None or n >= len(raw):
        return raw
    if n < 0:
        raise ValueError(f"subsample size must be >= 0, got {n}")
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(raw), generator=gen)[:n].sort().values.tolist()
    return take(raw, keep)


def eval_subsample(raw: RawSplit, n: int | None) -> RawSplit:
    """The dev or test subsample of ``n`` examples that every run is scored on, whatever its
    seed (:func:`subsample` with :data:`EVAL_SUBSAMPLE_SEED`): runs under different seeds, the
    ensemble of their checkpoints and the Hugging Face baseline see the same examples.
    """
    return subsample(raw, n, EVAL_SUBSAMPLE_SEED)


# --------------------------------------------------------------------------- download


def default_cache_dir() -> Path:
    """``<cache root>/data/<commit[:8]>`` (:func:`mtl.cache.cache_root`)."""
    return cache_root() / "data" / DATA_COMMIT[:8]


def _task_split_of(name: str) -> tuple[Task, str]:
    for task in BUILTIN.values():
        for split in SPLITS:
            if task.file(split) == name:
                return task, split
    raise ValueError(f"not a data file: {name}")


def _check_file(path: Path, name: str, min_rows: Mapping[str, int]) -> str | None:
    """Why the file at ``path`` is not a valid copy of ``name``, or None when it is."""
    if name in SHA256:
        got = sha256_file(path)
        if got != SHA256[name]:
            return f"sha256 mismatch (expected {SHA256[name]}, got {got})"
        return None
    task, split = _task_split_of(name)
    try:
        _locate_columns(path, _read_header(path), task, split)
        with contextlib.closing(_records(path)) as records:
            rows = sum(1 for _ in records) - 1
    except DataError as err:
        return str(err).removeprefix(f"{path}: ")
    need = min_rows.get(name, 1)
    if rows < need:
        return f"only {rows} data rows, expected at least {need}"
    return None


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` into ``dest`` (a temporary name), with a progress bar."""
    try:
        with requests.get(url, stream=True, timeout=timeout) as resp:
            resp.raise_for_status()
            total = int(resp.headers.get("Content-Length", 0)) or None
            with (
                dest.open("wb") as fh,
                tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name
                ) as bar,
            ):
                for chunk in resp.iter_content(chunk_size=1 << 16):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as err:
        dest.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed: {err}") from None


def download_data(
    cache_dir: Path | None = None,
    base_url: str = DEFAULT_BASE_URL,
    *,
    min_rows: Mapping[str, int] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download the published data once into a cache folder and verify every file.

    Files come from ``{base_url}/{DATA_COMMIT}/data/{name}``. Files already in the cache and valid
    are not downloaded again. Each download streams into a temporary name and is renamed into
    place only once verified: against its pinned sha256 (:data:`SHA256`) where we know it, else
    (``quora-train.csv``, ``quora-test-student.csv``) by its header columns and a minimum number of
    data rows (:data:`MIN_ROWS`).

    Args:
        cache_dir: Destination folder; None: :func:`default_cache_dir`.
        base_url: Repository root to download from (tests point it at a local server).
        min_rows: Overrides :data:`MIN_ROWS` for the files checked by row count.
        timeout: Seconds to wait for the server (connect and between bytes).

    Returns:
        The folder holding all the files.

    Raises:
        DataError: A download failed or a downloaded file failed verification (it is not kept).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    rows_needed = {**MIN_ROWS, **(min_rows or {})}
    for name in DATA_FILES:
        dest = folder / name
        if dest.is_file():
            problem = _check_file(dest, name, rows_needed)
            if problem is None:
                continue
            logger.warning("%s: cached copy is invalid (%s); downloading again", dest, problem)
        url = f"{base_url.rstrip('/')}/{DATA_COMMIT}/data/{name}"

        def fetch_checked(tmp: Path, url: str = url, name: str = name) -> None:
            _fetch(url, tmp, timeout)
            problem = _check_file(tmp, name, rows_needed)
            if problem is not None:
                raise DataError(f"{name}: {problem}; downloaded from {url}, not kept")

        atomic_write(dest, fetch_checked)
        logger.info("downloaded %s", dest)
    return folder


def local_copy_problem(folder: Path) -> str | None:
    """Why ``folder`` does not hold a usable copy of the data, or None when it does.

    Usable is what training reads: every task's train and dev file, each with its columns (the
    readers' own header check); test files are optional (no test predictions without them) but
    checked when present. Unlike :func:`download_data`'s checks, neither the published checksums
    nor its row counts are asked for, so a local copy or subset of the data passes.
    """
    folder = Path(folder)
    for task in BUILTIN.values():
        for split in SPLITS:
            path = folder / split_file(task, split)
            if not path.is_file():
                if split == "test":
                    continue
                return f"{path}: no such file"
            try:
                _locate_columns(path, _read_header(path), task, split)
            except DataError as err:
                return str(err)
    return None


def ensure_data(
    folder: Path,
    base_url: str = DEFAULT_BASE_URL,
    *,
    min_rows: Mapping[str, int] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Keep a usable copy of the data in ``folder``, else download the published data into it.

    For cluster setup: a folder someone filled (a copy from another machine, a subset) is used as
    it is, so a node without internet sets up; only when a file that training reads is missing or
    lacks its columns is :func:`download_data` called, which verifies and fills the folder.

    Args:
        folder: The data folder (``MTL_DATA_DIR`` of the cluster).
        base_url: As for :func:`download_data`.
        min_rows: As for :func:`download_data`.
        timeout: As for :func:`download_data`.

    Returns:
        ``folder``.

    Raises:
        DataError: The folder is not usable and the download failed.
    """
    folder = Path(folder)
    problem = local_copy_problem(folder)
    if problem is None:
        logger.info("%s: a usable copy of the data is there; nothing downloaded", folder)
        return folder
    logger.info("%s; downloading the published data", problem)
    return download_data(folder, base_url, min_rows=min_rows, timeout=timeout)


def resolve_data_dir(data_dir: str | None) -> Path:
    """The data folder: the config value, else ``$MTL_DATA_DIR``, else :func:`download_data`.

    Raises:
        DataError: The configured or environment folder does not exist.
    """
    if data_dir is not None:
        path, source = Path(data_dir).expanduser(), "data.data_dir"
    elif os.environ.get("MTL_DATA_DIR"):
        path, source = Path(os.environ["MTL_DATA_DIR"]).expanduser(), "$MTL_DATA_DIR"
    else:
        return download_data()
    if not path.is_dir():
        raise DataError(f"{source}: {path}: no such folder")
    return path


# --------------------------------------------------------------------------- tokenize and batch


@dataclass
class Encoded:
    """A tokenized split; sequences are unpadded 1-D long tensors.

    Attributes:
        task: The task's name.
        split: ``train``, ``dev`` or ``test``.
        ids: Example ids.
        labels: (n,) long for int labels (sst), float32 for float ones (para, sts); None for
            test.
        input_ids: Per example ``[CLS] a [SEP]`` (one sentence, design 1) or ``[CLS] a [SEP] b [SEP]``
            (design 2 pairs).
        token_type_ids: Design 2 pairs only (0 for a, 1 for b); None means all zeros.
        input_ids_b: Design 1 pairs only: ``[CLS] b [SEP]``.
        lengths: (n,) long: max(len(a), len(b)) per example, for bucketing.
    """

    task: str
    split: str
    ids: list[str]
    labels: torch.Tensor | None
    input_ids: list[torch.Tensor]
    token_type_ids: list[torch.Tensor] | None
    input_ids_b: list[torch.Tensor] | None
    lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def _sequences(rows: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example 1-D long tensors (views into one buffer, as :meth:`Sequences.tensors` gives
    them) and their lengths ``(n,)``: one conversion for the split, not one per example."""
    sizes = [len(row) for row in rows]
    flat = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    return list(flat.split(sizes)), torch.tensor(sizes, dtype=torch.long)


@contextlib.contextmanager
def _truncating(tokenizer: Any, max_length: int) -> Iterator[Any]:
    """The fast tokenizer's Rust backend, set as ``tokenizer(..., truncation=True,
    max_length=max_length)`` sets it (longest-first truncation, no padding, special tokens in
    the text read as text unless ``split_special_tokens`` says otherwise); the backend's own
    settings are restored afterwards, so a later plain call of the tokenizer is not truncated."""
    backend = tokenizer.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    special = backend.encode_special_tokens
    backend.enable_truncation(
        max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side
    )
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    try:
        yield backend
    finally:
        if truncation is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)
        backend.encode_special_tokens = special


def encode(raw: RawSplit, tokenizer: Any, max_length: int, design: int) -> Encoded:
    """Batch-tokenize a split with a fast tokenizer (one call per column, truncated).

    The token ids are those of ``tokenizer(raw.text_a, raw.text_b, truncation=True,
    max_length=max_length)``; the batch goes straight to the Rust backend
    (``encode_batch_fast``, which uses the ``tokenizers`` thread pool unless
    ``TOKENIZERS_PARALLELISM`` is false) and skips transformers' conversion of every example
    into Python dicts: 1.9 instead of 2.9 CPU seconds for all the CS224N training data
    (benchmarks/RESULTS_search.md).

    Args:
        raw: The split.
        tokenizer: A Hugging Face (fast) BERT tokenizer; it adds ``[CLS]`` and ``[SEP]``.
        max_length: Tokens per sequence after truncation, special tokens included; a design 2
            pair counts both sentences (longest-first truncation).
        design: 1: each sentence of a pair encoded on its own; 2: the pair encoded jointly.

    Returns:
        The :class:`Encoded` split.
    """
    if design not in (1, 2):
        raise ValueError(f"design must be 1 or 2, got {design}")
    token_type_ids = input_ids_b = None
    with _truncating(tokenizer, max_length) as backend:
        batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # tokenizers < 0.20
        if raw.text_b is not None and design == 2:
            pairs = batch(list(zip(raw.text_a, raw.text_b, strict=True)))
            input_ids, lengths = _sequences([e.ids for e in pairs])
            token_type_ids, _ = _sequences([e.type_ids for e in pairs])
        else:
            input_ids, lengths = _sequences([e.ids for e in batch(raw.text_a)])
            if raw.text_b is not None:
                input_ids_b, lengths_b = _sequences([e.ids for e in batch(raw.text_b)])
                lengths = torch.maximum(lengths, lengths_b)
    labels = None
    if raw.labels is not None:
        # The task's parse_label returns ints for a class per logit (cross-entropy wants long).
        classes = bool(raw.labels) and isinstance(raw.labels[0], int)
        labels = torch.tensor(raw.labels, dtype=torch.long if classes else torch.float32)
    return Encoded(
        task=raw.task,
        split=raw.split,
        ids=list(raw.ids),
        labels=labels,
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        input_ids_b=input_ids_b,
        lengths=lengths,
    )


@dataclass
class Batch:
    """One single-task batch, padded to the longest sequence in the batch.

    Attributes:
        task: The task's name (the key of its head and PALs).
        index: (B,) positions of the examples in the :class:`Encoded` split.
        input_ids: (B, L), padded with 0.
        attention_mask: (B, L) long, 1 for tokens, 0 for padding.
        token_type_ids: (B, L) for design 2 pairs, else None.
        input_ids_b: (B, Lb) for design 1 pairs, else None.
        attention_mask_b: (B, Lb) for design 1 pairs, else None.
        labels: (B,) or None for test.
    """

    task: str
    index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    input_ids_b: torch.Tensor | None = None
    attention_mask_b: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """Copy every tensor to ``device`` (non-blocking)."""
        moved = {
            f.name: value.to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def __len__(self) -> int:
        return self.index.numel()


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    padded = pad_sequence(seqs, batch_first=True, padding_value=0)  # (B, L)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = (torch.arange(padded.shape[1]) < lengths[:, None]).long()  # (B, L)
    return padded, mask


def collate(enc: Encoded, indices: Sequence[int]) -> Batch:
    """Gather examples ``indices`` of ``enc`` into a :class:`Batch`.

    Args:
        enc: The encoded split.
        indices: Positions in ``enc`` (at least one).

    Returns:
        The batch, padded to its own longest sequence.
    """
    if len(indices) == 0:
        raise ValueError("collate needs at least one index")
    index = torch.as_tensor(list(indices), dtype=torch.long)
    positions = index.tolist()
    input_ids, attention_mask = _pad([enc.input_ids[i] for i in positions])
    token_type_ids = input_ids_b = attention_mask_b = None
    if enc.token_type_ids is not None:
        token_type_ids, _ = _pad([enc.token_type_ids[i] for i in positions])
    if enc.input_ids_b is not None:
        input_ids_b, attention_mask_b = _pad([enc.input_ids_b[i] for i in positions])
    return Batch(
        task=enc.task,
        index=index,
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        input_ids_b=input_ids_b,
        attention_mask_b=attention_mask_b,
        labels=None if enc.labels is None else enc.labels[index],
    )


def batch_order(
    lengths: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    bucket: bool = True,
) -> list[list[int]]:
    """Split example positions into batches; every index appears exactly once.

    Training (``generator`` given): with ``bucket``, shuffle all indices, cut them into buckets
    of ``batch_size * BUCKET_BATCHES``, sort each bucket by length, cut it into batches, and
    shuffle the order of all batches; without ``bucket``, uniformly shuffled batches.
    Evaluation (``generator`` None): indices sorted by length, then cut into batches (``bucket``
    is ignored); map predictions back through :attr:`Batch.index`.

    Args:
        lengths: (n,) sequence lengths.
        batch_size: Examples per batch; one batch may be smaller: the last one, except in
            bucketed training, where the batch order is shuffled.
        generator: Random state for training; None for evaluation order.
        bucket: Length-bucketed training batches.

    Returns:
        Lists of positions, one per batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    lengths = torch.as_tensor(lengths)
    n = lengths.numel()
    if n == 0:
        return []
    if generator is None:
        order = torch.sort(lengths, stable=True).indices
        return [chunk.tolist() for chunk in order.split(batch_size)]
    perm = torch.randperm(n, generator=generator)
    if not bucket:
        return [chunk.tolist() for chunk in perm.split(batch_size)]
    batches: list[list[int]] = []
    for chunk in perm.split(batch_size * BUCKET_BATCHES):
        by_length = chunk[torch.sort(lengths[chunk], stable=True).indices]
        batches.extend(b.tolist() for b in by_length.split(batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


# --------------------------------------------------------------------------- everything at once


@dataclass
class TaskData:
    """Encoded train/dev/test splits for the configured tasks.

    Attributes:
        train: Task -> encoded training split.
        dev: Task -> encoded dev split.
        test: Task -> encoded test split, only for tasks whose test file exists.
        reports: One :class:`SkipReport` per file read.
        missing: Names of absent test files, e.g. ``quora-test-student.csv``.
        test_rows: Task -> rows of its test file, before any subsample: fewer in
            :attr:`test` means its test predictions are not a whole submission.
        data_dir: The folder the files were read from (resolved once, :func:`resolve_data_dir`),
            for whatever else of the run reads it (stage 1).
        raw_train: Task -> training split as read and subsampled, before tokenizing, for the one
            task another stage tokenizes its own way: stage 1's Quora pairs
            (:data:`mtl.tasks.STAGE1_TASK`, design 1 at ``contrastive.max_length``), so that a
            run reads Quora's training file once. Only that task: its text is about 350 bytes a
            pair in the heap, 48 MB for all 141,506 published pairs (benchmarks/RESULTS_data.md).
    """

    train: dict[str, Encoded]
    dev: dict[str, Encoded]
    test: dict[str, Encoded]
    reports: list[SkipReport]
    missing: list[str]
    test_rows: dict[str, int] = field(default_factory=dict)
    data_dir: Path | None = None
    raw_train: dict[str, RawSplit] = field(default_factory=dict)


def load_task_data(
    cfg: DataConfig,
    tokenizer: Any,
    design: int,
    seed: int,
    *,
    data_dir: Path | None = None,
) -> TaskData:
    """Read, validate, subsample and encode every split of ``cfg.tasks``.

    Training splits are subsampled to ``cfg.max_train_examples`` (the stage-1 task's is also
    kept untokenized, :attr:`TaskData.raw_train`); dev and test splits are
    subsampled to ``cfg.max_eval_examples`` with the fixed seed :data:`EVAL_SUBSAMPLE_SEED`, so runs
    under different seeds are scored on the same dev examples (their spread is training noise
    only, and paired comparisons see every example on both sides). Every report that skipped rows,
    and the list of absent test files, is logged as a warning on the ``mtl.data`` logger.

    Args:
        cfg: The data section of the config.
        tokenizer: A Hugging Face fast tokenizer.
        design: 1 or 2 (see :func:`encode`).
        seed: Seeds the training subsamples.
        data_dir: ``cfg.data_dir`` already resolved (None: resolved here).

    Returns:
        The encoded splits, reports and missing test files.

    Raises:
        DataError: A train or dev file is missing or lacks a column.
    """
    if data_dir is None:
        data_dir = resolve_data_dir(cfg.data_dir)
    data = TaskData(train={}, dev={}, test={}, reports=[], missing=[], data_dir=data_dir)
    for spec in configured(cfg):
        task = spec.name
        for split in SPLITS:
            if split == "test" and spec.file(split) is None:
                continue  # a declared task without a test file
            if split == "test" and not (data_dir / split_file(spec, split)).is_file():
                data.missing.append(split_file(spec, split))
                continue
            raw = read_split(data_dir, spec, split)
            data.reports.append(raw.report)
            if raw.report.skipped:
                logger.warning("%s", raw.report)
            if raw.report.duplicate_ids:
                logger.warning("%s", raw.report.duplicates_warning())
            if split == "train":
                raw = subsample(raw, cfg.max_train_examples, seed)
                if task == STAGE1_TASK:
                    data.raw_train[task] = raw
            else:
                if split == "test":
                    data.test_rows[task] = len(raw)
                raw = eval_subsample(raw, cfg.max_eval_examples)
            target = {"train": data.train, "dev": data.dev, "test": data.test}[split]
            target[task] = encode(raw, tokenizer, cfg.max_length, design)
    if data.missing:
        logger.warning("no test file, so no test predictions for: %s", ", ".join(data.missing))
    return data


# --------------------------------------------------------------------------- tokenized cache

# Bump whenever reading, validating, subsampling or encoding changes what a TaskData holds, so
# that no run loads data tokenized the old way.
TOKENIZED_FORMAT = 1
# The files a backbone folder's tokenizer is built from (transformers' AutoTokenizer reads those
# present); their digests name the tokenizer in the cache key, not the backbone's name.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# Data settings that do not change the tokenized data (the files are keyed by their bytes).
_UNKEYED_DATA = {"data_dir", "bucket", "cache_tokenized"}


@dataclass(frozen=True)
class Sequences:
    """A list of 1-D tensors as one flat array and their sizes: one buffer to store or share.

    Pickling 140k small tensors one by one costs more than tokenizing them again (6 s against
    4.6 s for all the training data); one array unpickles in a fraction of a second.
    """

    flat: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> Sequences:
        sizes = np.array([len(t) for t in tensors], dtype=np.int64)
        flat = torch.cat(tensors).numpy() if tensors else np.zeros(0, dtype=np.int64)
        return cls(flat, sizes)

    def tensors(self) -> list[torch.Tensor]:
        # One copy out of a possibly read-only buffer (Ray's object store), then views into it.
        flat = torch.from_numpy(np.array(self.flat))
        return list(flat.split(self.sizes.tolist()))


def _map_splits(data: TaskData, fn: Any) -> TaskData:
    """``data`` with ``fn`` applied to every field of every encoded split."""

    def split(enc: Encoded) -> Encoded:
        return replace(enc, **{f.name: fn(getattr(enc, f.name)) for f in fields(enc)})

    return replace(
        data,
        train={t: split(e) for t, e in data.train.items()},
        dev={t: split(e) for t, e in data.dev.items()},
        test={t: split(e) for t, e in data.test.items()},
    )


def pack(data: TaskData) -> TaskData:
    """``data`` whose per-example tensor lists are :class:`Sequences` (stored and shared so)."""

    def one(value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return Sequences.of(value)
        return value

    return _map_splits(data, one)


def unpack(data: TaskData) -> TaskData:
    """The TaskData that :func:`pack` packed."""
    return _map_splits(data, lambda v: v.tensors() if isinstance(v, Sequences) else v)


def tokenized_key(
    cfg: DataConfig, data_dir: Path, tokenizer_dir: Path, design: int, seed: int
) -> str:
    """The hex sha256 naming a tokenized dataset: everything :func:`load_task_data` reads.

    The bytes of every data file of the configured tasks (absent test files as absent), the
    bytes of the tokenizer's files in ``tokenizer_dir`` (:data:`TOKENIZER_FILES`) and the
    tokenizers/transformers versions, the data settings but the folder and batching
    (``_UNKEYED_DATA``), the design, the seed when it picks the training subsample
    (``max_train_examples`` set), and :data:`TOKENIZED_FORMAT`. As Hugging Face ``datasets``
    fingerprints a processed dataset by its inputs and transform.
    """
    import tokenizers
    import transformers

    files = {}
    for spec in configured(cfg):
        for split in SPLITS:
            name = spec.file(split)
            if name is not None:
                path = data_dir / name
                files[f"{spec.name}/{split}"] = sha256_file(path) if path.is_file() else None
    tokenizer = {
        name: sha256_file(tokenizer_dir / name)
        for name in TOKENIZER_FILES
        if (tokenizer_dir / name).is_file()
    }
    record = {
        "format": TOKENIZED_FORMAT,
        "files": files,
        "tokenizer": tokenizer,
        "versions": [tokenizers.__version__, transformers.__version__],
        "data": cfg.model_dump(mode="json", exclude=_UNKEYED_DATA),
        "design": design,
        "seed": seed if cfg.max_train_examples is not None else None,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def tokenized_cache_dir() -> Path:
    """``<cache root>/tokenized`` (:func:`mtl.cache.cache_root`): one ``<key>.pkl`` per dataset."""
    return cache_root() / "tokenized"


def tokenized_path(
    cfg: DataConfig, data_dir: Path, tokenizer_dir: Path, design: int, seed: int
) -> Path:
    """Where :func:`load_packed_task_data` stores (or finds) this data: ``<key>.pkl`` in
    :func:`tokenized_cache_dir` (:func:`tokenized_key`)."""
    return (
        tokenized_cache_dir() / f"{tokenized_key(cfg, data_dir, tokenizer_dir, design, seed)}.pkl"
    )


def _warn_reports(data: TaskData) -> None:
    # What load_task_data warns while it reads, said again for data read from the cache.
    for report in data.reports:
        if report.skipped:
            logger.warning("%s", report)
        if report.duplicate_ids:
            logger.warning("%s", report.duplicates_warning())
    if data.missing:
        logger.warning("no test file, so no test predictions for: %s", ", ".join(data.missing))


def load_packed_task_data(
    cfg: DataConfig, tokenizer: Any, tokenizer_dir: Path, design: int, seed: int
) -> TaskData:
    """:func:`load_task_data`, packed (:func:`pack`), through the on-disk tokenized cache.

    With ``cfg.cache_tokenized`` the data is looked up in :func:`tokenized_cache_dir` under
    :func:`tokenized_key`; a hit skips reading and tokenizing and logs the same skip warnings,
    a miss builds the data and stores it (written atomically, so concurrent runs never read a
    part). A cache file that cannot be read is rebuilt with a warning. One process builds a
    given dataset at a time (:func:`mtl.cache.exclusive`, as stage 1's cache): another
    that asks for it meanwhile waits and reads the file, so a search whose driver starts the
    tokenizing before Ray (:func:`mtl.search.run.prebuild_data`), or trials that load their own
    data at once, tokenize it once.

    Args:
        cfg: The data section of the config.
        tokenizer: The fast tokenizer built from ``tokenizer_dir``.
        tokenizer_dir: The backbone folder holding the tokenizer's files.
        design: 1 or 2 (see :func:`encode`).
        seed: Seeds the training subsamples.

    Returns:
        The packed data; :func:`unpack` gives the per-example tensors.

    Raises:
        DataError: As :func:`load_task_data`.
    """
    if not cfg.cache_tokenized:
        return pack(load_task_data(cfg, tokenizer, design, seed))
    data_dir = resolve_data_dir(cfg.data_dir)
    path = tokenized_path(cfg, data_dir, tokenizer_dir, design, seed)
    data = _read_cached(path, data_dir)
    if data is not None:
        return data
    with _building(path):
        data = _read_cached(path, data_dir)  # built by the process that held the lock
        if data is not None:
            return data
        data = pack(load_task_data(cfg, tokenizer, design, seed, data_dir=data_dir))

        def write(tmp: Path) -> None:
            with tmp.open("wb") as fh:
                pickle.dump(data, fh, protocol=pickle.HIGHEST_PROTOCOL)

        try:
            atomic_write(path, write)
        except OSError as err:  # a full or read-only disk costs the next run the tokenizing only
            logger.warning("could not store the tokenized data in %s: %s", path, err)
    return data


def _read_cached(path: Path, data_dir: Path) -> TaskData | None:
    """The tokenized data stored at ``path``; None if absent or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as fh:
            data = pickle.load(fh)
        if not isinstance(data, TaskData):
            raise TypeError(f"holds a {type(data).__name__}, not TaskData")
    except Exception as err:  # any unreadable file is only a miss; it is rebuilt
        logger.warning(
            "tokenized cache %s unreadable (%s: %s); tokenizing again",
            path,
            type(err).__name__,
            err,
        )
        return None
    logger.info("tokenized data from the cache: %s", path)
    _warn_reports(data)
    return replace(data, data_dir=data_dir)


@contextlib.contextmanager
def _building(path: Path) -> Iterator[None]:
    """Holds ``<path>.lock`` while this process builds ``path``; without a writable cache
    folder there is nothing to share, and the data is built unlocked."""
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(
                exclusive(
                    Path(f"{path}.lock"),
                    lambda: logger.info("another run is tokenizing %s; waiting for it", path.name),
                )
            )
        except OSError as err:
            logger.warning("could not lock %s (%s); tokenizing without it", path, err)
        yield
