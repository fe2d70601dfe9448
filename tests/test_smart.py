"""SMART: the pure divergences and ascent step, R_s against finite differences, weight 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtl import smart
from mtl.bert import BertModel
from mtl.config import ModelConfig, SmartConfig
from mtl.heads import MultitaskBert, task_loss
from tests.test_heads import _batch

TASK_DESIGNS = [("sst", 2), ("para", 1), ("para", 2), ("sts", 1), ("sts", 2)]


def _model(backbone: Path, design: int, dtype=torch.float64) -> MultitaskBert:
    torch.manual_seed(0)
    cfg = ModelConfig(design=design, head_hidden=8)
    return MultitaskBert(BertModel.from_pretrained(str(backbone)), cfg).to(dtype)


def _logits(task: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 5) if task == "sst" else (n,)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_divergence_is_zero_for_identical_outputs_and_positive_otherwise(task: str) -> None:
    a, b = _logits(task, 4, 0), _logits(task, 4, 1)
    assert smart.divergence(task, a, a.clone()).item() == 0.0
    assert smart.divergence(task, a, b).item() > 0.0
    # Symmetric in its arguments.
    torch.testing.assert_close(smart.divergence(task, a, b), smart.divergence(task, b, a))


def test_symmetric_kl_matches_torch_kl_in_both_directions() -> None:
    a, b = _logits("sst", 4, 0), _logits("sst", 4, 1)
    lp, lq = F.log_softmax(a, -1), F.log_softmax(b, -1)
    both = F.kl_div(lq, lp, log_target=True, reduction="batchmean") + F.kl_div(
        lp, lq, log_target=True, reduction="batchmean"
    )
    torch.testing.assert_close(smart.divergence("sst", a, b), both)


def test_paraphrase_logit_is_read_as_a_two_class_distribution() -> None:
    a, b = _logits("para", 4, 0), _logits("para", 4, 1)
    two_class_a = torch.stack([torch.zeros_like(a), a], -1)  # softmax([0, l]) = [1 - s(l), s(l)]
    two_class_b = torch.stack([torch.zeros_like(b), b], -1)
    torch.testing.assert_close(
        smart.divergence("para", a, b), smart.divergence("sst", two_class_a, two_class_b)
    )
    assert smart.divergence("sts", a, b).item() == pytest.approx(((a - b) ** 2).mean().item())


@pytest.mark.parametrize(("norm", "order"), [("inf", float("inf")), ("l2", 2.0)])
def test_normalize_scales_each_token_to_norm_about_one(norm: str, order: float) -> None:
    delta = torch.randn(3, 5, 8, dtype=torch.float64) * torch.rand(3, 5, 1, dtype=torch.float64)
    out = smart.normalize(delta, norm, epsilon=1e-6)
    sizes = torch.linalg.vector_norm(delta, ord=order, dim=-1)
    torch.testing.assert_close(
        torch.linalg.vector_norm(out, ord=order, dim=-1), sizes / (sizes + 1e-6)
    )
    torch.testing.assert_close(
        out / out.norm(dim=-1, keepdim=True), delta / delta.norm(dim=-1, keepdim=True)
    )
    assert smart.normalize(torch.zeros(1, 2, 8), norm, 1e-6).abs().max() == 0.0  # epsilon: finite


def test_l2_ascent_step_on_a_quadratic_is_a_power_iteration_and_never_decreases() -> None:
    """For D(delta) = sum_t delta_t' H delta_t with H positive semi-definite, one step raises D."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    h = a @ a.T

    def d(delta: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsi,ij,bsj->", delta, h, delta)

    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        delta = smart.initial_noise(torch.zeros(2, 3, 8, dtype=torch.float64), 1e-5, g)
        for eta in (1e-3, 1e-1, 10.0):
            grad = 2 * torch.einsum("ij,bsj->bsi", h, delta)
            stepped = smart.ascent_step(delta, grad, eta, "l2", 1e-6)
            assert d(stepped) >= d(smart.normalize(delta, "l2", 1e-6))


@pytest.mark.parametrize(("task", "design"), TASK_DESIGNS)
def test_ascent_step_does_not_decrease_the_divergence(
    tiny_backbone: Path, task: str, design: int
) -> None:
    model = _model(tiny_backbone, design).eval()
    batch = _batch(task, design)
    clean = model(batch).logits
    embeds = [e for e in model.word_embeddings(batch) if e is not None]

    def d(delta: list[torch.Tensor]) -> float:
        perturbed = [e + x for e, x in zip(embeds, delta, strict=True)]
        second = perturbed[1] if len(perturbed) > 1 else None
        return smart.divergence(
            task, model(batch, embeds=(perturbed[0], second)).logits, clean
        ).item()

    cfg = SmartConfig(enabled=True)
    gen = torch.Generator().manual_seed(0)
    noise = [smart.initial_noise(e, cfg.sigma, gen).requires_grad_() for e in embeds]
    perturbed = [e + n for e, n in zip(embeds, noise, strict=True)]
    second = perturbed[1] if len(perturbed) > 1 else None
    div = smart.divergence(task, model(batch, embeds=(perturbed[0], second)).logits, clean)
    grads = torch.autograd.grad(div, noise)
    noise = [n.detach() for n in noise]
    # The raw gradient step at the paper's eta, and the full step with its normalisation.
    raw = [n + cfg.eta * g for n, g in zip(noise, grads, strict=True)]
    assert d(raw) > d(noise) > 0.0
    stepped = [
        smart.ascent_step(n, g, cfg.eta, "inf", cfg.epsilon)
        for n, g in zip(noise, grads, strict=True)
    ]
    assert d(stepped) > d(noise)
    gen = torch.Generator().manual_seed(0)
    final = smart.adversarial_perturbation(model, batch, clean, cfg, gen)
    for ours, theirs in zip(final, stepped, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_design1_perturbs_both_sentences(tiny_backbone: Path) -> None:
    model = _model(tiny_backbone, design=1).eval()
    batch = _batch("para", 1)
    seen: list[tuple] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("embeds")), with_kwargs=True
    )
    clean = model(batch).logits
    smart.smart_regularizer(model, batch, clean, SmartConfig(enabled=True))
    emb_a, emb_b = model.word_embeddings(batch)
    assert len(seen) == 3  # clean, ascent and final runs
    (ascent_a, ascent_b), (final_a, final_b) = seen[1], seen[2]
    # The ascent run starts from the noise (scale sigma), the final run from per-token norm ~1.
    assert (ascent_a - emb_a).abs().amax() > 0 and (ascent_b - emb_b).abs().amax() > 0
    assert (final_a - emb_a).abs().amax() > 0.5 and (final_b - emb_b).abs().amax() > 0.5


