"""What one decode step of an exported model is made of: its nodes, kernels and bytes.

    python benchmarks/node_profile.py FOLDER [--device cpu|cuda] [--steps 1,5] \\
        [--past 32] [--repeats 20] [--json OUT.json]

``FOLDER`` is one exported model (``target/`` or ``draft/`` of a ``quickdraft export``).
For each step length k in ``--steps`` it runs k-token steps after a ``--past``-token
prefix, each rewound so every step sees the same cache length, and reports:

* **ONNX Runtime's profiler** (``SessionOptions.enable_profiling``), per operator type:
  nodes per step, their time per step, and the weight bytes they read (the initializers
  each node takes, from the graph without its external data), with the bandwidth that
  implies. On the CPU these times are the nodes' own; on CUDA they are the host's launch
  times (kernels run asynchronously), so there the counts matter, not the times.
* **The GPU's own kernels** on CUDA (CUPTI through ``torch.profiler``, when torch with
  CUDA is installed): the fast path's step (CUDA graphs on, greedy ids to the host)
  replayed ``--repeats`` times; kernels per step, GPU time per step, the largest
  kernels, and weight bytes over GPU time against the device's copy bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import dump_json, environment  # noqa: E402

# bytes per element of ONNX tensor types (onnx.TensorProto data types)
_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
               16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 1, 22: 1}


def node_weight_bytes(model_path: Path) -> dict[str, int]:
    """Bytes of the weights each node of the graph reads {node name: bytes}: its
    initializers, and the fp32 weights ONNX Runtime folds from int8 storage (an
    initializer through a ``DequantizeLinear``, quickdraft's ``--dtype int8``)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    count = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    sizes = {t.name: count[t.name] * _ITEM_BYTES.get(t.data_type, 4)
             for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in count:
            sizes[n.output[0]] = count[n.input[0]] * 4  # folded to fp32 at load
    return {n.name: sum(sizes.get(i, 0) for i in n.input) for n in model.graph.node
            if n.op_type != "DequantizeLinear"}


def _runs(events: list[dict]) -> list[list[dict]]:
    """The profile's Node events grouped by the session run that holds them, in order."""
    runs = sorted((e for e in events if e.get("cat") == "Session"
                   and e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node"
                    and e.get("name", "").endswith("_kernel_time")), key=lambda e: e["ts"])
    out, i = [], 0
    for run in runs:
        end, inside = run["ts"] + run["dur"], []
        while i < len(nodes) and nodes[i]["ts"] <= end:
            if nodes[i]["ts"] >= run["ts"]:
                inside.append(nodes[i])
            i += 1
        out.append(inside)
    return out


def op_table(step_runs: list[list[dict]], weights: dict[str, int]) -> list[dict]:
    """Per operator type, the median over runs: nodes, microseconds, weight bytes, GB/s."""
    per_op: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in step_runs:
        acc: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
        for e in run:
            op = e.get("args", {}).get("op_name", "?")
            name = e["name"][: -len("_kernel_time")]
            a = acc[op]
            a[0] += 1
            a[1] += e["dur"]
            a[2] += weights.get(name, 0)
        for op, (count, us, nbytes) in acc.items():
            per_op[op]["nodes"].append(count)
            per_op[op]["us"].append(us)
            per_op[op]["bytes"].append(nbytes)
    rows = []
    for op, v in per_op.items():
        us, nbytes = statistics.median(v["us"]), statistics.median(v["bytes"])
        rows.append({"op": op, "nodes": statistics.median(v["nodes"]), "us": round(us, 1),
                     "weight_mb": round(nbytes / 1e6, 2),
                     "gb_s": round(nbytes / us / 1e3, 1) if us > 0 and nbytes else None})
    return sorted(rows, key=lambda r: -r["us"])


def _steps(model, k: int, past: list[int], warmup: int, repeats: int, rng,
           timed=None) -> None:
    """One prefill of ``past``, then ``warmup`` and ``repeats`` k-token steps, each rewound
    to ``past``; the repeats inside the context manager ``timed`` when one is given."""
    from quickdraft.protocols import GreedyState

    state = model.new_state()
    try:
        state.append(past)
        step = state.append_greedy if isinstance(state, GreedyState) else state.append

        def run(n: int) -> None:
            for _ in range(n):
                step([int(t) for t in rng.integers(0, model.vocab_size, size=k)])
                state.rewind(len(past))

        run(warmup)
        with timed if timed is not None else contextlib.nullcontext():
            run(repeats)
    finally:
        state.close()


def ort_profile(folder: Path, device, steps: list[int], past: int, warmup: int,
                repeats: int) -> dict:
    from quickdraft.ort_backend.device import session_options
    from quickdraft.ort_backend.generator import load_model

    weights = node_weight_bytes(folder / "model.onnx")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "step")
        model = load_model(folder, device, graph_steps=tuple(steps), cuda_graph=False,
                           options=options)
        prefix = [int(t) for t in rng.integers(0, model.vocab_size, size=past)]
        for k in steps:
            _steps(model, k, prefix, warmup, repeats, rng)
        events = json.loads(Path(model.session.end_profiling()).read_text())
    runs = _runs(events)
    ours = runs[len(runs) - len(steps) * (1 + warmup + repeats):]
    out = {}
    for j, k in enumerate(steps):
        block = ours[j * (1 + warmup + repeats):(j + 1) * (1 + warmup + repeats)]
        timed = block[1 + warmup:]
        rows = op_table(timed, weights)
        out[str(k)] = {"nodes_per_step": int(statistics.median(len(r) for r in timed)),
                       "node_us_per_step": round(sum(r["us"] for r in rows), 1),
                       "weight_mb": round(sum(r["weight_mb"] for r in rows), 1),
                       "ops": rows}
    return out


