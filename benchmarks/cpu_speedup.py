"""Speculative against autoregressive decoding on this CPU, side by side in one run.

    python benchmarks/cpu_speedup.py --model-dir DIR [--model-dir DIR ...] \\
        [--tokens 128] [--rounds 3] [--device cpu|cuda] [--json OUT.json]

For each exported pair, prompt set (code, English, copy-heavy) and drafting strategy, the
autoregressive and the speculative generation of the same prompt with the same settings
run alternately ``--rounds`` times after a warm-up; the medians of tokens per second give
the speedup, and greedy runs must give the same tokens. ``DIR`` may be ``bundled`` (the
package's pair). ``--device cuda`` runs the same comparison on the GPU (a static fp16
export gets CUDA graphs, as ``quickdraft generate`` does).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment  # noqa: E402

PROMPTS = {
    "code": "def quicksort(arr):\n",
    "readme": "def quicksort(arr):",  # the README's first command
    "english": "The history of the printing press begins",
    # the earlier part of a file in the prompt: its continuation repeats what came before
    "copy": ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
             "    return total / len(values)\n\n\ndef mean_of_squares(values):\n"
             "    total = 0\n    for v in values:\n        total += v * v\n"
             "    return total / len(values)\n\n\ndef mean_of_cubes(values):\n"),
}
# (label, drafter kind, gamma, temperature, device sampling: None = the pair's default)
RUNS = [
    ("model g3", "model", 3, 0.0, None),
    ("model g4", "model", 4, 0.0, None),
    ("model g5", "model", 5, 0.0, None),
    ("model auto", "model", "auto", 0.0, None),
    ("ngram g4", "ngram", 4, 0.0, None),
    ("auto g4", "auto", 4, 0.0, None),
    ("model g4 T0.7", "model", 4, 0.7, None),
    ("auto g4 T0.7", "auto", 4, 0.7, None),
    # the draft's tokens sampled on the host / on the model's device (DeviceModelDrafter)
    ("model g4 T0.7 host", "model", 4, 0.7, False),
    ("model g4 T0.7 device", "model", 4, 0.7, True),
]
DEFAULT_RUNS = [r[0] for r in RUNS[:8]]


def measure(pair, prompt: str, kind: str, gamma, temperature: float, tokens: int,
            rounds: int, seed: int = 0, device_sampling: bool | None = None) -> dict:
    from quickdraft.ort_backend import DecodeConfig
    from quickdraft.sampling import SamplingConfig

    config = DecodeConfig(max_new_tokens=tokens, sampling=SamplingConfig(temperature),
                          seed=seed)
    spec_rates, auto_rates, same, stats = [], [], True, None
    with pair.generator(config, gamma=gamma, drafter=kind,
                        device_sampling=device_sampling) as spec, \
            pair.generator(config) as auto:
        spec.generate(prompt)
        auto.generate(prompt)  # warm-up of both
        for _ in range(rounds):
            s = spec.generate(prompt)
            a = auto.generate(prompt)
            spec_rates.append(s.stats.tokens_per_s)
            auto_rates.append(a.stats.tokens_per_s)
            same = same and (temperature > 0 or s.tokens == a.tokens)
            stats = s.stats
    sp, ar = statistics.median(spec_rates), statistics.median(auto_rates)
    g = stats.generation
    return {"speculative_tok_s": round(sp, 1), "autoregressive_tok_s": round(ar, 1),
            "speedup": round(sp / ar, 3), "alpha": round(g.alpha, 3),
            "acceptance_rate": round(g.acceptance_rate, 3),
            "tokens_per_iteration": round(g.tokens_per_iteration, 2),
            "c": None if stats.cost_ratio != stats.cost_ratio else round(stats.cost_ratio, 3),
            "new_tokens": stats.new_tokens, "same_tokens": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", action="append", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", nargs="*", default=list(PROMPTS))
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS,
                    help=f"of: {'; '.join(r[0] for r in RUNS)}")
    ap.add_argument("--seeds", type=int, default=1,
                    help="sampled runs: seeds 0..N-1, each its own side-by-side comparison; "
                    "the row reports the median speedup and the range")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from tabulate import tabulate

    from quickdraft.ort_backend import load_pair
    from quickdraft.ort_backend.cli import default_model_dir

    rows = []
    for folder in args.model_dir:
        path = default_model_dir() if folder == "bundled" else Path(folder)
        pair = load_pair(path, device=args.device, max_gamma=8)
        for prompt in args.prompts:
            for label, kind, gamma, temperature, on_device in RUNS:
                if label not in args.runs:
                    continue
                t0 = time.perf_counter()
                seeds = range(args.seeds if temperature > 0 else 1)
                recs = [measure(pair, PROMPTS[prompt], kind, gamma, temperature, args.tokens,
                                args.rounds, seed, on_device) for seed in seeds]
                rec = sorted(recs, key=lambda r: r["speedup"])[len(recs) // 2]  # the median
                if len(recs) > 1:
                    rec = {**rec, "seeds": len(recs),
                           "speedup_range": [min(r["speedup"] for r in recs),
                                             max(r["speedup"] for r in recs)]}
                rows.append({"pair": folder, "prompt": prompt, "run": label, **rec,
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)
    table = [(r["pair"].rstrip("/").split("/")[-1], r["prompt"], r["run"],
              r["autoregressive_tok_s"], r["speculative_tok_s"], f"{r['speedup']:.2f}x",
              r["alpha"], r["c"], r["same_tokens"]) for r in rows]
    print(tabulate(table, headers=["pair", "prompt", "run", "AR tok/s", "spec tok/s",
                                   "speedup", "alpha", "c", "same tokens"]))
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python benchmarks/cpu_speedup.py " + " ".join(
                f"--model-dir {m}" for m in args.model_dir)
            + f" --prompts {' '.join(args.prompts)} --tokens {args.tokens} --rounds "
            f"{args.rounds} --seeds {args.seeds} --device {args.device}",
            "machine": {"processor": platform.processor() or platform.machine(),
                        "cpus": __import__("os").cpu_count(), "device": args.device},
            "environment": environment(),
            "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
