#!/usr/bin/env bash
# Pipelined decoding and device sampling on the H200, side by side with onnxruntime-genai
# 0.18; one GPU call each, on a machine prepared by ../shared/device (source
# /tmp/ortgpu.env first). Results under $OUT.
#   bash benchmarks/h200_pipelined.sh 1b      # 1.1B pair: make, export, systems, pipelined
#                                             # gamma 4 and 8, sampled T=1 and T=0.7/top-p 0.9
#                                             # (sequential and pipelined at gamma 4)
#   bash benchmarks/h200_pipelined.sh checks  # the 1b pair: CUDA graphs against none
#                                             # (pipelined included), serving concurrency
#   bash benchmarks/h200_pipelined.sh 7b      # 7B pair: the same systems, greedy and T=1
#   bash benchmarks/h200_pipelined.sh sampling  # the sampling and verification graphs'
#                                               # cost per call, blocked against one-level;
#                                               # a whole verdict with and without a CUDA
#                                               # graph of the verification graph
#   bash benchmarks/h200_pipelined.sh streams   # the verify call and the draft's chain
#                                               # alone and together, by the priority of
#                                               # each model's CUDA stream: random pairs
#                                               # of the trained pair's shapes (97m), 1b
set -euo pipefail
out=${OUT:-runs/h200}
mkdir -p "$out"
systems=qd-fast,genai-graph,genai-spec-graph
case ${1:?1b, checks, 7b, sampling or streams} in
  1b)
    python3 benchmarks/bench.py --pairs 1b --num-prompts 2 --systems "$systems" \
        --pipelined 4,8 --shadow-keep-rates 0.3 --samplings 1.0:1.0,0.7:0.9 \
        --tag pipelined-1b --budget 560 \
        --out "$out/1b" ;;
  checks)
    python3 benchmarks/cuda_graph_check.py /tmp/qdbench/pairs/1b/qd-fast \
        --json "$out/cuda_graph_check.json"
    python3 benchmarks/concurrency.py --model-dir /tmp/qdbench/pairs/1b/qd-fast --device cuda \
        --streams 1,4,16 --requests-per-stream 1 --max-tokens 128 --time-limit 200 \
        --json "$out/concurrency_1b.json" ;;
  7b)
    python3 benchmarks/bench.py --pairs 7b --clean --systems "$systems" --pipelined 4,8 \
        --samplings 1.0:1.0 --tag pipelined-7b --budget 570 --out "$out/7b" ;;
  sampling)
    python3 benchmarks/device_sampling_cost.py --device cuda --vocab 8192 32000 49152 \
        --json "$out/device_sampling_cost.json" ;;
  streams)
    python3 benchmarks/stream_priority.py --make 97m --work /tmp/sp97 --device cuda \
        --gammas 3,5,7 --repeats 200 --json "$out/stream_priority_97m.json"
    python3 benchmarks/stream_priority.py --make 1b --work /tmp/sp1b --device cuda \
        --gammas 4,8 --repeats 100 --json "$out/stream_priority_1b.json" ;;
  *) echo "unknown step $1: 1b, checks, 7b, sampling or streams" >&2; exit 2 ;;
esac
