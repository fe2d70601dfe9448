"""SMART: smoothness-inducing adversarial regularization (section 4.3 of the paper).

Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language
Models through Principled Regularized Optimization", https://arxiv.org/abs/1911.03437. The
training objective becomes (their equation 1, the paper's section 4.3)

    F(theta) = L(theta) + lambda * R_s(theta),
    R_s(theta) = 1/n sum_i max_{x~_i} l_s(f(x~_i; theta), f(x_i; theta)),

where x_i are the input word embeddings and x~_i their perturbation. As in the code the paper
cites (archinetai/vat-pytorch's ``SMARTLoss``; MT-DNN's ``SmartPerturbation`` is the same idea),
the inner max is approximated by K ascent steps from Gaussian noise:

    delta_0 = sigma * N(0, I)
    delta_{k+1} = normalize(delta_k + eta * grad_delta l_s(f(x + delta_k), f(x)))
    R_s = l_s(f(x + delta_K), f(x))

``normalize`` divides each token's perturbation by its own norm plus epsilon (infinity norm by
default, L2 as an option), so epsilon is only the small constant that keeps the division finite
and every token ends up with a perturbation of norm about 1. Read literally as a ball of radius
epsilon = 1e-6, R_s would be about 1e-12 on MiniLM; with the per-token normalisation it is about
1e-2. As in vat-pytorch the perturbation is detached after each ascent step, so the gradient of R_s
with respect to the parameters is taken at a fixed perturbation. l_s is the symmetric KL divergence
for classification (the paraphrase logit read as a two-class distribution) and the squared error
for regression.

The module has three layers: pure tensor functions (the divergences, the normalisation, one ascent
step), the one function that re-runs the model (:func:`smart_regularizer`), and the glue the
training loop calls (:class:`Regularizer`), which also holds SMART's optional Bregman proximal point
term: mu * l_s(f(x; theta), f(x; theta~)) against a momentum copy theta~ of the model, updated after
every optimizer step as theta~ <- beta * theta~ + (1 - beta) * theta (their equations 2 and 3).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.config import SmartConfig
from mtl.data import Batch

if TYPE_CHECKING:
    from mtl.heads import MultitaskBert

# ---------------------------------------------------------------------------------------------
# Pure tensor math


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (bf16 logits under autocast), float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def binary_log_probs(logit: Tensor) -> Tensor:
    """(batch,) binary logits -> (batch, 2) log-probabilities of the classes 0 and 1."""
    return torch.stack([F.logsigmoid(-logit), F.logsigmoid(logit)], dim=-1)


def symmetric_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Batch mean of KL(p || q) + KL(q || p) = sum_c (p_c - q_c) (log p_c - log q_c).

    Args:
        log_p: (batch, classes) log-probabilities.
        log_q: (batch, classes) log-probabilities.

    Returns:
        A scalar; gradients flow into both arguments.
    """
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()


def squared_error(a: Tensor, b: Tensor) -> Tensor:
    """Batch mean of (a - b)^2 for (batch,) scores."""
    return (a - b).pow(2).mean()


def divergence(task: str, logits: Tensor, other: Tensor) -> Tensor:
    """l_s between two outputs of a task's head: symmetric KL (sst, para) or squared error (sts).

    Args:
        task: ``sst`` ((batch, 5) logits), ``para`` ((batch,) binary logits) or ``sts``
            ((batch,) scores).
        logits: one output.
        other: the other output, same shape.

    Returns:
        A scalar, zero when the outputs are equal and positive otherwise.
    """
    logits, other = _upcast(logits), _upcast(other)
    if task == "sst":
        return symmetric_kl(F.log_softmax(logits, -1), F.log_softmax(other, -1))
    if task == "para":
        return symmetric_kl(binary_log_probs(logits), binary_log_probs(other))
    if task == "sts":
        return squared_error(logits, other)
    raise ValueError(f"unknown task {task!r}")


def normalize(delta: Tensor, norm: str, epsilon: float) -> Tensor:
    """Divides every token's perturbation by its norm plus ``epsilon``.

    Args:
        delta: (batch, seq, hidden) perturbation.
        norm: ``inf`` (the largest absolute entry, vat-pytorch's default) or ``l2``.
        epsilon: keeps the division finite for an all-zero token.
    """
    if norm == "inf":
        size = delta.abs().amax(dim=-1, keepdim=True)  # (batch, seq, 1)
    elif norm == "l2":
        size = delta.norm(dim=-1, keepdim=True)
    else:
        raise ValueError(f"norm must be 'inf' or 'l2', got {norm!r}")
    return delta / (size + epsilon)


def ascent_step(delta: Tensor, grad: Tensor, eta: float, norm: str, epsilon: float) -> Tensor:
    """One ascent step on the divergence, then the per-token normalisation (no autograd)."""
    return normalize(delta.detach() + eta * grad.detach(), norm, epsilon)


