#!/usr/bin/env bash
# The trained 97M / 6M pair on the H200, in two GPU calls back to back on a machine
# prepared by ../shared/device (source /tmp/ortgpu.env first; the second call needs the
# first's files, so the machine must stay warm in between). Results under $OUT.
#   bash benchmarks/h200_trained.sh train     # corpus, tokenizer, target (peak lr 6e-4),
#                                             # draft distilled from it, held-out alpha; export
#   bash benchmarks/h200_trained.sh systems   # quickdraft beside onnxruntime-genai: greedy,
#                                             # the gamma sweep, pipelined, sampled at T=1
set -euo pipefail
out=${OUT:-runs/h200}
mkdir -p "$out"
case ${1:?train or systems} in
  train)
    python3 benchmarks/bench.py --pairs trained --stages bandwidth,train,export,build \
        --num-prompts 2 --target-seconds "${TARGET_SECONDS:-300}" \
        --draft-seconds "${DRAFT_SECONDS:-140}" --tag trained-train --budget 585 \
        --out "$out/trained-train" ;;
  systems)
    python3 benchmarks/bench.py --pairs trained --num-prompts 2 \
        --systems qd-fast,genai-graph,genai-spec-graph --pipelined 4,7 --samplings 1.0:1.0 \
        --tag trained --budget 560 --out "$out/trained" ;;
  *) echo "unknown step $1: train or systems" >&2; exit 2 ;;
esac
