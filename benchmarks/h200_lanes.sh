#!/usr/bin/env bash
# Serving with lanes on the H200: the streams' proposals verified in one target call
# (and drafted as one chain of the draft's lanes), against the same with every proposal
# drafted alone, every stream verified alone and autoregressive jobs, side by side in one
# run (benchmarks/concurrency.py's direct, direct-lanes, direct-lanes-verify and direct-ar
# modes; MODES overrides), after the
# CUDA-graph check of every decoding scenario (lanes included). One GPU call per pair, on a
# machine prepared by ../shared/device (source /tmp/ortgpu.env first).
#   bash benchmarks/h200_lanes.sh 1b   # make and export the 1.1B pair, check, 1/4/16 streams
#   bash benchmarks/h200_lanes.sh 7b   # the same for the 7B pair
set -euo pipefail
out=${OUT:-runs/h200}
mkdir -p "$out"
pair=${1:?1b or 7b}
case $pair in 1b|7b) ;; *) echo "unknown pair $pair: 1b or 7b" >&2; exit 2 ;; esac
dir=/tmp/qdbench/pairs/$pair/qd-fast
[ -d "$dir" ] || python3 benchmarks/bench.py --pairs "$pair" --stages make,export \
    --systems qd-fast --budget 200 --out "$out/make-$pair"
[ -n "${SKIP_CHECK:-}" ] || python3 benchmarks/cuda_graph_check.py "$dir" --prompts 4 \
    --json "$out/cuda_graph_check_$pair.json"
python3 benchmarks/concurrency.py --model-dir "$dir" \
    --device cuda --streams 1,4,16 --requests-per-stream 2 --max-tokens 128 --gamma 4 \
    --mode "${MODES:-direct,direct-lanes,direct-lanes-verify,direct-ar}" \
    --time-limit "${TIME_LIMIT:-300}" \
    --json "$out/concurrency_lanes_$pair.json"
