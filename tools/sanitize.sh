#!/usr/bin/env bash
# Build the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer and run the kernel tests
# against it. Usage: tools/sanitize.sh [pytest args...]   (default: the SpMM and format tests)
set -euo pipefail
cd "$(dirname "$0")/.."
bdir=build/asan
SPARSEPRUNE_SANITIZE=address,undefined SPARSEPRUNE_CUDA=OFF tools/dev_build.sh "$bdir" >/dev/null
pkg=$(mktemp -d)
trap 'rm -rf "$pkg"; tools/dev_build.sh >/dev/null' EXIT  # restore the normal build afterwards
cp -r python/sparseprune "$pkg/"
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests/test_linear.py tests/test_formats.py tests/test_reliability.py)
LD_PRELOAD="$asan $ubsan" PYTHONPATH="$pkg" HYPOTHESIS_PROFILE=dev python -m pytest -q -p no:cacheprovider "${args[@]}"
