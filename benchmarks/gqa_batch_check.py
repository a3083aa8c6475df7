"""Does a static-cache GroupQueryAttention graph verify several sequences in one call?

    python benchmarks/gqa_batch_check.py MODEL_DIR [--device cpu|cuda] [--json OUT.json]

Runs the graph of ``MODEL_DIR`` (a static export's target/) on B = 2 and 4 sequences of
different cache lengths at once, k = 1 and 5 new tokens each, and compares every row's
logits with the same sequence run alone (batch 1), on this onnxruntime's CPU provider
(the default) or, with ``--device cuda``, its CUDA provider (caches and logits in the
manifest's dtype, fp16 for a CUDA export; inputs fed as host NumPy arrays for the
comparison). It also times the batched call against B single calls: on the CPU one run of
each single; on CUDA the median of 10 runs of each after 3 warm-ups, every input already
on the device (IOBinding), so that the host-to-device copy of the caches is not timed.

It also records whether this onnxruntime build has the PagedAttention contrib op
(com.microsoft) for the CPU and, with ``--device cuda``, for CUDA: a one-node model
(made with onnx.helper) is loaded (on CUDA alone, with CPU fallback disabled) and run once
on two packed sequences; the JSON keeps the error text when either step fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

_NP = {"fp32": np.float32, "fp16": np.float16}


def run(sess, names, ids, lengths, cache_len, kv, hd, layers, dtype=np.float32):
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
            feeds[f"past_key_values.{layer}.{kind}"] = (rng.standard_normal(
                (b, kv, cache_len, hd)).astype(np.float32) * 0.1).astype(dtype)
    return sess.run(["logits"], {n: v for n, v in feeds.items() if n in names})[0], feeds


def _device_ms(sess, feeds: dict, names, *, warmup: int = 3, reps: int = 10) -> float:
    """Median ms of one run with every input already on the CUDA device (IOBinding) and
    the outputs left there."""
    import onnxruntime as ort

    io = sess.io_binding()
    for n, v in feeds.items():
        if n in names:
            io.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(v), "cuda", 0))
    for o in sess.get_outputs():
        io.bind_output(o.name, "cuda", 0)
    times = []
    for r in range(warmup + reps):
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)  # returns once the CUDA stream is done
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _cuda_session(path: Path):
    from quickdraft.ort_backend.device import Device, create_session, session_options

    return create_session(path, Device("cuda", 0), session_options())


def paged_attention_check(device: str) -> dict:
    """Whether PagedAttention (com.microsoft) loads and runs on ``device`` ("cpu" or
    "cuda") in this build, with the error text where it does not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    heads, kv_heads, head, block, blocks = 4, 2, 64, 256, 4  # fp16, flash-friendly sizes
    lens, past = [3, 2], [5, 0]  # new tokens and cached tokens per sequence
    tokens = sum(lens)
    f16, i32 = TensorProto.FLOAT16, TensorProto.INT32
    inputs = [("query", f16, [tokens, heads * head]), ("key", f16, [tokens, kv_heads * head]),
              ("value", f16, [tokens, kv_heads * head]),
              ("key_cache", f16, [blocks, block, kv_heads, head]),
              ("value_cache", f16, [blocks, block, kv_heads, head]),
              ("cumulative_sequence_length", i32, [len(lens) + 1]),
              ("past_seqlens", i32, [len(lens)]), ("block_table", i32, [len(lens), 1])]
    node = helper.make_node("PagedAttention", [n for n, _, _ in inputs], ["output"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads)
    graph = helper.make_graph([node], "paged", [helper.make_tensor_value_info(*i)
                                                for i in inputs],
                              [helper.make_tensor_value_info("output", f16,
                                                             [tokens, heads * head])])
    model = helper.make_model(graph, ir_version=9, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    out = {"device": device, "model": "one PagedAttention node, fp16, "
           f"{heads} heads / {kv_heads} kv heads of {head}, block_size {block}",
           "registered": None, "ran": None}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if device == "cuda":  # a node without a CUDA kernel then fails the session
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        providers = [("CUDAExecutionProvider", {"device_id": "0"})]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            out["error"] = "this onnxruntime has no CUDAExecutionProvider"
            return out
    else:
        providers = ["CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        out["registered"] = True
        out["providers"] = sess.get_providers()
    except Exception as e:  # noqa: BLE001 - the error text is the answer
        out["registered"] = False
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        return out
    rng = np.random.default_rng(0)
    feeds = {n: (rng.standard_normal(shape) * 0.1).astype(np.float16)
             for n, t, shape in inputs if t == f16}
    feeds["cumulative_sequence_length"] = np.cumsum([0, *lens]).astype(np.int32)
    feeds["past_seqlens"] = np.array(past, np.int32)
    feeds["block_table"] = np.arange(len(lens), dtype=np.int32).reshape(len(lens), 1)
    try:
        result = sess.run(["output"], feeds)[0]
        out["ran"] = True
        out["output_finite"] = bool(np.isfinite(result.astype(np.float32)).all())
    except Exception as e:  # noqa: BLE001
        out["ran"] = False
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    from quickdraft.manifest import load_manifest

    m = load_manifest(args.model_dir)
    cuda = args.device == "cuda"
    if cuda:
        sess = _cuda_session(args.model_dir / m.model_file)
        dtype = _NP[m.dtype]
    else:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(args.model_dir / m.model_file), opts,
                                    providers=["CPUExecutionProvider"])
        dtype = np.float32
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
                                     m.head_dim, m.num_layers, dtype)
            except Exception as e:  # ONNX Runtime refuses the shape: record what it says
                rows.append({"batch": b, "new_tokens": k, "refused": str(e).split(
                    "Status Message: ")[-1]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            batched = batched.astype(np.float32)
            worst = 0.0
            singles = []
            argmax_equal = True
            for i in range(b):
                one = {n: v[i : i + 1] for n, v in feeds.items()}
                t0 = time.perf_counter()
                alone = sess.run(["logits"], {n: v for n, v in one.items() if n in names})[0]
                singles.append(time.perf_counter() - t0)
                alone = alone.astype(np.float32)
                worst = max(worst, float(np.abs(alone[0] - batched[i]).max()))
                argmax_equal &= bool((alone[0].argmax(-1) == batched[i].argmax(-1)).all())
                if cuda:  # device-resident inputs, warmed up
                    singles[-1] = _device_ms(sess, one, names) / 1e3
            if cuda:
                batched_ms = _device_ms(sess, feeds, names)
            else:
                t = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    sess.run(["logits"], {n: v for n, v in feeds.items() if n in names})
                    t.append(time.perf_counter() - t0)
                batched_ms = 1e3 * statistics.median(t)
            row = {"batch": b, "new_tokens": k, "cache_lengths": lengths,
                   "max_abs_diff_vs_alone": worst,
                   "batched_ms": round(batched_ms, 3),
                   "singles_ms": round(1e3 * sum(singles), 3)}
            if cuda:
                row["max_abs_logit"] = float(np.abs(batched).max())
                row["argmax_equal_vs_alone"] = argmax_equal
                row["timing"] = ("median of 10 runs after 3 warm-ups each, inputs on the "
                                 "device (IOBinding); singles_ms: the sum over the rows")
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    paged = [paged_attention_check("cpu")] + ([paged_attention_check("cuda")] if cuda else [])
    for p in paged:
        print(json.dumps({"paged_attention": p}), flush=True)
    if args.json:
        out = {"onnxruntime": ort.__version__, "model": str(args.model_dir), "rows": rows}
        out.update({"device": args.device, "dtype": m.dtype, "providers": sess.get_providers(),
                    "paged_attention": paged})
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
