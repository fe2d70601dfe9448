"""Our encoder against ``transformers.BertModel``, its checkpoint loader and backbone lookup."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from mtl.backbones import BackboneError, load_tokenizer, resolve_backbone
from mtl.bert import (
    BertConfig,
    BertModel,
    BertOutput,
    CheckpointError,
    convert_hf_state_dict,
    padding_of,
)

ROOT = Path(__file__).resolve().parents[1]

# Hugging Face's BertModelTester shape.
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of 9 tokens with 9, 6 and 2 real ones, and two segments."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, TINY["vocab_size"], (3, 9), generator=gen)
    attention_mask = (torch.arange(9) < torch.tensor([[9], [6], [2]])).long()
    token_type_ids = (torch.arange(9) >= 4).long().expand(3, 9) * attention_mask
    return dict(
        input_ids=input_ids * attention_mask,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
    )


def save_ours(model: BertModel, folder: Path, state_dict: dict | None = None) -> Path:
    """Writes a Hugging Face style folder (config.json, model.safetensors) without transformers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    state_dict = model.state_dict() if state_dict is None else state_dict
    save_file({k: v.contiguous() for k, v in state_dict.items()}, folder / "model.safetensors")
    return folder


def assert_same_output(ours: BertOutput, theirs, attention_mask: torch.Tensor) -> None:
    """Real tokens and the pooler to 1e-5; padded positions, which nothing reads and our
    unpadded layers never compute, are zero."""
    real = attention_mask.bool()
    torch.testing.assert_close(
        ours.last_hidden_state[real], theirs.last_hidden_state[real], rtol=1e-5, atol=1e-5
    )
    assert not ours.last_hidden_state[~real].any()
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=1e-5, atol=1e-5)


# --- equivalence with transformers ----------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_transformers_on_tiny_config(tmp_path: Path, attn_implementation: str) -> None:
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**TINY, attn_implementation=attn_implementation)
    theirs = transformers.BertModel(hf_config).eval()
    assert theirs.config._attn_implementation == attn_implementation
    theirs.save_pretrained(tmp_path)
    ours = BertModel.from_pretrained(tmp_path).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())

    batch = tiny_batch()
    with torch.no_grad():
        assert_same_output(ours(**batch), theirs(**batch), batch["attention_mask"])
        # No mask, and an all-ones mask (which takes SDPA's mask-free path), agree too.
        ids = batch["input_ids"][:, :4] + 1
        full = torch.ones_like(ids)
        for mask in (None, full):
            assert_same_output(ours(ids, mask), theirs(input_ids=ids, attention_mask=mask), full)


@pytest.mark.slow
def test_matches_transformers_on_minilm() -> None:
    folder = resolve_backbone("minilm")
    tokenizer = load_tokenizer(folder)
    sentences = [
        "A man is playing a guitar on the stage.",
        "Stocks fell.",
        "The quick brown fox jumps over the lazy dog, twice, before lunch.",
        "Is this the same question as the other one?",
    ]
    batch = tokenizer(sentences[:2], sentences[2:], padding=True, return_tensors="pt")
    assert not batch["attention_mask"].bool().all()
    ours = BertModel.from_pretrained("minilm").eval()
    for attn_implementation in ("eager", "sdpa"):
        theirs = transformers.BertModel.from_pretrained(
            str(folder), attn_implementation=attn_implementation
        ).eval()
        with torch.no_grad():
            assert_same_output(ours(**batch), theirs(**batch), batch["attention_mask"])


