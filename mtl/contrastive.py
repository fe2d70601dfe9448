"""Stage 1: supervised contrastive pretraining of the encoder on labelled Quora pairs (section 4.5).

A fixed fraction (15% by default) of the Quora training pairs, chosen by id, trains the encoder's
[CLS] embeddings with one of two losses; stage 2 (the multitask training of ``mtl/train.py``)
starts from the stage-1 encoder and trains Quora on the other pairs only. Settings follow the
paper's section 5.3: AdamW at 1e-5, batch 64, 64 tokens per sentence, up to 20 epochs, early
stopping with patience 5 on the loss over Quora's dev pairs.

Losses (pure functions of the embeddings, apart from the code that runs the encoder):

* ``margin`` (the paper's formula, Hadsell et al. 2006):
  L = 0.5 * (y * d^2 + (1 - y) * max(0, m - d)^2), m = 0.5, where d is the Euclidean distance
  between the L2-normalised embeddings, d^2 = 2 - 2 cos(u, v). Section 5.3 says the loss is
  computed from the cosine similarity; on raw MiniLM [CLS] vectors (norm about 7) every
  non-duplicate pair would lie farther apart than m and the negative term would always be zero.
* ``infonce`` (SimCSE's supervised objective, Gao et al. 2021, equation 5, with Quora's labelled
  non-duplicates as the hard negatives): every pair's first sentence h_i is an anchor,

      l_i = -log exp(cos(h_i, h_i+) / tau) / sum_j (exp(cos(h_i, h_j+) / tau)
                                                    + exp(cos(h_i, h_j-) / tau)),

  tau = 0.05. A duplicate pair's positive h_i+ is its second sentence. A non-duplicate pair has
  no labelled positive, so, as unsupervised SimCSE does, its positive is a second encoding of its
  own first sentence under another dropout mask, and its second sentence is its hard negative
  h_i-. Every positive and every hard negative of the batch is a column of every anchor's
  denominator, so each non-duplicate pair's two questions meet in their own anchor's
  denominator and are pushed apart.

The Quora budget is the one a run without stage 1 would train on: stage 1 takes ``fraction``
(15%) of exactly the training pairs that ``data.max_train_examples`` selects, by id, and stage 2
trains on the other 85%, so the two arms of an ablation see the same pairs (the paper's protocol);
``stage1.json`` in the run folder records both sets' sizes and a digest of their ids.

Stage-1 encoders are cached in a folder that may be shared by every run of a search: a file
``<key>.safetensors`` whose key hashes the backbone (its config and weights), the stage-1 config,
the Quora files' checksums, the stage-1 pairs' ids and the seed, so runs that would train
identical stage-1 encoders train it once. A run that misses the cache takes a lock on the key (``<key>.lock`` beside it,
:func:`mtl.cache.exclusive`; on a cluster the cache folder is the shared one) before training, and looks again
once it holds it: trials that start together, such as the cells of an ablation grid, wait for the
first one's stage 1 instead of each training its own. The file is written under a temporary name
and renamed into place, so a reader never sees half a file. Stage 1 runs inside
``torch.random.fork_rng``: a cache hit and a fresh stage 1 leave stage 2 with the same random
state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mtl import data as data_lib
from mtl.backbones import Backbone, load_backbone
from mtl.bert import BertModel
from mtl.cache import atomic_write, cache_root, exclusive, sha256_file
from mtl.config import Config, ContrastiveConfig
from mtl.tasks import BUILTIN, STAGE1_TASK

log = logging.getLogger("mtl.contrastive")

# Bump when the stage-1 procedure changes, so old cache entries are not reused.
CACHE_FORMAT = 2
_QUORA = BUILTIN[STAGE1_TASK]
_QUORA_FILES = (data_lib.split_file(_QUORA, "train"), data_lib.split_file(_QUORA, "dev"))

# ---------------------------------------------------------------------------------------------
# Losses


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (bf16 under autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def margin_loss(u: Tensor, v: Tensor, labels: Tensor, margin: float = 0.5) -> Tensor:
    """The paper's contrastive loss on L2-normalised embeddings, averaged over the batch.

    L_i = 0.5 * (y_i * d_i^2 + (1 - y_i) * max(0, m - d_i)^2), d_i^2 = 2 - 2 cos(u_i, v_i).

    Args:
        u: (batch, hidden) first sentences' embeddings.
        v: (batch, hidden) second sentences' embeddings.
        labels: (batch,) 1 for duplicates, 0 otherwise.
        margin: m.
    """
    u, v = F.normalize(_upcast(u), dim=-1), F.normalize(_upcast(v), dim=-1)
    d2 = (2.0 - 2.0 * (u * v).sum(-1)).clamp_min(0.0)  # (batch,)
    # The floor keeps sqrt's gradient finite for identical embeddings.
    d = d2.clamp_min(1e-12).sqrt()
    y = labels.to(d2.dtype)
    return (0.5 * (y * d2 + (1.0 - y) * (margin - d).clamp_min(0.0).pow(2))).mean()


def infonce_loss(
    u: Tensor,
    v: Tensor,
    labels: Tensor,
    temperature: float = 0.05,
    u_view: Tensor | None = None,
) -> Tensor:
    """SimCSE's supervised InfoNCE (Gao et al. 2021, eq. 5) with non-duplicates as hard negatives.

    Every pair's first sentence is an anchor. A duplicate's positive is its second sentence; a
    non-duplicate's positive is ``u_view`` (its first sentence again under another dropout mask,
    unsupervised SimCSE's positive) and its second sentence is its hard negative. The columns of
    every anchor's softmax are all the positives, then all the hard negatives; averaged over the
    anchors.

    Args:
        u: (batch, hidden) first sentences' embeddings (the anchors).
        v: (batch, hidden) second sentences' embeddings.
        labels: (batch,) 1 for duplicates, 0 otherwise.
        temperature: tau.
        u_view: (non-duplicates, hidden) second views of the non-duplicates' first sentences, in
            batch order; None uses ``u`` itself (cosine 1, as in evaluation mode without dropout).

    Returns:
        A scalar.
    """
    u, v = F.normalize(_upcast(u), dim=-1), F.normalize(_upcast(v), dim=-1)
    negative = ~labels.bool()  # (batch,)
    view = u[negative] if u_view is None else F.normalize(_upcast(u_view), dim=-1)
    positives = v.clone()
    positives[negative] = view  # (batch, hidden)
    columns = torch.cat([positives, v[negative]])  # (batch + non-duplicates, hidden)
    logits = u @ columns.T / temperature  # (batch, batch + non-duplicates)
    return F.cross_entropy(logits, torch.arange(len(u), device=u.device))


LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor, ContrastiveConfig, Tensor | None], Tensor]] = {
    "margin": lambda u, v, y, cfg, u_view: margin_loss(u, v, y, cfg.margin),
    "infonce": lambda u, v, y, cfg, u_view: infonce_loss(u, v, y, cfg.temperature, u_view),
}

# ---------------------------------------------------------------------------------------------
# The stage-1 / stage-2 split of Quora


def split_ids(ids: Sequence[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Splits ids into (stage 1, stage 2) deterministically and disjointly.

    Ids are ordered by sha256 of ``"<seed>:<id>"`` and the first ``round(fraction * n)`` go to
    stage 1, so the split depends only on the set of ids and the seed, not on the file order.
    """
    unique = sorted(set(ids), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    cut = round(fraction * len(unique))
    return set(unique[:cut]), set(unique[cut:])


def exclude_stage1(data: data_lib.TaskData, stage1: Stage1Result | None) -> data_lib.TaskData:
    """``data`` with the stage-1 pairs removed from Quora training; ``data`` itself is untouched.

    A search shares one pre-tokenized :class:`~mtl.data.TaskData` between trials with and without
    stage 1, so this returns a new object whose Quora training split is a filtered copy.
    """
    if stage1 is None or STAGE1_TASK not in data.train:
        return data
    para = data.train[STAGE1_TASK]
    keep = [i for i, example_id in enumerate(para.ids) if example_id not in stage1.ids]
    log.info("%s: held out %d stage-1 training pairs", STAGE1_TASK, len(para) - len(keep))
    return replace(data, train={**data.train, STAGE1_TASK: data_lib.take(para, keep)})


# ---------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``<cache root>/stage1`` (:func:`mtl.cache.cache_root`)."""
    return cache_root() / "stage1"


def _weights_file(backbone_dir: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (backbone_dir / name).is_file():
            return backbone_dir / name
    raise FileNotFoundError(f"{backbone_dir} has neither model.safetensors nor pytorch_model.bin")


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of a set of example ids (order-free), as recorded in ``stage1.json``."""
    return hashlib.sha256("\n".join(sorted(set(ids))).encode()).hexdigest()


def cache_key(
    backbone_dir: Path, cfg: ContrastiveConfig, data_dir: Path, seed: int, ids: Sequence[str]
) -> str:
    """Hash of everything stage 1's result depends on.

    The backbone enters by content (config.json and weights), not by path, so copies of the same
    weights in different places share entries; ``ids`` are the stage-1 training pairs (so a
    different ``data.max_train_examples`` is a different entry); ``enabled`` and ``cache_dir`` do
    not enter, nor do the device and precision stage 1 happens to run on.
    """
    parts = {
        "format": CACHE_FORMAT,
        "backbone": {
            "config.json": sha256_file(backbone_dir / "config.json"),
            "weights": sha256_file(_weights_file(backbone_dir)),
        },
        "stage1": cfg.model_dump(mode="json", exclude={"enabled", "cache_dir"}),
        "data": {name: sha256_file(data_dir / name) for name in _QUORA_FILES},
        "ids": ids_digest(ids),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def save_atomic(path: Path, tensors: dict[str, Tensor], record: dict) -> None:
    """Writes ``tensors`` (with ``record`` as metadata) to a temporary name, then renames it."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"record": json.dumps(record)}))


def read_record(path: Path) -> dict:
    """The record stored with a cached stage-1 encoder."""
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["record"])


def load_encoder(encoder: BertModel, path: str | Path) -> None:
    """Loads a stage-1 encoder's weights into ``encoder`` (same architecture, strict keys)."""
    encoder.load_state_dict(load_file(str(path)), strict=True)


# ---------------------------------------------------------------------------------------------
# Stage 1


@dataclass(frozen=True)
class Stage1Result:
    """What stage 1 hands to stage 2.

    Attributes:
        path: the cached encoder weights.
        key: the cache key.
        cache_hit: the encoder came from the cache and no stage 1 was trained.
        steps: optimizer steps this call trained (0 on a hit).
        ids: the Quora training ids of the stage-1 fraction (held out of stage 2).
        record: how the cached encoder was trained (epochs, losses, sizes).
    """

    path: Path
    key: str
    cache_hit: bool
    steps: int
    ids: frozenset[str]
    record: dict


def _cls_pair(
    encoder: BertModel, batch: data_lib.Batch, views: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """[CLS] embeddings of both sentences of each pair, in one encoder pass.

    Args:
        encoder: the encoder being trained.
        batch: a design-1 batch of Quora pairs.
        views: also encode the non-duplicates' first sentences a second time (another dropout
            mask, the InfoNCE loss's positives for them).

    Returns:
        u and v, (batch, hidden) each, and the second views (non-duplicates, hidden) or None.
    """
    assert batch.input_ids_b is not None and batch.attention_mask_b is not None
    length = max(batch.input_ids.shape[1], batch.input_ids_b.shape[1])

    def pad(x: Tensor) -> Tensor:
        return F.pad(x, (0, length - x.shape[1]))

    ids = [pad(batch.input_ids), pad(batch.input_ids_b)]
    mask = [pad(batch.attention_mask), pad(batch.attention_mask_b)]
    if views:
        negative = ~batch.labels.bool()
        ids.append(ids[0][negative])
        mask.append(mask[0][negative])
    # (2 * batch [+ non-duplicates], length) -> (..., hidden)
    cls = encoder(torch.cat(ids), torch.cat(mask)).last_hidden_state[:, 0]
    n = len(batch.input_ids)
    return cls[:n], cls[n : 2 * n], cls[2 * n :] if views else None


def _mean_loss(
    encoder: BertModel,
    enc: data_lib.Encoded,
    cfg: ContrastiveConfig,
    device: torch.device,
    autocast: Callable,
) -> float:
    """Mean validation loss over length-sorted batches (a fixed order)."""
    encoder.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for indices in data_lib.batch_order(enc.lengths, cfg.batch_size, None):
            batch = data_lib.collate(enc, indices).to(device)
            with autocast():
                u, v, _ = _cls_pair(encoder, batch)
            total += LOSSES[cfg.loss](u, v, batch.labels, cfg, None).item() * len(indices)
            count += len(indices)
    encoder.train()
    return total / max(1, count)


def train_stage1(
    encoder: BertModel,
    train_set: data_lib.Encoded,
    val_set: data_lib.Encoded,
    cfg: ContrastiveConfig,
    seed: int,
    device: torch.device,
    autocast: Callable = contextlib.nullcontext,
) -> tuple[dict[str, Tensor], dict]:
    """Trains ``encoder`` contrastively and returns the best state (by validation loss).

    Returns:
        The best state dict (on the CPU) and a record: epochs run, optimizer steps, the
        validation loss of every epoch and the best one.
    """
    encoder.to(device).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, fused=True)  # see mtl.train
    loss_fn = LOSSES[cfg.loss]
    best, best_state, bad, steps = float("inf"), None, 0, 0
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        total = 0.0
        order = data_lib.batch_order(train_set.lengths, cfg.batch_size, gen, bucket=False)
        for indices in order:
            batch = data_lib.collate(train_set, indices).to(device)
            with autocast():
                u, v, u_view = _cls_pair(encoder, batch, views=cfg.loss == "infonce")
            loss = loss_fn(u, v, batch.labels, cfg, u_view)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            total += loss.item()
        val = _mean_loss(encoder, val_set, cfg, device, autocast)
        history.append({"epoch": epoch + 1, "train_loss": total / max(1, len(order)), "val": val})
        log.info(
            "stage 1 epoch %d: train %.4f, val %.4f", epoch + 1, history[-1]["train_loss"], val
        )
        if val < best:
            best, bad = val, 0
            best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in encoder.state_dict().items()
            }
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is None:
        raise RuntimeError(f"stage 1: the validation loss was never finite ({history})")
    record = {"epochs": len(history), "steps": steps, "best_val_loss": best, "history": history}
    return best_state, record


