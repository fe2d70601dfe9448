"""Projected attention layers: identity at initialisation, sizes, routing, gradients, names."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtl import pal
from mtl.bert import BertConfig, BertLayer, BertModel
from mtl.build import build_model, param_groups
from mtl.config import ConfigError, PalConfig, build_config
from mtl.heads import task_loss
from tests.test_heads import _batch

TASKS = ("sst", "para", "sts")
VARIANTS = ("paper", "standard")


@pytest.mark.parametrize(
    ("hidden", "heads", "low_dim", "width"),
    [
        (768, 12, None, 204),  # BERT-base: 12 x 17 (Stickland and Murray)
        (384, 12, None, 108),  # MiniLM: 102 rounded up to 12 x 9
        (1024, 12, None, 276),  # BERT-large: 272 rounded up to 12 x 23
        (32, 4, None, 12),  # the tiny test model: 8.5 rounded up to 4 x 3
        (384, 6, None, 102),  # 6 heads divide 102
        (384, 12, 96, 96),  # an explicit width wins
    ],
)
def test_width_rule(hidden: int, heads: int, low_dim: int | None, width: int) -> None:
    assert pal.pal_width(hidden, heads, low_dim) == width


def test_width_must_be_a_multiple_of_the_heads() -> None:
    with pytest.raises(ConfigError, match=r"pal: .*low_dim 100 is not a multiple of heads 12"):
        build_config({"pal": {"variant": "standard", "low_dim": 100}})


def _encoder(backbone: Path, dtype=torch.float32) -> BertModel:
    return BertModel.from_pretrained(str(backbone)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_output_at_initialisation_equals_the_plain_encoder(
    tiny_backbone: Path, variant: str, dtype: torch.dtype
) -> None:
    plain = _encoder(tiny_backbone, dtype)
    adapted = copy.deepcopy(plain)
    pal.add_pals(adapted, PalConfig(variant=variant, heads=4), TASKS)
    assert all(not isinstance(layer, BertLayer) for layer in adapted.encoder.layer)
    batch = _batch("para", 2)  # with padding
    expected = plain(batch.input_ids, batch.attention_mask, batch.token_type_ids).last_hidden_state
    for task in TASKS:
        out = adapted(batch.input_ids, batch.attention_mask, batch.token_type_ids, task=task)
        torch.testing.assert_close(out.last_hidden_state, expected, atol=1e-6, rtol=0)


def test_paper_merge_starts_as_sum_and_up_projection_as_zero(tiny_backbone: Path) -> None:
    encoder = _encoder(tiny_backbone)
    pal.add_pals(encoder, PalConfig(variant="paper", heads=4), TASKS)
    merge = encoder.encoder.layer[0].pal["sst"].merge
    eye = torch.eye(32)
    torch.testing.assert_close(merge.weight, torch.cat([eye, eye], 1))
    assert merge.bias.abs().max() == 0
    assert encoder.pal["sst"].up.weight.abs().max() == 0


def test_standard_pal_parameters_on_bert_base_come_to_about_1_8m_per_task() -> None:
    base = BertConfig()  # BERT-base's shape; meta tensors: no memory, no weights
    with torch.device("meta"):
        encoder = BertModel(base)
    size = encoder.num_parameters()
    tasks = [f"task{i}" for i in range(8)]
    pal.add_pals(encoder, PalConfig(variant="standard"), tasks)
    added = encoder.num_parameters() - size
    per_task = added // len(tasks)
    d, h = 204, 768
    # shared V_down and V_up, plus query/key/value in d for each of 12 layers
    assert per_task == (h * d + d) + (d * h + h) + 12 * (3 * d * d + 3 * d) == 1_819_836
    # Stickland and Murray: 8 tasks make the model 1.13x BERT-base.
    assert (size + added) / size == pytest.approx(1.13, abs=0.01)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tasks_are_routed_to_their_own_pals(tiny_backbone: Path, variant: str) -> None:
    encoder = _encoder(tiny_backbone)
    pal.add_pals(encoder, PalConfig(variant=variant, heads=4), TASKS)
    encoder.eval()  # the new PAL modules too: no attention dropout
    with torch.no_grad():
        encoder.pal["sts"].up.weight.normal_()
    batch = _batch("sst", 2)

    def run(task: str | None) -> torch.Tensor:
        return encoder(batch.input_ids, batch.attention_mask, task=task).last_hidden_state

    assert torch.equal(run("sst"), run("para"))  # untouched PALs: still the plain encoder
    assert not torch.allclose(run("sts"), run("sst"))
    with pytest.raises(ValueError, match="PAL layers need one of the tasks"):
        run(None)
    with pytest.raises(TypeError, match="PALs wrap a BertLayer"):
        pal.add_pals(encoder, PalConfig(variant=variant, heads=4), TASKS)


@pytest.mark.parametrize("design", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_pretrain_mode_trains_the_pals_and_not_the_frozen_encoder(
    tiny_backbone: Path, variant: str, design: int
) -> None:
    cfg = build_config(
        {
            "model": {"head_hidden": 8, "design": design},
            "train": {"mode": "pretrain", "lr": 1e-2},
            "pal": {"variant": variant, "heads": 4, "lr": 3e-2},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg, tiny_backbone)
    pal_params = {id(p) for p in pal.pal_parameters(model)}
    frozen = [p for p in model.encoder.parameters() if id(p) not in pal_params]
    groups = param_groups(model, cfg)
    assert [g["lr"] for g in groups] == [1e-2, 1e-2, 3e-2, 3e-2]
    assert {id(p) for g in groups[2:] for p in g["params"]} == pal_params
    optimizer = torch.optim.AdamW(groups)
    batch = _batch("para", design)
    for step in range(2):
        optimizer.zero_grad(set_to_none=False)
        task_loss("para", model(batch).logits, batch.labels).backward()
        assert all(p.grad is None for p in frozen)
        grads = {n: p.grad for n, p in model.named_parameters() if id(p) in pal_params}
        assert all(grads[n] is not None for n in grads if ".para." in f".{n}")
        # Other tasks' PALs are not on this batch's path.
        assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if ".sst." in n)
        if step == 0:  # zero V_up: the gradient reaches V_up first
            assert grads["encoder.pal.para.up.weight"].abs().max() > 0
        else:  # then everything of the task's PALs
            nonzero = [n for n, g in grads.items() if ".para." in n and g.abs().max() > 0]
            assert len(nonzero) == sum(".para." in n for n in grads)
        optimizer.step()


def test_state_dict_keeps_hugging_face_names_and_saves(tiny_backbone: Path, tmp_path: Path) -> None:
    plain = _encoder(tiny_backbone)
    adapted = copy.deepcopy(plain)
    pal.add_pals(adapted, PalConfig(variant="standard", heads=4), TASKS)
    keys = set(adapted.state_dict())
    assert set(plain.state_dict()) <= keys
    extra = sorted(keys - set(plain.state_dict()))
    assert "pal.sst.down.weight" in extra and "encoder.layer.1.pal.sts.qkv.weight" in extra
    # The shared projections are stored once (safetensors refuses shared tensors).
    assert not any(k.startswith("encoder.layer.") and ".down." in k for k in extra)
    save_file(
        {k: v.contiguous() for k, v in adapted.state_dict().items()}, tmp_path / "m.safetensors"
    )
    restored = copy.deepcopy(plain)
    pal.add_pals(restored, PalConfig(variant="standard", heads=4), TASKS)
    restored.load_state_dict(load_file(tmp_path / "m.safetensors"))


def test_a_deep_copy_shares_its_own_projections(tiny_backbone: Path) -> None:
    """The Bregman teacher is a deep copy: its layers must use the copy's V_down and V_up."""
    encoder = _encoder(tiny_backbone)
    pal.add_pals(encoder, PalConfig(variant="standard", heads=4), TASKS)
    twin = copy.deepcopy(encoder)
    assert twin.encoder.layer[0]._projections[0] is twin.pal
    assert twin.encoder.layer[1]._projections[0] is twin.pal
    assert twin.pal["sst"].up.weight is not encoder.pal["sst"].up.weight


