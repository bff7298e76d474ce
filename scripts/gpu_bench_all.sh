#!/usr/bin/env bash
# On a GPU box: check every family, then time all four real-size families in bf16.
#   bash scripts/gpu_bench_all.sh results/bench/$(hostname)_$(date +%F) [extra bench.py args]
# Each family's table goes to <out>/<family>.txt as it is produced (a run cut short keeps what
# it measured: bench.py prints each method's numbers to stderr as they are taken).
set -u
out=${1:-results/bench/gpu_$(date +%F)}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 scripts/gpu_check.py 2>&1 | tee "$out/gpu_check.txt"
for family in llava15 llava16 qwen25vl internvl35; do
    python3 scripts/bench.py --backbone real --family "$family" --device cuda --dtype bfloat16 \
        --threads 8 --n 16 --repeats 2 "$@" 2>&1 | tee "$out/$family.txt"
done
