"""train.precision: the run-time rule, the CPU's flags it reads, and what the run folder records."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mtl import precision
from mtl.precision import CpuInfo, choose_precision, cpu_info, parse_cpuinfo
from mtl.train import train
from tests.test_train import tiny_config

CPU = torch.device("cpu")


def _cpu(*flags: str) -> CpuInfo:
    return CpuInfo(model="test CPU", flags=frozenset(flags), capability="AVX512")


@pytest.mark.parametrize(
    ("requested", "device", "flags", "bf16", "reason"),
    [
        # Sapphire Rapids: AMX tiles with bf16
        ("auto", CPU, ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f"), True, "amx_bf16"),
        # AMD Zen 4 / Cooper Lake: AVX-512 BF16 dot products, no AMX
        ("auto", CPU, ("avx512_bf16", "avx512f", "avx2"), True, "avx512_bf16"),
        ("auto", CPU, ("amx_bf16", "amx_tile"), True, "amx_bf16"),
        # Skylake/Ice Lake server, Zen 3: AVX-512 or AVX2 without bf16 instructions
        ("auto", CPU, ("avx512f", "avx512bw", "avx512_vnni", "avx2"), False, "none of"),
        ("auto", CPU, ("avx2", "fma"), False, "emulated"),
        # amx_tile alone (AMX-INT8 only) has no bf16 products
        ("auto", CPU, ("amx_tile", "amx_int8", "avx512f"), False, "none of"),
        # Arm's bf16 feature: not measured, so fp32
        ("auto", CPU, ("fp", "asimd", "sve", "bf16"), False, "none of"),
        ("auto", CPU, (), False, "unknown"),
        ("fp32", CPU, ("amx_bf16", "avx512_bf16"), False, "train.precision is fp32"),
        ("bf16", CPU, ("avx2",), True, "train.precision is bf16"),
        ("auto", torch.device("cuda"), (), True, "CUDA"),
        ("auto", torch.device("mps"), ("avx512_bf16",), False, "only on CUDA and on CPUs"),
    ],
)
def test_rule(
    requested: str, device: torch.device, flags: tuple[str, ...], bf16: bool, reason: str
) -> None:
    choice = choose_precision(requested, device, _cpu(*flags))
    assert (choice.bf16, choice.name, choice.requested) == (
        bf16,
        "bf16" if bf16 else "fp32",
        requested,
    )
    assert reason in choice.reason


def test_unknown_request_is_an_error() -> None:
    with pytest.raises(ValueError, match="auto, fp32 or bf16, not 'fp16'"):
        choose_precision("fp16", CPU, _cpu())


X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme
"""
ARM = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_x86_and_arm() -> None:
    model, flags = parse_cpuinfo(X86)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == {
        "fpu",
        "vme",
        "avx2",
        "avx512f",
        "avx512_bf16",
        "amx_bf16",
        "amx_tile",
        "amx_int8",
    }
    assert parse_cpuinfo(ARM) == (
        None,
        frozenset(["fp", "asimd", "evtstrm", "aes", "sve", "bf16", "i8mm"]),
    )


def test_this_machine_matches_lscpu() -> None:
    """The flags read from /proc/cpuinfo are the ones lscpu (util-linux) reports."""
    if shutil.which("lscpu") is None or not Path("/proc/cpuinfo").exists():
        pytest.skip("needs Linux with lscpu")
    fields = {}
    for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    info = cpu_info()
    if "Flags" in fields:
        assert info.flags == set(fields["Flags"].split())
    if "Model name" in fields:
        assert info.model == fields["Model name"]
    assert info.capability == torch.backends.cpu.get_cpu_capability()


def test_unreadable_cpuinfo_means_fp32(tmp_path: Path) -> None:
    info = cpu_info(tmp_path / "no-such-file")
    assert info.flags == frozenset()
    assert not choose_precision("auto", CPU, info).bf16


@pytest.mark.parametrize("requested", ["auto", "fp32", "bf16"])
def test_run_info_records_the_choice_and_the_run_trains_in_it(
    tiny_backbone: Path, real_data_dir: Path, tmp_path: Path, requested: str
) -> None:
    """run_info.json says what was chosen and why, with the CPU's flags; the linear layers'
    outputs during training are in the chosen dtype."""
    cfg = tiny_config(
        tiny_backbone,
        real_data_dir,
        tmp_path / "run",
        train={"max_steps": 2, "precision": requested, "device": "cpu", "write_predictions": False},
    )
    dtypes: set[torch.dtype] = set()

    def record(module: torch.nn.Module, args: tuple, out: object) -> None:
        if isinstance(module, torch.nn.Linear) and module.training:
            dtypes.add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        train(cfg)
    finally:
        handle.remove()
    expected = choose_precision(requested, CPU)
    assert dtypes == {torch.bfloat16 if expected.bf16 else torch.float32}

    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["precision"] == {
        "requested": requested,
        "bf16": expected.bf16,
        "chosen": expected.name,
        "reason": expected.reason,
        "device": "cpu",
    }
    machine = cpu_info()
    assert info["cpu"]["model"] == machine.model
    assert info["cpu"]["flags"] == {f: f in machine.flags for f in precision.RECORDED_FLAGS}
    assert {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"} <= set(info["cpu"]["flags"])