@pytest.mark.parametrize("variant", VARIANTS)
def test_trained_pal_gives_each_row_of_a_padded_batch_its_own_output(
    tiny_backbone: Path, variant: str
) -> None:
    """PAL attention runs in the encoder's unpadded layout: a padded batch's real tokens equal
    each sequence run alone, once V_up has moved off zero (at zero the PAL adds nothing)."""
    torch.manual_seed(0)
    encoder = _encoder(tiny_backbone)
    pal.add_pals(encoder, PalConfig(variant=variant, heads=4), TASKS)
    encoder.eval()  # the new PAL modules too: no attention dropout
    with torch.no_grad():
        for p in pal.pal_parameters(encoder):
            p.add_(torch.randn_like(p) * 0.1)
        batch = _batch("para", 2)
        assert not batch.attention_mask.bool().all()
        out = encoder(batch.input_ids, batch.attention_mask, batch.token_type_ids, task="sts")
        for row, length in enumerate(batch.attention_mask.sum(1).tolist()):
            alone = encoder(
                batch.input_ids[row : row + 1, :length],
                token_type_ids=batch.token_type_ids[row : row + 1, :length],
                task="sts",
            )
            torch.testing.assert_close(
                out.last_hidden_state[row, :length], alone.last_hidden_state[0]
            )
