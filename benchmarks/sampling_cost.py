"""What shaping the logits costs on the host: ``adjust_logits`` against a full sort.

    python benchmarks/sampling_cost.py [--vocab 4096 32000 49152] [--rows 1 5] \\
        [--json OUT.json]

``adjust_logits`` sorts only the largest entries of a row for top-k and top-p (more of
them until their mass reaches top-p); the full sort of every row, as the plain statement
in tests/test_sampling.py does it, is timed beside it on the same logits, and both must
give the same probabilities bit for bit. Logits are Gaussian with scale ``s``: s 1 is
flat (the nucleus holds most of the vocabulary, the partial sort's worst case), s 4 is
peaked like a language model's. Medians of ``--repeats`` calls, per call of ``rows`` rows
(a verification step of gamma + 1 target rows, or one autoregressive row).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import dump_results  # noqa: E402


def full_sort(z: np.ndarray, top_k: int, top_p: float, temperature: float) -> np.ndarray:
    """Temperature, top-k and top-p by a stable argsort of every row [R, V] -> [R, V]."""
    z = np.asarray(z, dtype=np.float64)  # [R, V]
    z = (z - z.max(axis=-1, keepdims=True)) / temperature  # the max at 0, as adjust_logits
    vocab = z.shape[-1]
    if 0 < top_k < vocab:
        order = np.argsort(-z, axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(vocab), axis=-1)
        z = np.where(rank < top_k, z, -np.inf)
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def median_ms(fn, args: tuple, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="*", default=[4096, 32000, 49152])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 5])
    ap.add_argument("--scales", type=float, nargs="*", default=[1.0, 4.0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from tabulate import tabulate

    from quickdraft.sampling import SamplingConfig, adjust_logits

    configs = [("T0.7 top-p 0.9", SamplingConfig(0.7, top_p=0.9)),
               ("T1 top-k 50", SamplingConfig(1.0, top_k=50)),
               ("T1", SamplingConfig(1.0))]
    rng = np.random.default_rng(0)
    rows = []
    for vocab in args.vocab:
        for n in args.rows:
            for scale in args.scales:
                z = (rng.normal(size=(n, vocab)) * scale).astype(np.float32)  # [n, V]
                for label, c in configs:
                    same = np.array_equal(adjust_logits(z, c),
                                          full_sort(z, c.top_k, c.top_p, c.temperature))
                    ours = median_ms(adjust_logits, (z, c), args.repeats)
                    full = median_ms(full_sort, (z, c.top_k, c.top_p, c.temperature),
                                     args.repeats)
                    rows.append({"vocab": vocab, "rows": n, "scale": scale, "config": label,
                                 "adjust_logits_ms": round(ours, 3),
                                 "full_sort_ms": round(full, 3),
                                 "speedup": round(full / ours, 2), "same": same})
    print(tabulate([(r["vocab"], r["rows"], r["scale"], r["config"], r["full_sort_ms"],
                     r["adjust_logits_ms"], f"{r['speedup']:.1f}x", r["same"]) for r in rows],
                   headers=["V", "rows", "scale", "sampling", "full sort ms",
                            "adjust_logits ms", "speedup", "same"]))
    if args.json:
        dump_results(args.json, rows=rows)


if __name__ == "__main__":
    main()
