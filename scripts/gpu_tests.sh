#!/usr/bin/env bash
# H100: the whole suite. Kernel tests in parallel; the big-model tests alone (they need the GPU's memory).
# Usage: scripts/gpu_tests.sh WIKITEXT_FILE OUT_DIR
set -u
mkdir -p ../shared/data/wikitext-2-raw && cp -n "$1" ../shared/data/wikitext-2-raw/ 2>/dev/null
python3 -m pytest -q -n 8 -ra --ignore tests/test_gpu_models.py tests/ 2>&1 | tee "$2/pytest-parallel.log" | tail -8
python3 -m pytest -q -ra tests/test_gpu_models.py 2>&1 | tee "$2/pytest-models.log" | tail -8
