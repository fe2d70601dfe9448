#!/usr/bin/env bash
# Install mtl-search (editable) into the active Python environment, with the CPU build of torch on
# a Linux machine without an NVIDIA GPU.
#
#   ./install.sh              # pip install -e .
#   ./install.sh test         # pip install -e '.[test]'  (extras, comma-separated: test,dashboard)
#   ./install.sh --dry-run    # print the pip commands and why, install nothing
#
# Why: PyPI's torch wheel for Linux is the CUDA build (several GB with its nvidia-* wheels), which
# a CPU-only machine downloads for nothing. Where `nvidia-smi -L` lists no GPU, torch comes from
# PyTorch's CPU index (TORCH_INDEX_URL, default https://download.pytorch.org/whl/cpu), torch alone;
# everything else comes from the usual index. A torch already installed (any build) is kept, so a
# GPU machine's CUDA build and an offline machine's local wheel are never replaced. On macOS and
# Windows PyPI's torch is already CPU-only (with MPS on Apple silicon): installed as pip picks it.
# Environment: PYTHON (default: python, else python3), TORCH_INDEX_URL, and pip's own PIP_*.
set -euo pipefail
cd "$(dirname "$0")"

dry_run=0
extras=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) extras="$arg" ;;
  esac
done

python=${PYTHON:-$(command -v python || command -v python3 || true)}
if [[ -z "$python" ]]; then
  echo "install.sh: no python on PATH (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
target="."
[[ -n "$extras" ]] && target=".[$extras]"
cpu_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

run() {
  echo "+ $*"
  if [[ $dry_run == 0 ]]; then "$@"; fi
}

if "$python" -c "import torch" >/dev/null 2>&1; then
  echo "torch: keeping the installed $("$python" -c 'import torch; print(torch.__version__)')"
elif [[ "$(uname -s)" != Linux ]]; then
  echo "torch: from PyPI ($(uname -s): PyPI's build has no CUDA)"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "torch: the CUDA build from PyPI (nvidia-smi lists a GPU)"
else
  echo "torch: the CPU build from $cpu_index (no NVIDIA GPU: nvidia-smi absent or lists none)"
  run "$python" -m pip install torch --index-url "$cpu_index"
fi
run "$python" -m pip install -e "$target"
