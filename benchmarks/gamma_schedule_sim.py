#!/usr/bin/env python
"""What choosing gamma per iteration can gain, on the paper's cost model.

    python benchmarks/gamma_schedule_sim.py --json benchmarks/results/gamma_schedule_sim.json

Simulates generations of ``--tokens`` tokens in which each draft token is accepted with
probability alpha(t) (t: the output position), an iteration of gamma draft tokens costs
gamma * c + 1 target-call units (Theorem 3.8's model: verification costs one call whatever
gamma), and compares, per workload and c, tokens per unit of time of every fixed gamma
with ``AdaptiveGammaDrafter`` (the rule behind ``--gamma auto``, with its defaults and
with other decay / prior settings), Hugging Face's schedule and an oracle that knows the
true alpha at each position (Theorem 3.8's gamma for it: the most any schedule gains).
No model runs: this is the theory's bound on the gain, for reading the measured rows of
``benchmarks/strategies.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quickdraft import drafters  # noqa: E402
from quickdraft.theory import best_gamma  # noqa: E402

MAX_GAMMA = 8
WORKLOADS = {  # name -> alpha at output position t of a 128-token generation
    "iid 0.8": lambda t: 0.8,
    "iid 0.6": lambda t: 0.6,
    "phased 0.95 / 0.4": lambda t: 0.95 if t < 64 else 0.4,  # strategies.py's phased set
}
SETTINGS = {"default": {}, "decay 0.95": {"decay": 0.95},
            "decay 0.95, prior 0.8": {"decay": 0.95, "prior_alpha": 0.8},
            "decay 0.97, prior 0.8": {"decay": 0.97, "prior_alpha": 0.8},
            "decay 0.8": {"decay": 0.8}}


class _Stub:
    """A base drafter for the schedules: proposes whatever length it is asked for."""

    max_tokens = MAX_GAMMA

    def get_candidates(self, ids, max_tokens, uniforms):
        raise NotImplementedError  # the simulation asks the schedule only

    def update_candidate_strategy(self, ids, n_accepted):
        pass


def accepted(gamma: int, alpha: float, rng: np.random.Generator) -> int:
    """Draft tokens accepted of ``gamma``, each with probability alpha, up to a rejection."""
    k = 0
    while k < gamma and rng.random() < alpha:
        k += 1
    return k


def simulate(alpha_at, c: float, choose, n: int, runs: int, seed: int) -> float:
    """Tokens per target-call unit over ``runs`` generations; ``choose()`` returns a
    schedule object with ``next(position)`` (the gamma) and ``tell(k)`` (accepted count)."""
    rng = np.random.default_rng(seed)
    tokens = cost = 0.0
    for _ in range(runs):
        schedule, out = choose(), 0
        while out < n:
            gamma = min(schedule.next(out), n - out - 1) if n - out > 1 else 0
            k = accepted(gamma, alpha_at(out), rng)
            schedule.tell(gamma, k)
            out += k + 1
            cost += gamma * c + 1.0
        tokens += out
    return tokens / cost


class Fixed:
    def __init__(self, gamma):
        self.gamma = gamma

    def next(self, out):
        return self.gamma

    def tell(self, gamma, k):
        pass


class Oracle:
    """Theorem 3.8's gamma for the true alpha at each position: no schedule does better
    on this model."""

    def __init__(self, alpha_at, c):
        self.alpha_at, self.c = alpha_at, c

    def next(self, out):
        return best_gamma(min(self.alpha_at(out), 1 - 1e-9), self.c, MAX_GAMMA)

    def tell(self, gamma, k):
        pass


class Schedule:
    """A quickdraft gamma schedule driven without a model."""

    def __init__(self, drafter):
        self.d = drafter

    def next(self, out):
        return self.d.choose()

    def tell(self, gamma, k):
        self.d.chosen.append(gamma)
        self.d.update_candidate_strategy(None, k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--costs", default="0.06,0.12")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = []
    for name, alpha_at in WORKLOADS.items():
        for c in [float(x) for x in a.costs.split(",")]:
            fixed = {g: simulate(alpha_at, c, lambda g=g: Fixed(g), a.tokens, a.runs, 0)
                     for g in range(1, MAX_GAMMA + 1)}
            best = max(fixed, key=fixed.get)
            row = {"workload": name, "c": c, "best_fixed_gamma": best,
                   "best_fixed": fixed[best], "gamma_4_over_best": fixed[4] / fixed[best]}
            for label, kw in SETTINGS.items():
                def make(kw=kw, c=c):
                    return Schedule(drafters.AdaptiveGammaDrafter(
                        _Stub(), max_gamma=MAX_GAMMA, cost_ratio=c, **kw))
                v = simulate(alpha_at, c, make, a.tokens, a.runs, 0)
                row[f"auto ({label}) over best fixed"] = v / fixed[best]
                row[f"auto ({label}) over gamma 4"] = v / fixed[4]
            hf = simulate(alpha_at, c, lambda: Schedule(drafters.HeuristicGammaDrafter(
                _Stub(), max_gamma=MAX_GAMMA)), a.tokens, a.runs, 0)
            row["HF schedule over best fixed"] = hf / fixed[best]
            oracle = simulate(alpha_at, c, lambda alpha_at=alpha_at, c=c: Oracle(alpha_at, c),
                              a.tokens, a.runs, 0)
            row["oracle over best fixed"] = oracle / fixed[best]
            row["oracle over gamma 4"] = oracle / fixed[4]
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"command": "python benchmarks/gamma_schedule_sim.py "
                                      + " ".join(argv or sys.argv[1:]), "tokens": a.tokens,
                                      "runs": a.runs, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
