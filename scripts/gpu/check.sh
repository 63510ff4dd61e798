#!/usr/bin/env bash
# The GPU check, in one go (README.md beside this script).
#
#   on the GPU machine:  bash scripts/gpu/check.sh            (call 1 carries .gpu/p1, call 2 .gpu/p2)
#   here, on CPU:        OUT=dir bash scripts/gpu/check.sh --dry-run
#
# Installs the carried wheels and model, then scripts/gpu/check.py: `lmcodec selftest`,
# the CPU-made archives decoded on the device, the check inputs compressed there
# (their archives in $OUT/device-archives.tar for scripts/gpu/cross_decode.py here),
# benchmarks.speed at levels 3 and 6 both ways; figures in $OUT/gpu-check.json.
# The whole run stays within BUDGET_S seconds (default 480: the 8 minutes it is given).
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder for gpu-check.json}"
mkdir -p "$OUT"
budget=${BUDGET_S:-480}
if [ "${1:-}" = "--dry-run" ]; then
  py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  exec "$py" scripts/gpu/check.py --dry-run --out "$OUT" --budget "$budget"
fi
# shellcheck disable=SC1091
. scripts/gpu/env.sh
[ "$LMC_READY" = 1 ] || exit 0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
left=$((budget - ($(date +%s) - start)))
set -o pipefail
python3 scripts/gpu/check.py --device cuda --out "$OUT" --inputs "$LMC/parts/inputs" \
  --speed-file "$LMC/parts/speed-input" --speed-bytes "${SPEED_BYTES:-2000000}" --budget "$left" 2>&1 \
  | tee "$OUT/check.log"
