#!/usr/bin/env bash
# The GPU smoke run of issue 15 (the command and what it prints: benchmarks/gpu_smoke.py).
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_smoke.py" "$@"