@pytest.mark.parametrize(("task", "design"), [("sst", 2), ("para", 1), ("sts", 2)])
def test_rs_and_its_parameter_gradient_match_finite_differences(
    tiny_backbone: Path, task: str, design: int
) -> None:
    """float64, no dropout, one fixed generator for the noise of both sides."""
    model = _model(tiny_backbone, design).eval()
    batch = _batch(task, design, b=2, length=5)
    if batch.input_ids_b is not None:
        batch.input_ids_b, batch.attention_mask_b = (
            batch.input_ids_b[:, :4],
            batch.attention_mask_b[:, :4],
        )
    # A larger sigma and eta than the paper's make the ascent direction matter in this check.
    cfg = SmartConfig(enabled=True, sigma=0.1, eta=100.0)
    embeds = [e.detach() for e in model.word_embeddings(batch) if e is not None]

    def run(delta: list[torch.Tensor]) -> torch.Tensor:
        perturbed = [e + x for e, x in zip(embeds, delta, strict=True)]
        second = perturbed[1] if len(perturbed) > 1 else None
        return model(batch, embeds=(perturbed[0], second)).logits

    with torch.no_grad():
        clean = model(batch).logits
        gen = torch.Generator().manual_seed(7)
        noise = [smart.initial_noise(e, cfg.sigma, gen) for e in embeds]
        # grad_delta l_s by central differences, entry by entry.
        h = 1e-6
        grads = []
        for k, n in enumerate(noise):
            g = torch.zeros_like(n)
            for idx in range(n.numel()):
                plus, minus = [x.clone() for x in noise], [x.clone() for x in noise]
                plus[k].view(-1)[idx] += h
                minus[k].view(-1)[idx] -= h
                hi = smart.divergence(task, run(plus), clean)
                lo = smart.divergence(task, run(minus), clean)
                g.view(-1)[idx] = (hi - lo) / (2 * h)
            grads.append(g)
        delta = [
            smart.ascent_step(n, g, cfg.eta, cfg.norm, cfg.epsilon)
            for n, g in zip(noise, grads, strict=True)
        ]
        expected = smart.divergence(task, run(delta), clean)

    r_s = smart.smart_regularizer(
        model, batch, model(batch).logits, cfg, torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(r_s.detach(), expected, rtol=1e-7, atol=0)
    assert r_s.item() > 1e-4

    # d R_s / d theta at the fixed perturbation, against central differences on a few entries.
    r_s.backward()
    params = dict(model.named_parameters())
    names = [
        "encoder.embeddings.word_embeddings.weight",
        "encoder.encoder.layer.0.attention.self.query.weight",
        "encoder.encoder.layer.1.output.LayerNorm.weight",
        "encoder.embeddings.LayerNorm.bias",
        next(n for n in params if n.startswith(f"heads.{task}.") and n.endswith("weight")),
    ]
    gen = torch.Generator().manual_seed(1)
    for name in names:
        p = params[name]
        used = batch.input_ids[0, 0].item() if "word_embeddings" in name else None
        for _ in range(3):
            idx = torch.randint(p.numel(), (1,), generator=gen).item()
            if used is not None:  # a row the batch actually reads
                idx = used * p.shape[1] + idx % p.shape[1]
            with torch.no_grad():
                old = p.view(-1)[idx].item()
                values = []
                for sign in (1, -1):
                    p.view(-1)[idx] = old + sign * 1e-6
                    embeds = [e.detach() for e in model.word_embeddings(batch) if e is not None]
                    values.append(smart.divergence(task, run(delta), model(batch).logits))
                p.view(-1)[idx] = old
            numeric = (values[0] - values[1]).item() / 2e-6
            assert p.grad.view(-1)[idx].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


@pytest.mark.parametrize(("task", "design"), [("sst", 2), ("para", 1), ("sts", 2)])
def test_weight_zero_computes_and_logs_rs_but_changes_nothing(
    tiny_backbone: Path, tmp_path: Path, task: str, design: int
) -> None:
    model = _model(tiny_backbone, design, torch.float32).train()  # dropout on, as in training
    batch = _batch(task, design)

    def step(regularizer: smart.Regularizer | None) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        out = model(batch)
        loss = task_loss(task, out.logits, batch.labels)
        if regularizer is not None:
            loss = regularizer.add(loss, model, batch, out.logits)
        loss.backward()
        return loss.item(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    plain_loss, plain_grads = step(None)
    regularizer = smart.Regularizer(SmartConfig(enabled=True, weight=0.0), model, total_steps=10)
    loss, grads = step(regularizer)
    assert loss == plain_loss
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, plain_grads[name]), name

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    regularizer.log(writer, step=1)
    writer.close()
    events = EventAccumulator(str(tmp_path)).Reload()
    (logged,) = events.Scalars(f"train/smart_{task}")
    assert logged.value > 0.0

    # With a positive weight the same batch trains on R_s.
    _, weighted = step(smart.Regularizer(SmartConfig(enabled=True, weight=5.0), model, 10))
    assert any(not torch.equal(weighted[n], plain_grads[n]) for n in plain_grads)


def test_disabled_regularizer_computes_nothing(tiny_backbone: Path) -> None:
    model = _model(tiny_backbone, 2, torch.float32)
    batch = _batch("sst", 2)
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    logits = model(batch).logits
    loss = task_loss("sst", logits, batch.labels)
    regularizer = smart.Regularizer(SmartConfig(), model, total_steps=10)
    assert regularizer.add(loss, model, batch, logits) is loss
    assert len(calls) == 1 and regularizer.teacher is None


def test_bregman_teacher_follows_the_momentum_schedule(tiny_backbone: Path) -> None:
    model = _model(tiny_backbone, 2, torch.float32)
    cfg = SmartConfig(enabled=True, bregman=True)
    regularizer = smart.Regularizer(cfg, model, total_steps=100)
    teacher = regularizer.teacher
    assert teacher is not None
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert [smart.teacher_beta(s, 100, cfg) for s in (1, 10, 11, 100)] == [0.99, 0.99, 0.999, 0.999]
    student = model.heads["sst"].net[0].weight
    mirror = teacher.model.heads["sst"].net[0].weight
    before = mirror.detach().clone()
    with torch.no_grad():
        student.add_(1.0)
    regularizer.after_step(1)
    torch.testing.assert_close(mirror, before * 0.99 + (before + 1.0) * 0.01)
    # The Bregman term is logged and pulls the student back towards the teacher.
    batch = _batch("sst", 2)
    model.eval()
    loss = task_loss("sst", model(batch).logits, batch.labels)
    total = regularizer.add(loss, model, batch, model(batch).logits)
    assert total.item() > loss.item()
    assert set(regularizer._sums) == {"smart_sst", "bregman_sst"}


@pytest.mark.slow
def test_rs_at_paper_defaults_on_minilm_is_not_negligible(real_data_dir: Path) -> None:
    """Per-token normalisation: R_s well above 1e-4; a literal 1e-6 ball would give ~1e-12."""
    from mtl import data as data_lib
    from mtl.backbones import resolve_backbone
    from mtl.config import build_config
    from mtl.train import build_model, load_data

    data_cfg = {"data_dir": str(real_data_dir), "max_train_examples": 16, "max_length": 64}
    cfg = build_config({"data": data_cfg})
    data = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, resolve_backbone("minilm")).eval()
    defaults = SmartConfig(enabled=True)
    for task in ("sst", "para", "sts"):
        batch = data_lib.collate(data.train[task], list(range(16)))
        with torch.no_grad():
            clean = model(batch).logits
        gen = torch.Generator().manual_seed(0)
        r_s = smart.smart_regularizer(model, batch, clean, defaults, gen).item()
        assert r_s > 1e-4, task
        (embeds, _) = model.word_embeddings(batch)
        gen = torch.Generator().manual_seed(0)
        noise = smart.initial_noise(embeds, defaults.sigma, gen)
        ball = smart.normalize(noise, "inf", defaults.epsilon) * defaults.epsilon
        with torch.no_grad():
            literal = smart.divergence(
                task, model(batch, embeds=(embeds + ball, None)).logits, clean
            )
        assert literal.item() < 1e-8, task
