"""install.sh: the CPU build of torch where no NVIDIA GPU is listed, PyPI's build otherwise.

The script runs for real in --dry-run mode (it prints the pip commands it would run) under a PATH
that holds no nvidia-smi, or a stand-in nvidia-smi that answers as a GPU machine or a broken
driver does, with Python interpreters that do and do not have torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "install.sh"
SYSTEM_PATH = "/usr/bin:/bin"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("nvidia-smi", path=SYSTEM_PATH) is not None,
    reason="needs Linux with no nvidia-smi in /usr/bin:/bin",
)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python without torch (a fresh venv)."""
    folder = tmp_path_factory.mktemp("bare-venv")
    venv.create(folder, with_pip=False)
    return folder / "bin" / "python"


def _install(
    tmp_path: Path, python: Path, *args: str, nvidia_smi: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        fake.chmod(0o755)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={
            "PATH": f"{bin_dir}:{SYSTEM_PATH}",
            "HOME": str(tmp_path),
            "PYTHON": str(python),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cpu_machine_gets_the_cpu_build(tmp_path: Path, bare_python: Path) -> None:
    out = _install(tmp_path, bare_python, "--dry-run")
    assert out.returncode == 0, out.stderr
    commands = [ln for ln in out.stdout.splitlines() if ln.startswith("+ ")]
    assert commands == [
        f"+ {bare_python} -m pip install torch {CPU_INDEX}",
        f"+ {bare_python} -m pip install -e .",
    ]
    assert "no NVIDIA GPU" in out.stdout


def test_gpu_machine_gets_pypi_torch(tmp_path: Path, bare_python: Path) -> None:
    gpu = 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0c6d2b6e-0000-0000-0000-000000000000)"'
    out = _install(tmp_path, bare_python, "--dry-run", "test", nvidia_smi=gpu)
    assert out.returncode == 0, out.stderr
    assert "index-url" not in out.stdout
    assert f"+ {bare_python} -m pip install -e .[test]" in out.stdout.splitlines()
    assert "CUDA build" in out.stdout


def test_nvidia_smi_without_a_working_driver_means_cpu(tmp_path: Path, bare_python: Path) -> None:
    broken = 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."; exit 9'
    out = _install(tmp_path, bare_python, "--dry-run", nvidia_smi=broken)
    assert out.returncode == 0, out.stderr
    assert CPU_INDEX in out.stdout


def test_index_can_be_overridden(tmp_path: Path, bare_python: Path) -> None:
    out = _install(tmp_path, bare_python, "--dry-run", TORCH_INDEX_URL="file:///mirror/cpu")
    assert "pip install torch --index-url file:///mirror/cpu" in out.stdout


def test_installed_torch_is_kept(tmp_path: Path) -> None:
    """This test's own interpreter has torch: the script leaves it and installs only the project."""
    import torch

    out = _install(tmp_path, Path(sys.executable), "--dry-run", "test,dashboard")
    assert out.returncode == 0, out.stderr
    assert f"keeping the installed {torch.__version__}" in out.stdout
    commands = [ln for ln in out.stdout.splitlines() if ln.startswith("+ ")]
    assert commands == [f"+ {sys.executable} -m pip install -e .[test,dashboard]"]


def test_unknown_option_is_one_line_and_status_2(tmp_path: Path, bare_python: Path) -> None:
    out = _install(tmp_path, bare_python, "--cuda")
    assert out.returncode == 2
    assert out.stderr.strip() == "install.sh: unknown option --cuda (see --help)"
    assert os.access(SCRIPT, os.X_OK)
