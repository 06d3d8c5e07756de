#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs the job:
#   ./run.sh train [train.py arguments]   (default: --config configs/adalfl_cifar.yaml)
#   ./run.sh test  [pytest arguments]
#   ./run.sh bench
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
bash scripts/setup_env.sh
if [[ -z "${META_DATA_ROOT:-}" && -d "$root/../shared/data" ]]; then
  export META_DATA_ROOT="$root/../shared/data"
fi
py="$root/.venv/bin/python"
job="${1:-train}"
shift || true
case "$job" in
  train)
    if [[ $# -eq 0 ]]; then set -- --config configs/adalfl_cifar.yaml; fi
    exec "$py" train.py "$@" ;;
  test)
    "$root/.venv/bin/ruff" check .
    exec "$py" -m pytest "$@" ;;
  bench)
    for script in bench/*.py; do "$py" "$script"; done ;;
  *)
    echo "usage: ./run.sh {train|test|bench} [arguments]" >&2; exit 2 ;;
esac
