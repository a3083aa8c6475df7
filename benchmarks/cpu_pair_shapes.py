"""Per-call cost of candidate bundled-pair shapes on this CPU: 1-token and (gamma+1)-token
steps of static-cache graphs (onnxruntime-genai's builder) in fp32 and int4 (MatMulNBits).

    python benchmarks/cpu_pair_shapes.py [--json OUT.json]

Random weights (cost does not depend on them). Prints ms per call, the verify/step ratio
r = t(5) / t(1) and the cost ratio c of each draft against each target, the numbers that
decide Theorem 3.8's speedup on a CPU (with r in the denominator: (1 - a^(g+1)) /
((1 - a)(g c + r))).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = {  # layers, hidden, heads, kv heads, intermediate
    "t6x384": (6, 384, 6, 2, 1024),
    "t8x512": (8, 512, 8, 4, 1408),
    "t12x512": (12, 512, 8, 4, 1408),
    "t8x768": (8, 768, 12, 4, 2048),
}
PRECISIONS = ("fp32", "int4", "int4-acc0", "int8")
DRAFTS = {
    "d1x128": (1, 128, 2, 1, 384),
    "d2x192": (2, 192, 3, 1, 512),
}
VOCAB, CONTEXT = 4096, 1024


def make(folder: Path, tok: Path, shape) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    layers, hidden, heads, kv, inter = shape
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=inter, max_position_embeddings=CONTEXT,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(tok).save_pretrained(folder)


def build(src: Path, out: Path, precision: str) -> Path:
    """The builder's graph; int4: MatMulNBits (accuracy level 4: int8 compute, or 0: fp32);
    int8: the fp32 graph through ONNX Runtime's dynamic quantization (MatMulInteger)."""
    base = "int4" if precision.startswith("int4") else "fp32"
    args = [sys.executable, "-m", "quickdraft.export.builder", "--builder", "-i", str(src),
            "-o", str(out), "-p", base, "-e", "cpu", "-c", str(out / "cache")]
    if base == "int4":
        level = "0" if precision.endswith("acc0") else "4"
        args += ["--extra_options", f"int4_accuracy_level={level}"]
    subprocess.run(args, check=True, capture_output=True)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(out / "model.onnx", out / "model.int8.onnx",
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        return out / "model.int8.onnx"
    return out / "model.onnx"


def time_steps(model: Path, threads: int, kv: int, hd: int, steps=(1, 5), past: int = 64,
               reps: int = 60):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    past_in = [i for i in sess.get_inputs() if i.name.startswith("past")]
    cache = {i.name: np.zeros((1, kv, CONTEXT, hd), np.float32) for i in past_in}
    out = {}
    for k in steps:
        feeds = {"input_ids": np.ones((1, k), np.int64), **cache}
        mask = np.zeros((1, CONTEXT), np.int64)
        mask[0, :past + k] = 1
        feeds["attention_mask"] = mask
        feeds = {n: v for n, v in feeds.items() if n in names}
        io = sess.io_binding()
        for n, v in feeds.items():
            io.bind_cpu_input(n, v)
        for o in sess.get_outputs():
            io.bind_output(o.name, "cpu")
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sess.run_with_iobinding(io)
            ts.append(time.perf_counter() - t0)
        out[k] = 1e3 * statistics.median(ts[10:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="model names to measure")
    args = ap.parse_args()
    from quickdraft.export.toy import train_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tmp / "tok"
        train_tokenizer(tok, vocab_size=VOCAB)
        for name, shape in {**TARGETS, **DRAFTS}.items():
            src = tmp / name
            make(src, tok, shape)
            for precision in PRECISIONS:
                if args.only and name not in args.only:
                    continue
                model = build(src, tmp / f"{name}-{precision}", precision)
                threads = 1 if name in DRAFTS else os.cpu_count()
                layers, hidden, heads, kv, _ = shape
                t = time_steps(model, threads, kv, hidden // heads)
                size = sum(f.stat().st_size for f in model.parent.glob(model.name + "*"))
                rows.append({"model": name, "precision": precision, "threads": threads,
                             "ms_1": round(t[1], 3), "ms_5": round(t[5], 3),
                             "r": round(t[5] / t[1], 2), "mb": round(size / 2**20, 1)})
                print(rows[-1], flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
