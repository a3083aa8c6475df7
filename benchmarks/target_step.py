"""What a target step costs under variants of its graph and of its attention kernel.

    python benchmarks/target_step.py HF_TARGET --work DIR \\
        [--runs plain/xqa,plain/cudnn,gate_up/xqa,...] [--rounds 2] [--json OUT.json]

Exports ``HF_TARGET`` (a Hugging Face folder) as static fp16 CUDA graphs of the same
weights, one per variant of the export's graph settings:

* ``plain``: neither setting;
* ``gate_up``: ``fuse_gate_up`` (the model builder's ``fuse_mlp_gate_up``): each MLP's gate
  and up projections as one MatMul (four matrix products per layer, not five);
* ``trans_b``: ``transpose_weights``: every MatMul weight stored [N, K] under a
  ``com.microsoft.FusedMatMul`` with ``transB=1`` (:mod:`quickdraft.export.transpose`), so
  cuBLAS reads each output's weights as one contiguous row;
* ``gate_up_trans_b``: both.

Each ``VARIANT/KERNEL`` of ``--runs`` (KERNEL: GroupQueryAttention's CUDA kernel, one of
``quickdraft.ort_backend.device.ATTENTION_KERNELS``, the models' ``attention`` option) runs
in its own process, the runs in turn in each of ``--rounds`` rounds. A process times 1-
and ``--gamma + 1``-token steps (CUDA graphs on, greedy ids to the host, each step rewound
so every step sees ``--past`` cached tokens), records the GPU's kernels in the first round
(``node_profile.cuda_kernels``), and decodes ``--check-steps`` greedy tokens and one
step's logits, compared with the first of ``--runs``. A run whose result file is in
``--work`` is not run again: a call cut short resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import dump_json, environment, log  # noqa: E402
from quickdraft.ort_backend.device import ATTENTION_KERNELS  # noqa: E402

# variant -> the export's graph settings
VARIANTS = {
    "plain": {"fuse_gate_up": False, "transpose_weights": False},
    "gate_up": {"fuse_gate_up": True, "transpose_weights": False},
    "trans_b": {"fuse_gate_up": False, "transpose_weights": True},
    "gate_up_trans_b": {"fuse_gate_up": True, "transpose_weights": True},
}
RUNS = "plain/xqa,plain/cudnn,gate_up/cudnn,trans_b/cudnn,gate_up_trans_b/cudnn"


# --device -> the export's dtype
DTYPE = {"cuda": "fp16", "cpu": "fp32"}


def export_variant(hf: Path, out: Path, max_length: int, device: str, variant: str) -> None:
    from quickdraft.export.builder import export_static_model

    export_static_model(hf, out, dtype=DTYPE[device], device=device, max_length=max_length,
                        validate=False, **VARIANTS[variant])


def measure(folder: Path, device_kind: str, steps: list[int], past: int, repeats: int,
            check_steps: int, attention: str, kernels: bool) -> dict:
    """Run in a child process: step times, greedy tokens and logits of ``folder`` (and its
    kernels with ``kernels`` on CUDA)."""
    from benchmarks.node_profile import cuda_kernels
    from quickdraft.ort_backend.device import Device
    from quickdraft.ort_backend.generator import load_model

    device = Device(device_kind)
    t0 = time.perf_counter()
    model = load_model(folder, device, graph_steps=tuple(steps),
                       cuda_graph=device_kind == "cuda", attention=attention)
    rec: dict = {"load_s": round(time.perf_counter() - t0, 1), "step_ms": {}}
    rng = np.random.default_rng(0)
    prefix = [int(t) for t in rng.integers(0, model.vocab_size, size=past)]
    state = model.new_state()
    try:
        state.append(prefix)
        for k in steps:
            ids = [int(t) for t in rng.integers(0, model.vocab_size, size=k)]
            times = []
            for i in range(3 + repeats):
                t0 = time.perf_counter()
                state.append_greedy(ids)
                if i >= 3:
                    times.append((time.perf_counter() - t0) * 1e3)
                state.rewind(past)
            rec["step_ms"][str(k)] = {"median": round(statistics.median(times), 4),
                                      "min": round(min(times), 4)}
        logits = state.append(prefix[:5])  # [5, V]
        state.rewind(past)
        tokens, last = [], prefix[-1:]
        for _ in range(check_steps):
            last = [int(state.append_greedy(last)[-1])]
            tokens.append(last[0])
        rec["tokens"] = tokens
        rec["logits"] = logits.astype(np.float32).tolist()
    finally:
        state.close()
    del model
    rec["kernels"] = (cuda_kernels(folder, device, steps, past, 3, 10, 4240.0, attention)
                      if kernels and device_kind == "cuda" else {})
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf", type=Path, help="the Hugging Face target folder")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--runs", default=RUNS, help="comma list of VARIANT/KERNEL")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--past", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--check-steps", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", choices=sorted(DTYPE), default="cuda")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-attention", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--child-kernels", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = [1, args.gamma + 1]
    if args.child is not None:  # one measurement, written to --json
        dump_json(args.json, measure(args.child, args.device, steps, args.past, args.repeats,
                                     args.check_steps, args.child_attention,
                                     args.child_kernels))
        return
    pairs = [tuple(r.split("/")) for r in args.runs.split(",")]
    for r in pairs:
        if len(r) != 2 or r[0] not in VARIANTS or r[1] not in ATTENTION_KERNELS:
            raise SystemExit(f"--runs: {'/'.join(r)!r} is not VARIANT/KERNEL with VARIANT "
                             f"one of {', '.join(VARIANTS)} and KERNEL one of "
                             f"{', '.join(ATTENTION_KERNELS)}")
    variants = list(dict.fromkeys(v for v, _ in pairs))
    work = args.work
    folders = {v: work / v for v in VARIANTS}
    built = {}
    for v in variants:
        done_file = folders[v] / "built.json"
        if not done_file.is_file():
            t0 = time.perf_counter()
            try:
                export_variant(args.hf, folders[v], args.max_length, args.device, v)
                info = dict(VARIANTS[v])
            except Exception as e:  # a variant that cannot be built is reported, not run
                shutil.rmtree(folders[v], ignore_errors=True)
                built[v] = {"error": f"{type(e).__name__}: {e}"[-600:]}
                log(f"{v}: not built: {built[v]['error']}")
                continue
            dump_json(done_file, {**info, "seconds": round(time.perf_counter() - t0, 1)})
        built[v] = json.loads(done_file.read_text())
    log(f"built {built}")
    pairs = [(v, a) for v, a in pairs if "error" not in built[v]]
    runs = []
    for r in range(args.rounds):
        for v, a in pairs:
            out = work / f"run_{r}_{v}_{a}.json"
            row = {"round": r, "variant": v, "attention": a}
            if not out.is_file():
                cmd = [sys.executable, __file__, str(args.hf), "--work", str(work),
                       "--child", str(folders[v]), "--json", str(out), "--device",
                       args.device, "--gamma", str(args.gamma), "--past", str(args.past),
                       "--repeats", str(args.repeats), "--check-steps",
                       str(args.check_steps), "--child-attention", a,
                       *(["--child-kernels"] if r == 0 else [])]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    row["error"] = "\n".join((done.stdout + done.stderr).splitlines()[-6:])
            if out.is_file():
                row.update(json.loads(out.read_text()))
            runs.append(row)
            log(f"{v}/{a} round {r}: {row.get('step_ms', row.get('error'))}")
    base = next((x for x in runs if "tokens" in x), None)
    summary = []
    for v, a in pairs:
        rows = [x for x in runs if x["variant"] == v and x["attention"] == a
                and "step_ms" in x]
        if not rows:
            continue
        s = {"variant": v, "attention": a}
        for k in steps:
            s[f"ms_{k}"] = [x["step_ms"][str(k)]["median"] for x in rows]
            kern = next((x["kernels"][str(k)] for x in rows
                         if str(k) in x.get("kernels", {})), {})
            s[f"kernels_{k}"] = kern.get("kernels_per_step")
            s[f"gpu_us_{k}"] = kern.get("gpu_us_per_step")
        if base is not None:
            s["tokens_equal"] = all(x["tokens"] == base["tokens"] for x in rows)
            s["max_logit_diff"] = max(float(np.max(np.abs(np.asarray(x["logits"]) -
                                                          np.asarray(base["logits"]))))
                                      for x in rows)
        summary.append(s)
    for x in runs:
        x.pop("logits", None)
    result = {"command": " ".join(sys.argv), "environment": environment(), "built": built,
              "summary": summary, "runs": runs}
    if args.json:
        dump_json(args.json, result)
    from tabulate import tabulate
    print(tabulate(summary, headers="keys"))


if __name__ == "__main__":
    main()
