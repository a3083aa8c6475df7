"""Whether a seeded sampled generation repeats itself, per attention kernel.

    python benchmarks/seeded_repeat.py MODEL_DIR --device cuda [--attention auto,cudnn]
        [--runs 8] [--new-tokens 128] [--temperature 1] [--gammas 4] [--json OUT.json]

One generator per system (autoregressive, speculative at each gamma) decodes the same
prompt ``--runs`` times with one seed. Each row counts the distinct outputs and, for each
run, the index of its first token that differs from the first run's (None: equal). The
draws come from the same uniforms every run, so a difference is the logits differing
between runs: a kernel that is not deterministic in floating point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import dump_results, log  # noqa: E402
from benchmarks.cuda_graph_check import first_difference  # noqa: E402


def repeats(gen, prompt: list[int], runs: int) -> list[list[int]]:
    outs = []
    for _ in range(runs):
        gen.prefill(prompt)
        while not gen.done:
            gen.step()
        outs.append(list(gen.new_tokens))
    return outs


def main(argv=None) -> int:
    from tabulate import tabulate

    from quickdraft.ort_backend import DecodeConfig, load_pair
    from quickdraft.sampling import SamplingConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--attention", default="auto,cudnn", help="comma list of kernels")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--gammas", default="4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    gammas = [int(g) for g in args.gammas.split(",") if g]
    config = DecodeConfig(max_new_tokens=args.new_tokens, seed=args.seed,
                          sampling=SamplingConfig(temperature=args.temperature))
    rows = []
    for attention in args.attention.split(","):
        pair = load_pair(args.model_dir, device=args.device, attention=attention)
        prompt = list(range(2, 18))
        for gamma in [None, *gammas]:
            gen = pair.generator(config) if gamma is None else pair.generator(config, gamma=gamma)
            outs = repeats(gen, prompt, args.runs)
            gen.close()
            system = "AR" if gamma is None else f"SD g={gamma}"
            rows.append({"attention": attention, "system": system,
                         "distinct": len({tuple(o) for o in outs}),
                         "first_difference": [first_difference(outs[0], o) for o in outs[1:]]})
            log(f"{attention} {rows[-1]['system']}: {rows[-1]['distinct']} distinct")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.json:
        dump_results(args.json, settings=vars(args) | {"model_dir": str(args.model_dir),
                                                        "json": str(args.json)}, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
