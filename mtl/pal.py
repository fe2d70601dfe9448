"""Projected attention layers (PALs): task-specific low-dimensional attention beside BERT's layers.

Stickland and Murray 2019, "BERT and PALs: Projected Attention Layers for Efficient Adaptation in
Multi-Task Learning", https://arxiv.org/abs/1902.02671 (code: AsaCooperStickland/Bert-n-Pals), and
section 4.4 / Figure 2 of the paper. A PAL maps a layer's input h (batch, seq, hidden) to

    PAL(h) = GELU(V_up · Attention(V_down · h))

where V_down (hidden -> d) and V_up (d -> hidden) are shared by all layers of one task and the
multi-head attention in the low dimension d (query, key and value projections, no output
projection) is the layer's own. Every task has its own PALs; a layer picks them by the ``task``
argument that :class:`mtl.bert.BertModel` passes down. Two compositions, chosen by ``pal.variant``:

* ``standard`` (Stickland and Murray): LN(FFN(a) + a + PAL(h)) in every layer, a being the
  attention block's output, i.e. the PAL's output joins the residual sum of the layer's final
  LayerNorm (Bert-n-Pals' ``self.output(intermediate, attention + extra)``).
* ``paper``: the PAL runs beside the layer's (first) self-attention; the self-attention context and
  the PAL's output are concatenated and a per-task linear layer (2 hidden -> hidden) merges them
  before the attention output block; the feed-forward half is left unchanged ("no PAL2").

The layers are wrappers composed around :class:`mtl.bert.BertLayer`, not flags inside it: a
wrapper adopts the layer's ``attention``, ``intermediate`` and ``output`` sub-blocks, so every
pretrained parameter keeps its Hugging Face name, and adds ``pal.<task>.*``. The shared projections
live once on the encoder as ``pal.<task>.down`` / ``pal.<task>.up``.

Initialisation leaves the model's output unchanged at step 0: V_up is zero (so PAL(h) = GELU(0) =
0), and the ``paper`` merge starts as [I | I], the self-attention context plus the PAL's output.
The gradient still reaches V_up (through GELU'(0) = 1/2 and the merge), and the rest of the PAL as
soon as V_up moves.

Width rule: BERT-base (hidden 768) uses d = 204 with 12 heads (12 x 17). Other sizes scale it,
d = 204 * hidden / 768, rounded up to a multiple of the head count: MiniLM's 384 gives 102, which
12 heads do not divide, so d = 108 (9 per head); 1024 gives 272 -> 276 (:func:`pal_width`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.bert import BertLayer, BertModel, Padding, attention
from mtl.config import PalConfig

# BERT-base's PAL width and hidden size (Stickland and Murray, section 4).
BASE_WIDTH, BASE_HIDDEN = 204, 768


def pal_width(hidden: int, heads: int, low_dim: int | None = None) -> int:
    """The PAL width d: ``low_dim`` if given, else 204 * hidden / 768 rounded up to ``heads``."""
    if low_dim is not None:
        if low_dim % heads:
            raise ValueError(f"PAL width {low_dim} is not a multiple of {heads} heads")
        return low_dim
    return heads * math.ceil(hidden * BASE_WIDTH / (BASE_HIDDEN * heads))


class PalProjections(nn.Module):
    """One task's V_down (hidden -> d) and V_up (d -> hidden), shared by all layers."""

    def __init__(self, hidden: int, width: int, std: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        nn.init.normal_(self.down.weight, std=std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


class PalAttention(nn.Module):
    """Multi-head self-attention in the PAL width, without an output projection (Bert-n-Pals)."""

    def __init__(self, width: int, heads: int, dropout: float, std: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        nn.init.normal_(self.qkv.weight, std=std)
        nn.init.zeros_(self.qkv.bias)
        self.dropout_p = dropout

    def forward(self, x: Tensor, padding: Padding) -> Tensor:
        """(batch, seq, d) or unpadded (tokens, d) -> same; see :class:`mtl.bert.Padding`."""
        dropout_p = self.dropout_p if self.training else 0.0
        return attention(self.qkv(x), padding, self.heads, dropout_p)


def projected_attention(
    h: Tensor, padding: Padding, proj: PalProjections, pal_attention: PalAttention
) -> Tensor:
    """PAL(h) = GELU(V_up · Attention(V_down · h)), (batch, seq, hidden) or (tokens, hidden)."""
    return F.gelu(proj.up(pal_attention(proj.down(h), padding)))


class PaperPal(nn.Module):
    """One task's parts of a ``paper`` layer: its PAL attention and the merge linear layer."""

    def __init__(self, hidden: int, width: int, heads: int, dropout: float, std: float) -> None:
        super().__init__()
        self.attention = PalAttention(width, heads, dropout, std)
        self.merge = nn.Linear(2 * hidden, hidden)
        with torch.no_grad():
            eye = torch.eye(hidden, dtype=self.merge.weight.dtype)
            self.merge.weight.copy_(torch.cat([eye, eye], dim=1))  # [I | I]
            self.merge.bias.zero_()


class _PalLayer(nn.Module):
    """A BertLayer's sub-blocks plus per-task PAL parts; routes by ``task``."""

    def __init__(self, layer: BertLayer, pal: nn.ModuleDict, projections: nn.ModuleDict) -> None:
        super().__init__()
        if not isinstance(layer, BertLayer):
            raise TypeError(f"PALs wrap a BertLayer, got {type(layer).__name__}")
        self.attention = layer.attention
        self.intermediate = layer.intermediate
        self.output = layer.output
        self.pal = pal
        # Shared by every layer and registered once, on the encoder: a tuple keeps nn.Module from
        # registering it here too (a second state_dict entry for the same tensors).
        self._projections = (projections,)

    def _route(self, task: str | None) -> tuple[PalProjections, nn.Module]:
        if task is None or task not in self.pal:
            raise ValueError(f"PAL layers need one of the tasks {list(self.pal)}, got {task!r}")
        return self._projections[0][task], self.pal[task]


class StandardPalLayer(_PalLayer):
    """Stickland and Murray's layer: LN(FFN(a) + a + PAL(h))."""

    def forward(self, hidden_states: Tensor, padding: Padding, task: str | None = None) -> Tensor:
        proj, pal_attention = self._route(task)
        attention_output = self.attention(hidden_states, padding)
        extra = projected_attention(hidden_states, padding, proj, pal_attention)
        # BertFFNOutput(x, residual) = LN(dropout(dense(x)) + residual).
        return self.output(self.intermediate(attention_output), attention_output + extra)


class PaperPalLayer(_PalLayer):
    """The paper's layer (Figure 2): merge([SA(h), PAL(h)]), then BERT's attention output and FFN."""

    def forward(self, hidden_states: Tensor, padding: Padding, task: str | None = None) -> Tensor:
        proj, parts = self._route(task)
        context = self.attention.self(hidden_states, padding)  # (..., hidden), either layout
        extra = projected_attention(hidden_states, padding, proj, parts.attention)
        context = parts.merge(torch.cat([context, extra], dim=-1))  # (..., hidden)
        attention_output = self.attention.output(context, hidden_states)
        return self.output(self.intermediate(attention_output), attention_output)


def add_pals(encoder: BertModel, cfg: PalConfig, tasks: Iterable[str]) -> None:
    """Composes PALs into every layer of ``encoder``, in place (a no-op for ``variant: none``).

    Call it after loading the pretrained weights and after freezing the encoder in ``pretrain``
    mode: the new parameters are created trainable, on the encoder's device and dtype.

    Args:
        encoder: the encoder whose ``encoder.layer`` entries are replaced by wrappers.
        cfg: variant, width and heads.
        tasks: the tasks that get their own PALs.

    Raises:
        TypeError: the encoder already has PALs.
    """
    if cfg.variant == "none":
        return
    config = encoder.config
    hidden, std = config.hidden_size, config.initializer_range
    width = pal_width(hidden, cfg.heads, cfg.low_dim)
    dropout = config.attention_probs_dropout_prob
    reference = encoder.embeddings.word_embeddings.weight
    tasks = list(tasks)
    with torch.device(reference.device):
        encoder.pal = nn.ModuleDict({t: PalProjections(hidden, width, std) for t in tasks})
        layers = encoder.encoder.layer
        for i, layer in enumerate(layers):
            if cfg.variant == "standard":
                pal = nn.ModuleDict(
                    {t: PalAttention(width, cfg.heads, dropout, std) for t in tasks}
                )
                layers[i] = StandardPalLayer(layer, pal, encoder.pal)
            else:
                pal = nn.ModuleDict(
                    {t: PaperPal(hidden, width, cfg.heads, dropout, std) for t in tasks}
                )
                layers[i] = PaperPalLayer(layer, pal, encoder.pal)
    for module in pal_modules(encoder):
        module.to(dtype=reference.dtype)


def pal_modules(model: nn.Module) -> list[nn.Module]:
    """The top-level PAL modules in ``model``: the shared projections and each layer's parts."""
    return [m for m in model.modules() if isinstance(m, PalProjections | PalAttention | PaperPal)]


def pal_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every PAL parameter of ``model``, once each."""
    seen: dict[int, nn.Parameter] = {}
    for module in pal_modules(model):
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def with_pal_lr(groups: list[dict], model: nn.Module, lr: float | None) -> list[dict]:
    """Moves the PAL parameters of each optimizer group into a copy of it with learning rate ``lr``.

    Args:
        groups: AdamW parameter groups (``params``, ``weight_decay``, ``lr``).
        model: the model the groups were built from.
        lr: the PAL learning rate; None keeps the groups as they are.

    Returns:
        The groups without PAL parameters, then one group per original group that had any.
    """
    pal_ids = {id(p) for p in pal_parameters(model)}
    if lr is None or not pal_ids:
        return groups
    rest, pal = [], []
    for group in groups:
        rest.append({**group, "params": [p for p in group["params"] if id(p) not in pal_ids]})
        ours = [p for p in group["params"] if id(p) in pal_ids]
        if ours:
            pal.append({**group, "params": ours, "lr": lr})
    return rest + pal


__all__ = [
    "PalAttention",
    "PalProjections",
    "PaperPal",
    "PaperPalLayer",
    "StandardPalLayer",
    "add_pals",
    "pal_modules",
    "pal_parameters",
    "pal_width",
    "projected_attention",
    "with_pal_lr",
]
