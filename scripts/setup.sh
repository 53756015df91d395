#!/usr/bin/env bash
# Set up this clone: a shared base environment of the pinned stack, and this clone's own
# thin environment .venv on top of it. Idempotent; a second clone on the machine takes
# seconds.
#
# The base is ~11 GB (sglang pins a CUDA build of torch, which also runs on the CPU). It
# lives in a cache keyed by the pinned requirements, is installed once per machine, and
# is only read afterwards: it never holds lmcache-sgl. .venv is a venv of this clone
# that sees the base's site-packages through a .pth file and holds only this clone's
# editable install (its entry points, its kernels built in this tree), so whatever other
# clones do, this one imports its own code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYTAG=$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
KEY=$(cat requirements.txt requirements.lock | sha256sum | cut -c1-16)-$PYTAG
CACHE_ROOT=${LMCACHE_SGL_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmcache-sgl}
BASE="$CACHE_ROOT/env-$KEY"

if [ ! -f "$BASE/.complete" ]; then
    echo "setup: installing the pinned base environment into $BASE (first time: ~4 min, ~11 GB)"
    rm -rf "$BASE"
    mkdir -p "$CACHE_ROOT"
    "$PY" -m venv "$BASE"
    "$BASE/bin/pip" install -q -r requirements.txt -c requirements.lock
    touch "$BASE/.complete"
fi
BASE_SITE=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')

# .venv: this clone's own venv over the base. An older setup made .venv a link to the
# base; a changed base (new pins) needs a new one. It is built beside .venv and moved in
# place, so .venv/bin/python keeps working while it is replaced.
if [ -L .venv ] || [ "$(cat .venv/.lmcache-sgl-base 2>/dev/null)" != "$BASE" ]; then
    echo "setup: creating .venv over the shared base $BASE"
    NEW=".venv.new.$$"
    rm -rf "$NEW"
    "$BASE/bin/python" -m venv --without-pip "$NEW"
    SITE=$("$NEW/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    # addsitedir, unlike a plain path line, also runs the base's own .pth files
    echo "import site; site.addsitedir('$BASE_SITE')" > "$SITE/_lmcache_sgl_base.pth"
    echo "$BASE" > "$NEW/.lmcache-sgl-base"
    sed -i "s|$PWD/$NEW|$PWD/.venv|g" "$NEW"/bin/activate* "$NEW/pyvenv.cfg"  # name .venv, not $NEW
    rm -rf .venv && mv "$NEW" .venv
fi

# Build and install this clone (editable, kernels built here) when its build inputs,
# its location or its environment changed.
STAMP=$( (pwd; cat .venv/.lmcache-sgl-base pyproject.toml CMakeLists.txt src/kernels/*) | sha256sum | cut -c1-16)
if [ "$(cat .venv/.lmcache-sgl-installed 2>/dev/null)" != "$STAMP" ] || ! ls lmcache_sgl/_kernels_cpu*.so >/dev/null 2>&1; then
    echo "setup: building lmcache-sgl and its kernels into .venv"
    .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
    echo "$STAMP" > .venv/.lmcache-sgl-installed
fi

# The lint tools of `make lint` (requirements-lint.txt): a small shared environment of
# their own, keyed by their pins, so they change nothing that the code imports.
LINT="$CACHE_ROOT/lint-$(sha256sum < requirements-lint.txt | cut -c1-16)-$PYTAG"
if [ ! -f "$LINT/.complete" ]; then
    echo "setup: installing the lint tools into $LINT"
    rm -rf "$LINT"
    "$PY" -m venv "$LINT"
    "$LINT/bin/pip" install -q -r requirements-lint.txt
    touch "$LINT/.complete"
fi
[ "$(readlink .venv/lint)" = "$LINT" ] || ln -sfn "$LINT" .venv/lint

# Older setups installed lmcache-sgl into the base itself, where every clone saw it.
if ls -d "$BASE_SITE"/lmcache_sgl-*.dist-info >/dev/null 2>&1; then
    echo "setup: removing the lmcache-sgl an older setup installed into the shared base"
    "$BASE/bin/python" -m pip uninstall -q -y lmcache-sgl
fi
.venv/bin/python -c "import lmcache_sgl.ops as o; print('setup: done; compiled kernels:', o.HAVE_EXTENSION)"