def test_padded_batch_trains_like_transformers(tmp_path: Path) -> None:
    """Unpadded layers give the gradients of the padded computation, for every parameter."""
    torch.manual_seed(0)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    theirs = transformers.BertModel(
        transformers.BertConfig(**TINY, **no_dropout, attn_implementation="sdpa")
    )
    theirs.save_pretrained(tmp_path)
    ours = BertModel.from_pretrained(tmp_path)
    batch = tiny_batch()
    real = batch["attention_mask"].bool()[..., None]
    grads = []
    for model in (ours, theirs):
        out = model(**batch)
        # Mean-pool the real tokens, as the heads do, plus the pooler.
        loss = (out.last_hidden_state * real).sum() + out.pooler_output.square().sum()
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_padded_batch_equals_each_sequence_alone() -> None:
    """Each row of a padded batch, unpadded inside, equals that row run alone (no padding),
    from token ids, from inputs_embeds and from a given embedding_output (SMART's path)."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    batch = tiny_batch()
    embeds = model.embeddings.word_embeddings(batch["input_ids"])
    with torch.no_grad():
        emb_out = model.embeddings(embeds, batch["token_type_ids"])
        outputs = [
            model(**batch),
            model(
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
                inputs_embeds=embeds,
            ),
            model(attention_mask=batch["attention_mask"], embedding_output=emb_out),
        ]
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            alone = model(
                batch["input_ids"][row : row + 1, :length],
                token_type_ids=batch["token_type_ids"][row : row + 1, :length],
            )
            for out in outputs:
                torch.testing.assert_close(
                    out.last_hidden_state[row, :length], alone.last_hidden_state[0]
                )
                assert not out.last_hidden_state[row, length:].any()
                torch.testing.assert_close(out.pooler_output[row], alone.pooler_output[0])


def test_padding_layouts() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    cpu = padding_of(mask, 2, 3, torch.device("cpu"))
    assert cpu.indices.tolist() == [0, 1, 2, 3]
    x = torch.arange(6.0).view(2, 3, 1)
    assert cpu.unpad(x).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert cpu.pad(cpu.unpad(x)).flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 0.0, 0.0]
    # Nothing padded: no mask, so SDPA takes its mask-free kernel, and no gathering.
    full = padding_of(torch.ones(2, 3), 2, 3, torch.device("cpu"))
    assert full.mask is None and full.indices is None
    # On an accelerator the layers stay padded and nothing is counted on the host.
    meta = padding_of(mask.to("meta"), 2, 3, torch.device("meta"))
    assert meta.indices is None and meta.mask.shape == (2, 1, 1, 3)


def test_inputs_embeds_equals_input_ids() -> None:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    batch = tiny_batch()
    embeds = model.embeddings.word_embeddings(batch["input_ids"])
    with torch.no_grad():
        by_ids = model(**batch)
        by_embeds = model(
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            inputs_embeds=embeds,
        )
    torch.testing.assert_close(by_embeds.last_hidden_state, by_ids.last_hidden_state)
    torch.testing.assert_close(by_embeds.pooler_output, by_ids.pooler_output)


@pytest.mark.parametrize(
    ("input_ids", "inputs_embeds"),
    [(None, None), (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, 32))],
)
def test_exactly_one_input_is_required(input_ids, inputs_embeds) -> None:
    model = BertModel(BertConfig(**TINY))
    with pytest.raises(ValueError, match="exactly one of input_ids, inputs_embeds"):
        model(input_ids, inputs_embeds=inputs_embeds)


def test_task_reaches_every_layer_and_wrappers_can_replace_layers() -> None:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    seen: list[str | None] = []

    class Recorder(torch.nn.Module):
        def __init__(self, layer: torch.nn.Module) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, hidden_states, padding, task=None):
            seen.append(task)
            return self.layer(hidden_states, padding, task=task)

    batch = tiny_batch()
    with torch.no_grad():
        before = model(**batch, task="sst").last_hidden_state
        for i, layer in enumerate(model.encoder.layer):
            assert layer.attention.self.query.in_features == TINY["hidden_size"]
            assert layer.intermediate.dense.out_features == TINY["intermediate_size"]
            model.encoder.layer[i] = Recorder(layer)
        after = model(**batch, task="sst").last_hidden_state
    assert seen == ["sst", "sst"]
    torch.testing.assert_close(after, before)


def test_init_is_hugging_face_like() -> None:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 256}))
    layer = model.encoder.layer[0]
    assert 0.015 < layer.intermediate.dense.weight.std().item() < 0.025
    assert layer.intermediate.dense.bias.abs().max().item() == 0.0
    assert torch.equal(layer.output.LayerNorm.weight, torch.ones(64))
    assert model.embeddings.word_embeddings.weight[0].abs().max().item() == 0.0  # padding row


# --- config ---------------------------------------------------------------------------------


def test_config_from_json_ignores_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, "architectures": ["BertModel"], "model_type": "bert"}))
    assert BertConfig.from_json_file(path) == BertConfig(**TINY)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"is_decoder": True}, "is_decoder"),
        ({"num_attention_heads": 5}, "not a multiple"),
        ({"hidden_act": "swish"}, "hidden_act"),
    ],
)
def test_config_rejects_what_we_do_not_implement(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BertConfig.from_dict({**TINY, **overrides})


# --- checkpoint loading ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hf_key", "our_key"),
    [
        ("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
        ("bert.pooler.dense.bias", "pooler.dense.bias"),
        ("bert.embeddings.LayerNorm.gamma", "embeddings.LayerNorm.weight"),
        ("encoder.layer.0.output.LayerNorm.beta", "encoder.layer.0.output.LayerNorm.bias"),
        ("bert.embeddings.position_ids", None),
        ("cls.predictions.transform.dense.weight", None),
        ("cls.seq_relationship.bias", None),
        ("encoder.layer.0.extra.weight", "encoder.layer.0.extra.weight"),
    ],
)
def test_convert_hf_state_dict_rules(hf_key: str, our_key: str | None) -> None:
    converted = convert_hf_state_dict({hf_key: torch.zeros(1)})
    assert list(converted) == ([] if our_key is None else [our_key])


def legacy_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an old ``BertForPreTraining`` checkpoint looks like."""
    out = {}
    for key, value in state_dict.items():
        if "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        out["bert." + key] = value
    out["bert.embeddings.position_ids"] = torch.arange(TINY["hidden_size"])[None]
    out["cls.predictions.bias"] = torch.zeros(TINY["vocab_size"])
    out["cls.seq_relationship.weight"] = torch.zeros(2, TINY["hidden_size"])
    return out


