#!/usr/bin/env python3
"""Draw the documentation's plots from quickdraft.theory and the benchmark JSON.

    python scripts/make_plots.py                 # theory + benchmark plots -> docs/assets/
    python scripts/make_plots.py --out DIR       # somewhere else
    python scripts/make_plots.py --only theory   # or: --only benchmarks
    python scripts/make_plots.py --run benchmarks/results/h100_run4.json   # one bench.py run
                                                 # -> docs/assets/benchmarks/<stem>_*.png

Deterministic: the Agg backend, fixed sizes and DPI, and no timestamp or software tag in
the PNG metadata, so rerunning it on the same matplotlib gives the same files.

Benchmark results are read from ``benchmarks/results/*.json``. Their format is not fixed
yet, so the reader is tolerant: a file is a list of records, or an object holding such a
list (under "results", "records", "runs" or "data"); a record is an object with a numeric
``gamma`` and at least one metric among ``speedup``, ``walltime_improvement``,
``tokens_per_second`` (also ``tokens_per_s``, ``tok_per_s``). Records are grouped into
lines by the first of ``label``, ``name``, ``pair``, ``model``, ``backend``, ``device``
they carry. Where a group's records carry ``alpha`` and ``c``, the Theorem 3.8 prediction
is drawn beside the measurement. Files or records it cannot read are skipped with a note;
with no results at all it draws nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from quickdraft import theory  # noqa: E402

ASSETS = ROOT / "docs" / "assets"
RUN_ASSETS = ASSETS / "benchmarks"  # plots of bench.py results files (make_run_plots)
RESULTS = ROOT / "benchmarks" / "results"

DPI = 110
SIZE = (6.4, 4.2)
RUN_SIZE = (7.0, 4.2)
PNG_METADATA = {"Software": None}  # no matplotlib version tag: same bytes on rerun

GAMMAS_FOR_TOKENS = (1, 2, 3, 5, 7, 10)
CS_FOR_WALLTIME = (0.0, 0.05, 0.1, 0.2, 0.4)
ALPHAS_FOR_WALLTIME = (0.6, 0.8, 0.9)
ALPHAS_FOR_OPERATIONS = (0.5, 0.6, 0.7, 0.8, 0.9)

METRICS = {  # key in a record -> axis label
    "speedup": "speedup over autoregressive (measured)",
    "walltime_improvement": "walltime improvement (measured)",
    "tokens_per_second": "tokens per second",
    "tokens_per_s": "tokens per second",
    "tok_per_s": "tokens per second",
}
LABEL_KEYS = ("label", "name", "pair", "model", "backend", "device")
LIST_KEYS = ("results", "records", "runs", "data")


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _save(fig, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def plot_expected_tokens(out: Path) -> Path:
    """Eq. 1: expected tokens per iteration against alpha, one line per gamma."""
    alphas = np.linspace(0.0, 0.99, 199)
    fig, ax = plt.subplots(figsize=SIZE)
    for g in GAMMAS_FOR_TOKENS:
        ax.plot(alphas, [theory.expected_tokens(a, g) for a in alphas], label=f"γ = {g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=1)
    ax.legend(title="draft tokens", loc="upper left")
    _style(ax, r"Expected tokens per iteration, $(1-\alpha^{\gamma+1})\,/\,(1-\alpha)$ (Eq. 1)",
           "α (expected acceptance rate)", "tokens per target call")
    return _save(fig, out / "expected_tokens.png")


def plot_walltime(out: Path) -> Path:
    """Theorem 3.8: walltime improvement against gamma, one line per c, a panel per alpha."""
    gammas = np.arange(1, 21)
    fig, axes = plt.subplots(1, len(ALPHAS_FOR_WALLTIME), figsize=(11.5, 4.0), sharey=True)
    for ax, a in zip(axes, ALPHAS_FOR_WALLTIME, strict=True):
        for c in CS_FOR_WALLTIME:
            ys = [theory.walltime_improvement(a, int(g), c) for g in gammas]
            (line,) = ax.plot(gammas, ys, marker="o", markersize=3, label=f"c = {c:g}")
            best = theory.best_gamma(a, c)
            if best <= gammas[-1]:
                ax.plot([best], [theory.walltime_improvement(a, best, c)], marker="*",
                        markersize=11, color=line.get_color())
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([1, 5, 10, 15, 20])
        _style(ax, f"α = {a}", "γ (draft tokens per iteration)",
               "walltime improvement" if ax is axes[0] else "")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="c (cost of a draft call / a target call)",
               loc="lower center", ncol=len(CS_FOR_WALLTIME), frameon=False)
    fig.suptitle("Walltime improvement (Theorem 3.8); ★ marks the best γ", fontsize=12)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(fig, out / "walltime_improvement.png", tight=False)


def plot_best_gamma(out: Path) -> Path:
    """The best integer gamma against alpha, one line per c."""
    alphas = np.linspace(0.3, 0.95, 131)
    fig, ax = plt.subplots(figsize=SIZE)
    for c in (0.01, 0.02, 0.05, 0.1, 0.2):
        ax.step(alphas, [theory.best_gamma(a, c) for a in alphas], where="post",
                label=f"c = {c:g}")
    ax.set_yscale("log", base=2)
    ax.set_yticks([1, 2, 4, 8, 16, 32])
    ax.set_yticklabels(["1", "2", "4", "8", "16", "32"])
    ax.legend(title="cost ratio", loc="upper left")
    _style(ax, "The γ that maximises the walltime improvement", "α", "best γ")
    return _save(fig, out / "best_gamma.png")


def plot_operations(out: Path) -> Path:
    """Theorem 3.11: the operations factor against gamma (c_hat = 0), one line per alpha."""
    gammas = np.arange(1, 21)
    fig, ax = plt.subplots(figsize=SIZE)
    for a in ALPHAS_FOR_OPERATIONS:
        ax.plot(gammas, [theory.operations_factor(a, int(g)) for g in gammas], marker="o",
                markersize=3, label=f"α = {a}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([1, 5, 10, 15, 20])
    ax.legend(loc="upper left")
    _style(ax, r"Operations relative to autoregressive (Theorem 3.11, $\hat{c} = 0$)",
           "γ (draft tokens per iteration)", "operations factor")
    return _save(fig, out / "operations_factor.png")


def plot_hierarchical(out: Path) -> Path:
    """Two levels against the best two-model configurations, as the draft's cost grows:
    target p, draft q (alpha 0.8 against p), a draft of the draft r (alpha 0.8 against q,
    0.6 against p, cost 0.01 of a target call)."""
    c_draft = np.linspace(0.01, 0.6, 60)
    a_pq, a_qr, a_pr, c_r = 0.8, 0.8, 0.6, 0.01
    with_q = [theory.walltime_improvement(a_pq, theory.best_gamma(a_pq, c), c) for c in c_draft]
    with_r = theory.walltime_improvement(a_pr, theory.best_gamma(a_pr, c_r), c_r)
    two_level = [theory.best_hierarchical(a_pq, c, a_qr, c_r, 16)[2] for c in c_draft]
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot(c_draft, with_q, label="p with q (best γ)")
    ax.plot(c_draft, [with_r] * len(c_draft), linestyle="--", label="p with r (best γ)")
    ax.plot(c_draft, two_level, label="p with q, q decoded by r (best γ, γ₂)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.legend(loc="upper right")
    _style(ax, "Hierarchical drafting: α(p,q) = α(q,r) = 0.8, α(p,r) = 0.6, c_r = 0.01",
           "c_q (cost of a draft call / a target call)", "walltime improvement")
    return _save(fig, out / "hierarchical.png")


def make_theory_plots(out: Path = ASSETS) -> list[Path]:
    """Every theory plot, into ``out``. Returns the files written."""
    out = Path(out)
    return [plot_expected_tokens(out), plot_walltime(out), plot_best_gamma(out),
            plot_operations(out), plot_hierarchical(out)]


# ----------------------------------------------------------------------------- benchmarks
# one results file of benchmarks/bench.py (pairs, systems, sweeps): its own plots


def plot_tokens_per_s(results: dict, path: Path) -> Path | None:
    from benchmarks.report import system_rows

    pairs = [(n, p) for n, p in (results.get("pairs") or {}).items() if p.get("systems")]
    if not pairs:
        return None
    fig, axes = plt.subplots(1, len(pairs), squeeze=False,
                             figsize=(RUN_SIZE[0] * max(1, len(pairs)) / 1.6, RUN_SIZE[1]))
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
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, path)


def plot_gamma_sweep(results: dict, path: Path) -> Path | None:
    pairs = [(n, p) for n, p in (results.get("pairs") or {}).items()
             if any(s.get("sweep") for s in (p.get("systems") or {}).values())]
    if not pairs:
        return None
    fig, axes = plt.subplots(1, len(pairs), squeeze=False,
                             figsize=(RUN_SIZE[0] * max(1, len(pairs)) / 1.6, RUN_SIZE[1]))
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
    pts = []
    for name, pair in (results.get("pairs") or {}).items():
        for sname, res in (pair.get("systems") or {}).items():
            for r in res.get("controlled") or []:
                if r.get("speedup") is not None and r.get("theoretical_improvement") is not None:
                    pts.append((f"{name} {sname}", r))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=RUN_SIZE)
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
    fig, ax = plt.subplots(figsize=RUN_SIZE)
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
        plt.close(fig)
        return None
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xlabel("gamma")
    ax.set_ylabel("target call on gamma + 1 tokens / on 1 token")
    ax.legend(fontsize=7)
    return _save(fig, path)


def make_run_plots(results_path: Path, out: Path = RUN_ASSETS) -> list[Path]:
    """The plots of one ``benchmarks/bench.py`` results file (``<stem>_tokens_per_s``,
    ``_gamma_sweep``, ``_controlled_alpha``, ``_verify_cost``; one without data is not
    drawn) into ``out``. Returns the files written."""

    results = json.loads(Path(results_path).read_text())
    stem = results_path.stem
    made = []
    for suffix, fn in (("tokens_per_s", plot_tokens_per_s), ("gamma_sweep", plot_gamma_sweep),
                       ("controlled_alpha", plot_controlled), ("verify_cost", plot_verify_cost)):
        p = fn(results, Path(out) / f"{stem}_{suffix}.png")
        if p is not None:
            made.append(p)
    return made


# any results file: metrics against gamma, read tolerantly


def _records(data) -> list[dict]:
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for key in LIST_KEYS:
            if isinstance(data.get(key), list):
                return [r for r in data[key] if isinstance(r, dict)]
    return []


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _label(record: dict) -> str:
    for key in LABEL_KEYS:
        if key in record and isinstance(record[key], (str, int, float)):
            return str(record[key])
    return "results"


def plot_benchmark_file(path: Path, out: Path, log=print) -> list[Path]:
    """Plot each metric of one results file against gamma. Returns the files written."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log(f"skip {path}: not readable JSON ({e})")
        return []
    records = [r for r in _records(data) if _number(r.get("gamma")) is not None]
    if not records:
        log(f"skip {path}: no records with a numeric 'gamma'")
        return []
    written = []
    for metric, ylabel in METRICS.items():
        groups: dict[str, list[tuple[float, float, dict]]] = {}
        for r in records:
            y = _number(r.get(metric))
            if y is not None:
                groups.setdefault(_label(r), []).append((_number(r["gamma"]), y, r))
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=SIZE)
        for label in sorted(groups):
            pts = sorted(groups[label], key=lambda t: t[0])
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            predicted = [
                (g, theory.walltime_improvement(a, int(g), c))
                for g, _, r in pts
                if (a := _number(r.get("alpha"))) is not None and 0 <= a <= 1
                and (c := _number(r.get("c"))) is not None and c >= 0 and g >= 1
            ]
            if predicted and metric in ("speedup", "walltime_improvement"):
                ax.plot([p[0] for p in predicted], [p[1] for p in predicted], linestyle="--",
                        color=line.get_color(), label=f"{label}: Theorem 3.8 from its α, c")
        if metric in ("speedup", "walltime_improvement"):
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.legend(fontsize=8)
        _style(ax, f"{Path(path).stem}: {metric}", "γ", ylabel)
        written.append(_save(fig, Path(out) / f"benchmark_{Path(path).stem}_{metric}.png"))
    if not written:
        log(f"skip {path}: records carry none of {', '.join(METRICS)}")
    return written


def make_benchmark_plots(results: Path = RESULTS, out: Path = ASSETS, log=print) -> list[Path]:
    """Plot every ``results/*.json`` into ``out``; nothing (and no error) if there is none."""
    files: Iterable[Path] = sorted(Path(results).glob("*.json")) if Path(results).is_dir() else []
    written = []
    for path in files:
        written += plot_benchmark_file(path, Path(out), log=log)
    if not written:
        log(f"no benchmark plots: no usable results in {results}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="folder for the PNGs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="benchmark JSON folder")
    parser.add_argument("--only", choices=["theory", "benchmarks"], help="draw only one kind")
    parser.add_argument("--run", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="draw the plots of these bench.py results files only (into "
                             "--out, default docs/assets/benchmarks/)")
    args = parser.parse_args(argv)
    if args.run:
        out = RUN_ASSETS if args.out == ASSETS else args.out
        for path in args.run:
            for made in make_run_plots(path, out):
                print(made)
        return 0
    written = []
    if args.only in (None, "theory"):
        written += make_theory_plots(args.out)
    if args.only in (None, "benchmarks"):
        written += make_benchmark_plots(args.results, args.out)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
