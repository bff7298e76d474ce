#!/usr/bin/env bash
# On a GPU box: check every family, then time the real-size families in bf16.
#   bash scripts/gpu_bench_all.sh results/bench/$(hostname)_$(date +%F) [extra bench.py args]
#   FAMILIES="qwen25vl" CHECK=0 bash scripts/gpu_bench_all.sh out/ --n 16 --repeats 2   # one family, no check
#   ... --sdpa-cudnn   # let SDPA use cuDNN attention (PyTorch's choice on Hopper; the library turns it off)
# Defaults: 8 samples, each timed once, the speed-up rows that matter at real size, and 2
# samples per method under torch.profiler (time by phase, host vs kernels; later arguments
# override them, e.g. --methods vanilla,egg --profile 0). Each family's table goes to
# <out>/<family>.txt as it is produced (a run cut short keeps what it measured: bench.py
# prints each method's numbers to stderr as they are taken).
# UNDONE=1 adds the rows that undo one speed-up each from the fastest configuration
# (egg_param_grads, egg_no_map_cache, egg_eager, egg_fp32; see egg_eval/undone.py), unprofiled.
# MAIN=0 skips the per-family runs (with CHECK=0: only the extra runs below).
# BUDGETS=1 also times LLaVA-1.6 and InternVL-3.5 at 1024 px (where the default budget makes them
# recompute layers) with no budget (egg_reused_prefix), the default (egg, 0.4x the weights) and
# egg under an 8 GB budget (about 0.5x), 8 samples each, to read time against peak memory; the
# first three rows also profiled by phase (2 samples each: where the budget's time goes).
# WHOLE=1 also runs gpu_check at the families' full depth with --whole-runs 8: full EGG on 8
# samples twice in a row, with and without deterministic=true (answers, crops and maps compared).
# OOM=1 also runs scripts/oom_check.py: real out-of-memory under a cap, the grounding's fallback
# and the runner's per-sample record (needs editdistance, as the runner does).
# ALLOC=1 also times LLaVA-1.6 and InternVL-3.5 at 1024 px, vanilla and egg, 8 samples each, with
# PyTorch's allocator as it is and with expandable_segments:True (--alloc-conf): peak allocated
# and peak reserved (what the device shows as taken), and time.
# PREFETCH=1 also runs scripts/bench_prefetch.py with Qwen2.5-VL and LLaVA-1.6 (published configurations,
# random weights): the runner's loop on 24 DocVQA-sized pages with prefetch=0 and 4 (needs hydra).
# WINDOWS=1 also times Qwen2.5-VL at 1024 px with the stock SDPA vision attention (one call per
# window) and with the grouped one (one per window length), vanilla and EGG, 4 samples each.
set -u
out=${1:-results/bench/gpu_$(date +%F)}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
families=${FAMILIES:-llava15,llava16,qwen25vl,internvl35}
if [ "${CHECK:-1}" != 0 ]; then
    python3 scripts/gpu_check.py --families "$families" 2>&1 | tee "$out/gpu_check.txt"
fi
for family in ${families//,/ }; do
    [ "${MAIN:-1}" = 0 ] && break  # MAIN=0: only the extra runs asked for below
    python3 scripts/bench.py --backbone real --family "$family" --device cuda --dtype bfloat16 \
        --threads 8 --n 8 --repeats 1 --methods vanilla,egg_reused_features,egg_reused_prefix,egg_lean,egg,egg_no_lean --profile 2 \
        "$@" 2>&1 | tee "$out/$family.txt"
    if [ "${UNDONE:-0}" != 0 ]; then
        python3 scripts/bench.py --backbone real --family "$family" --device cuda --dtype bfloat16 --threads 8 \
            --n 8 --repeats 1 --methods vanilla,egg_reused_prefix,egg_param_grads,egg_no_map_cache,egg_eager,egg_fp32 \
            "$@" 2>&1 | tee "$out/${family}_undone.txt"
    fi
done
if [ "${BUDGETS:-0}" != 0 ]; then
    for family in llava16 internvl35; do
        python3 scripts/bench.py --backbone real --family "$family" --device cuda --dtype bfloat16 --threads 8 \
            --n 8 --repeats 1 --methods vanilla,egg_reused_prefix,egg --image-size 1024 --profile 2 2>&1 \
            | tee "$out/${family}_1024_budgets.txt"
        python3 scripts/bench.py --backbone real --family "$family" --device cuda --dtype bfloat16 --threads 8 \
            --n 8 --repeats 1 --methods vanilla,egg --image-size 1024 --activation-memory-gb 8 2>&1 | tee "$out/${family}_1024_budget8.txt"
    done
fi
if [ "${WHOLE:-0}" != 0 ]; then
    python3 scripts/gpu_check.py --families "$families" --layers 0 --deterministic --whole-runs 8 2>&1 \
        | tee "$out/gpu_check_whole_runs.txt"
fi
if [ "${OOM:-0}" != 0 ]; then
    python3 scripts/oom_check.py --families "$families" 2>&1 | tee "$out/oom_check.txt"
fi
if [ "${ALLOC:-0}" != 0 ]; then
    for family in llava16 internvl35; do
        for conf in default expandable; do
            flag=""; [ "$conf" = expandable ] && flag="--alloc-conf expandable_segments:True"
            python3 scripts/bench.py --backbone real --family "$family" --device cuda --dtype bfloat16 --threads 8 \
                --n 8 --repeats 1 --methods vanilla,egg --image-size 1024 $flag 2>&1 | tee "$out/${family}_1024_alloc_$conf.txt"
        done
    done
fi
if [ "${PREFETCH:-0}" != 0 ]; then
    for family in qwen25vl llava16; do
        python3 scripts/bench_prefetch.py --real "$family" --n 24 --repeats 1 2>&1 | tee "$out/${family}_prefetch.txt"
    done
fi
if [ "${WINDOWS:-0}" != 0 ]; then
    for w in grouped stock; do
        flag=""; [ "$w" = stock ] && flag="--stock-windows"
        python3 scripts/bench.py --backbone real --family qwen25vl --device cuda --dtype bfloat16 --threads 8 \
            --n 4 --repeats 1 --methods vanilla,egg --image-size 1024 $flag 2>&1 | tee "$out/qwen25vl_1024_windows_$w.txt"
    done
fi
