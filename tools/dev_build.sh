#!/usr/bin/env bash
# Developer build without pip: compiles the extension into BUILD_DIR and copies the modules next to
# the Python sources, so `PYTHONPATH=python pytest` runs this checkout. Usage: tools/dev_build.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
bdir=${1:-build/dev}
pybind_dir=$(python -c "import pybind11; print(pybind11.get_cmake_dir())")
if [ ! -f "$bdir/build.ninja" ]; then
  cmake -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$pybind_dir" \
    -DPython_EXECUTABLE="$(command -v python)" -DSPARSEPRUNE_CUDA="${SPARSEPRUNE_CUDA:-OFF}" \
    -DSPARSEPRUNE_SANITIZE="${SPARSEPRUNE_SANITIZE:-}" -DSKBUILD_PROJECT_VERSION=0.1.0 >/dev/null
fi
cmake --build "$bdir" -j"$(nproc)"
cp "$bdir"/_C*.so "$bdir"/_build_info.py python/sparseprune/
[ -n "$(ls "$bdir"/_cuda*.so 2>/dev/null)" ] && cp "$bdir"/_cuda*.so python/sparseprune/ || true
echo "built into $bdir; run with PYTHONPATH=$(pwd)/python"
