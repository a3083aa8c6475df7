"""int8-stored weights on the CPU: folded to fp32 at load (what quickdraft does) against
ONNX Runtime's own 8-bit arithmetic (MatMulNBits), per step length, side by side.

    python benchmarks/int8_cpu_steps.py [--model-dir DIR] [--reps 200] [--json OUT.json]

``DIR`` (default: the bundled pair) holds ``target/`` stored with ``weights: "int8"``. The
8-bit variant is the same graph loaded without the folding option (a copy of the folder
whose manifest no longer says int8, so ONNX Runtime fuses DequantizeLinear + MatMul into
MatMulNBits). Each reports the median ms of one greedy target step of k new tokens after a
100-token past through the DecodeState protocol, and t_k / t_1: the cost of verifying
k - 1 draft tokens against one autoregressive step.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's benchmarks/ and quickdraft/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LENGTHS = [1, 2, 3, 5, 7]
PAST = 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from tabulate import tabulate

    from benchmarks.adapters import step_costs
    from quickdraft.manifest import load_manifest
    from quickdraft.ort_backend import load_model
    from quickdraft.ort_backend.cli import default_model_dir
    from quickdraft.ort_backend.device import Device

    root = args.model_dir or default_model_dir()
    folder = root / "target"
    if load_manifest(folder).weights != "int8":
        raise SystemExit(f"{folder}: its manifest does not store int8 weights")
    prompt = [2 + i % 1000 for i in range(PAST)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "target"
        shutil.copytree(folder, plain)
        m = load_manifest(plain)
        m.weights = ""  # no folding: ONNX Runtime's QDQ fusions decide the kernels
        m.save(plain)
        for label, path in (("int8 stored, fp32 compute (folded)", folder),
                            ("int8 compute (MatMulNBits)", plain)):
            model = load_model(path, Device("cpu"), graph_steps=LENGTHS)
            ms = step_costs(model, prompt, LENGTHS, reps=args.reps, greedy=True)
            rows.append({"variant": label, "ms": {k: round(v, 3) for k, v in ms.items()},
                         "ratio_to_1": {k: round(v / ms[1], 3) for k, v in ms.items()}})
    table = [[r["variant"], *[f"{r['ms'][k]:.2f} ({r['ratio_to_1'][k]:.2f}x)" for k in LENGTHS]]
             for r in rows]
    print(tabulate(table, headers=["target step", *[f"k={k}" for k in LENGTHS]]))
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python benchmarks/int8_cpu_steps.py"
                       + (f" --model-dir {args.model_dir}" if args.model_dir else "")
                       + f" --reps {args.reps}",
            "machine": {"processor": platform.processor() or platform.machine(),
                        "cpus": __import__("os").cpu_count()},
            "past": PAST, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
