#!/usr/bin/env python
"""What an input upload costs the host on CUDA: ``OrtValue.update_inplace``, idle and busy.

The fast path writes each call's small inputs (token ids, the attention mask, a sampled
chain's uniforms) into their device buffers with ``update_inplace`` before it launches the
call. This times, on one ONNX Runtime session:

- one upload of an int64 [1, T] mask with the device idle;
- the same upload right after a long call was launched without waiting
  (``disable_synchronize_execution_providers``): an upload that waits for the device takes
  about as long as the call itself;
- K uploads of [1, T] one by one against one upload of [K, T].

The long call is a chain of N fp16 MatMuls [1, D] x [D, D] over 8 distinct weights
(onnx.helper; N * D * D * 2 bytes read), the mask's sum a second output so that the mask
is a bound input. Medians over ``--repeats``:

    python benchmarks/upload_cost.py --device cuda --json upload_cost.json

``--smoke``: a tiny model on the CPU (a check that the script runs, not a measurement).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

if __package__ in (None, ""):
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import dump_json, environment, log  # noqa: E402

WEIGHTS = 8  # distinct weight matrices the chain cycles through (more than the L2 cache)


def chain_model(d: int, n: int, t: int):
    """An ONNX model: y = x W_0 W_1 ... W_{n-1} (fp16, W_i = weights[i % WEIGHTS]) and
    mask_sum = ReduceSum(mask) over an int64 mask [1, t]."""
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    inits = [numpy_helper.from_array(
        (g.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)).astype(np.float16),
        f"w{i}") for i in range(min(WEIGHTS, n))]  # [d, d] each
    nodes, prev = [], "x"
    for i in range(n):
        out = "y" if i == n - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i % WEIGHTS}"], [out]))
        prev = out
    nodes.append(helper.make_node("ReduceSum", ["mask"], ["mask_sum"], keepdims=0))
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, d]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, [1, t])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, d]),
         helper.make_tensor_value_info("mask_sum", TensorProto.INT64, [])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=9)  # readable by onnxruntime 1.31 (IR <= 13)


def _median_us(times: list[float]) -> float:
    return statistics.median(times) * 1e6


def measure(device: str, d: int, n: int, t: int, k: int, repeats: int,
            cuda_graph: bool = False) -> dict:
    import onnxruntime as ort

    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    options = [{"enable_cuda_graph": "1"}] if cuda_graph else None
    session = ort.InferenceSession(chain_model(d, n, t).SerializeToString(),
                                   providers=providers, provider_options=options)
    if session.get_providers()[0] != providers[0]:
        raise SystemExit(f"{providers[0]} is not available to this onnxruntime "
                         f"({ort.__version__}, {session.get_providers()}): install "
                         "onnxruntime-gpu for --device cuda")
    mask_host = np.ones((1, t), dtype=np.int64)  # [1, t]
    x = ort.OrtValue.ortvalue_from_numpy(np.ones((1, d), dtype=np.float16), device, 0)
    mask = ort.OrtValue.ortvalue_from_numpy(mask_host, device, 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type((1, d), np.float16, device, 0)
    total = ort.OrtValue.ortvalue_from_shape_and_type((), np.int64, device, 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", x)
    binding.bind_ortvalue_input("mask", mask)
    binding.bind_ortvalue_output("y", y)
    binding.bind_ortvalue_output("mask_sum", total)
    no_sync = ort.RunOptions()
    no_sync.add_run_config_entry("disable_synchronize_execution_providers", "1")
    if cuda_graph:  # one replay per call: a launch returns long before the device is done
        no_sync.add_run_config_entry("gpu_graph_id", "1")
    singles = [ort.OrtValue.ortvalue_from_numpy(mask_host, device, 0) for _ in range(k)]
    many_host = np.ones((k, t), dtype=np.int64)  # [k, t]
    many = ort.OrtValue.ortvalue_from_numpy(many_host, device, 0)

    for _ in range(5):  # warm-up: allocations, kernels
        session.run_with_iobinding(binding)
    times: dict[str, list[float]] = {k: [] for k in (
        "call", "idle", "one_by_one", "merged", "launch", "busy")}

    def timed(key: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - t0)

    for r in range(repeats):
        mask_host[0, -1] = r % 2  # a different mask each time
        timed("call", lambda: session.run_with_iobinding(binding))
        timed("idle", lambda: mask.update_inplace(mask_host))
        timed("one_by_one", lambda: [v.update_inplace(mask_host) for v in singles])
        timed("merged", lambda: many.update_inplace(many_host))
        timed("launch", lambda: session.run_with_iobinding(binding, no_sync))
        timed("busy", lambda: mask.update_inplace(mask_host))  # the call running, or done
        binding.synchronize_outputs()
    if int(total.numpy()) != int(mask_host.sum()):
        raise RuntimeError(f"mask_sum {int(total.numpy())} is not the uploaded mask's "
                           f"{int(mask_host.sum())}")
    return {"device": device, "d": d, "matmuls": n, "mask_tokens": t, "uploads": k,
            "repeats": repeats, "cuda_graph": cuda_graph, "weight_bytes_read": n * d * d * 2,
            "call_us": _median_us(times["call"]), "launch_us": _median_us(times["launch"]),
            "upload_idle_us": _median_us(times["idle"]),
            "upload_after_launch_us": _median_us(times["busy"]),
            f"uploads_{k}_one_by_one_us": _median_us(times["one_by_one"]),
            f"upload_{k}_rows_at_once_us": _median_us(times["merged"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--d", type=int, default=4096, help="the MatMuls' width")
    ap.add_argument("--matmuls", type=int, default=160, help="MatMuls in the long call")
    ap.add_argument("--mask-tokens", type=int, default=2048,
                    help="the mask's length (the static cache's, 2,048 in the benchmarks)")
    ap.add_argument("--uploads", type=int, default=5, help="K: uploads one by one or merged")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--cuda-graph", action="store_true",
                    help="capture the long call as a CUDA graph (CUDA only), so that its "
                         "launch returns at once and the upload after it meets a busy device")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    a = ap.parse_args(argv)
    for name in ("d", "matmuls", "mask_tokens", "uploads", "repeats"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got "
                             f"{getattr(a, name)}")
    if a.smoke:
        a.device, a.d, a.matmuls, a.mask_tokens, a.repeats = "cpu", 32, 3, 16, 5
    if a.cuda_graph and a.device != "cuda":
        raise SystemExit("--cuda-graph needs --device cuda")
    row = measure(a.device, a.d, a.matmuls, a.mask_tokens, a.uploads, a.repeats, a.cuda_graph)
    for key, value in row.items():
        log(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    if a.json:
        dump_json(a.json, {"command": "python benchmarks/upload_cost.py "
                           + " ".join(argv if argv is not None else sys.argv[1:]),
                           "environment": environment(), "result": row})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
