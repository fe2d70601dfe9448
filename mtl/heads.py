"""Task heads, their losses, predictions and metrics (section 4.1 and Figure 1 of the paper).

One encoder is shared by the tasks (:mod:`mtl.tasks`: SST, Quora, STS and any declared in the
config); each task has a head of :attr:`mtl.tasks.Task.num_outputs` outputs, and its loss,
decision and metric are the task's own (the functions below ask the task).

Pairs use one of two designs. Design 1 (Sentence-BERT) encodes each sentence alone and feeds
``[u, |u - v|, v]`` to the head; design 2 encodes ``[CLS] s1 [SEP] s2 [SEP]`` jointly and feeds the
pair's sentence embedding. The losses are plain functions of (output, labels), apart from the code
that runs the model, so regularizers can reuse them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtl.bert import BertModel
from mtl.config import ModelConfig
from mtl.data import Batch
from mtl.tasks import BUILTIN, Task, as_task

__all__ = [
    "FeedForwardHead",
    "MultitaskBert",
    "TaskOutput",
    "pool",
    "predict",
    "task_loss",
    "task_metric",
]


class FeedForwardHead(nn.Module):
    """Dropout, then one linear layer, or linear -> GELU -> linear (``layers=2``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        if layers == 1:
            self.net = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.dropout(x))


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence embedding from the last layer: [CLS] or the mask-aware mean.

    Args:
        hidden: (batch, seq, hidden) last hidden states.
        mask: (batch, seq) attention mask, 1 for real tokens.
        pooling: "cls" or "mean".
    """
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@dataclass
class TaskOutput:
    """What a head returns for one batch.

    Attributes:
        logits: (batch, num_labels) for a classification of more than 2 labels (sst); (batch,)
            for a binary logit (para) or a score (sts); see :attr:`mtl.tasks.Task.num_outputs`.
        embeddings: (batch, hidden) pooled sentence (or pair, design 2) embedding.
    """

    logits: torch.Tensor
    embeddings: torch.Tensor


class MultitaskBert(nn.Module):
    """The shared encoder with one head per task.

    Args:
        encoder: the shared encoder.
        cfg: the heads' sizes, the pair design and the pooling.
        tasks: one head per task, in this order (default: the built-in tasks; a run passes
            :func:`mtl.tasks.registry`, so every run has the built-in heads and a checkpoint
            fits whatever subset of tasks a run trains).
    """

    def __init__(self, encoder: BertModel, cfg: ModelConfig, tasks: Iterable[Task] | None = None):
        super().__init__()
        self.encoder = encoder
        self.design = cfg.design
        self.pooling = cfg.pooling
        self.tasks: dict[str, Task] = {
            t.name: t for t in (tasks if tasks is not None else BUILTIN.values())
        }
        hidden = encoder.config.hidden_size
        pair_in = 3 * hidden if cfg.design == 1 else hidden
        head = {"hidden": cfg.head_hidden, "layers": cfg.head_layers, "dropout": cfg.head_dropout}
        self.heads = nn.ModuleDict(
            {
                t.name: FeedForwardHead(pair_in if t.pair else hidden, t.num_outputs, **head)
                for t in self.tasks.values()
            }
        )

    def embedding_output(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedding layer's output (after its LayerNorm and dropout), (batch, seq, hidden)
        per sentence (the second too in design 1): what SMART perturbs."""
        embeddings = self.encoder.embeddings

        def run(ids: torch.Tensor, token_types: torch.Tensor | None) -> torch.Tensor:
            return embeddings(embeddings.word_embeddings(ids), token_types)

        second = run(batch.input_ids_b, None) if batch.input_ids_b is not None else None
        return run(batch.input_ids, batch.token_type_ids), second

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        task: str,
        embedding_output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled embedding (batch, hidden) of one encoder pass."""
        out = self.encoder(
            None if embedding_output is not None else input_ids,
            attention_mask,
            token_type_ids,
            embedding_output=embedding_output,
            task=task,
        )
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    def forward(
        self,
        batch: Batch,
        embedding_output: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> TaskOutput:
        """Run the encoder and the batch's task head.

        Args:
            batch: one task's padded batch.
            embedding_output: optional replacement for the embedding layer's output (first,
                second sentence), (batch, seq, hidden) each, e.g. perturbed by SMART.
        """
        task = batch.task
        emb_a, emb_b = embedding_output if embedding_output is not None else (None, None)
        if batch.input_ids_b is None:
            u = self.encode(
                batch.input_ids, batch.attention_mask, batch.token_type_ids, task, emb_a
            )
            features = u
        else:
            # Design 1: both sentences in one encoder pass, stacked on the batch axis.
            ids, mask, emb = _stack_pair(batch, emb_a, emb_b)
            pooled = self.encode(ids, mask, None, task, emb)  # (2 * batch, hidden)
            u, v = pooled.chunk(2)
            features = torch.cat([u, (u - v).abs(), v], dim=-1)
        logits = self.heads[task](features)
        if self.tasks[task].num_outputs == 1:
            logits = logits.squeeze(-1)  # (batch,)
        return TaskOutput(logits=logits, embeddings=u)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - x.shape[1]
    if extra == 0:
        return x
    pad = (0, 0, 0, extra) if x.dim() == 3 else (0, extra)
    return F.pad(x, pad)


def _stack_pair(
    batch: Batch, emb_a: torch.Tensor | None, emb_b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    assert batch.input_ids_b is not None and batch.attention_mask_b is not None
    length = max(batch.input_ids.shape[1], batch.input_ids_b.shape[1])
    ids = torch.cat([_pad_to(batch.input_ids, length), _pad_to(batch.input_ids_b, length)])
    mask = torch.cat(
        [_pad_to(batch.attention_mask, length), _pad_to(batch.attention_mask_b, length)]
    )
    emb = None
    if emb_a is not None:
        assert emb_b is not None, "design 1 needs embeddings for both sentences"
        emb = torch.cat([_pad_to(emb_a, length), _pad_to(emb_b, length)])
    return ids, mask, emb


def task_loss(task: Task | str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss of one batch (:meth:`mtl.tasks.Task.loss`)."""
    return as_task(task).loss(logits, labels)


def predict(task: Task | str, logits: torch.Tensor) -> torch.Tensor:
    """Submission-format predictions (:meth:`mtl.tasks.Task.predict`)."""
    return as_task(task).predict(logits)


def task_metric(task: Task | str, pred: np.ndarray, gold: np.ndarray) -> float | None:
    """The task's dev metric (:meth:`mtl.tasks.Task.score`; None when undefined)."""
    return as_task(task).score(pred, gold)