def cuda_kernels(folder: Path, device, steps: list[int], past: int, warmup: int,
                 repeats: int, bandwidth_gb_s: float | None, attention: str = "auto") -> dict:
    """Kernels the GPU ran per fast-path step (CUDA graphs on, ``attention``'s
    GroupQueryAttention kernel), from CUPTI."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return {"unavailable": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"unavailable": "torch sees no CUDA device"}
    from quickdraft.ort_backend.generator import load_model

    weight_bytes = sum(node_weight_bytes(folder / "model.onnx").values())
    model = load_model(folder, device, graph_steps=tuple(steps), cuda_graph=True,
                       attention=attention)
    rng = np.random.default_rng(0)
    prefix = [int(t) for t in rng.integers(0, model.vocab_size, size=past)]
    out = {}
    for k in steps:
        prof = profile(activities=[ProfilerActivity.CUDA])
        _steps(model, k, prefix, warmup, repeats, rng, timed=prof)  # warm-up captures
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"
                   and not e.name.startswith(("Memcpy", "Memset", "cudaMemcpy"))]
        per_name: dict[str, list[float]] = defaultdict(list)
        for e in kernels:
            per_name[e.name].append(e.device_time)
        gpu_us = sum(e.device_time for e in kernels) / repeats
        top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:12]
        rec = {"kernels_per_step": round(len(kernels) / repeats, 1),
               "gpu_us_per_step": round(gpu_us, 1),
               "weight_mb": round(weight_bytes / 1e6, 1),
               "top_kernels": [{"kernel": n[:120], "calls_per_step": round(len(t) / repeats, 1),
                                "us_per_step": round(sum(t) / repeats, 1)} for n, t in top]}
        if gpu_us > 0:
            rec["weight_gb_s"] = round(weight_bytes / gpu_us / 1e3, 1)
            if bandwidth_gb_s:
                rec["share_of_bandwidth"] = round(rec["weight_gb_s"] / bandwidth_gb_s, 3)
        out[str(k)] = rec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", default="1,5", help="comma list of step lengths")
    ap.add_argument("--past", type=int, default=32, help="cached tokens before each step")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--bandwidth", type=float, default=4240.0,
                    help="the device's copy bandwidth in GB/s (H200: 4240, measured)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from tabulate import tabulate

    from quickdraft.ort_backend.device import Device

    steps = [int(s) for s in args.steps.split(",")]
    device = Device(args.device)
    result = {"command": "python benchmarks/node_profile.py " + " ".join(sys.argv[1:]),
              "folder": str(args.folder), "device": args.device, "past": args.past,
              "repeats": args.repeats, "environment": environment(),
              "ort": ort_profile(args.folder, device, steps, args.past, args.warmup,
                                 args.repeats)}
    if args.device == "cuda":
        result["cuda_kernels"] = cuda_kernels(args.folder, device, steps, args.past,
                                              args.warmup, args.repeats, args.bandwidth)
    for k, rec in result["ort"].items():
        print(f"\n{k}-token step: {rec['nodes_per_step']} nodes, {rec['node_us_per_step']} us "
              f"in nodes ({'host launch time' if args.device == 'cuda' else 'CPU time'}), "
              f"{rec['weight_mb']} MB of weights")
        print(tabulate([(r["op"], r["nodes"], r["us"], r["weight_mb"], r["gb_s"])
                        for r in rec["ops"]],
                       headers=["op", "nodes", "us", "weight MB", "GB/s"]))
    for k, rec in result.get("cuda_kernels", {}).items():
        if not isinstance(rec, dict):
            print(f"GPU kernels: {rec}")
            continue
        print(f"\n{k}-token step on the GPU: {rec['kernels_per_step']} kernels, "
              f"{rec['gpu_us_per_step']} us, {rec.get('weight_gb_s')} GB/s of weights "
              f"({rec.get('share_of_bandwidth')} of {args.bandwidth:.0f})")
        print(tabulate([(t["kernel"][:70], t["calls_per_step"], t["us_per_step"])
                        for t in rec["top_kernels"]], headers=["kernel", "calls", "us"]))
    if args.json:
        dump_json(args.json, result)


if __name__ == "__main__":
    main()
