"""Greedy output with CUDA graphs against the same decoding without them, on CUDA.

    python benchmarks/cuda_graph_check.py MODEL_DIR [--prompts 6] [--json OUT.json]

A static export decodes greedily with CUDA graphs in the ways a server and the benchmarks
use it: one autoregressive generator reused across prompts, two live at once (two cache
slots on one model), a speculative generator reused, both kinds alive together, a
fresh generator per request, and pipelined decoding (the target's verify call and the
draft's chain in flight at once), reused and beside a sequential speculative generator,
with and without graphs, and lanes (the target loaded with lanes: a speculative generator
alone, reused; all prompts stepped together through ``score_lanes``; both without
graphs). Each prompt's tokens are compared with autoregressive decoding of the same pair
loaded without CUDA graphs; each entry is the index of the first token that differs
(None: all equal). ``sampled``: seeded sampling (prompt i with seed i), autoregressive,
sequential and pipelined speculative (draws and verdicts on the device, two row banks),
each run twice on one generator, with CUDA graphs (the draws and verdicts captured too)
against the same without them. ``steps`` compares one
history's step logits on a lane's cache slot with a plain slot's, per step length (max
|difference|, argmax equal). Prompts: the first
``--prompts`` of those ``benchmarks/concurrency.py`` sends.
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

    def together(pair):
        gens = [pair.generator(config, gamma=GAMMA) for _ in prompts]
        for g, p in zip(gens, prompts):
            g.prefill(p)
        while not all(g.done for g in gens):
            for g in gens:  # the generators beyond the lanes step alone
                if not g.done and not g.lane_ready:
                    g.step()
            ready = [g for g in gens if g.lane_ready]
            if not ready:
                continue
            asks = [g.begin_step() for g in ready]
            scores = pair.target.score_lanes([a.state for a in asks], [a.tokens for a in asks],
                                             [a.greedy for a in asks])
            for g, sc in zip(ready, scores):
                g.end_step(sc)
        out = [[first_difference(reference[i], g.new_tokens)] for i, g in enumerate(gens)]
        for g in gens:
            g.close()
        return out

    return {"autoregressive": autoregressive, "two_autoregressive": two_autoregressive,
            "speculative": speculative, "both": both, "fresh": fresh,
            "pipelined": pipelined, "pipelined_and_speculative": pipelined_and_speculative,
            "lanes_alone": speculative, "lanes_together": together}


SAMPLING = dict(temperature=0.8, top_p=0.95)


def sampled_runs(pair, config, prompts) -> dict:
    """{"autoregressive" | "sequential" | "pipelined": tokens per prompt and run} of seeded
    sampling (autoregressive: the target's draws on the device)."""
    from dataclasses import replace

    out = {}
    for name, gamma, pipelined in (("autoregressive", None, False),
                                   ("sequential", GAMMA, False), ("pipelined", GAMMA, True)):
        runs = []
        for i, p in enumerate(prompts):
            with pair.generator(replace(config, seed=i), gamma=gamma,
                                pipelined=pipelined) as g:
                runs.append([g.generate(p).tokens for _ in range(2)])
        out[name] = runs
    return out


def step_logits(plain, lanes, history: list[int], steps=(1, 2, 5)) -> dict:
    """The logits of one history's next steps on a lane's slot and on a plain slot."""
    import numpy as np

    out = {}
    for k in steps:
        a, b = plain.target.new_state(), lanes.target.new_state()
        try:
            for s in (a, b):
                s.append_greedy(history[:-k])
            x, y = a.append(history[-k:]), b.append(history[-k:])  # [k, V]
            out[k] = {"lane": b.lane, "max_abs": float(np.abs(x.astype(np.float32) -
                                                               y.astype(np.float32)).max()),
                      "argmax_equal": bool((x.argmax(-1) == y.argmax(-1)).all())}
        finally:
            a.close()
            b.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke run of the same scenarios (no graphs there)")
    args = ap.parse_args()
    from benchmarks.concurrency import make_requests
    from quickdraft.ort_backend import DecodeConfig, load_pair

    config = DecodeConfig(max_new_tokens=args.tokens)
    plain = load_pair(args.model_dir, device=args.device, max_gamma=GAMMA, cuda_graph=False)
    prompts = [r.prompt for r in make_requests(plain.tokenizer, args.prompts, 32)]
    with plain.generator(config) as g:
        reference = [g.generate(p).tokens for p in prompts]
    runs = scenarios(config, prompts, reference)
    results = {"pipelined_without_graphs": runs["pipelined"](plain)}
    lanes_plain = load_pair(args.model_dir, device=args.device, max_gamma=GAMMA, cuda_graph=False,
                            lanes=4)
    results["lanes_alone_without_graphs"] = runs["lanes_alone"](lanes_plain)
    results["lanes_together_without_graphs"] = runs["lanes_together"](lanes_plain)
    del lanes_plain
    for name, run in runs.items():
        lanes = 4 if name.startswith("lanes") else 0
        results[name] = run(load_pair(args.model_dir, device=args.device, max_gamma=GAMMA,
                                      lanes=lanes))
        print(name, results[name], flush=True)
    graphs = load_pair(args.model_dir, device=args.device, max_gamma=GAMMA)
    from quickdraft.sampling import SamplingConfig

    sampled = DecodeConfig(max_new_tokens=args.tokens, sampling=SamplingConfig(**SAMPLING))
    want, got = sampled_runs(plain, sampled, prompts), sampled_runs(graphs, sampled, prompts)
    results["sampled"] = {
        name: [[first_difference(w[0], t) for t in g] for w, g in zip(want[name], got[name])]
        for name in want}
    results["sampled_without_graphs_repeat"] = {
        name: [first_difference(w[0], w[1]) for w in want[name]] for name in want}
    print("sampled", results["sampled"], flush=True)
    lanes = load_pair(args.model_dir, device=args.device, max_gamma=GAMMA, lanes=4)
    history = plain.tokenizer.encode(prompts[0]).ids + reference[0][:40]
    results["steps"] = {"plain_vs_lane_slot": step_logits(graphs, lanes, history),
                        "no_graphs_vs_lane_slot": step_logits(plain, lanes, history)}
    print("steps", results["steps"], flush=True)
    del plain
    if args.json:
        dump_results(args.json, results=results)


if __name__ == "__main__":
    main()
