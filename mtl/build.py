"""Model building: the model from the backbone (and stage 1), its AdamW parameter groups and
learning-rate schedule, and the device and precision a run uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl import contrastive, precision
from mtl import pal as pal_lib
from mtl.bert import BertModel
from mtl.config import Config
from mtl.heads import MultitaskBert
from mtl.tasks import registry


def build_model(
    cfg: Config,
    backbone_dir: Path,
    encoder_weights: Path | None = None,
    backbone_state: Mapping[str, torch.Tensor] | None = None,
) -> MultitaskBert:
    """The encoder from its pretrained (or stage-1) weights, its PALs, and fresh heads.

    ``backbone_dir`` is a folder already resolved (:func:`mtl.backbones.resolve_backbone`).
    """
    overrides: dict[str, Any] = {}
    if cfg.model.encoder_dropout is not None:
        overrides = {
            "hidden_dropout_prob": cfg.model.encoder_dropout,
            "attention_probs_dropout_prob": cfg.model.encoder_dropout,
        }
    encoder = BertModel.from_folder(backbone_dir, state_dict=backbone_state, **overrides)
    if encoder_weights is not None:
        contrastive.load_encoder(encoder, encoder_weights)
    model = MultitaskBert(encoder, cfg.model, registry(cfg.data).values())
    if cfg.train.mode == "pretrain":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    pal_lib.add_pals(model.encoder, cfg.pal, cfg.data.tasks)  # after freezing: PALs train
    return model


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not biases or LayerNorm), trainable only."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name else decay).append(p)
    lr = cfg.train.peak_lr
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return pal_lib.with_pal_lr(groups, model, cfg.pal.lr)


def linear_schedule(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear decay to 0 at ``total_steps``."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def autocast_for(cfg: Config, device: torch.device):
    """The autocast context factory of ``cfg.train.precision`` on ``device`` (for callers outside
    the trainer that rebuild a run's model, e.g. the ensemble); the choice is
    :func:`mtl.precision.choose_precision`'s."""
    return precision.autocast(precision.choose_precision(cfg.train.precision, device), device)
