#!/usr/bin/env python
"""Plots of benchmark results (the JSON ``benchmarks/bench.py`` writes).

    python benchmarks/plots.py benchmarks/results/h100.json        # -> docs/assets/benchmarks/

* ``<stem>_tokens_per_s.png``: tokens/s of every system and mode, per pair;
* ``<stem>_gamma_sweep.png``: speedup against gamma (quickdraft, onnxruntime-genai, HF),
  with Theorem 3.8's prediction from quickdraft's measured alpha and c;
* ``<stem>_controlled_alpha.png``: realized against theoretical speedup at controlled alpha;
* ``<stem>_verify_cost.png``: cost of a target call on gamma + 1 tokens over one token.

Deterministic (Agg, fixed size and DPI, no metadata); a plot without data is not drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO  # noqa: E402
from benchmarks.report import system_rows  # noqa: E402

OUT = REPO / "docs" / "assets" / "benchmarks"
DPI, SIZE = 110, (7.0, 4.2)
META = {"Software": None}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata=META)
    _plt().close(fig)
    return path


def plot_tokens_per_s(results: dict, path: Path) -> Path | None:
    plt = _plt()
    pairs = [(n, p) for n, p in (results.get("pairs") or {}).items() if p.get("systems")]
    if not pairs:
        return None
    fig, axes = plt.subplots(1, len(pairs), figsize=(SIZE[0] * max(1, len(pairs)) / 1.6, SIZE[1]),
                             squeeze=False)
    drawn = False
    for ax, (name, pair) in zip(axes[0], pairs):
        rows = [r for r in system_rows(results, name, pair) if r.get("tokens_per_s")]
        if not rows:
            ax.set_visible(False)
            continue
        labels = [f"{r['label']}\n{r['mode']}" for r in rows]
        ax.barh(range(len(rows)), [r["tokens_per_s"] for r in rows],
                color=["tab:blue" if r["system"].startswith("qd") else "tab:gray" for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("tokens / s (batch 1, greedy)")
        ax.set_title(name)
        drawn = True
    return _save(fig, path) if drawn else None


def plot_gamma_sweep(results: dict, path: Path) -> Path | None:
    from quickdraft import theory

    plt = _plt()
    pairs = [(n, p) for n, p in (results.get("pairs") or {}).items()
             if any(s.get("sweep") for s in (p.get("systems") or {}).values())]
    if not pairs:
        return None
    fig, axes = plt.subplots(1, len(pairs), figsize=(SIZE[0] * max(1, len(pairs)) / 1.6, SIZE[1]),
                             squeeze=False)
    for ax, (name, pair) in zip(axes[0], pairs):
        for sname, res in (pair.get("systems") or {}).items():
            sweep = [r for r in res.get("sweep") or [] if r.get("speedup") is not None]
            if not sweep:
                continue
            sweep.sort(key=lambda r: r["gamma"])
            (line,) = ax.plot([r["gamma"] for r in sweep], [r["speedup"] for r in sweep],
                              marker="o", label=sname)
            sp = res.get("spec") or {}
            if sname.startswith("qd") and sp.get("alpha") is not None and sp.get("cost_ratio_c"):
                gs = list(range(1, max(r["gamma"] for r in sweep) + 1))
                ax.plot(gs, [theory.walltime_improvement(sp["alpha"], g, sp["cost_ratio_c"])
                             for g in gs], linestyle="--", color=line.get_color(), linewidth=1,
                        label=f"Theorem 3.8 ({sname}: alpha {sp['alpha']:.2f}, "
                              f"c {sp['cost_ratio_c']:.3f})")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("gamma (draft tokens per iteration)")
        ax.set_ylabel("speedup over the system's own autoregressive")
        ax.set_title(name)
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_controlled(results: dict, path: Path) -> Path | None:
    plt = _plt()
    pts = []
    for name, pair in (results.get("pairs") or {}).items():
        for sname, res in (pair.get("systems") or {}).items():
            for r in res.get("controlled") or []:
                if r.get("speedup") is not None and r.get("theoretical_improvement") is not None:
                    pts.append((f"{name} {sname}", r))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    for label in sorted({lbl for lbl, _ in pts}):
        rs = sorted((r for lbl, r in pts if lbl == label), key=lambda r: r["alpha_nominal"])
        xs = [r["alpha_nominal"] for r in rs]
        (line,) = ax.plot(xs, [r["speedup"] for r in rs], marker="o", label=f"{label} measured")
        ax.plot(xs, [r["theoretical_improvement"] for r in rs], linestyle="--",
                color=line.get_color(), label=f"{label} Theorem 3.8")
    ax.set_xlabel("alpha (controlled)")
    ax.set_ylabel("speedup over autoregressive")
    ax.legend(fontsize=6)
    return _save(fig, path)


def plot_verify_cost(results: dict, path: Path) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    drawn = False
    for name, pair in (results.get("pairs") or {}).items():
        for sname, res in (pair.get("systems") or {}).items():
            ratios = (res.get("costs") or {}).get("verify_over_step") or {}
            if ratios:
                gs = sorted(int(g) for g in ratios)
                ax.plot(gs, [ratios[str(g)] if str(g) in ratios else ratios[g] for g in gs],
                        marker="o", label=f"{name} {sname}")
                drawn = True
    if not drawn:
        _plt().close(fig)
        return None
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xlabel("gamma")
    ax.set_ylabel("target call on gamma + 1 tokens / on 1 token")
    ax.legend(fontsize=7)
    return _save(fig, path)


def make_plots(results_path: Path, out: Path = OUT) -> list[Path]:
    results = json.loads(results_path.read_text())
    stem = results_path.stem
    made = []
    for suffix, fn in (("tokens_per_s", plot_tokens_per_s), ("gamma_sweep", plot_gamma_sweep),
                       ("controlled_alpha", plot_controlled), ("verify_cost", plot_verify_cost)):
        p = fn(results, out / f"{stem}_{suffix}.png")
        if p is not None:
            made.append(p)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    for p in args.results:
        for made in make_plots(p, args.out):
            print(made)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
