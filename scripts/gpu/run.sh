#!/usr/bin/env bash
# Run on the device machine in the third call of README.md (this folder).
# usage: bash scripts/gpu/run.sh speed|smoke|full|large|determinism
set -euo pipefail
what=${1:-speed}
cat /tmp/lmc/part-aa /tmp/lmc/part-ab .carry/p3/part-ac > /tmp/lmc/model.gguf
export PYTHONPATH=/tmp/lmc/site:$PWD HF_HUB_OFFLINE=1 LMCODEC_CACHE=/tmp/lmc/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
corpus=${LMCODEC_CORPUS:-.carry/p3/corpus}
case "$what" in
  speed)
    python3 -m benchmarks.speed --model /tmp/lmc/model.gguf --device cuda --file "$corpus/large/dickens" \
      --json "$OUT/speed_cuda.json" ;;
  determinism)
    python3 -m pytest -q tests/test_codec.py -k "round_trip or thread" ;;
  smoke|full|large)
    python3 -m benchmarks.run --suite "$what" --corpus "$corpus" --model /tmp/lmc/model.gguf --device cuda \
      --out "$OUT/$what" ;;
esac