def test_loads_pretraining_checkpoint_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = BertModel(BertConfig(**TINY))
    save_ours(source, tmp_path, legacy_layout(source.state_dict()))
    loaded = BertModel.from_pretrained(tmp_path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_from_pretrained_applies_config_overrides(tmp_path: Path) -> None:
    save_ours(BertModel(BertConfig(**TINY)), tmp_path)
    model = BertModel.from_pretrained(tmp_path, hidden_dropout_prob=0.0)
    assert model.config.hidden_dropout_prob == 0.0
    assert model.config.attention_probs_dropout_prob == 0.1


@pytest.mark.parametrize(
    ("break_it", "match"),
    [
        (
            lambda sd: sd.pop("encoder.layer.1.intermediate.dense.bias"),
            r"missing key encoder\.layer\.1\.intermediate\.dense\.bias",
        ),
        (
            lambda sd: sd.update({"encoder.layer.0.adapter.weight": torch.zeros(2)}),
            r"unexpected key encoder\.layer\.0\.adapter\.weight",
        ),
        (
            lambda sd: sd.update({"embeddings.token_type_embeddings.weight": torch.zeros(3, 32)}),
            r"shape mismatch embeddings\.token_type_embeddings\.weight: checkpoint \(3, 32\) vs model \(2, 32\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_checkpoint_is_refused_naming_the_key(break_it, match: str) -> None:
    state_dict = BertModel(BertConfig(**TINY)).state_dict()
    break_it(state_dict)
    with pytest.raises(CheckpointError, match=match):
        BertModel(BertConfig(**TINY)).load_hf_state_dict(state_dict)


def test_bad_checkpoint_names_every_problem_and_copies_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state_dict = BertModel(BertConfig(**TINY)).state_dict()
    del state_dict["encoder.layer.0.attention.self.key.weight"]
    del state_dict["encoder.layer.1.output.dense.bias"]
    state_dict["bert.encoder.layer.0.attention.self.qkv.weight"] = torch.zeros(96, 32)
    state_dict["pooler.dense.weight"] = torch.zeros(32, 31)
    save_ours(BertModel(BertConfig(**TINY)), tmp_path, state_dict)

    target = BertModel(BertConfig(**TINY))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        target.load_hf_state_dict(state_dict)
    message = str(err.value)
    for expected in (
        "missing key encoder.layer.0.attention.self.key.weight",
        "missing key encoder.layer.1.output.dense.bias",
        "unexpected key encoder.layer.0.attention.self.qkv.weight",
        "shape mismatch pooler.dense.weight: checkpoint (32, 31) vs model (32, 32)",
    ):
        assert expected in message
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    with pytest.raises(
        CheckpointError, match=r"missing key encoder\.layer\.0\.attention\.self\.key"
    ):
        BertModel.from_pretrained(tmp_path)


def test_checkpoint_without_pooler_keeps_fresh_pooler(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    source = BertModel(BertConfig(**TINY))
    state_dict = {k: v for k, v in source.state_dict().items() if not k.startswith("pooler.")}
    target = BertModel(BertConfig(**TINY))
    pooler_before = target.pooler.dense.weight.clone()
    with caplog.at_level(logging.WARNING, logger="mtl.bert"):
        target.load_hf_state_dict(state_dict)
    assert "no pooler weights" in caplog.text
    assert torch.equal(target.pooler.dense.weight, pooler_before)
    assert torch.equal(
        target.encoder.layer[1].output.dense.weight, source.encoder.layer[1].output.dense.weight
    )


class _Payload:
    """Any class at all: unpickling it must not be allowed."""


def test_pytorch_bin_is_read_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = BertModel(BertConfig(**TINY))
    save_ours(source, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(legacy_layout(source.state_dict()), tmp_path / "pytorch_model.bin")
    loaded = BertModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.pooler.dense.weight, source.pooler.dense.weight)

    torch.save({"embeddings.word_embeddings.weight": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError,
        match=r"pytorch_model\.bin: refused: it holds a pickled tests\.test_bert\._Payload",
    ):
        BertModel.from_pretrained(tmp_path)


def test_folder_without_weights_fails(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(
        CheckpointError,
        match=rf"^{tmp_path}: has neither model\.safetensors nor pytorch_model\.bin",
    ):
        BertModel.from_pretrained(tmp_path)


def test_bert_needs_no_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_ours(BertModel(BertConfig(**TINY)), tmp_path)
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # any import of it now raises ImportError\n"
        "import torch\n"
        "from mtl.bert import BertModel\n"
        "model = BertModel.from_pretrained(sys.argv[1]).eval()\n"
        "out = model(torch.tensor([[2, 5, 7]]))\n"
        "assert out.last_hidden_state.shape == (1, 3, 32)\n"
        "print('ok')\n"
    )
    result = _fresh_python(code, str(tmp_path))
    assert result.stdout.strip() == "ok"


def _fresh_python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter (nothing imported yet); it must exit 0."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


# --- backbones ------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["minilm", "MiniLM", "all-minilm-l6-v2"])
def test_minilm_aliases_resolve_to_the_packaged_model(alias: str) -> None:
    folder = resolve_backbone(alias)
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()


def test_local_folder_resolves_to_itself(tmp_path: Path) -> None:
    assert resolve_backbone(str(tmp_path)) == tmp_path


UNKNOWN_BACKBONE_MESSAGE = (
    r"'no-such-org/no-such-bert' is neither a local folder nor in the Hugging Face hub cache "
    r".*network access"
)


def test_unknown_backbone_fails_clearly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=UNKNOWN_BACKBONE_MESSAGE):
        resolve_backbone("no-such-org/no-such-bert")


def test_unknown_backbone_fails_clearly_in_a_fresh_interpreter() -> None:
    # Nothing imported beforehand: catches a lazily imported submodule that only worked
    # because another test had imported it.
    code = (
        "from mtl.backbones import BackboneError, resolve_backbone\n"
        "try:\n"
        "    resolve_backbone('no-such-org/no-such-bert')\n"
        "except BackboneError as err:\n"
        "    print(err)\n"
    )
    result = _fresh_python(code, HF_HUB_OFFLINE="1")
    assert re.search(UNKNOWN_BACKBONE_MESSAGE, result.stdout)


@pytest.mark.slow
def test_tokenizer_loads_from_the_packaged_model() -> None:
    tokenizer = load_tokenizer(resolve_backbone("minilm"))
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]


# --- the benchmark's own smoke run ----------------------------------------------------------


SMOKE_ARGS = ("--device", "cpu", "--steps", "2", "--warmup", "1")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("--config", "base", "--data", "synthetic", "--shapes", "2x16"),
            ("gradients of all 199 parameters agree", "2x16 wall: ours"),
        ),
        (
            ("--config", "base", "--shapes", "2x16", "--modes", "eager", "--no-padding"),
            ("gradients of all 199 parameters agree", "2x16 eager: ", "ms a step"),
        ),
        (
            ("--batch-size", "4", "--optimizer", "fused", "--dtype", "bf16"),
            ("gradients of all 103 parameters agree", "random wall: ours", "bucketed wall: ours"),
        ),
    ],
)
def test_benchmark_runs_on_cpu(real_data_dir: Path, args, expected) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/encoder_step.py", *SMOKE_ARGS, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "MTL_DATA_DIR": str(real_data_dir)},
    )
    assert result.returncode == 0, result.stderr
    for line in (*expected, "median ratio ours/hf", "process CPU: ours"):
        assert line in result.stdout


def test_benchmark_refuses_an_unknown_mode() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/encoder_step.py", "--modes", "eager,graf"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    assert "--modes: unknown graf" in result.stderr
