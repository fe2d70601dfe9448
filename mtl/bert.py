"""A BERT encoder in one readable file, with Hugging Face's parameter names.

Every sub-module is named after its key in Hugging Face's ``modeling_bert.py`` (``embeddings.*``,
``encoder.layer.N.attention.self.query.*``, ``pooler.dense.*``), so our ``state_dict`` keys are
``transformers.BertModel``'s and loading a checkpoint is a key map plus loud checks
(:func:`convert_hf_state_dict`, :meth:`BertModel.load_hf_state_dict`). This module never imports
``transformers``; a test enforces it.

Speed comes from four choices, measured in ``benchmarks/encoder_step.py``: the query, key and
value projections run as one matmul (the three ``nn.Linear`` keep their checkpoint names and
are concatenated at run time, which autograd splits back for free), attention is
``F.scaled_dot_product_attention`` reading strided views of that one matmul's output, the
padding mask is built once per forward, and on CPU the layers skip the padding: the real tokens
are gathered into one (tokens, hidden) matrix, every embedding, projection, feed-forward and
LayerNorm runs on it, and only attention sees the padded (batch, seq) layout (:class:`Padding`;
MosaicBERT's and FlashAttention's "unpadding"). Padded positions of ``last_hidden_state`` are
then zero; every real position equals the padded computation's.

Reference: Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding", https://arxiv.org/abs/1810.04805.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact erf GELU, Hugging Face's "gelu"
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}

# Pooler keys a checkpoint may lack (sentence-transformers and some hub exports drop them).
_POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names every offending key."""


@dataclass(frozen=True)
class BertConfig:
    """The encoder's shape, read from a Hugging Face ``config.json``; unknown keys are ignored."""

    # Rows of the word-embedding table.
    vocab_size: int = 30522
    # Width of every token vector.
    hidden_size: int = 768
    # Number of transformer layers.
    num_hidden_layers: int = 12
    # Attention heads per layer; must divide hidden_size.
    num_attention_heads: int = 12
    # Width of the feed-forward block's inner layer.
    intermediate_size: int = 3072
    # Feed-forward activation: "gelu" (exact erf), "gelu_new" (tanh approximation) or "relu".
    hidden_act: str = "gelu"
    # Dropout on embeddings and on each sub-block's output.
    hidden_dropout_prob: float = 0.1
    # Dropout on attention probabilities.
    attention_probs_dropout_prob: float = 0.1
    # Longest sequence the position table covers.
    max_position_embeddings: int = 512
    # Rows of the token-type (segment) table.
    type_vocab_size: int = 2
    # LayerNorm epsilon.
    layer_norm_eps: float = 1e-12
    # Token id whose word embedding gets no gradient.
    pad_token_id: int = 0
    # Standard deviation of the normal initialisation of weights.
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        """Builds a config from a Hugging Face config dict, ignoring keys we do not use.

        Raises:
            ValueError: the dict asks for a variant this encoder does not implement
                (relative position embeddings, a decoder).
        """
        position_type = d.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type {position_type!r} is not supported")
        if d.get("is_decoder", False):
            raise ValueError("is_decoder=True is not supported: this is an encoder")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | Path) -> BertConfig:
        """Reads a Hugging Face ``config.json``."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass
class BertOutput:
    """What :meth:`BertModel.forward` returns."""

    # (batch, seq, hidden): the last layer's token vectors.
    last_hidden_state: Tensor
    # (batch, hidden): tanh(dense(last_hidden_state[:, 0])), BERT's [CLS] pooler.
    pooler_output: Tensor


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        inputs_embeds: Tensor,
        token_type_ids: Tensor | None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Adds position and token-type embeddings to word embeddings.

        Args:
            inputs_embeds: (batch, seq, hidden), or (tokens, hidden) unpadded.
            token_type_ids: (batch, seq), or (tokens,); None means all zeros.
            position_ids: (tokens,) for unpadded input; None means 0..seq-1 in every row.
        """
        if position_ids is None:
            # Positions are 0..seq-1 for every row: slice the table instead of a lookup.
            seq_len = inputs_embeds.shape[1]
            x = inputs_embeds + self.position_embeddings.weight[:seq_len]  # (seq, hidden)
        else:
            x = inputs_embeds + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


