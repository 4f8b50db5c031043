#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md ("GPU") in one command, for a short GPU lease:
#   OUT=/tmp/gpu bash scripts/bench_gpu.sh
# Each step runs under its own time limit and a failing step does not stop the next; each writes its JSON
# line to $OUT/<step>.json, all logs go to $OUT/gpu.log and a one-line verdict per step to $OUT/steps.txt.
# Steps (most wanted first): AIRPI end to end with the shipped generalist, eager and torch.compile-d, fp32
# and bf16, first call and warm, at 256 x 256 positions (65,536 patterns, 1 GiB of float32 CBEDs); PtychoNN
# and Chang likewise;
# training steps of the four networks in fp32 and bf16; kernel datagen with abTEM on CuPy against its CPU
# run on the same samples. Needs, beside torch / Lightning / h5py / CuPy: hydra-core, omegaconf, antlr4 and,
# for the datagen step, abTEM 1.0.11 with ase, dask and IPython / ipywidgets (abTEM imports them); on a
# machine without a package index, install their wheels into a folder on PYTHONPATH first.
# Figures of one H200 (session 16): docs/benchmarks.md "GPU", docs/bench_gpu_h200_s16.json.
set -u
OUT=${OUT:-/tmp/deepstem_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
LOG="$OUT/gpu.log"
SCAN=${SCAN:-256}

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" > "$OUT/$name.json" 2>> "$LOG"
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start)) s" | tee -a "$OUT/steps.txt" "$LOG"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
    # the imports every step needs, so that a missing package shows once, at the top
    python3 -c "import hydra, lightning, h5py, physics, evaluation.networks, models, training; print('imports ok')"
    python3 -c "import abtem, cupy; print('abtem', abtem.__version__, 'cupy', cupy.__version__)"
} >> "$LOG" 2>&1

step reconstruct_airpi 210 python3 scripts/bench_reconstruct.py --device cuda --methods airpi \
    --scan "$SCAN" "$SCAN" --detector 64 64 --precisions 32 bf16 --compile both --read-ahead-check \
    --batch-sweep 256 1024 4096 --warm-repeat --network-min-s 2 --airpi-ckpt pretrained/airpi_generalist.ckpt
step reconstruct_others 150 python3 scripts/bench_reconstruct.py --device cuda --methods ptychonn chang \
    --scan "$SCAN" "$SCAN" --detector 64 64 --precisions 32 bf16 --compile both --warm-repeat --network-min-s 1
step train 90 python3 scripts/bench_train.py --device cuda --models airpi chang ptychonn \
    --precision both --batch 256 --steps 30 --warmup 5
step train_cgrdn 45 python3 scripts/bench_train.py --device cuda --models cgrdn --precision both --batch 16 \
    --steps 10 --warmup 3
step datagen 90 python3 scripts/bench_datagen.py --configs kernel_generalist --samples 6 --no-check \
    --no-baseline --gpu
