#!/usr/bin/env bash
# The demo command: set up (or reuse) the host, then run the demo graphs on the real ComfyUI, headless,
# with the bundled demo model. Arguments go to scripts/demo.py (e.g. --class-name ring --out DIR).
set -euo pipefail
repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
echo "[demo] setting up the host (first time ~3 min, then seconds)"
host_env=$(bash "$repo_dir/scripts/bootstrap.sh" | tail -n 1)
# shellcheck disable=SC1090
source "$host_env"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
exec "$SHIELD_PYTHON" "$repo_dir/scripts/demo.py" "$@"
