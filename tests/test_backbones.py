"""Backbones as people have them: checked once, before any data is tokenized, one line each.

Each case is a real folder on disk (a tiny random BERT in the Hugging Face layout, broken the way
public checkpoints are broken) run through the real command line, whose data folder does not
exist: a backbone error that came after the data had been read would be a data error instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtl.backbones import BackboneError, load_backbone
from mtl.bert import CheckpointError, read_checkpoint
from mtl.cli import main
from mtl.config import build_config
from mtl.train import load_data
from tests.tiny import make_tiny_backbone

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db\n"
    "size 90868376\n"
)


def _lfs(path: Path) -> None:
    path.write_text(LFS_POINTER)


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 not weights at all " * 50)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "lfs-pointer": (_lfs, r"a git-lfs pointer, not the file .*run `git lfs pull` in "),
    "truncated": (_truncate, r"truncated or corrupt"),
    "garbage": (_garbage, r"truncated or corrupt"),
    "empty": (_empty, r"truncated or corrupt"),
}


def _folder(tmp_path: Path, weights: str = "model.safetensors", **config: object) -> Path:
    folder = make_tiny_backbone(tmp_path / "backbone", **config)
    if weights == "pytorch_model.bin":
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / weights)
        (folder / "model.safetensors").unlink()
    return folder


def _run(tmp_path: Path, capsys: pytest.CaptureFixture, backbone: Path, *sets: str) -> str:
    """``python -m mtl.train`` on ``backbone`` with a data folder that does not exist: asserts
    exit status 2 and one line on stderr, and returns that line."""
    argv = [
        "--set",
        f"model.backbone={backbone}",
        "--set",
        f"data.data_dir={tmp_path / 'no-data-here'}",
        "--output-dir",
        str(tmp_path / "run"),
        *[arg for s in sets for arg in ("--set", s)],
    ]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0].removeprefix("error: ")


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unreadable_weights_file_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, weights: str, corruption: str
) -> None:
    folder = _folder(tmp_path, weights)
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(folder / weights)
    with pytest.raises(CheckpointError, match=rf"^{folder / weights}: .*{reason}"):
        read_checkpoint(folder)
    message = _run(tmp_path, capsys, folder)
    assert message.startswith(f"{folder / weights}: ") and "no-data-here" not in message


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "vocab.txt"])
def test_lfs_pointer_for_config_or_tokenizer_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    folder = _folder(tmp_path)
    _lfs(folder / name)
    assert _run(tmp_path, capsys, folder) == (
        f"{folder / name}: a git-lfs pointer, not the file (the repository was cloned without "
        f"git-lfs); run `git lfs pull` in {folder}"
    )


def test_extra_keys_name_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A BertForSequenceClassification export: the task head's keys do not fit the encoder."""
    folder = _folder(tmp_path)
    state = read_checkpoint(folder)
    state["classifier.weight"] = torch.zeros(2, 32)
    state["classifier.bias"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    message = _run(tmp_path, capsys, folder)
    assert message.startswith(f"{folder / 'model.safetensors'} does not fit BertModel: ")
    problems = message.split(": ", 1)[1].split("; ")
    assert sorted(problems) == [
        "unexpected key classifier.bias",
        "unexpected key classifier.weight",
    ]
    cfg = build_config({"model": {"backbone": str(folder)}})
    given = {**read_checkpoint(folder), "classifier.weight": torch.zeros(2, 32)}
    with pytest.raises(CheckpointError, match=rf"^the weights given for {folder} does not fit"):
        load_backbone(cfg).read_weights(given)


@pytest.mark.parametrize(
    ("config", "sets", "expected"),
    [
        (
            {},
            ["data.max_length=1024"],
            "max_position_embeddings is 512, below data.max_length 1024; set data.max_length "
            "to at most 512",
        ),
        (
            {"max_position_embeddings": 64},
            ["data.max_length=32", "contrastive.enabled=true", "contrastive.max_length=128"],
            "max_position_embeddings is 64, below contrastive.max_length 128",
        ),
        (
            {"type_vocab_size": 1},
            [],
            "type_vocab_size is 1, but model.design 2 gives the second sentence of a para/sts "
            "pair segment id 1; use model.design 1 or a backbone with type_vocab_size 2",
        ),
        (
            {"type_vocab_size": 1},
            ["data.tasks=[sts]"],
            "type_vocab_size is 1, but model.design 2 gives the second sentence of a sts pair",
        ),
    ],
    ids=["max_length", "contrastive-max_length", "type_vocab_size", "type_vocab_size-sts"],
)
def test_config_json_that_cannot_run_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture, config: dict, sets: list[str], expected: str
) -> None:
    folder = _folder(tmp_path, **config)
    message = _run(tmp_path, capsys, folder, *sets)
    assert message.startswith(f"{folder / 'config.json'}: {expected}")


def test_tokenizer_larger_than_embedding_table(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _folder(tmp_path, vocab_size=1000)
    message = _run(tmp_path, capsys, folder)
    assert message == (
        f"{folder}: the tokenizer has 30,522 tokens but config.json's vocab_size (the embedding "
        "table) has 1,000 rows; the tokenizer belongs to another model"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "config.json: no such file"),
        ("{not json", "config.json: not JSON"),
        ('{"position_embedding_type": "relative_key"}', "'relative_key' is not supported"),
    ],
)
def test_bad_config_json_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str | None, expected: str
) -> None:
    folder = _folder(tmp_path)
    if text is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(text)
    assert expected in _run(tmp_path, capsys, folder)


def test_missing_tokenizer_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_tiny_backbone(tmp_path / "backbone", tokenizer_dir=tmp_path / "nowhere")
    assert _run(tmp_path, capsys, folder).startswith(
        f"{folder}: no tokenizer (neither tokenizer.json nor vocab.txt)"
    )


@pytest.mark.parametrize(
    ("config", "sets"),
    [
        ({"type_vocab_size": 1}, {"model": {"design": 1}}),
        ({"type_vocab_size": 1}, {"data": {"tasks": ["sst"]}}),
        ({"max_position_embeddings": 64}, {"data": {"max_length": 64}}),
    ],
    ids=["design-1", "sst-only", "max_length-at-the-limit"],
)
def test_backbones_that_fit_pass(
    tmp_path: Path, real_data_dir: Path, config: dict, sets: dict
) -> None:
    folder = _folder(tmp_path, **config)
    raw = {
        "model": {"backbone": str(folder)},
        "data": {"data_dir": str(real_data_dir), "max_train_examples": 4, "max_eval_examples": 4},
    }
    for key, value in sets.items():
        raw[key] = {**raw[key], **value}
    cfg = build_config(raw)
    backbone = load_backbone(cfg)
    assert backbone.folder == folder and backbone.config.type_vocab_size == config.get(
        "type_vocab_size", 2
    )
    assert set(backbone.read_weights()) == set(read_checkpoint(folder))
    assert len(load_data(cfg, backbone).dev) == len(cfg.data.tasks)


def test_search_data_cache_path_checks_before_tokenizing(tmp_path: Path) -> None:
    """What a search's data cache calls: the same check, before the (absent) data is read."""
    folder = _folder(tmp_path, max_position_embeddings=64)
    cfg = build_config(
        {"model": {"backbone": str(folder)}, "data": {"data_dir": str(tmp_path / "absent")}}
    )
    with pytest.raises(BackboneError, match=r"below data\.max_length 128"):
        load_data(cfg)
