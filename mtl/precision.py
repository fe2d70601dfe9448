"""Which precision a run trains in, decided at run time from the device and the CPU's flags.

``train.precision: auto`` trains under bf16 autocast where bf16 matrix products run natively:

* on CUDA (every GPU the project targets has bf16 tensor cores);
* on an x86 CPU whose flags (``/proc/cpuinfo``) include ``amx_bf16`` (Intel AMX tiles, Sapphire
  Rapids and later) or ``avx512_bf16`` (the ``VDPBF16PS`` dot product: Cooper Lake, AMD Zen 4 and
  later). oneDNN runs the linear layers' GEMMs in bf16 there; ``benchmarks/precision_epoch.py``
  measures what a whole epoch gains (README, Benchmarks);
* fp32 everywhere else: without those instructions oneDNN has no native bf16 GEMM and converts
  around it, so bf16 is not expected to pay (not measured: the project's boxes have bf16). CPUs
  of other architectures (Arm's ``bf16`` feature) are left at fp32 until someone measures them.

``train.precision: bf16`` or ``fp32`` is obeyed as written. The choice, its reason and the CPU's
model and relevant flags go into the run folder's ``run_info.json``, because the same config
trains at different precisions on different machines.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# CPU flags (Linux /proc/cpuinfo names) under which oneDNN runs bf16 GEMMs natively.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# The flags worth recording beside a timing: bf16/int8 matrix units and the vector widths.
RECORDED_FLAGS = (
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx512f",
    "avx512bw",
    "avx_vnni",
    "avx2",
    "fma",
    "bf16",  # Arm (aarch64) BFDOT/BFMMLA, in the Features line
    "sve",
)


@dataclass(frozen=True)
class CpuInfo:
    """What the trainer knows of the CPU it runs on.

    Attributes:
        model: the model name (``model name`` in /proc/cpuinfo; ``platform.processor()``
            elsewhere), None when unknown.
        flags: every feature flag of the first processor (``flags`` on x86, ``Features`` on
            Arm); empty when /proc/cpuinfo cannot be read (macOS, Windows).
        capability: the vector instruction set PyTorch's CPU kernels dispatch to
            (``torch.backends.cpu.get_cpu_capability()``: ``DEFAULT``, ``AVX2``, ``AVX512``...).
    """

    model: str | None
    flags: frozenset[str]
    capability: str

    def relevant_flags(self) -> dict[str, bool]:
        """Presence of each of :data:`RECORDED_FLAGS`, for run_info.json and benchmarks."""
        return {flag: flag in self.flags for flag in RECORDED_FLAGS}


def parse_cpuinfo(text: str) -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of the first processor listed in a /proc/cpuinfo text."""
    model, flags = None, frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
        if model is not None and flags:
            break
    return model, flags


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """The running machine's CPU (reads ``cpuinfo`` when it exists)."""
    model, flags = None, frozenset()
    with contextlib.suppress(OSError):  # no /proc: flags unknown, auto stays at fp32
        model, flags = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    return CpuInfo(
        model=model or platform.processor() or None,
        flags=flags,
        capability=torch.backends.cpu.get_cpu_capability(),
    )


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in and why.

    Attributes:
        requested: ``train.precision`` as configured (auto, fp32, bf16).
        bf16: True to run forward passes under bf16 autocast (weights, gradients and the
            optimizer stay fp32).
        reason: one sentence, recorded in run_info.json.
    """

    requested: str
    bf16: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def choose_precision(
    requested: str, device: torch.device, cpu: CpuInfo | None = None
) -> PrecisionChoice:
    """Resolve ``train.precision`` for ``device``.

    Args:
        requested: auto, fp32 or bf16.
        device: the device the run trains on.
        cpu: the CPU's description (default: :func:`cpu_info` of this machine); read only for
            ``auto`` on a CPU device.

    Returns:
        The choice and a one-sentence reason (module docstring: the rule).

    Raises:
        ValueError: ``requested`` is none of auto, fp32, bf16.
    """
    if requested in ("fp32", "bf16"):
        return PrecisionChoice(requested, requested == "bf16", f"train.precision is {requested}")
    if requested != "auto":
        raise ValueError(f"train.precision must be auto, fp32 or bf16, not {requested!r}")
    if device.type == "cuda":
        return PrecisionChoice(requested, True, "auto on CUDA: bf16 tensor cores")
    if device.type != "cpu":
        return PrecisionChoice(
            requested, False, f"auto on {device.type}: bf16 is chosen only on CUDA and on CPUs"
        )
    cpu = cpu if cpu is not None else cpu_info()
    native = [f for f in BF16_CPU_FLAGS if f in cpu.flags]
    if native:
        return PrecisionChoice(
            requested, True, f"auto on a CPU with native bf16 instructions ({', '.join(native)})"
        )
    if not cpu.flags:
        why = "its flags are unknown (no /proc/cpuinfo)"
    else:
        why = f"it has none of {', '.join(BF16_CPU_FLAGS)}, so bf16 would be emulated"
    return PrecisionChoice(requested, False, f"auto on a CPU: fp32, because {why}")


def autocast(choice: PrecisionChoice, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of autocast contexts for ``choice`` (a no-op context under fp32)."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=choice.bf16)


def run_record(choice: PrecisionChoice, device: torch.device, cpu: CpuInfo | None = None) -> dict:
    """The ``precision`` and ``cpu`` entries of run_info.json."""
    cpu = cpu if cpu is not None else cpu_info()
    return {
        "precision": {**asdict(choice), "chosen": choice.name, "device": str(device)},
        "cpu": {
            "model": cpu.model,
            "machine": platform.machine(),
            "capability": cpu.capability,
            "flags": cpu.relevant_flags(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
    }