def _keep_ids(raw: data_lib.RawSplit, ids: set[str]) -> data_lib.RawSplit:
    """The rows of ``ids``, the first row of each (a repeated id is one pair, as in the pool)."""
    seen: set[str] = set()
    keep = []
    for i, example_id in enumerate(raw.ids):
        if example_id in ids and example_id not in seen:
            seen.add(example_id)
            keep.append(i)
    return data_lib.take(raw, keep)


def run_stage1(
    cfg: Config,
    pool: data_lib.RawSplit,
    device: torch.device | str = "cpu",
    autocast: Callable = contextlib.nullcontext,
    *,
    backbone: Backbone | None = None,
    weights: Mapping[str, Tensor] | None = None,
    data_dir: Path | None = None,
) -> Stage1Result:
    """The stage-1 encoder for ``cfg``: from the cache, or trained now and cached.

    Args:
        cfg: the run's config (``contrastive``, ``model.backbone``, ``data.data_dir``, ``seed``).
        pool: the Quora training pairs the run would train on without stage 1 (what
            ``data.max_train_examples`` selected), as read and untokenized; stage 1 trains on
            ``contrastive.fraction`` of them and stage 2 on the rest.
        device: where to train on a cache miss.
        autocast: a context factory for mixed precision, as the training loop uses.
        backbone: the run's backbone, already resolved and checked (None: loaded here,
            :func:`mtl.backbones.load_backbone`).
        weights: its pretrained weights already in memory (None: read from its folder on a
            cache miss).
        data_dir: ``data.data_dir`` as the run resolved it (None: resolved here).

    Returns:
        The cached weights' path, whether it was a hit, and the stage-1 ids.
    """
    c = cfg.contrastive
    if data_dir is None:
        data_dir = data_lib.resolve_data_dir(cfg.data.data_dir)
    if backbone is None:
        backbone = load_backbone(cfg)
    stage1_ids, _ = split_ids(pool.ids, c.fraction, cfg.seed)
    key = cache_key(backbone.folder, c, data_dir, cfg.seed, sorted(stage1_ids))
    cache_dir = Path(c.cache_dir).expanduser() if c.cache_dir else default_cache_dir()
    path = cache_dir / f"{key}.safetensors"
    ids = frozenset(stage1_ids)

    def hit() -> Stage1Result:
        log.info("stage 1: cache hit %s", path)
        return Stage1Result(path, key, True, 0, ids, read_record(path))

    if path.is_file():
        return hit()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(
        cache_dir / f"{key}.lock",
        lambda: log.info("stage 1: another run is training %s; waiting for it", path.name),
    ):
        if path.is_file():  # trained by the run that held the lock
            return hit()
        train_raw = _keep_ids(pool, stage1_ids)
        record = _train_and_cache(
            cfg, backbone, weights, data_dir, train_raw, path, device, autocast
        )
    log.info("stage 1: trained %d steps, cached %s", record["steps"], path)
    return Stage1Result(path, key, False, record["steps"], ids, record)


