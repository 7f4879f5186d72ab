#!/usr/bin/env bash
# The test command: set up (or reuse) the host, lint, then run the test suite against real ComfyUI.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k memorizer`).
set -euo pipefail
repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
host_env=$(bash "$repo_dir/scripts/bootstrap.sh" | tail -n 1)
# shellcheck disable=SC1090
source "$host_env"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$repo_dir"
echo "[test] ruff"
"$SHIELD_PYTHON" -m ruff check .
"$SHIELD_PYTHON" -m ruff format --check .
echo "[test] pytest"
# From tests/ (its pytest.ini makes it the rootdir): the repo root is the pack's package, which
# pytest must not import as a test package.
cd tests
"$SHIELD_PYTHON" -m pytest "$@"
