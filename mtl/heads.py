"""Task heads, their losses, predictions and metrics (section 4.1 and Figure 1 of the paper).

One encoder is shared by three tasks:

* ``sst``: SST-5 sentiment, 5-way classification of one sentence (cross-entropy).
* ``para``: Quora paraphrase detection, a binary logit per pair (binary cross-entropy on logits).
* ``sts``: STS similarity, a 0..5 regression per pair (mean-squared error).

Pairs use one of two designs. Design 1 (Sentence-BERT) encodes each sentence alone and feeds
``[u, |u - v|, v]`` to the head; design 2 encodes ``[CLS] s1 [SEP] s2 [SEP]`` jointly and feeds the
pair's sentence embedding. The losses are plain functions of (output, labels), apart from the code
that runs the model, so regularizers can reuse them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from mtl.bert import BertModel
from mtl.config import TASK_METRICS, ModelConfig
from mtl.data import Batch

NUM_SENTIMENT_CLASSES = 5


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
        logits: (batch, 5) for sst; (batch,) binary logit for para; (batch,) score for sts.
        embeddings: (batch, hidden) pooled sentence (or pair, design 2) embedding.
    """

    logits: torch.Tensor
    embeddings: torch.Tensor


class MultitaskBert(nn.Module):
    """The shared encoder with one head per task."""

    def __init__(self, encoder: BertModel, cfg: ModelConfig):
        super().__init__()
        self.encoder = encoder
        self.design = cfg.design
        self.pooling = cfg.pooling
        hidden = encoder.config.hidden_size
        pair_in = 3 * hidden if cfg.design == 1 else hidden
        head = {"hidden": cfg.head_hidden, "layers": cfg.head_layers, "dropout": cfg.head_dropout}
        self.heads = nn.ModuleDict(
            {
                "sst": FeedForwardHead(hidden, NUM_SENTIMENT_CLASSES, **head),
                "para": FeedForwardHead(pair_in, 1, **head),
                "sts": FeedForwardHead(pair_in, 1, **head),
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
        if task != "sst":
            logits = logits.squeeze(-1)
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


def task_loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss of one batch: cross-entropy (sst), BCE on logits (para), MSE (sts)."""
    if task == "sst":
        return F.cross_entropy(logits.float(), labels)
    if task == "para":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    if task == "sts":
        return F.mse_loss(logits.float(), labels.float())
    raise ValueError(f"unknown task {task!r}")


def predict(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Submission-format predictions: class 0..4, 0/1 paraphrase, raw similarity score."""
    if task == "sst":
        return logits.argmax(-1)
    if task == "para":
        return (logits > 0).long()
    return logits.float()


def pearson_undefined(pred: np.ndarray, gold: np.ndarray) -> str | None:
    """Why the Pearson correlation of ``pred`` and ``gold`` is undefined, or None when it is not.

    It is undefined for fewer than two examples and when either side is constant (a zero
    variance in the denominator).
    """
    pred = np.asarray(pred, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if pred.size < 2:
        return f"{pred.size} example{'' if pred.size == 1 else 's'}"
    if np.ptp(pred) == 0:
        return f"every prediction is {pred[0]:g}"
    if np.ptp(gold) == 0:
        return f"every gold score is {gold[0]:g}"
    return None


def pearson(pred: np.ndarray, gold: np.ndarray) -> float | None:
    """Pearson correlation (``scipy.stats.pearsonr``); None when undefined (see
    :func:`pearson_undefined`), never a number that looks real."""
    if pearson_undefined(pred, gold) is not None:
        return None
    return float(stats.pearsonr(np.asarray(pred, np.float64), np.asarray(gold, np.float64))[0])


def task_metric(task: str, pred: np.ndarray, gold: np.ndarray) -> float | None:
    """sst and para: accuracy; sts: Pearson correlation (None when undefined)."""
    if task == "sts":
        return pearson(pred, gold)
    return float((np.asarray(pred) == np.asarray(gold)).mean())


METRIC_NAMES = TASK_METRICS


def overall_score(metrics: Mapping[str, float | None]) -> float:
    """The CS224N overall score ``(sst_acc + para_acc + (sts_pearson + 1) / 2) / 3``.

    With fewer tasks configured, the mean over the tasks present (Pearson still rescaled). An
    undefined Pearson correlation (None) counts as 0, i.e. no correlation, so the score stays a
    number that checkpoint selection can compare; :func:`pearson_undefined` says why.
    """
    parts = [metrics[m] for m in ("sst_acc", "para_acc") if m in metrics]
    if "sts_pearson" in metrics:
        parts.append(((metrics["sts_pearson"] or 0.0) + 1.0) / 2.0)
    return sum(parts) / len(parts)