def _train_and_cache(
    cfg: Config,
    backbone: Backbone,
    weights: Mapping[str, Tensor] | None,
    data_dir: Path,
    train_raw: data_lib.RawSplit,
    path: Path,
    device: torch.device | str,
    autocast: Callable,
) -> dict:
    """Train stage 1 on ``train_raw`` and write it to ``path``; returns its record.

    The training pairs come from the run (no second read of Quora's training file); the
    validation pairs are stage 1's own subsample of Quora's dev file, by ``cfg.seed``.
    """
    c = cfg.contrastive
    started = time.time()
    val_raw = data_lib.subsample(
        data_lib.read_split(data_dir, _QUORA, "dev"), c.max_val_examples, cfg.seed
    )
    train_set = data_lib.encode(train_raw, backbone.tokenizer, c.max_length, design=1)
    val_set = data_lib.encode(val_raw, backbone.tokenizer, c.max_length, design=1)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        encoder = BertModel.from_folder(backbone.folder, state_dict=weights)
        state, record = train_stage1(
            encoder, train_set, val_set, c, cfg.seed, torch.device(device), autocast
        )
    record.update(
        key=path.stem,
        backbone=cfg.model.backbone,
        config=c.model_dump(mode="json"),
        seed=cfg.seed,
        train_pairs=len(train_set),
        val_pairs=len(val_set),
        seconds=round(time.time() - started, 1),
    )
    save_atomic(path, state, record)
    return record


