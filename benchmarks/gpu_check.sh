#!/usr/bin/env bash
# One prepared GPU check (see README "On a GPU"): our encoder against transformers' on a
# BERT-base-shaped bf16 training step (tokens/s, MFU), then a one-trial search on the GPU.
# Usage: benchmarks/gpu_check.sh OUT_DIR [DATA_DIR] [TOKENIZER_DIR]
# On the lent device the wheels Ray/Optuna/pydantic need come from .devrun/ (not in git).
set -uo pipefail
out=${1:?output folder}; data=${2:-${MTL_DATA_DIR:-../shared/data/cs224n}}; tok=${3:-}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
device=$($py -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
$py -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$out/device.txt"

# 1. BERT-base shape, random weights, bf16 autocast: ours vs transformers (tokens/s, MFU).
if [ "$device" = cuda ]; then
  $py benchmarks/encoder_step.py --device cuda --dtype bf16 --config base --shapes 32x128,128x128 \
    --warmup 5 --steps 20 2>&1 | tee "$out/encoder_step_gpu.txt"
else
  $py benchmarks/encoder_step.py --device cpu --config base --shapes 2x16 --warmup 1 --steps 2 \
    2>&1 | tee "$out/encoder_step_gpu.txt"
fi

# 2. A one-trial search on this machine's accelerator, BERT-base shape with random weights.
work=$(mktemp -d)
hidden=768; layers=12; heads=12; inter=3072; gpu=1; cpus=4
[ "$device" = cpu ] && { hidden=32; layers=2; heads=4; inter=37; gpu=0; cpus=1; }
$py - "$work/backbone" "$tok" "$hidden" "$layers" "$heads" "$inter" <<'PY'
import sys
from tests.tiny import make_tiny_backbone
out, tok, h, n, a, i = sys.argv[1:]
make_tiny_backbone(out, tokenizer_dir=tok or None, hidden_size=int(h), num_hidden_layers=int(n),
                   num_attention_heads=int(a), intermediate_size=int(i))
PY
cat > "$work/smoke.yaml" <<YAML
experiment: {name: gpu-smoke, storage_path: $work/results, seed: 0}
base:
  model: {backbone: $work/backbone}
  data: {data_dir: $(realpath "$data"), max_train_examples: 2000, max_eval_examples: 400}
  train: {epochs: 1, eval_every: 0.5, batch_size: 32, progress: false}
parameters:
  design: {path: model.design, type: categorical, choices: [2]}
  lr: {path: train.lr, type: float, low: 2.0e-5, high: 5.0e-5, log: true}
search: {sampler: random, num_samples: 1, max_concurrent_trials: 1}
scheduler: {type: fifo}
resources_per_trial: {cpu: $cpus, gpu: $gpu}
YAML
start=$(date +%s)
$py -m mtl.search "$work/smoke.yaml" --no-dashboard 2>&1 | tail -40 | tee "$out/smoke_search.txt"
echo "smoke search wall seconds: $(( $(date +%s) - start ))" | tee -a "$out/smoke_search.txt"
cp "$work/results/gpu-smoke/results.csv" "$out/smoke_results.csv" 2>/dev/null
rm -rf "$work"
