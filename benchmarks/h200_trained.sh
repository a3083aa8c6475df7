#!/usr/bin/env bash
# The trained 97M / 6M pair on the H200, on a machine prepared by ../shared/device (source
# /tmp/ortgpu.env first; a step needs the earlier steps' files, so the machine must stay
# warm in between). Results under $OUT.
#   bash benchmarks/h200_trained.sh pair     # one call: corpus (all of the machine's Python
#                                            # sources), tokenizer, target 240 s, draft 90 s,
#                                            # held-out alpha; export; every system beside
#                                            # onnxruntime-genai: greedy, the gamma sweep,
#                                            # pipelined (also with a ShadowRule of
#                                            # min_keep_rate KEEP_RATES, default 0.3),
#                                            # sampled at T=1
#   bash benchmarks/h200_trained.sh base     # the pair trained as `pair` trains it and
#                                            # exported, nothing measured: the target that
#                                            # `shapes` distills its drafts from
#   bash benchmarks/h200_trained.sh genai    # the pair's greedy systems again, beside
#                                            # onnxruntime-genai (for a `pair` call whose
#                                            # training left too little budget for it)
#   bash benchmarks/h200_trained.sh check    # the exported pair with CUDA graphs against
#                                            # without (greedy, sampled: captured verdicts)
#   bash benchmarks/h200_trained.sh host     # host time per iteration on the exported pair
#                                            # (greedy and T=1, gamma 4, XQA attention or
#                                            # HOST_ATTENTION), with a cProfile of where
#                                            # it goes; pipelined too, at HOST_PIPELINED
#                                            # (default 4), plain and with KEEP_RATES
#   bash benchmarks/h200_trained.sh shapes   # other drafts for the same target (one wider
#                                            # layer; the target's first 1 and 2 layers, from
#                                            # its weights): held-out alpha, c, speedups;
#                                            # SHAPE_STEPS fixes their steps, SHAPE_SAMPLES=N
#                                            # adds each shape trained on N of the target's
#                                            # continuations (at T=1, SAMPLE_BATCH at once;
#                                            # SHAPE_SAMPLES_ONLY=1: only those rows);
#                                            # SHAPE_DIVERGENCES=kl,tvd: each row once per
#                                            # draft-loss divergence
# A longer target run, over two calls (TARGET_SECONDS, default 620; the first call stops
# with a checkpoint, exit status 3; the second continues and, once the pair is trained,
# exports and measures as `pair` does). `pair` and `train` start from an empty work folder:
#   bash benchmarks/h200_trained.sh train; bash benchmarks/h200_trained.sh finish
# PIPELINED: the pipelined gammas the systems are measured at (default 4,7).
# DRAFT_SHAPE picks the draft (train_pair.py --draft-shape; default the paper's 256x2):
# DRAFT_SHAPE=targetx2 DRAFT_SECONDS=400 starts it from the target's first two layers, the
# fastest draft measured for this target (held-out alpha 0.833). That does not fit one call
# beside the target's training: TARGET_SECONDS=240 DRAFT_SHAPE=targetx2 DRAFT_SECONDS=400
# with `train`, then `finish` (again while it exits 3), the same variables each time.
# DRAFT_SAMPLES=N: half of every draft batch from N continuations the target wrote (half
# greedy, half sampled at SAMPLE_T / SAMPLE_TOP_P, default 0.8 / 0.95; SAMPLE_BATCH at once)
# DISTILL_DIVERGENCE=tvd: the draft's loss on total variation (1 - alpha at T=1), not KL
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts run by path import the project
out=${OUT:-runs/h200}
work=/tmp/qdbench
pair=$work/pairs/trained
mkdir -p "$out"
# 8 held-out prompts (PROMPTS): with 2, one target's autoregressive rate varied 10% between
# rows measured in separate processes (1,666-1,852 tok/s)
train() {  # $1: target seconds; further arguments go to train_pair.py
  python3 benchmarks/train_pair.py --out "$pair" --device cuda --target-seconds "$1" \
      --draft-seconds "${DRAFT_SECONDS:-90}" --num-prompts "${PROMPTS:-8}" \
      ${DRAFT_SHAPE:+--draft-shape "$DRAFT_SHAPE"} \
      ${DISTILL_DIVERGENCE:+--distill-divergence "$DISTILL_DIVERGENCE"} \
      ${DRAFT_SAMPLES:+--draft-samples "$DRAFT_SAMPLES" --sample-temperature "${SAMPLE_T:-0.8}" \
                       --sample-top-p "${SAMPLE_TOP_P:-0.95}" \
                       --sample-batch "${SAMPLE_BATCH:-256}"} "${@:2}" 2>&1 \
      | tee -a "$out/train.log"
}
systems() {
  cp "$pair/pair.json" "$out/pair.json"
  python3 benchmarks/bench.py --work "$work" --pairs trained \
      --stages bandwidth,export,build,systems --num-prompts "${PROMPTS:-8}" \
      --systems qd-fast,genai-graph,genai-spec-graph --pipelined "${PIPELINED:-4,7}" \
      --shadow-keep-rates "${KEEP_RATES:-0.3}" \
      --samplings "${SAMPLINGS:-1.0:1.0}" --sampling-gammas "${SAMPLING_GAMMAS:-4,7}" --tag trained \
      --budget "$((${CALL_LIMIT:-580} - SECONDS))" --out "$out/trained"
}
case ${1:?pair, base, genai, check, host, shapes, train or finish} in
  pair) rm -rf "$work"; train "${TARGET_SECONDS:-240}" && systems ;;
  base)
    rm -rf "$work"; train "${TARGET_SECONDS:-240}"
    cp "$pair/pair.json" "$out/pair.json"
    python3 benchmarks/bench.py --work "$work" --pairs trained --stages export --systems qd-fast \
        --num-prompts "${PROMPTS:-8}" --tag trained-base --budget 300 --out "$out/base" ;;
  genai)  # a fresh results file: the systems are measured again, side by side
    rm -f "$work/results.json"
    python3 benchmarks/bench.py --work "$work" --pairs trained --stages build,systems \
        --num-prompts "${PROMPTS:-8}" --systems qd-fast,genai-graph,genai-spec-graph \
        --samplings none --tag trained-genai --budget 300 --out "$out/genai" ;;
  check)
    python3 benchmarks/cuda_graph_check.py "$pair/qd-fast" --json "$out/cuda_graph_check.json" ;;
  host)
    # XQA: cuDNN's attention (the default) changes a seeded T=1 output between runs;
    # here HOST_PIPELINED= (empty) times no pipelined system, KEEP_RATES= none with a
    # ShadowRule (the `pair` step's KEEP_RATES= means the default, 0.3)
    IFS=, read -ra pipelined <<< "${HOST_PIPELINED-4}"
    IFS=, read -ra rates <<< "${KEEP_RATES-0.3}"
    keep=()
    [ "${#pipelined[@]}" -eq 0 ] || keep=(--shadow-keep-rates "${rates[@]}")
    python3 benchmarks/host_overhead.py --pairs static --static-dir "$pair/qd-fast" \
        --device cuda --attention "${HOST_ATTENTION:-xqa}" --gammas 4 --temperatures 0 1 \
        --pipelined "${pipelined[@]}" "${keep[@]}" \
        --repeats 5 --profile 3 \
        --json "$out/host_overhead.json" ;;
  shapes)
    length=(--draft-seconds "${SHAPE_SECONDS:-90}")  # or a fixed step count
    [ -z "${SHAPE_STEPS:-}" ] || length=(--draft-steps "$SHAPE_STEPS")
    python3 benchmarks/draft_shapes.py --pair-dir "$pair" \
        --shapes "${SHAPES:-512x1,targetx1,targetx2}" "${length[@]}" \
        ${SHAPE_SAMPLES:+--samples "$SHAPE_SAMPLES" --sample-batch "${SAMPLE_BATCH:-4096}" \
                         --sample-temperature "${SAMPLE_T:-1.0}" \
                         --sample-top-p "${SAMPLE_TOP_P:-1.0}" \
                         ${SHAPE_SAMPLES_ONLY:+--samples-only}} \
        ${SHAPE_DIVERGENCES:+--divergences "$SHAPE_DIVERGENCES"} \
        --pipelined 4 --budget "${SHAPES_BUDGET:-560}" --out "$out/shapes" ;;
  train)  # exit status 3: stopped with a checkpoint, as planned
    rm -rf "$work"; train "${TARGET_SECONDS:-620}" --call-seconds "${CALL_SECONDS:-530}" ;;
  finish) train "${TARGET_SECONDS:-620}" --call-seconds "${CALL_SECONDS:-530}" && systems ;;
  *) echo "unknown step $1: pair, base, genai, check, host, shapes, train or finish" >&2
     exit 2 ;;
esac