def stage1_for_run(
    cfg: Config,
    run_dir: Path,
    data: data_lib.TaskData,
    device: torch.device,
    autocast: Callable,
    backbone: Backbone | None = None,
    weights: Mapping[str, Tensor] | None = None,
) -> Stage1Result | None:
    """Stage 1 for a training run (None when ``contrastive.enabled`` is off).

    ``backbone`` (with ``weights``) and ``data.data_dir`` are what the run resolved and read,
    so that a run resolves its backbone and data folder once, and reads Quora's training file
    once: stage 1 takes its pairs' text from ``data.raw_train``.

    Stage 1 trains on ``contrastive.fraction`` of the Quora training pairs in ``data`` (the run's
    subsample) and stage 2 on the rest (:func:`exclude_stage1`). Writes ``stage1.json`` in the
    run folder: the key, the cache path, whether it was a hit, the steps trained by this run, how
    the cached encoder was trained, and both stages' pair counts and id digests.
    """
    if not cfg.contrastive.enabled:
        return None
    raw = data.raw_train[STAGE1_TASK]
    result = run_stage1(
        cfg, raw, device, autocast, backbone=backbone, weights=weights, data_dir=data.data_dir
    )
    pool = raw.ids
    stage2 = [i for i in pool if i not in result.ids]
    summary = {k: v for k, v in asdict(result).items() if k != "ids"}
    summary.update(
        path=str(result.path),
        quora_pairs=len(pool),
        stage1_pairs=len(result.ids),
        stage2_pairs=len(stage2),
        stage1_ids_sha256=ids_digest(result.ids),
        stage2_ids_sha256=ids_digest(stage2),
        quora_ids_sha256=ids_digest(pool),
    )
    (run_dir / "stage1.json").write_text(json.dumps(summary, indent=2))
    return result


__all__ = [
    "Stage1Result",
    "cache_key",
    "default_cache_dir",
    "exclude_stage1",
    "ids_digest",
    "infonce_loss",
    "load_encoder",
    "margin_loss",
    "run_stage1",
    "save_atomic",
    "split_ids",
    "stage1_for_run",
    "train_stage1",
]
