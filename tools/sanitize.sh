#!/usr/bin/env bash
# Build the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer into build/asan and run tests
# against it (the installed package is not touched: a private copy of the Python sources is used).
# Usage: tools/sanitize.sh [pytest args...]   (default: kernel, format and hostile-file tests)
set -euo pipefail
cd "$(dirname "$0")/.."
bdir=build/asan
pybind_dir=$(python -c "import pybind11; print(pybind11.get_cmake_dir())")
if [ ! -f "$bdir/build.ninja" ]; then
  cmake -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$pybind_dir" \
    -DPython_EXECUTABLE="$(command -v python)" -DSPARSEPRUNE_CUDA=OFF -DSPARSEPRUNE_SANITIZE=address,undefined \
    -DSKBUILD_PROJECT_VERSION=0.1.0 >/dev/null
fi
cmake --build "$bdir" -j"$(nproc)" >/dev/null
pkg=$(mktemp -d)
trap 'rm -rf "$pkg"' EXIT
cp -r python/sparseprune "$pkg/"
rm -f "$pkg"/sparseprune/_C*.so "$pkg"/sparseprune/_cuda*.so
cp "$bdir"/_C*.so "$bdir"/_build_info.py "$pkg/sparseprune/"
# every process (test subprocesses too) imports this copy, even where an editable install is present
cat > "$pkg/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
PY
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LD_PRELOAD="$asan $ubsan" PYTHONPATH="$pkg" HYPOTHESIS_PROFILE=dev
# the sanitized module must be the one imported (an editable install's finder would shadow PYTHONPATH)
python -c "import sparseprune._C as c, sys; f = c.__file__; sys.exit(0 if f.startswith('$pkg') else 'sanitize.sh: imported ' + f + ', not the sanitized build')"
args=("$@")
# Timing is meaningless under ASan: the test that bounds convert()'s wall time in units of a dense
# (uninstrumented torch) forward is left out (our instrumented kernels run several times slower than that
# unit; it failed at 21 forwards vs 15 + 3 s allowed on a Zen 3). It runs in the main, uninstrumented pass.
[ ${#args[@]} -gt 0 ] || args=(tests/test_linear.py tests/test_formats.py tests/test_reliability.py tests/test_hostile.py
                               tests/test_fuzz_files.py tests/test_quant_kernels.py tests/test_pool.py
                               tests/test_residual.py tests/test_layer_norm_fusion.py tests/test_kept_arrays.py
                               -k "not wall_time_with_costly_calls")
python -m pytest -q -p no:cacheprovider "${args[@]}"