@dataclass(frozen=True)
class Padding:
    """Where a (batch, seq) batch's real tokens are: what every layer attends with.

    Token vectors reach the layers in one of two layouts. Padded: (batch, seq, hidden), the
    collator's grid. Unpadded (``indices`` set): (tokens, hidden), the real tokens only, in
    row-major order, so the dense layers do no work on padding; attention alone scatters them
    back into the grid (:func:`attention`). Build it with :func:`padding_of`.
    """

    batch: int
    seq: int
    # (batch, 1, 1, seq) bool, True for the keys to attend to; None when nothing is padded.
    mask: Tensor | None
    # (tokens,) long: the real tokens' positions in the flattened (batch * seq) grid; None
    # when the layers see the padded layout.
    indices: Tensor | None = None

    def unpad(self, x: Tensor) -> Tensor:
        """(batch, seq, *rest) -> (tokens, *rest) when unpadded, else unchanged."""
        if self.indices is None:
            return x
        return x.flatten(0, 1)[self.indices]

    def pad(self, x: Tensor) -> Tensor:
        """(tokens, *rest) -> (batch, seq, *rest) with zeros at padding, when unpadded."""
        if self.indices is None:
            return x
        grid = x.new_zeros(self.batch * self.seq, *x.shape[1:])
        # index_put's backward gathers the real rows' gradient: no work on the padding.
        return grid.index_put((self.indices,), x).view(self.batch, self.seq, *x.shape[1:])


def padding_of(
    attention_mask: Tensor | None, batch: int, seq: int, device: torch.device
) -> Padding:
    """The :class:`Padding` of a (batch, seq) 0/1 mask (None means nothing is padded).

    On CPU the layers run unpadded whenever something is padded: counting the real tokens
    needs their number on the host, free there. On an accelerator that count would stall the
    host once per forward, so the layers stay padded and the mask is passed as it is, even
    when nothing is padded. A bool mask, rather than an additive float one, stays right under
    autocast, where the queries are bfloat16 while the embeddings are float32.
    """
    if attention_mask is None:
        return Padding(batch, seq, None)
    keep = attention_mask.bool()
    mask = keep[:, None, None, :]  # (batch, 1, 1, seq): same keys masked for every head and query
    if device.type != "cpu":
        return Padding(batch, seq, mask)
    indices = keep.flatten().nonzero().squeeze(1)  # (tokens,)
    if indices.numel() == batch * seq:
        return Padding(batch, seq, None)  # nothing padded: SDPA's mask-free kernel
    return Padding(batch, seq, mask, indices)


def attention(qkv: Tensor, padding: Padding, num_heads: int, dropout_p: float) -> Tensor:
    """Multi-head scaled dot-product attention on fused projections, in either layout.

    Args:
        qkv: (batch, seq, 3 * width) or, unpadded, (tokens, 3 * width): queries, keys and
            values side by side, each ``num_heads`` heads of width / num_heads.
        padding: the batch's :class:`Padding`.
        num_heads: heads.
        dropout_p: dropout on the attention probabilities (0 in evaluation).

    Returns:
        (batch, seq, width), or (tokens, width) unpadded.
    """
    qkv = padding.pad(qkv)  # (batch, seq, 3 * width); zero rows at padding are masked keys
    batch, seq, three_width = qkv.shape
    width = three_width // 3
    # Split, not view-permute-unbind: the backward then assembles the fused gradient with
    # one cat instead of a stack plus a copy.
    q, k, v = (
        t.view(batch, seq, num_heads, width // num_heads).transpose(1, 2)
        for t in qkv.split(width, dim=-1)
    )  # each (batch, heads, seq, head_dim), a strided view of qkv
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=padding.mask, dropout_p=dropout_p)
    # SDPA lays its output out as (batch, seq, heads, head_dim), so this is usually a view.
    return padding.unpad(out.transpose(1, 2).reshape(batch, seq, width))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with the three projections fused into one matmul."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden_states: Tensor, padding: Padding) -> Tensor:
        """Attends over each sequence; (batch, seq, hidden) or (tokens, hidden) -> same."""
        # Concatenating 3 (hidden, hidden) weights costs far less than the activation matmuls
        # it merges, and its backward only slices the fused gradient.
        weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))
        bias = torch.cat((self.query.bias, self.key.bias, self.value.bias))
        qkv = F.linear(hidden_states, weight, bias)  # (..., 3 * hidden)
        dropout_p = self.dropout_p if self.training else 0.0
        return attention(qkv, padding, self.num_heads, dropout_p)


