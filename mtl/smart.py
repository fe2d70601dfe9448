"""SMART: smoothness-inducing adversarial regularization (section 4.3 of the paper).

Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language
Models through Principled Regularized Optimization", https://arxiv.org/abs/1911.03437. The
training objective becomes (their equation 1, the paper's section 4.3)

    F(theta) = L(theta) + lambda_s * R_s(theta),
    R_s(theta) = 1/n sum_i max_{||x~_i - x_i||_p <= epsilon} l_s(f(x~_i; theta), f(x_i; theta)),

where x_i is the output of the embedding layer (word + position + token-type embeddings after
their LayerNorm), the input the encoder layers see, and x~_i its perturbation. As in MT-DNN, the
perturbation is added to that output, where every token vector has LayerNorm's scale (median L2
norm about 10 on MiniLM), never to the raw word embeddings before the LayerNorm (about 9 times
smaller there). The inner max is approximated by K ascent steps from Gaussian noise, with one of
two update rules (``smart.update``):

* ``normalized_step`` (the default), SMART's Algorithm 1 (lines 5-9), whose normalised ascent
  step namisan/mt-dnn's ``mt_dnn/perturbation.py`` implemented when the paper came out (commit
  0d6201e, ``SmartPerturbation._norm_grad``)::

      delta_0 = sigma * N(0, I)
      g_k = grad_delta l_s(f(x + delta_k), f(x))
      delta_{k+1} = delta_k + eta * g_k / (||g_k|| + epsilon)      (norm per token)

  The gradient is normalised, not the perturbation, so while the raw gradient is well above
  epsilon every token moves by eta (in the chosen norm) in the direction that increases the
  divergence most: a perturbation of order eta = 1e-3, under 1% of a token vector, pointing where
  the model is least smooth (in training, with dropout on, the raw gradient on MiniLM is about
  1e-4; without dropout, at sigma-sized noise, it falls below epsilon and so does the step).
  We follow Algorithm 1 more literally than that commit, which dropped delta_0 from the final
  input (x + eta * g / ||g||), stopped R_s's gradient at the embedding output and ascended a
  one-sided KL: here the final input is x + delta_K and R_s reaches the embedding layer, as in
  later mt-dnn and vat-pytorch. Like both we do not project onto the epsilon ball (Algorithm 1's
  Pi), so epsilon is only the constant that keeps the division finite.

* ``unit_norm``, archinetai/vat-pytorch's ``SMARTLoss`` (which the seed paper cites) and later
  MT-DNN (``perturbation.py`` at commit 676b48b): the whole perturbation, noise plus step, is
  rescaled to norm 1 per token::

      delta_{k+1} = (delta_k + eta * g_k) / (||delta_k + eta * g_k|| + epsilon)

  Much larger (with the inf norm, over half a token vector's L2 norm on MiniLM) but still on the
  embedding layer's output, so the input stays recognisable (median cosine with the clean token
  vector above 0.7).

``||.||`` is the infinity norm (``smart.norm: inf``, both references' default) or the L2 norm.
The perturbation is detached after each step, so the gradient of R_s with respect to the
parameters is taken at a fixed perturbation. l_s is the symmetric KL divergence for
classification (the paraphrase logit read as a two-class distribution) and the squared error for
regression. Its gradient is the full gradient of the value the paper defines; mt-dnn's
``SymKlCriterion`` and vat-pytorch's ``sym_kl_loss`` detach the other side in each KL term, a
semi-gradient that near f(x~) = f(x) is half of ours, so lambda here acts like 2 * lambda there.
Under bf16 autocast (the CUDA default) sigma = 1e-5 is below bf16's resolution in the matmuls, so
the initial noise is mostly rounding; the ascent step (order eta) is not.

The module has three layers: pure tensor functions (the divergences, the normalisation, the two
update rules), the one function that re-runs the model (:func:`smart_regularizer`), and the glue
the training loop calls (:class:`Regularizer`). The glue owns SMART's randomness: the noise and
the dropout of SMART's extra passes draw from SMART's own seeded generator inside
``torch.random.fork_rng``, so with ``weight: 0`` a run is identical to a run without SMART. It
also holds SMART's optional Bregman proximal point term: mu * l_s(f(x; theta), f(x; theta~))
against a momentum copy theta~ of the model, updated after every optimizer step as
theta~ <- beta * theta~ + (1 - beta) * theta (their equations 2 and 3).
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
    from mtl.tasks import Task

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


def divergence(task: Task | str, logits: Tensor, other: Tensor) -> Tensor:
    """l_s between two outputs of a task's head (:meth:`mtl.tasks.Task.divergence`): symmetric
    KL of the class distributions (sst's softmax, para's binary logit) or squared error (sts).

    Args:
        task: the task (or a built-in task's name), e.g. ``sst`` ((batch, 5) logits), ``para``
            ((batch,) binary logits) or ``sts`` ((batch,) scores).
        logits: one output.
        other: the other output, same shape.

    Returns:
        A scalar, zero when the outputs are equal and positive otherwise.
    """
    from mtl.tasks import as_task

    return as_task(task).divergence(_upcast(logits), _upcast(other))


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


def ascent_step(
    delta: Tensor, grad: Tensor, eta: float, norm: str, epsilon: float, update: str
) -> Tensor:
    """One update of the perturbation (no autograd), by one of the two rules of the module doc.

    Args:
        delta: (batch, seq, hidden) current perturbation delta_k.
        grad: (batch, seq, hidden) gradient of the divergence with respect to ``delta``.
        eta: the step size.
        norm: ``inf`` or ``l2``, per token.
        epsilon: keeps the division finite.
        update: ``normalized_step`` (SMART's Algorithm 1: delta + eta * g / ||g||) or
            ``unit_norm`` (vat-pytorch: (delta + eta * g) / ||delta + eta * g||).

    Returns:
        delta_{k+1}, detached.
    """
    delta, grad = delta.detach(), grad.detach()
    if update == "normalized_step":
        return delta + eta * normalize(grad, norm, epsilon)
    if update == "unit_norm":
        return normalize(delta + eta * grad, norm, epsilon)
    raise ValueError(f"update must be 'normalized_step' or 'unit_norm', got {update!r}")


def initial_noise(embeds: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """sigma * N(0, I) shaped like ``embeds``, as both reference codes draw it (randn * sigma)."""
    noise = torch.randn(embeds.shape, generator=generator, device=embeds.device, dtype=embeds.dtype)
    return noise * sigma


# ---------------------------------------------------------------------------------------------
# The one function that re-runs the model


def _perturbed_logits(model: MultitaskBert, batch: Batch, hidden: Sequence[Tensor]) -> Tensor:
    second = hidden[1] if len(hidden) > 1 else None
    return model(batch, embedding_output=(hidden[0], second)).logits


def adversarial_perturbation(
    model: MultitaskBert,
    batch: Batch,
    embedding_output: Sequence[Tensor],
    target: Tensor,
    cfg: SmartConfig,
) -> list[Tensor]:
    """The perturbation delta_K of the embedding layer's output, after K ascent steps from noise.

    Args:
        model: the multitask model, in whatever train/eval mode the caller chose.
        batch: one task's batch.
        embedding_output: the clean embedding-layer output of each sentence, (batch, seq, hidden)
            each (used detached): one, or two for a design-1 pair.
        target: the clean output the divergence is measured against (used detached).
        cfg: sigma, eta, epsilon, steps (K), norm and update rule.

    Returns:
        One detached (batch, seq, hidden) tensor per sentence, each started from its own noise
        drawn from torch's global random state (the caller isolates it, see
        :class:`Regularizer`).
    """
    hidden = [h.detach() for h in embedding_output]
    delta = [initial_noise(h, cfg.sigma) for h in hidden]
    target = target.detach()
    for _ in range(cfg.steps):
        delta = [d.requires_grad_() for d in delta]
        with torch.enable_grad():
            perturbed = [h + d for h, d in zip(hidden, delta, strict=True)]
            div = divergence(
                model.tasks[batch.task], _perturbed_logits(model, batch, perturbed), target
            )
            grads = torch.autograd.grad(div, delta)
        delta = [
            ascent_step(d, g, cfg.eta, cfg.norm, cfg.epsilon, cfg.update)
            for d, g in zip(delta, grads, strict=True)
        ]
    return delta


def smart_regularizer(
    model: MultitaskBert,
    batch: Batch,
    clean_logits: Tensor,
    cfg: SmartConfig,
) -> Tensor:
    """R_s of one batch: the divergence at the adversarially perturbed embedding-layer output.

    Args:
        model: the multitask model.
        batch: one task's batch.
        clean_logits: the model's output on the unperturbed batch, with its graph: R_s
            backpropagates through it as well as through the perturbed run.
        cfg: sigma, eta, epsilon, steps (K), norm and update rule.

    Returns:
        The scalar R_s; its gradient is taken at the fixed (detached) perturbation and flows
        into every parameter, the embedding layer's included.
    """
    hidden = [h for h in model.embedding_output(batch) if h is not None]
    delta = adversarial_perturbation(model, batch, hidden, clean_logits, cfg)
    perturbed = [h + d for h, d in zip(hidden, delta, strict=True)]
    return divergence(
        model.tasks[batch.task], _perturbed_logits(model, batch, perturbed), clean_logits
    )


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
    R_s is computed and logged but not added, so neither the loss nor the gradients change.

    SMART's randomness is its own: before each batch's R_s, a seed drawn from SMART's generator
    (seeded with ``seed``) seeds torch inside ``torch.random.fork_rng``, so the initial noise and
    the dropout of the extra passes never consume the training loop's random state, and the
    generator's state goes into checkpoints (:meth:`state_dict`) so a resumed run draws the same.
    """

    def __init__(self, cfg: SmartConfig, model: nn.Module, total_steps: int, seed: int = 0) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        use_teacher = cfg.enabled and cfg.bregman
        self.teacher = MomentumTeacher(model) if use_teacher else None
        self.generator = torch.Generator().manual_seed(seed)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def state_dict(self) -> dict[str, Tensor]:
        """SMART's random state, for a checkpoint."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.generator.set_state(state["generator"])

    def _regularizer(self, model: MultitaskBert, batch: Batch, logits: Tensor) -> Tensor:
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        device = logits.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return smart_regularizer(model, batch, logits, self.cfg)

    def _record(self, name: str, value: Tensor) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + value.item()
        self._counts[name] = self._counts.get(name, 0) + 1

    def add(self, loss: Tensor, model: MultitaskBert, batch: Batch, logits: Tensor) -> Tensor:
        """``loss + weight * R_s (+ mu * Bregman)`` for one batch whose clean output is ``logits``."""
        if not self.cfg.enabled:
            return loss
        r_s = self._regularizer(model, batch, logits)
        self._record(f"smart_{batch.task}", r_s)
        if self.cfg.weight > 0:
            loss = loss + self.cfg.weight * r_s
        if self.teacher is not None:
            bregman = divergence(model.tasks[batch.task], logits, self.teacher.logits(batch))
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
