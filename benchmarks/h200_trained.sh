#!/usr/bin/env bash
# The trained 97M / 6M pair on the H200, in three GPU calls back to back on a machine
# prepared by ../shared/device (source /tmp/ortgpu.env first; each call needs the earlier
# ones' files, so the machine must stay warm in between). Results under $OUT.
#   bash benchmarks/h200_trained.sh train    # corpus, tokenizer, the target (peak lr 6e-4)
#                                            # until the call's time is up (a checkpoint)
#   bash benchmarks/h200_trained.sh finish   # the same training command again: the rest of
#                                            # the target, the draft, held-out alpha; then
#                                            # export and every system beside
#                                            # onnxruntime-genai: greedy, the gamma sweep,
#                                            # pipelined, sampled at T=1 and T=0.7 / top-p 0.9
#   bash benchmarks/h200_trained.sh shapes   # wider drafts of 1-2 layers for the same
#                                            # target: held-out alpha, c, speedups
set -euo pipefail
out=${OUT:-runs/h200}
pair=/tmp/qdbench/pairs/trained
mkdir -p "$out"
train() {
  python3 benchmarks/train_pair.py --out "$pair" --device cuda \
      --target-seconds "${TARGET_SECONDS:-620}" --draft-seconds "${DRAFT_SECONDS:-100}" \
      --num-prompts 2 --call-seconds "${CALL_SECONDS:-530}" 2>&1 | tee -a "$out/train.log"
}
case ${1:?train, finish or shapes} in
  train) train ;;
  finish)
    train
    cp "$pair/pair.json" "$out/pair.json"
    python3 benchmarks/bench.py --pairs trained --stages bandwidth,export,build,systems \
        --num-prompts 2 --systems qd-fast,genai-graph,genai-spec-graph --pipelined 4,7 \
        --samplings 1.0:1.0,0.7:0.9 --sampling-gammas 4,7 --tag trained \
        --budget "$((${CALL_LIMIT:-575} - SECONDS))" \
        --out "$out/trained" ;;
  shapes)
    python3 benchmarks/draft_shapes.py --pair-dir "$pair" --shapes "${SHAPES:-512x1,512x2,768x1}" \
        --draft-seconds "${DRAFT_SECONDS:-100}" --pipelined 4,7 --sampling-gammas 4,7 \
        --budget 540 --out "$out/shapes" ;;
  *) echo "unknown step $1: train, finish or shapes" >&2; exit 2 ;;
esac
