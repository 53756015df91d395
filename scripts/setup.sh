#!/usr/bin/env bash
# Create (or reuse) the pinned environment, link it as .venv, and install lmcache-sgl
# into it (editable, kernels built against this environment). Idempotent.
#
# The environment is ~11 GB (sglang pins a CUDA build of torch, which also runs on the
# CPU). It lives in a cache keyed by the pinned requirements, so a second clone on the
# same machine (CI's, say) links it instead of installing it again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KEY=$(cat requirements.txt requirements.lock | sha256sum | cut -c1-16)-$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
CACHE_ROOT=${LMCACHE_SGL_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmcache-sgl}
ENV="$CACHE_ROOT/env-$KEY"

if [ ! -f "$ENV/.complete" ]; then
    echo "setup: installing the pinned environment into $ENV (first time: ~4 min, ~11 GB)"
    rm -rf "$ENV"
    mkdir -p "$CACHE_ROOT"
    "$PY" -m venv "$ENV"
    "$ENV/bin/pip" install -q -r requirements.txt -c requirements.lock
    touch "$ENV/.complete"
else
    echo "setup: reusing the environment $ENV"
fi
if [ "$(readlink .venv 2>/dev/null)" != "$ENV" ]; then
    rm -rf .venv
    ln -s "$ENV" .venv
fi

# Rebuild and reinstall the package only when its build inputs or its location changed.
STAMP=$( (pwd; cat pyproject.toml CMakeLists.txt src/kernels/*) | sha256sum | cut -c1-16)
if [ "$(cat "$ENV/.lmcache-sgl-installed" 2>/dev/null)" != "$STAMP" ] || ! ls lmcache_sgl/_kernels_cpu*.so >/dev/null 2>&1; then
    echo "setup: building lmcache-sgl and its kernels"
    .venv/bin/pip install -q --no-build-isolation --no-deps -e .
    echo "$STAMP" > "$ENV/.lmcache-sgl-installed"
fi
.venv/bin/python -c "import lmcache_sgl.ops as o; print('setup: done; compiled kernels:', o.HAVE_EXTENSION)"