class BertSelfOutput(nn.Module):
    """Projection after attention, dropout, residual and LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertAttention(nn.Module):
    """Self-attention (``self``) followed by its output block (``output``)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: Tensor, padding: Padding) -> Tensor:
        return self.output(self.self(hidden_states, padding), hidden_states)


class BertIntermediate(nn.Module):
    """First half of the feed-forward block: dense and activation."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.act(self.dense(hidden_states))


class BertFFNOutput(nn.Module):
    """Second half of the feed-forward block: dense, dropout, residual and LayerNorm.

    Hugging Face calls this class ``BertOutput``; that name is our forward's return type here,
    and only the attribute name ``output`` matters for checkpoints.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertLayer(nn.Module):
    """One transformer layer: attention, then feed-forward, each with residual and LayerNorm.

    Wrappers (PAL adapters in ``mtl/pal.py``) replace entries of ``BertModel.encoder.layer``
    and reach the sub-blocks as ``attention.self``, ``attention.output``, ``intermediate`` and
    ``output``; they must keep the signature ``forward(hidden_states, padding, task=None)`` and
    accept both layouts of :class:`Padding` (every block but attention works per token).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertFFNOutput(config)

    def forward(self, hidden_states: Tensor, padding: Padding, task: str | None = None) -> Tensor:
        """Maps (batch, seq, hidden) or (tokens, hidden) to the same; ``task`` is unused here."""
        attention_output = self.attention(hidden_states, padding)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    """The stack of layers, as ``encoder.layer`` (an ``nn.ModuleList``)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: Tensor, padding: Padding, task: str | None = None) -> Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, padding, task=task)
        return hidden_states


