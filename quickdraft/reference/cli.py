"""CLI verbs of the reference: ``theory`` and ``demo``."""

from __future__ import annotations

import argparse
import json

from quickdraft import theory


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("theory", help="expected tokens, speedup and the best gamma (paper, sec. 3)")
    p.add_argument("--alpha", type=float, nargs="+", required=True,
                   help="acceptance rate(s) alpha in [0, 1]")
    p.add_argument("--c", type=float, default=0.0,
                   help="cost of a draft call relative to a target call (default 0)")
    p.add_argument("--max-gamma", type=int, default=10, help="largest gamma to tabulate")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_theory)

    d = sub.add_parser("demo", help="speculative vs autoregressive sampling on n-gram models "
                       "fit on the Python standard library (NumPy reference)")
    d.add_argument("--prompt", default="def __init__(self", help="text to continue")
    d.add_argument("--gamma", type=int, default=4, help="draft tokens per iteration")
    d.add_argument("--max-new-tokens", type=int, default=200, help="characters to generate")
    d.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    d.add_argument("--top-k", type=int, default=0, help="keep the k likeliest (0: all)")
    d.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1: all)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random generator")
    d.add_argument("--chars", type=int, default=300_000, help="training characters")
    d.set_defaults(func=_demo)


MAX_GAMMA_TABLE = 1000  # theory tabulates gamma 1 .. --max-gamma, at most this many rows


def _theory(args) -> int:
    for a in args.alpha:
        if not 0 <= a <= 1:  # False for NaN too
            raise ValueError(f"--alpha must be a number in [0, 1], got {a}")
    if not 0 <= args.c < float("inf"):
        raise ValueError(f"--c must be a finite number >= 0, got {args.c}")
    if not 1 <= args.max_gamma <= MAX_GAMMA_TABLE:
        raise ValueError(f"--max-gamma must be in [1, {MAX_GAMMA_TABLE}], got {args.max_gamma}")
    rows = []
    for a in args.alpha:
        best = theory.best_gamma(a, args.c, args.max_gamma)
        for g in range(1, args.max_gamma + 1):
            rows.append(dict(alpha=a, gamma=g, expected_tokens=theory.expected_tokens(a, g),
                             speedup=theory.walltime_improvement(a, g, args.c),
                             operations=theory.operations_factor(a, g, 0.0), best=g == best))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"c = {args.c}   (speedup: Theorem 3.8; operations: Theorem 3.11 with c_hat = 0)")
    print(f"{'alpha':>6} {'gamma':>6} {'E[tokens]':>10} {'speedup':>9} {'operations':>11}")
    for r in rows:
        mark = "  <- best gamma" if r["best"] else ""
        print(f"{r['alpha']:>6.2f} {r['gamma']:>6d} {r['expected_tokens']:>10.2f} "
              f"{r['speedup']:>8.2f}X {r['operations']:>10.2f}X{mark}")
    for a in args.alpha:
        if a <= args.c:
            print(f"alpha {a} <= c {args.c}: speculative decoding cannot help (Corollary 3.9)")
    return 0


def _demo(args) -> int:
    from quickdraft.reference.demo import build_demo_pair, run_demo
    from quickdraft.sampling import SamplingConfig

    if args.chars < 1000:
        raise ValueError(f"--chars must be at least 1000 (training characters), got {args.chars}")
    if args.gamma < 1 or args.max_new_tokens < 1:
        raise ValueError("--gamma and --max-new-tokens must be >= 1")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    pair = build_demo_pair(args.chars)
    spec, auto = run_demo(pair, args.prompt, gamma=args.gamma,
                          max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    s = spec.stats
    print(f"target: {pair.target.order + 1}-gram characters, draft: "
          f"{pair.draft.order + 1}-gram, vocabulary {pair.tokenizer.vocab_size}")
    print("--- speculative sample ---")
    print(args.prompt + pair.tokenizer.decode(spec.tokens))
    print("--- statistics ---")
    print(f"gamma {s.gamma}: {s.new_tokens} tokens in {s.target_calls} target calls "
          f"({s.tokens_per_target_call:.2f} tokens per target call; autoregressive: "
          f"{auto.stats.tokens_per_target_call:.2f})")
    print(f"acceptance rate {s.acceptance_rate:.3f}, empirical alpha {s.alpha:.3f}, "
          f"expected tokens per iteration at that alpha (Eq. 1) "
          f"{theory.expected_tokens(min(s.alpha, 1.0), s.gamma):.2f}, "
          f"measured {s.tokens_per_iteration:.2f}")
    return 0
