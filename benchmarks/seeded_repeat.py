"""Whether a seeded sampled generation repeats itself, per attention kernel.

    python benchmarks/seeded_repeat.py MODEL_DIR --device cuda [--attention auto,cudnn]
        [--runs 8] [--new-tokens 128] [--temperature 1] [--gammas 4] [--interleave]
        [--json OUT.json]

One generator per system (autoregressive, speculative at each gamma) decodes the same
random prompt ``--runs`` times with one seed (``--interleave``: the generators alive
together, one run of each in turn). Each row counts the distinct outputs and, for each
later run, the index of its first token that differs from the first run's (None: equal).
The draws come from the same uniforms every run, so a difference is the logits differing
between runs: a kernel that is not deterministic in floating point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import dump_results, log  # noqa: E402
from benchmarks.cuda_graph_check import first_difference  # noqa: E402


def collect(model_dir: Path, *, device: str, attention: list[str], runs: int,
            new_tokens: int, temperature: float, gammas: list[int], seed: int,
            prompt_tokens: int, interleave: bool) -> list[dict]:
    from quickdraft.ort_backend import DecodeConfig, load_pair
    from quickdraft.sampling import SamplingConfig

    config = DecodeConfig(max_new_tokens=new_tokens, seed=seed,
                          sampling=SamplingConfig(temperature=temperature))
    rows = []
    for kernel in attention:
        pair = load_pair(model_dir, device=device, attention=kernel)
        rng = np.random.default_rng(seed)  # a random prompt, as host_overhead.py draws one
        prompt = [int(t) for t in rng.integers(2, pair.target.vocab_size, prompt_tokens)]
        systems = {("AR" if g is None else f"SD g={g}"):
                   (pair.generator(config) if g is None else pair.generator(config, gamma=g))
                   for g in [None, *gammas]}
        if interleave:
            outs = {name: [] for name in systems}
            for _ in range(runs):
                for name, gen in systems.items():
                    outs[name].append(gen.generate(prompt).tokens)
        else:
            outs = {name: [gen.generate(prompt).tokens for _ in range(runs)]
                    for name, gen in systems.items()}
        for name, gen in systems.items():
            gen.close()
            o = outs[name]
            rows.append({"attention": kernel, "system": name, "distinct": len(set(map(tuple, o))),
                         "first_difference": [first_difference(o[0], x) for x in o[1:]]})
            log(f"{kernel} {name}: {rows[-1]['distinct']} distinct of {runs}")
    return rows


def main(argv=None) -> int:
    from tabulate import tabulate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--attention", default="auto,cudnn", help="comma list of kernels")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--gammas", default="4")
    ap.add_argument("--seed", type=int, default=0, help="the sampling seed and the prompt's")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length")
    ap.add_argument("--interleave", action="store_true",
                    help="every system's generator alive at once, their runs in turn")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = collect(args.model_dir, device=args.device, attention=args.attention.split(","),
                   runs=args.runs, new_tokens=args.new_tokens, temperature=args.temperature,
                   gammas=[int(g) for g in args.gammas.split(",") if g], seed=args.seed,
                   prompt_tokens=args.prompt_tokens, interleave=args.interleave)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.json:
        dump_results(args.json, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
