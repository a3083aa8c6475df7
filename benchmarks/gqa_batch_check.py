"""Does a static-cache GroupQueryAttention graph verify several sequences in one call?

    python benchmarks/gqa_batch_check.py MODEL_DIR [--json OUT.json]

Runs the graph of ``MODEL_DIR`` (a static export's target/) on B = 2 and 4 sequences of
different cache lengths at once, k = 1 and 5 new tokens each, and compares every row's
logits with the same sequence run alone (batch 1), on this onnxruntime's CPU provider.
It also times the batched call against B single calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def run(sess, names, ids, lengths, cache_len, kv, hd, layers):
    """ids [B, k]; lengths [B] tokens already in each row's cache (random contents)."""
    b, k = ids.shape
    rng = np.random.default_rng(0)
    feeds = {"input_ids": ids.astype(np.int64)}
    mask = np.zeros((b, cache_len), np.int64)
    for i, n in enumerate(lengths):
        mask[i, : n + k] = 1
    feeds["attention_mask"] = mask
    for layer in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (b, kv, cache_len, hd)).astype(np.float32) * 0.1
    return sess.run(["logits"], {n: v for n, v in feeds.items() if n in names})[0], feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    from quickdraft.manifest import load_manifest

    m = load_manifest(args.model_dir)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(args.model_dir / m.model_file), opts,
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    cache_len = 256
    rows = []
    rng = np.random.default_rng(1)
    for b in (2, 4):
        for k in (1, 5):
            lengths = [int(x) for x in rng.integers(10, 200, b)]
            ids = rng.integers(0, m.vocab_size, (b, k))
            try:
                batched, feeds = run(sess, names, ids, lengths, cache_len, m.num_kv_heads,
                                     m.head_dim, m.num_layers)
            except Exception as e:  # ONNX Runtime refuses the shape: record what it says
                rows.append({"batch": b, "new_tokens": k, "refused": str(e).split(
                    "Status Message: ")[-1]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            worst = 0.0
            singles = []
            for i in range(b):
                one = {n: v[i : i + 1] for n, v in feeds.items()}
                t0 = time.perf_counter()
                alone = sess.run(["logits"], {n: v for n, v in one.items() if n in names})[0]
                singles.append(time.perf_counter() - t0)
                worst = max(worst, float(np.abs(alone[0] - batched[i]).max()))
            t = []
            for _ in range(5):
                t0 = time.perf_counter()
                sess.run(["logits"], {n: v for n, v in feeds.items() if n in names})
                t.append(time.perf_counter() - t0)
            rows.append({"batch": b, "new_tokens": k, "cache_lengths": lengths,
                         "max_abs_diff_vs_alone": worst,
                         "batched_ms": round(1e3 * statistics.median(t), 3),
                         "singles_ms": round(1e3 * sum(singles), 3)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "model": str(args.model_dir),
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
