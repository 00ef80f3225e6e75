#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv at the repo root.
#
# Everything `make test` and `make demo` need is installed here, with no other step:
# torch (the CPU wheel where the machine has one), mmengine, mmcv built from its sdist with
# its C++ ops, mmdet, mmsegmentation and the test tools. The mmcv build is the slow part
# (about 10 minutes on 2 cores); its wheel is cached outside the repo, in
# ${MMSN_CACHE:-~/.cache/mmsn}/wheels, keyed by the torch version, so it happens once per
# machine.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
cache=${MMSN_CACHE:-$HOME/.cache/mmsn}
torch_spec=${MMSN_TORCH:-torch==2.13.0}
mmcv_version=2.1.0

stamp="$venv/.mmsn-env-stamp"
want=$(cat "$root/requirements.txt" "$root/requirements"/*.txt "$0" 2>/dev/null | sha1sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

log() { printf '[setup_env] %s\n' "$*"; }
[[ -x "$venv/bin/python" ]] || { log "creating $venv with $($python --version)"; "$python" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# Machines of this workplace keep CPU torch wheels in /opt/wheels; elsewhere PyPI serves torch.
[[ -d /opt/wheels ]] && pip+=(--find-links /opt/wheels)

log "installing build tools and $torch_spec"
# setuptools 81: new enough for torch's metadata, still ships pkg_resources, which mmcv's
# setup.py and mmengine's 'mmdet::' config lookup import (removed in setuptools 82).
"${pip[@]}" --upgrade pip 'setuptools==81.*' wheel ninja
"${pip[@]}" "$torch_spec" -r "$root/requirements/build.txt"

torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
wheel_dir="$cache/wheels/mmcv-$mmcv_version-torch-$torch_version-$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
if ! ls "$wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
  log "building mmcv $mmcv_version with its C++ ops against torch $torch_version"
  log "this happens once per machine and takes about 10 minutes on 2 cores; cached in $wheel_dir"
  tmp=$(mktemp -d)
  start=$(date +%s)
  # -O1 -g0 halves the compile time against mmcv's default -O3 -g; the CPU ops mmdet needs
  # (RoIAlign, nms) are not hot in our use. Torch >= 2.14 headers need C++20, older accept 17.
  cxx_std=$("$venv/bin/python" - <<'PY'
import torch
major, minor = (int(v) for v in torch.__version__.split('+')[0].split('.')[:2])
print('c++20' if (major, minor) >= (2, 14) else 'c++17')
PY
)
  "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    "mmcv==$mmcv_version" -d "$tmp" >/dev/null
  tar -xzf "$tmp"/mmcv-"$mmcv_version".tar.gz -C "$tmp"
  sed -i "s/-std=c++17/-std=$cxx_std/g" "$tmp/mmcv-$mmcv_version/setup.py"
  (cd "$tmp/mmcv-$mmcv_version" && \
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} CFLAGS="-O1 -g0" CXXFLAGS="-O1 -g0" \
    PATH="$venv/bin:$PATH" \
    "$venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps . -w "$tmp/dist")
  mkdir -p "$wheel_dir"
  cp "$tmp"/dist/mmcv-*.whl "$wheel_dir/"
  rm -rf "$tmp"
  log "mmcv built in $(( $(date +%s) - start )) s"
fi

log "installing mmcv (cached wheel), OpenMMLab packages and test tools"
"${pip[@]}" "$wheel_dir"/mmcv-*.whl "$torch_spec" -r "$root/requirements.txt" -r "$root/requirements/tests.txt"
"${pip[@]}" --no-deps --no-build-isolation -e "$root"
echo "$want" > "$stamp"
log "environment ready: $venv"
