#!/usr/bin/env bash
# Creates .venv with the pinned stack and a learn2learn 0.2.0 built for this Python.
# Idempotent: does nothing when .venv already matches this script and pyproject.toml.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.setup-stamp"
want="$(cat "$root/scripts/setup_env.sh" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "[setup] creating $venv (first run takes a few minutes)"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch and torchvision as one consistent CUDA build pair: the same environment runs on CPU and GPU
# (see README, "Environment").
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
# requests: learn2learn imports it when it is imported
"${pip[@]}" "tensorboard>=2.15" "pyyaml>=6" "pytest>=7" "tqdm" "numpy" "matplotlib" "pillow" "scipy" "requests" "gym==0.26.2" \
  "cma>=3.3" "deap>=1.4" "submitit>=1.5" "ruff" "cython==0.29.37" "setuptools" "wheel"

if ! "$venv/bin/python" -c "import learn2learn" >/dev/null 2>&1; then
  # learn2learn 0.2.0 ships only an sdist whose generated C files predate Python 3.11:
  # regenerate them with Cython 0.29.37, then build without build isolation.
  build="$(mktemp -d)"
  echo "[setup] building learn2learn 0.2.0 from its sdist"
  "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
    learn2learn==0.2.0 -d "$build"
  tar xzf "$build/learn2learn-0.2.0.tar.gz" -C "$build"
  src="$build/learn2learn-0.2.0"
  rm -f "$src"/learn2learn/data/*.c
  for m in meta_dataset task_dataset transforms; do
    "$venv/bin/cython" -3 "$src/learn2learn/data/$m.pyx"
  done
  "${pip[@]}" --no-deps --no-build-isolation "$src"
  rm -rf "$build"
fi

"${pip[@]}" --no-deps --no-build-isolation -e "$root"
"$venv/bin/python" -c "import torch, torchvision, tensorboard; from tasks.episodes import import_learn2learn; \
print('[setup] torch', torch.__version__, '| torchvision', torchvision.__version__, '| learn2learn', \
import_learn2learn().__version__)"
echo "$want" > "$stamp"
