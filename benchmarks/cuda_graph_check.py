"""Greedy output with CUDA graphs against the same decoding without them, on CUDA.

    python benchmarks/cuda_graph_check.py MODEL_DIR [--prompts 6] [--json OUT.json]

A static export decodes greedily with CUDA graphs in the ways a server and the benchmarks
use it: one autoregressive generator reused across prompts, two live at once (two cache
slots on one model), a speculative generator reused, both kinds alive together, a
fresh generator per request, and pipelined decoding (the target's verify call and the
draft's chain in flight at once), reused and beside a sequential speculative generator,
with and without graphs. Each prompt's tokens are compared with autoregressive
decoding of the same pair loaded without CUDA graphs; each entry is the index of the
first token that differs (None: all equal). Prompts: the first ``--prompts`` of those
``benchmarks/concurrency.py`` sends.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import dump_results  # noqa: E402

GAMMA = 4


def first_difference(want: list[int], got: list[int]) -> int | None:
    at = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), None)
    return at if at is not None or len(want) == len(got) else min(len(want), len(got))


def scenarios(config, prompts, reference):
    """{name: function of a loaded pair -> first differences per prompt and run}."""
    def diff(i, generation):
        return first_difference(reference[i], generation.tokens)

    def autoregressive(pair):
        with pair.generator(config) as g:
            return [[diff(i, g.generate(p)) for _ in range(2)] for i, p in enumerate(prompts)]

    def two_autoregressive(pair):
        with pair.generator(config) as a, pair.generator(config) as b:
            return [[diff(i, a.generate(p)), diff(i, b.generate(p))]
                    for i, p in enumerate(prompts)]

    def speculative(pair):
        with pair.generator(config, gamma=GAMMA) as s:
            return [[diff(i, s.generate(p)) for _ in range(2)] for i, p in enumerate(prompts)]

    def both(pair):
        with pair.generator(config) as a, pair.generator(config, gamma=GAMMA) as s:
            return [[diff(i, a.generate(p)), diff(i, s.generate(p)), diff(i, s.generate(p))]
                    for i, p in enumerate(prompts)]

    def fresh(pair):
        out = []
        for i, p in enumerate(prompts):
            with pair.generator(config) as a:
                first = diff(i, a.generate(p))
            with pair.generator(config, gamma=GAMMA) as s:
                out.append([first, diff(i, s.generate(p))])
        return out

    def pipelined(pair):
        with pair.generator(config, gamma=GAMMA, pipelined=True) as s:
            return [[diff(i, s.generate(p)) for _ in range(2)] for i, p in enumerate(prompts)]

    def pipelined_and_speculative(pair):
        with pair.generator(config, gamma=GAMMA, pipelined=True) as a, \
                pair.generator(config, gamma=GAMMA) as s:
            return [[diff(i, a.generate(p)), diff(i, s.generate(p)), diff(i, a.generate(p))]
                    for i, p in enumerate(prompts)]

    return {"autoregressive": autoregressive, "two_autoregressive": two_autoregressive,
            "speculative": speculative, "both": both, "fresh": fresh,
            "pipelined": pipelined, "pipelined_and_speculative": pipelined_and_speculative}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from benchmarks.concurrency import make_requests
    from quickdraft.ort_backend import DecodeConfig, load_pair

    config = DecodeConfig(max_new_tokens=args.tokens)
    plain = load_pair(args.model_dir, device="cuda", max_gamma=GAMMA, cuda_graph=False)
    prompts = [r.prompt for r in make_requests(plain.tokenizer, args.prompts, 32)]
    with plain.generator(config) as g:
        reference = [g.generate(p).tokens for p in prompts]
    results = {"pipelined_without_graphs":
               scenarios(config, prompts, reference)["pipelined"](plain)}
    del plain
    for name, run in scenarios(config, prompts, reference).items():
        results[name] = run(load_pair(args.model_dir, device="cuda", max_gamma=GAMMA))
        print(name, results[name], flush=True)
    if args.json:
        dump_results(args.json, results=results)


if __name__ == "__main__":
    main()
