#!/usr/bin/env bash
# The prepared GPU speed check of issue 15 (README "Benchmarks"), one call on a lent GPU:
#  1. BERT-base shape, bf16: our training step eager, as one CUDA graph, under torch.compile,
#     and both, at 32x128 and 128x128 (MFU), with the top kernels of the eager and compiled
#     steps; then 128x128 with no padding (no mask: SDPA's mask-free kernels), profiled too.
#  2. MiniLM-shaped trials packed 1, 2 and 4 to the GPU (benchmarks/trial_packing.py).
# Usage: [PARTS="encoder packing"] [PACKINGS=1,2,4] benchmarks/gpu_speed.sh OUT_DIR
# (One call runs past 10 minutes with both parts: run PARTS=encoder and PARTS=packing apart.)
# Each part has its own time limit and writes its own file under OUT_DIR, so a part that runs
# long or fails leaves the others' figures. On a machine without a GPU it runs tiny shapes (how
# the script is checked). On the lent device, packages the image lacks (Ray, Optuna, pydantic)
# and the data travel in .devrun/ (not in git): site.tar.xz, data/, tok/ (MiniLM's tokenizer).
# Built on the development machine (the device has Python 3.12 and no network):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d whl ray==2.60.0 optuna==5.0.0 pydantic pydantic_core \
#     alembic annotated-types colorlog jsonschema jsonschema-specifications Mako referencing \
#     SQLAlchemy tensorboardX typing-inspection rpds-py
#   pip install --no-deps --target site --python-version 3.12 --only-binary=:all: \
#     --platform manylinux2014_x86_64 --implementation cp whl/*.whl
#   rm -rf site/ray/jars site/ray/rllib site/bin    # Java and RLlib: 64 MiB is the limit
#   tar -C site -cf - . | xz -6 > .devrun/site.tar.xz   # 38 MB
#   cp $MTL_DATA_DIR/* .devrun/data/; cp <MiniLM folder>/{vocab.txt,tokenizer*.json,special_tokens_map.json} .devrun/tok/
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -f .devrun/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .devrun/site.tar.xz -C /tmp/site
  export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" MTL_DATA_DIR="$PWD/.devrun/data"
else
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
fi
tok=$([ -d .devrun/tok ] && echo "$PWD/.devrun/tok" || echo "")
device=$($py -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  $py -c "import ray, optuna; print('ray', ray.__version__, 'optuna', optuna.__version__)"
  nproc
  # The card's bf16 matrix ceiling: a large product, the median of 10 after 3 warm-ups.
  $py - <<'PY'
import torch
if torch.cuda.is_available():
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); a @ b; end.record(); end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    seconds = sorted(times[3:])[5]
    print(f"bf16 matmul {n}^3 on random data: {2 * n**3 / seconds / 1e12:.0f} TFLOP/s")
PY
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

if [ "$device" = cuda ]; then
  enc=(--device cuda --dtype bf16 --config base --warmup 5 --steps 30)
  shapes=32x128,128x128; full=128x128; packing=(--cpus-per-trial 3)
  hidden=384; layers=6; heads=12; inter=1536
else
  enc=(--device cpu --config base --warmup 1 --steps 2)
  shapes=2x16; full=2x16; packing=(--device cpu --packings 1,2 --trials 2 --cpus-per-trial 1
    --set base.data.max_train_examples=40 --set base.data.max_eval_examples=20)
  hidden=32; layers=2; heads=4; inter=37
fi

parts=" ${PARTS:-encoder packing} "
if [[ $parts == *" encoder "* ]]; then
# 1. The encoder's step, four ways, with and without padding.
timeout "${T_ENCODER:-240}" $py benchmarks/encoder_step.py "${enc[@]}" --shapes "$shapes" \
  --modes eager,graph,compile,compile-graph --profile > "$out/encoder_modes.txt" 2>&1
echo "encoder modes: exit $?"; grep -E '^  [0-9]+x[0-9]+ |MFU|failed' "$out/encoder_modes.txt"
timeout "${T_FULL:-45}" $py benchmarks/encoder_step.py "${enc[@]}" --shapes "$full" --no-padding \
  --modes eager,graph --profile > "$out/encoder_nopad.txt" 2>&1
echo "no padding: exit $?"; grep -E '^  [0-9]+x[0-9]+ |MFU|failed' "$out/encoder_nopad.txt"
fi
[[ $parts == *" packing "* ]] || exit 0

# 2. Trials per hour, 1, 2 and 4 MiniLM-shaped trials to the GPU (random weights).
$py - /tmp/minilm-shape "$tok" "$hidden" "$layers" "$heads" "$inter" <<'PY'
import sys
from tests.tiny import make_tiny_backbone
out, tok, h, n, a, i = sys.argv[1:]
make_tiny_backbone(out, tokenizer_dir=tok or None, hidden_size=int(h), num_hidden_layers=int(n),
                   num_attention_heads=int(a), intermediate_size=int(i))
PY
[ -n "${PACKINGS:-}" ] && packing+=(--packings "$PACKINGS")
timeout "${T_PACKING:-540}" $py benchmarks/trial_packing.py --backbone /tmp/minilm-shape \
  "${packing[@]}" > "$out/packing.txt" 2>&1
echo "packing: exit $?"; tail -8 "$out/packing.txt"
