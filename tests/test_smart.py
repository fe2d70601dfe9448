"""SMART: the pure divergences and ascent step, R_s against finite differences, weight 0."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("update", ["normalized_step", "unit_norm"])
def test_ascent_step_on_a_quadratic_never_decreases_it(update: str) -> None:
    """For D(delta) = sum_t delta_t' H delta_t with H positive semi-definite, one step raises D
    (for the unit rule, above D at the rescaled starting point: a power iteration)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    h = a @ a.T

    def d(delta: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsi,ij,bsj->", delta, h, delta)

    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        delta = smart.initial_noise(torch.zeros(2, 3, 8, dtype=torch.float64), 1e-5, g)
        start = delta if update == "normalized_step" else smart.normalize(delta, "l2", 1e-6)
        for eta in (1e-3, 1e-1, 10.0):
            grad = 2 * torch.einsum("ij,bsj->bsi", h, delta)
            stepped = smart.ascent_step(delta, grad, eta, "l2", 1e-6, update)
            assert d(stepped) >= d(start)


def test_normalized_step_moves_each_token_by_eta_along_its_gradient() -> None:
    """SMART's Algorithm 1: delta + eta * g / ||g||_inf, per token."""
    delta = torch.randn(2, 3, 8, dtype=torch.float64) * 1e-5
    grad = torch.randn(2, 3, 8, dtype=torch.float64) * 1e-7  # raw gradients are tiny
    stepped = smart.ascent_step(delta, grad, 1e-3, "inf", 1e-20, "normalized_step")
    move = stepped - delta
    torch.testing.assert_close(move.abs().amax(-1), torch.full((2, 3), 1e-3, dtype=torch.float64))
    cos = F.cosine_similarity(move, grad, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    unit = smart.ascent_step(delta, grad, 1e-3, "inf", 1e-20, "unit_norm")
    torch.testing.assert_close(unit.abs().amax(-1), torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="update must be"):
        smart.ascent_step(delta, grad, 1e-3, "inf", 1e-6, "sideways")


def _hidden(model: MultitaskBert, batch) -> list[torch.Tensor]:
    return [h for h in model.embedding_output(batch) if h is not None]


def _run(model: MultitaskBert, batch, hidden: list[torch.Tensor]) -> torch.Tensor:
    second = hidden[1] if len(hidden) > 1 else None
    return model(batch, embedding_output=(hidden[0], second)).logits


@pytest.mark.parametrize("update", ["normalized_step", "unit_norm"])
@pytest.mark.parametrize(("task", "design"), TASK_DESIGNS)
def test_ascent_step_does_not_decrease_the_divergence(
    tiny_backbone: Path, task: str, design: int, update: str
) -> None:
    model = _model(tiny_backbone, design).eval()
    batch = _batch(task, design)
    clean = model(batch).logits
    hidden = [h.detach() for h in _hidden(model, batch)]

    def d(delta: list[torch.Tensor]) -> float:
        perturbed = [h + x for h, x in zip(hidden, delta, strict=True)]
        return smart.divergence(task, _run(model, batch, perturbed), clean).item()

    cfg = SmartConfig(enabled=True, update=update)
    torch.manual_seed(0)
    noise = [smart.initial_noise(h, cfg.sigma).requires_grad_() for h in hidden]
    perturbed = [h + n for h, n in zip(hidden, noise, strict=True)]
    div = smart.divergence(task, _run(model, batch, perturbed), clean)
    grads = torch.autograd.grad(div, noise)
    noise = [n.detach() for n in noise]
    stepped = [
        smart.ascent_step(n, g, cfg.eta, "inf", cfg.epsilon, update)
        for n, g in zip(noise, grads, strict=True)
    ]
    assert d(stepped) > d(noise) > 0.0
    torch.manual_seed(0)
    final = smart.adversarial_perturbation(model, batch, hidden, clean, cfg)
    for ours, theirs in zip(final, stepped, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(("update", "size"), [("normalized_step", 1e-3), ("unit_norm", 1.0)])
def test_design1_perturbs_both_sentences_after_the_embedding_layer(
    tiny_backbone: Path, update: str, size: float
) -> None:
    model = _model(tiny_backbone, design=1).eval()
    batch = _batch("para", 1)
    seen: list[tuple] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("embedding_output")), with_kwargs=True
    )
    clean = model(batch).logits
    # An epsilon far below this random model's raw gradients (about 1e-7 here): the step's size.
    cfg = SmartConfig(enabled=True, update=update, epsilon=1e-15)
    smart.smart_regularizer(model, batch, clean, cfg)
    emb_a, emb_b = model.embedding_output(batch)
    assert len(seen) == 3 and seen[0] is None  # clean, ascent and final runs
    (ascent_a, ascent_b), (final_a, final_b) = seen[1], seen[2]
    # The ascent run starts from the noise (scale sigma), the final run is eta (or 1) away.
    for ascent, final, clean_h in ((ascent_a, final_a, emb_a), (ascent_b, final_b, emb_b)):
        assert 0 < (ascent - clean_h).abs().amax().item() < 1e-3
        assert (final - clean_h).abs().amax().item() == pytest.approx(size, rel=0.05)


RULES = [
    # A larger sigma and eta than the paper's make the ascent direction matter in this check.
    SmartConfig(enabled=True, sigma=0.1, eta=0.5),
    SmartConfig(enabled=True, sigma=0.1, eta=100.0, update="unit_norm"),
]


@pytest.mark.parametrize("cfg", RULES, ids=["normalized_step", "unit_norm"])
@pytest.mark.parametrize(("task", "design"), [("sst", 2), ("para", 1), ("sts", 2)])
def test_rs_and_its_parameter_gradient_match_finite_differences(
    tiny_backbone: Path, task: str, design: int, cfg: SmartConfig
) -> None:
    """float64, no dropout, one seed for the noise of both sides."""
    model = _model(tiny_backbone, design).eval()
    batch = _batch(task, design, b=2, length=5)
    if batch.input_ids_b is not None:
        batch.input_ids_b, batch.attention_mask_b = (
            batch.input_ids_b[:, :4],
            batch.attention_mask_b[:, :4],
        )
    hidden = [h.detach() for h in _hidden(model, batch)]

    def run(delta: list[torch.Tensor]) -> torch.Tensor:
        return _run(model, batch, [h + x for h, x in zip(hidden, delta, strict=True)])

    with torch.no_grad():
        clean = model(batch).logits
        torch.manual_seed(7)
        noise = [smart.initial_noise(h, cfg.sigma) for h in hidden]
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
            smart.ascent_step(n, g, cfg.eta, cfg.norm, cfg.epsilon, cfg.update)
            for n, g in zip(noise, grads, strict=True)
        ]
        expected = smart.divergence(task, run(delta), clean)

    torch.manual_seed(7)
    r_s = smart.smart_regularizer(model, batch, model(batch).logits, cfg)
    torch.testing.assert_close(r_s.detach(), expected, rtol=1e-6, atol=0)
    assert r_s.item() > 1e-6

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
                    hidden = [x.detach() for x in _hidden(model, batch)]
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
    shift = torch.randn_like(before, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student.add_(shift)
    regularizer.after_step(1)
    torch.testing.assert_close(mirror, before * 0.99 + (before + shift) * 0.01)
    # The Bregman term is logged and pulls the student back towards the teacher.
    batch = _batch("sst", 2)
    model.eval()
    loss = task_loss("sst", model(batch).logits, batch.labels)
    total = regularizer.add(loss, model, batch, model(batch).logits)
    assert set(regularizer._sums) == {"smart_sst", "bregman_sst"}
    r_s, bregman = regularizer._sums["smart_sst"], regularizer._sums["bregman_sst"]
    assert bregman > 1e-4
    assert total.item() == pytest.approx(loss.item() + cfg.weight * r_s + cfg.mu * bregman)


def test_weight_zero_run_equals_a_run_without_smart(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path
) -> None:
    """SMART's noise and the dropout of its passes never touch the training loop's random state."""
    from safetensors.torch import load_file

    from mtl.train import train
    from tests.test_train import tiny_config

    runs = {}
    for name, section in (("off", {}), ("zero", {"enabled": True, "weight": 0.0})):
        cfg = tiny_config(
            tiny_backbone,
            real_data_dir,
            tmp_path / name,
            smart=section,
            train={"epochs": 2, "eval_every": 0.5},
        )
        train(cfg)
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["zero"] == runs["off"]
    off, zero = (load_file(tmp_path / n / "best" / "model.safetensors") for n in ("off", "zero"))
    assert all(torch.equal(off[k], zero[k]) for k in off)


def test_regularizer_leaves_the_global_random_state_alone(tiny_backbone: Path) -> None:
    model = _model(tiny_backbone, 2, torch.float32).train()
    batch = _batch("sst", 2)
    regularizer = smart.Regularizer(SmartConfig(enabled=True), model, 10, seed=4)
    torch.manual_seed(0)
    out = model(batch)
    state = torch.get_rng_state()
    loss = task_loss("sst", out.logits, batch.labels)
    regularizer.add(loss, model, batch, out.logits)
    assert torch.equal(torch.get_rng_state(), state)
    # Its own generator moves, and a checkpointed state replays the same R_s.
    saved = regularizer.state_dict()
    first = regularizer._regularizer(model, batch, out.logits).item()
    regularizer.load_state_dict(saved)
    assert regularizer._regularizer(model, batch, out.logits).item() == first


@pytest.mark.slow
def test_perturbation_on_minilm_with_real_sentences_at_the_paper_settings(
    real_data_dir: Path,
) -> None:
    """The issue's fidelity checks on MiniLM, SST/Quora/STS dev sentences, sigma 1e-5, eta 1e-3.

    normalized_step: in training (dropout on) each token's step is of order eta and the whole
    perturbation's per-token L2 norm is under 1% of the token vector's (median); the step points
    up the divergence: in >= 90% of batches it raises the divergence above the initial noise's
    and above a random perturbation of the same per-token size (eval mode, where only the
    perturbation differs between the passes, with an epsilon below the raw gradients there).
    unit_norm: perturbed and clean token vectors keep a median cosine >= 0.7.
    """
    from mtl import data as data_lib
    from mtl.backbones import resolve_backbone
    from mtl.build import build_model
    from mtl.config import build_config
    from mtl.train import load_data

    data_cfg = {"data_dir": str(real_data_dir), "max_eval_examples": 64, "max_length": 64}
    cfg = build_config({"data": data_cfg})
    data = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, resolve_backbone("minilm"))
    default = SmartConfig(enabled=True)
    unit = SmartConfig(enabled=True, update="unit_norm")
    sharp = SmartConfig(enabled=True, epsilon=1e-15)
    steps, ratios, cosines = [], [], []
    over_noise = over_random = batches = 0
    for task in ("sst", "para", "sts"):
        for start in range(0, 64, 8):
            batch = data_lib.collate(data.dev[task], list(range(start, start + 8)))
            mask = batch.attention_mask.bool()

            def perturb(rule: SmartConfig, train: bool, batch=batch, seed=batches) -> tuple:
                model.train(train)
                torch.manual_seed(seed)
                with torch.no_grad():
                    clean = model(batch).logits
                    (hidden, _) = model.embedding_output(batch)
                torch.manual_seed(seed)
                noise = smart.initial_noise(hidden, rule.sigma)
                torch.manual_seed(seed)
                (delta,) = smart.adversarial_perturbation(model, batch, [hidden], clean, rule)
                return clean, hidden, noise, delta

            _, hidden, noise, delta = perturb(default, train=True)
            steps.append((delta - noise).abs().amax(-1)[mask])
            ratios.append((delta.norm(dim=-1) / hidden.norm(dim=-1))[mask])
            _, hidden, _, delta = perturb(unit, train=True)
            cosines.append(F.cosine_similarity(hidden, hidden + delta, dim=-1)[mask])
            clean, hidden, noise, delta = perturb(sharp, train=False)
            step = delta - noise
            size = step.abs().amax(-1, keepdim=True)
            random = noise + smart.normalize(torch.randn_like(step), "inf", 1e-30) * size
            with torch.no_grad():
                div = {
                    name: smart.divergence(task, model(batch, (hidden + d, None)).logits, clean)
                    for name, d in (("noise", noise), ("ascent", delta), ("random", random))
                }
            over_noise += int(div["ascent"] > div["noise"])
            over_random += int(div["ascent"] > div["random"])
            batches += 1
    step = torch.cat(steps).median().item()
    ratio = torch.cat(ratios).median().item()
    cosine = torch.cat(cosines).median().item()
    print(
        f"median step {step:.2e}, median |delta|/|h| {ratio:.2e}, over noise {over_noise}, "
        f"over random {over_random} of {batches}, unit cosine {cosine:.3f}"
    )
    assert step >= 0.5 * default.eta
    assert ratio < 0.01
    assert over_noise >= 0.9 * batches and over_random >= 0.9 * batches
    assert cosine >= 0.7
