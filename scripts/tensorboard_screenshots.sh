#!/usr/bin/env bash
# Screenshots of TensorBoard on a mixed logdir (an AdaLFL, an MSE and a MAML run, a few steps each), taken with
# headless Chromium: Time Series, Images and HParams, as README's "TensorBoard" shows them.
#   scripts/tensorboard_screenshots.sh [OUT_DIR]     (default docs/figures; needs chromium: apt-get install chromium)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-docs/figures}"
python=.venv/bin/python
command -v chromium >/dev/null || { echo "chromium is missing: apt-get install chromium" >&2; exit 1; }
logdir="$(mktemp -d)"
trap 'kill "${board:-}" 2>/dev/null || true; rm -rf "$logdir"' EXIT
data=(--runs-root "$logdir" --data-root "${META_DATA_ROOT:-../shared/data}")
"$python" train.py --config configs/adalfl_mnist.yaml "${data[@]}" --set name=adalfl_mnist --set train.steps=400 \
    --set meta.init_steps=50 --set train.eval_every=100 --set log.loss_shape_every=100
"$python" train.py --config configs/adalfl_california.yaml "${data[@]}" --set name=mse_california --set method=mse \
    --set train.steps=400 --set train.eval_every=100
"$python" train.py --config configs/maml_omniglot_5w1s_cpu.yaml "${data[@]}" --set name=maml_omniglot \
    --set outer.iterations=20 --set eval.every=10 --set eval.val_tasks=10 --set eval.test_tasks=10 \
    --set log.every=5 --set log.progress=false
port=$((20000 + RANDOM % 20000))
"$python" -m tensorboard.main --logdir "$logdir" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
board=$!
for _ in $(seq 60); do
  "$python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/data/runs')" 2>/dev/null && break
  sleep 1
done
mkdir -p "$out"
for page in time_series:timeseries images:images hparams:hparams; do
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
      --virtual-time-budget=15000 --screenshot="$out/tensorboard_${page%%:*}.png" \
      "http://127.0.0.1:$port/?darkMode=false#${page##*:}" 2>/dev/null
  echo "wrote $out/tensorboard_${page%%:*}.png"
done