class BertPooler(nn.Module):
    """tanh(dense(h_[CLS])): BERT's sentence vector."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


def convert_hf_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Maps a Hugging Face BERT checkpoint's keys onto ours.

    Strips the ``bert.`` prefix of ``BertFor*`` checkpoints, renames old TensorFlow-era
    LayerNorm ``gamma``/``beta`` to ``weight``/``bias``, and drops the pre-training heads
    (``cls.*``) and the ``embeddings.position_ids`` buffer that old checkpoints stored.
    Other keys pass through unchanged, so :meth:`BertModel.load_hf_state_dict` reports them.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("bert.")
        if key.startswith("cls.") or key == "embeddings.position_ids":
            continue
        if key.endswith(".gamma"):
            key = key.removesuffix(".gamma") + ".weight"
        elif key.endswith(".beta"):
            key = key.removesuffix(".beta") + ".bias"
        out[key] = tensor
    return out


# The first line of a git-lfs pointer file, which a clone without git-lfs leaves in place of
# the weights (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def is_lfs_pointer(path: str | Path) -> bool:
    """Whether ``path`` is a git-lfs pointer file standing in for the real content."""
    with Path(path).open("rb") as fh:
        return fh.read(len(_LFS_POINTER)) == _LFS_POINTER


def lfs_pointer_message(path: str | Path) -> str:
    """The one-line error for a git-lfs pointer found where a real file was expected."""
    path = Path(path)
    return (
        f"{path}: a git-lfs pointer, not the file (the repository was cloned without git-lfs); "
        f"run `git lfs pull` in {path.parent}"
    )


def weights_file(folder: str | Path) -> Path:
    """The weights file of a backbone folder: ``model.safetensors``, else ``pytorch_model.bin``.

    Raises:
        CheckpointError: the folder has neither file.
    """
    folder = Path(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: has neither model.safetensors nor pytorch_model.bin")


def read_checkpoint(folder: str | Path) -> dict[str, Tensor]:
    """Reads ``model.safetensors``, else ``pytorch_model.bin`` (tensors only, no pickled code).

    Raises:
        CheckpointError: one line naming the file when the folder has neither file, or the file
            is a git-lfs pointer (cloned without git-lfs), truncated or otherwise unreadable,
            or (``.bin``) holds pickled objects other than tensors.
    """
    path = weights_file(folder)
    if is_lfs_pointer(path):
        raise CheckpointError(lfs_pointer_message(path))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise CheckpointError(
                f"{path}: not a readable safetensors file, truncated or corrupt "
                f"({path.stat().st_size:,} bytes: {err})"
            ) from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any pickled object that is not a tensor or a plain container;
        # its message names that object's class ("Unsupported global: GLOBAL module.Class").
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise CheckpointError(
                f"{path}: not a readable PyTorch weights file, truncated or corrupt "
                f"({path.stat().st_size:,} bytes)"
            ) from None
        raise CheckpointError(
            f"{path}: refused: it holds a pickled {found[1]}, not only tensors (weights_only)"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable PyTorch weights file, truncated or corrupt "
            f"({path.stat().st_size:,} bytes: {type(err).__name__})"
        ) from None
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, Tensor) for v in state_dict.values()
    ):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return dict(state_dict)


def check_state_dict(
    config: BertConfig, state_dict: Mapping[str, Tensor], source: str = "checkpoint"
) -> bool:
    """Checks every key and shape of a Hugging Face BERT state dict against ``config``.

    Nothing is allocated: the reference shapes come from a model on the meta device.

    Args:
        config: the encoder's shape.
        state_dict: weights as :func:`read_checkpoint` returns them (before key conversion).
        source: what the weights are, for the message (e.g. the folder they came from).

    Returns:
        True when the checkpoint lacks the pooler (see :meth:`BertModel.load_hf_state_dict`).

    Raises:
        CheckpointError: one line naming ``source`` and each missing key, each unexpected key
            and each shape mismatch.
    """
    with torch.device("meta"):
        expected = BertModel(config).state_dict()
    state_dict = convert_hf_state_dict(state_dict)
    keep_pooler = not any(k in state_dict for k in _POOLER_KEYS)
    if keep_pooler:
        expected = {k: v for k, v in expected.items() if k not in _POOLER_KEYS}
    problems = key_problems(expected, state_dict)
    if problems:
        raise CheckpointError(f"{source} does not fit BertModel: " + "; ".join(problems))
    return keep_pooler


def key_problems(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """Each missing key, each unexpected key and each shape mismatch of ``given``, in words."""
    return (
        [f"missing key {k}" for k in expected if k not in given]
        + [f"unexpected key {k}" for k in given if k not in expected]
        + [
            f"shape mismatch {k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in given.items()
            if k in expected and v.shape != expected[k].shape
        ]
    )


class BertModel(nn.Module):
    """The BERT encoder: embeddings, ``num_hidden_layers`` layers and the [CLS] pooler."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Hugging Face's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        embedding_output: Tensor | None = None,
        task: str | None = None,
    ) -> BertOutput:
        """Encodes a batch.

        Args:
            input_ids: (batch, seq) token ids; exactly one of this and ``inputs_embeds``.
            attention_mask: (batch, seq), 1 for real tokens and 0 for padding; None means no
                padding.
            token_type_ids: (batch, seq) segment ids; None means all zeros.
            inputs_embeds: (batch, seq, hidden), used instead of the word-embedding lookup
                (position and token-type embeddings are still added, as in Hugging Face).
            embedding_output: (batch, seq, hidden), the embedding layer's output (after its
                LayerNorm and dropout), used instead of computing it; what SMART perturbs.
            task: passed to every layer as ``task=``; plain layers ignore it, adapter
                wrappers pick their task's parameters with it.

        Returns:
            The last layer's states (zero at padded positions when the layers ran unpadded,
            see :func:`padding_of`) and the pooled [CLS] vector.
        """
        given = [x for x in (input_ids, inputs_embeds, embedding_output) if x is not None]
        if len(given) != 1:
            raise ValueError("pass exactly one of input_ids, inputs_embeds and embedding_output")
        batch, seq = given[0].shape[:2]
        padding = padding_of(attention_mask, batch, seq, given[0].device)
        if embedding_output is not None:
            hidden_states = padding.unpad(embedding_output)
        else:
            if inputs_embeds is None:
                # Gather the ids, not their vectors: the lookup then skips the padding too.
                inputs_embeds = self.embeddings.word_embeddings(padding.unpad(input_ids))
            else:
                inputs_embeds = padding.unpad(inputs_embeds)
            if token_type_ids is not None:
                token_type_ids = padding.unpad(token_type_ids)
            position_ids = None if padding.indices is None else padding.indices % seq
            hidden_states = self.embeddings(inputs_embeds, token_type_ids, position_ids)
        hidden_states = self.encoder(hidden_states, padding, task=task)  # (tokens or b, s, hidden)
        hidden_states = padding.pad(hidden_states)  # (batch, seq, hidden)
        return BertOutput(last_hidden_state=hidden_states, pooler_output=self.pooler(hidden_states))

    def load_hf_state_dict(
        self, state_dict: Mapping[str, Tensor], source: str = "checkpoint"
    ) -> None:
        """Loads a Hugging Face BERT state dict after :func:`convert_hf_state_dict`.

        Every key and shape is checked before anything is copied (:func:`check_state_dict`).
        A checkpoint without the pooler (sentence-transformers exports often drop it) keeps the
        freshly initialised pooler and logs a warning: our pooler output is then random, the
        token states are not.

        Args:
            state_dict: the weights.
            source: what they are, for the error message (e.g. the folder they came from).

        Raises:
            CheckpointError: naming ``source``, each missing key, each unexpected key and each
                shape mismatch.
        """
        keep_pooler = check_state_dict(self.config, state_dict, source)
        state_dict = convert_hf_state_dict(state_dict)
        if keep_pooler:
            logger.warning(
                "checkpoint has no pooler weights: keeping a randomly initialised pooler"
            )
            expected = self.state_dict()
            state_dict = {**state_dict, **{k: expected[k] for k in _POOLER_KEYS}}
        self.load_state_dict(state_dict, strict=True)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path,
        *,
        state_dict: Mapping[str, Tensor] | None = None,
        **config_overrides: Any,
    ) -> BertModel:
        """Builds the encoder from a backbone name or folder and loads its weights.

        Args:
            name_or_dir: "minilm", a local folder, or a hub name; see
                :func:`mtl.backbones.resolve_backbone`.
            state_dict: the folder's weights already in memory (e.g. shared by a search through
                Ray's object store), so the weights file is not read again.
            **config_overrides: config fields to replace, e.g. ``hidden_dropout_prob=0.0``.

        Returns:
            The model in training mode, on CPU, in float32.

        Raises:
            BackboneError: the folder's ``config.json`` is missing, not JSON, or asks for what
                this encoder does not implement (see :func:`mtl.backbones.read_config`).
            CheckpointError: the weights file is unreadable (see :func:`read_checkpoint`) or the
                weights do not fit the config (see :meth:`load_hf_state_dict`); the message
                names the folder.
        """
        from mtl.backbones import resolve_backbone

        folder = resolve_backbone(str(name_or_dir))
        return cls.from_folder(folder, state_dict=state_dict, **config_overrides)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        state_dict: Mapping[str, Tensor] | None = None,
        **config_overrides: Any,
    ) -> BertModel:
        """:meth:`from_pretrained` for a folder already resolved (a run resolves its backbone
        once, :func:`mtl.backbones.load_backbone`, and builds its encoders from that folder).

        Args, Returns and Raises as for :meth:`from_pretrained`; ``folder`` is used as it is.
        """
        from mtl.backbones import read_config

        folder = Path(folder)
        config = dataclasses.replace(read_config(folder), **config_overrides)
        model = cls(config)
        if state_dict is None:
            state_dict, source = read_checkpoint(folder), str(weights_file(folder))
        else:
            source = f"the weights given for {folder}"
        model.load_hf_state_dict(state_dict, source)
        return model

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Counts parameters; without the embedding tables when ``exclude_embeddings``."""
        skip = set(self.embeddings.parameters()) if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if p not in skip)


__all__ = [
    "BertConfig",
    "BertModel",
    "BertOutput",
    "CheckpointError",
    "Padding",
    "attention",
    "check_state_dict",
    "convert_hf_state_dict",
    "is_lfs_pointer",
    "key_problems",
    "lfs_pointer_message",
    "padding_of",
    "read_checkpoint",
    "weights_file",
]
