#!/usr/bin/env bash
# Screenshots of a finished search as a user watching it sees it: TensorBoard's HParams table and
# dev curves, optuna-dashboard's study page and trial list, in headless Chromium. Both servers
# listen on 127.0.0.1 only and are stopped at the end.
# Usage: benchmarks/screenshots.sh EXPERIMENT_FOLDER [OUT_DIR (docs/screenshots)] [STUDY_URL]
#   STUDY_URL defaults to sqlite:///<storage_path>/<name>.optuna.db beside the folder.
# Needs: tensorboard (in the project), optuna-dashboard (pip install -e ".[dashboard]"; installed
# here if missing), chromium (apt-get install -y chromium; installed here if missing and root).
# The PNGs are reduced to 128 colours (Pillow) to keep them small enough for the repository.
set -euo pipefail
exp=$(realpath "${1:?experiment folder}")
out=${2:-docs/screenshots}
study=${3:-sqlite:///$(dirname "$exp")/$(basename "$exp").optuna.db}
py=${PYTHON:-python3}
bin=$(dirname "$(command -v "$py")")
mkdir -p "$out"

if ! "$py" -c "import optuna_dashboard" 2>/dev/null; then
  "$py" -m pip install -q "optuna-dashboard>=0.15"
fi
dashboard=$(command -v optuna-dashboard || echo "$bin/optuna-dashboard")
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  apt-get install -y -q chromium >/dev/null
  dashboard=$(command -v optuna-dashboard || echo "$bin/optuna-dashboard")
browser=$(command -v chromium)
fi

port() { "$py" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
tb_port=$(port); od_port=$(port)
logs=$(mktemp -d)
"$bin/tensorboard" --logdir "$exp" --host 127.0.0.1 --port "$tb_port" >"$logs/tb.log" 2>&1 &
tb_pid=$!
"$dashboard" "$study" --host 127.0.0.1 --port "$od_port" >"$logs/od.log" 2>&1 &
od_pid=$!
trap 'kill $tb_pid $od_pid 2>/dev/null || true; wait 2>/dev/null || true' EXIT

wait_for() {  # URL: until it answers (60 s)
  for _ in $(seq 60); do curl -sf -o /dev/null "$1" && return 0; sleep 1; done
  echo "no answer from $1; logs in $logs" >&2; return 1
}
wait_for "http://127.0.0.1:$tb_port/data/runs"
wait_for "http://127.0.0.1:$od_port/api/studies"
study_id=$(curl -sf "http://127.0.0.1:$od_port/api/studies" | "$py" -c \
  "import json,sys; print(json.load(sys.stdin)['study_summaries'][0]['study_id'])")

shot() {  # NAME URL [WIDTH,HEIGHT]
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --window-size="${3:-1400,900}" --virtual-time-budget=20000 --screenshot="$out/$1.png" "$2" \
    >/dev/null 2>&1
  echo "$out/$1.png"
}
shot tensorboard_hparams "http://127.0.0.1:$tb_port/#hparams" 1800,700
# The SCALARS tab draws without a GPU (TIME SERIES needs WebGL): the objective, dev/overall and
# ASHA's stops, unsmoothed.
shot tensorboard_curves \
  "http://127.0.0.1:$tb_port/#scalars&tagFilter=overall%7Cstopped&_smoothingWeight=0" 1600,1000
shot optuna_dashboard_study "http://127.0.0.1:$od_port/dashboard/studies/$study_id" 1400,1100
# Trial 1's page (in the tests' tiny search, a trial that ASHA stopped).
shot optuna_dashboard_trial "http://127.0.0.1:$od_port/dashboard/studies/$study_id/trials?numbers=1" 1400,1000

"$py" - "$out" <<'PY'
import sys
from pathlib import Path

from PIL import Image

for path in Path(sys.argv[1]).glob("*.png"):
    Image.open(path).convert("RGB").quantize(128).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KiB")
PY
