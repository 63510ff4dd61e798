#!/usr/bin/env bash
# Benchmark suites on the GPU machine, after check.sh staged the model and wheels
# (same warm machine; prepare.sh --corpus, and this call carries .gpu/p3).
# usage: OUT=dir bash scripts/gpu/run.sh smoke|full|large|determinism
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:-smoke}
# shellcheck disable=SC1091
. scripts/gpu/env.sh
[ "$LMC_READY" = 1 ] || exit 0
corpus=${LMCODEC_CORPUS:-$LMC/parts/corpus}
case "$what" in
  determinism)
    python3 -m pytest -q tests/test_codec.py -k "round_trip or thread" ;;
  smoke|full|large)
    python3 -m benchmarks.run --suite "$what" --corpus "$corpus" --device cuda --out "$OUT/$what" ;;
  *) echo "usage: run.sh smoke|full|large|determinism"; exit 2 ;;
esac