def initial_noise(embeds: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """sigma * N(0, I) shaped like ``embeds``, as both reference codes draw it (randn * sigma)."""
    noise = torch.randn(embeds.shape, generator=generator, device=embeds.device, dtype=embeds.dtype)
    return noise * sigma


# ---------------------------------------------------------------------------------------------
# The one function that re-runs the model


def _perturbed_logits(model: MultitaskBert, batch: Batch, embeds: Sequence[Tensor]) -> Tensor:
    second = embeds[1] if len(embeds) > 1 else None
    return model(batch, embeds=(embeds[0], second)).logits


def adversarial_perturbation(
    model: MultitaskBert,
    batch: Batch,
    target: Tensor,
    cfg: SmartConfig,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """The perturbation delta_K of the word embeddings, after K ascent steps from noise.

    Args:
        model: the multitask model, in whatever train/eval mode the caller chose.
        batch: one task's batch.
        target: the clean output the divergence is measured against (used detached).
        cfg: sigma, eta, epsilon, steps (K) and norm.
        generator: random state of the initial noise (None: torch's global one).

    Returns:
        One detached (batch, seq, hidden) tensor per perturbed sentence: one, or two for a
        design-1 pair, each with its own noise.
    """
    embeds = [e.detach() for e in model.word_embeddings(batch) if e is not None]
    noise = [initial_noise(e, cfg.sigma, generator) for e in embeds]
    target = target.detach()
    for _ in range(cfg.steps):
        noise = [n.requires_grad_() for n in noise]
        with torch.enable_grad():
            perturbed = [e + n for e, n in zip(embeds, noise, strict=True)]
            div = divergence(batch.task, _perturbed_logits(model, batch, perturbed), target)
            grads = torch.autograd.grad(div, noise)
        noise = [
            ascent_step(n, g, cfg.eta, cfg.norm, cfg.epsilon)
            for n, g in zip(noise, grads, strict=True)
        ]
    return noise


def smart_regularizer(
    model: MultitaskBert,
    batch: Batch,
    clean_logits: Tensor,
    cfg: SmartConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """R_s of one batch: the divergence at the adversarially perturbed word embeddings.

    Args:
        model: the multitask model.
        batch: one task's batch.
        clean_logits: the model's output on the unperturbed batch, with its graph: R_s
            backpropagates through it as well as through the perturbed run.
        cfg: sigma, eta, epsilon, steps (K) and norm.
        generator: random state of the initial noise (None: torch's global one).

    Returns:
        The scalar R_s; its gradient is taken at the fixed (detached) perturbation.
    """
    delta = adversarial_perturbation(model, batch, clean_logits, cfg, generator)
    embeds = [e for e in model.word_embeddings(batch) if e is not None]
    perturbed = [e + d for e, d in zip(embeds, delta, strict=True)]
    return divergence(batch.task, _perturbed_logits(model, batch, perturbed), clean_logits)


# ---------------------------------------------------------------------------------------------
# Bregman proximal point teacher


class MomentumTeacher:
    """A frozen copy theta~ of the model, moved towards it after every optimizer step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # Frozen student parameters never change, so only the trainable ones are tracked.
        pairs = [
            (t, s)
            for t, s in zip(self.model.parameters(), model.parameters(), strict=True)
            if s.requires_grad
        ]
        self._teacher = [t for t, _ in pairs]
        self._student = [s for _, s in pairs]

    @torch.no_grad()
    def update(self, beta: float) -> None:
        """theta~ <- beta * theta~ + (1 - beta) * theta."""
        torch._foreach_lerp_(self._teacher, self._student, 1.0 - beta)

    @torch.no_grad()
    def logits(self, batch: Batch) -> Tensor:
        """The teacher's output on the clean batch (no dropout)."""
        return self.model(batch).logits


def teacher_beta(step: int, total_steps: int, cfg: SmartConfig) -> float:
    """beta for the update after optimizer step ``step`` (1-based): early, then late."""
    return cfg.beta_early if step <= cfg.beta_switch * total_steps else cfg.beta_late


# ---------------------------------------------------------------------------------------------
# What the training loop calls


class Regularizer:
    """Adds lambda * R_s (and the optional Bregman term) to each batch's loss and logs them.

    With ``cfg.enabled`` false every method is a no-op and nothing is computed. With weight 0,
    R_s is computed and logged but detached, so neither the loss nor the gradients change.
    """

    def __init__(self, cfg: SmartConfig, model: nn.Module, total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        use_teacher = cfg.enabled and cfg.bregman
        self.teacher = MomentumTeacher(model) if use_teacher else None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def _record(self, name: str, value: Tensor) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + value.item()
        self._counts[name] = self._counts.get(name, 0) + 1

    def add(self, loss: Tensor, model: MultitaskBert, batch: Batch, logits: Tensor) -> Tensor:
        """``loss + weight * R_s (+ mu * Bregman)`` for one batch whose clean output is ``logits``."""
        if not self.cfg.enabled:
            return loss
        r_s = smart_regularizer(model, batch, logits, self.cfg)
        self._record(f"smart_{batch.task}", r_s)
        if self.cfg.weight > 0:
            loss = loss + self.cfg.weight * r_s
        if self.teacher is not None:
            bregman = divergence(batch.task, logits, self.teacher.logits(batch))
            self._record(f"bregman_{batch.task}", bregman)
            if self.cfg.mu > 0:
                loss = loss + self.cfg.mu * bregman
        return loss

    def after_step(self, step: int) -> None:
        """Moves the Bregman teacher after optimizer step ``step`` (1-based)."""
        if self.teacher is not None:
            self.teacher.update(teacher_beta(step, self.total_steps, self.cfg))

    def log(self, writer, step: int) -> None:
        """Writes the running means as ``train/smart_<task>`` (and ``train/bregman_<task>``)."""
        for name, total in self._sums.items():
            writer.add_scalar(f"train/{name}", total / self._counts[name], step)
        self._sums.clear()
        self._counts.clear()


__all__ = [
    "MomentumTeacher",
    "Regularizer",
    "adversarial_perturbation",
    "ascent_step",
    "binary_log_probs",
    "divergence",
    "initial_noise",
    "normalize",
    "smart_regularizer",
    "squared_error",
    "symmetric_kl",
    "teacher_beta",
]
