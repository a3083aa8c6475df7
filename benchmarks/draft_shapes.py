#!/usr/bin/env python
"""Draft shapes for one trained target: held-out alpha, c and the measured speedup.

For each shape HIDDENxLAYERS (heads of 64), a draft is distilled from the target of a pair
that ``benchmarks/train_pair.py`` trained (``train_pair.distill_draft``: the pair's own
draft recipe and windows, for ``--draft-seconds``), its held-out alpha measured on the
pair's held-out windows, and it is exported alone beside the pair's exported target. Then
quickdraft's fast path measures every draft as bench.py's ``qd-fast`` system does
(autoregressive decoding, the per-call costs and c, speculative decoding at ``--gamma``
and over the gamma sweep, sampled rows, pipelined rows), the pair's own draft first, all
in one run. A draft costs what its kernels cost, not what its weights weigh, so fewer,
wider layers may buy alpha for little c; the speedup decides.

    python3 benchmarks/draft_shapes.py --pair-dir /tmp/qdbench/pairs/trained \\
        --shapes 512x1,512x2,768x1 --draft-seconds 100 --out runs/shapes

``--samples N`` adds, after each shape, the same shape distilled with half of every batch
from N continuations the target writes (``train_pair --draft-samples``; written once,
kept in the work folder for every shape): row ``SHAPE+samples``, the same budget or steps;
with ``--samples-only``, only those rows. ``--divergences kl,tvd`` distills every row once
per divergence of the draft loss (``training.DIVERGENCES``: KL(p || q), or the total
variation, 1 - alpha at T=1), rows ``SHAPE+kl`` and ``SHAPE+tvd``; without it, the pair's.

The pair needs its exported fast path (``bench.py --stages export``) and the token
streams its training kept (``streams.npz``). Writes ``OUT/draft_shapes.json`` (after
every task) and ``OUT/draft_shapes.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import (  # noqa: E402
    MIN_SECONDS,
    add_measure_options,
    parse_measure_options,
    qd_spec,
)
from benchmarks.common import dump_json, environment, load_json, log, run_worker  # noqa: E402
from benchmarks.report import fmt, greedy_cell, table  # noqa: E402

OWN = "own"  # the row of the pair's own draft
# seconds a shape needs beyond its training (the teacher's evaluation, the export, the
# measurement); a shape does not start with less budget left
OVERHEAD_SECONDS = 60.0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--pair-dir", type=Path, required=True,
                    help="a trained pair (train_pair.py's folder, with qd-fast/ exported)")
    ap.add_argument("--shapes", default="512x1,512x2,768x1",
                    help="comma list of HIDDENxLAYERS draft shapes, or targetxLAYERS (the "
                         "target's first layers, from its weights)")
    ap.add_argument("--draft-seconds", type=float, default=None,
                    help="training budget of each shape (default: the pair's draft budget)")
    ap.add_argument("--draft-steps", type=int, default=None, help="or a fixed step count")
    ap.add_argument("--samples", type=int, default=0,
                    help="also distill each shape with half of every batch from this many of "
                         "the target's continuations (row SHAPE+samples)")
    ap.add_argument("--sample-temperature", type=float, default=1.0,
                    help="the sampled half of those continuations (the rest greedy)")
    ap.add_argument("--sample-top-p", type=float, default=1.0)
    ap.add_argument("--sample-batch", type=int, default=1024,
                    help="continuations written at once")
    ap.add_argument("--samples-only", action="store_true",
                    help="with --samples, only the SHAPE+samples rows")
    ap.add_argument("--divergences", default=None,
                    help="comma list of draft-loss divergences (kl, tvd), a row each "
                         "(default: the pair's, no suffix)")
    ap.add_argument("--draft-lr", type=float, default=None,
                    help="peak learning rate of every shape (default: the pair's draft rate "
                         "times its hidden size over the shape's)")
    ap.add_argument("--out", type=Path, default=Path("runs/draft-shapes"))
    ap.add_argument("--work", type=Path, default=None,
                    help="the shapes' folders (default: PAIR_DIR/../PAIRNAME-shapes)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--budget", type=float, default=560.0,
                    help="seconds this run may spend: no task starts after it")
    add_measure_options(ap, samplings="1.0:1.0")
    a = ap.parse_args(argv)
    from benchmarks.train_pair import draft_shape

    try:
        a.shapes = {s.strip().lower(): draft_shape(s) for s in a.shapes.split(",") if s.strip()}
    except ValueError as e:
        raise SystemExit(f"--shapes: {e}") from None
    parse_measure_options(a)
    data = [("", None)]  # (row suffix, sample settings): the corpus alone
    if a.samples_only and not a.samples:
        raise SystemExit("--samples-only needs --samples N (the rows it keeps)")
    if a.samples:
        from benchmarks.train_pair import TrainConfig, check_samples

        settings = {"draft_samples": a.samples, "sample_temperature": a.sample_temperature,
                    "sample_top_p": a.sample_top_p, "sample_batch": a.sample_batch}
        try:
            check_samples(TrainConfig(**settings))
        except ValueError as e:
            raise SystemExit(str(e).replace("--draft-samples", "--samples")) from None
        data = [("+samples", settings)] if a.samples_only else [*data, ("+samples", settings)]
    divergences: list = [None]  # the pair's
    if a.divergences is not None:
        from benchmarks.training import DIVERGENCES

        divergences = [d.strip().lower() for d in a.divergences.split(",") if d.strip()]
        bad = [d for d in divergences if d not in DIVERGENCES]
        if bad or not divergences:
            raise SystemExit(f"--divergences: {', '.join(bad) or 'none given'}; use a comma "
                             f"list of {', '.join(sorted(DIVERGENCES))}")
    a.variants = [(name + suffix + (f"+{d}" if d else ""), shape, settings, d)
                  for name, shape in a.shapes.items() for suffix, settings in data
                  for d in dict.fromkeys(divergences)]
    a.alphas = []
    a.pair_dir = a.pair_dir.resolve()
    a.work = (a.work or a.pair_dir.parent / f"{a.pair_dir.name}-shapes").resolve()
    return a


def summary(name: str, draft: dict, qd: dict) -> dict:
    """One row: the draft's size and held-out alpha beside what the fast path measured."""
    costs, spec, best = qd.get("costs") or {}, qd.get("spec") or {}, qd.get("best_gamma") or {}
    row = {"shape": name, "parameters": draft.get("parameters"),
           "draft_fraction": draft.get("draft_fraction"),
           "training_steps": (draft.get("training") or {}).get("steps"),
           "divergence": (draft.get("training") or {}).get("divergence"),
           "lr": (draft.get("training") or {}).get("lr"),
           "alpha_T0_heldout": (draft.get("heldout") or {}).get("alpha_T0"),
           "alpha_T1_heldout": (draft.get("heldout") or {}).get("alpha_T1"),
           "alpha_T0_own_text": (draft.get("own_text") or {}).get("alpha_T0"),
           "alpha_T1_own_text": (draft.get("own_text") or {}).get("alpha_T1"),
           "draft_step_ms": (costs.get("draft_step_ms") or {}).get("1"),
           "c": costs.get("cost_ratio_c"),
           "ar_tokens_per_s": (qd.get("ar") or {}).get("tokens_per_s"),
           "gamma": spec.get("gamma"), "alpha": spec.get("alpha"),
           "speedup": spec.get("speedup"),
           "realized_over_theoretical": spec.get("realized_over_theoretical"),
           "best_gamma": best.get("measured"), "best_tokens_per_s": best.get("tokens_per_s"),
           "best_speedup": best.get("speedup"), "greedy_equal": spec.get("greedy_equal"),
           "mismatches": spec.get("mismatches"), "divergences": spec.get("divergences"),
           "status": qd.get("status")}
    row["sampled"] = [{"temperature": s["temperature"], "top_p": s["top_p"],
                       "gamma": s["gamma"], "speedup": (s.get("spec") or {}).get("speedup"),
                       "alpha": (s.get("spec") or {}).get("alpha")}
                      for s in qd.get("sampled") or []]
    row["pipelined"] = [{k: p.get(k) for k in ("gamma", "tokens_per_s", "speedup",
                                               "effective_c", "greedy_equal")}
                        for p in qd.get("pipelined") or []]
    return row


def _label(s: dict) -> str:
    top_p = "" if s["top_p"] == 1 else f", top-p {s['top_p']:g}"
    return f"T={s['temperature']:g}{top_p} gamma {s['gamma']}: speedup"


def render(rows: list[dict], gamma: int) -> str:
    sampled = list(dict.fromkeys(_label(s) for r in rows for s in r.get("sampled") or []))
    piped = list(dict.fromkeys(p["gamma"] for r in rows for p in r.get("pipelined") or []))
    headers = ["draft", "params (M)", "of target", "held-out alpha T=0 / T=1",
               "own-text alpha T=0 / T=1", "draft ms",
               "c", "AR tok/s", "alpha (loop)", f"speedup gamma {gamma}",
               "best gamma: speedup", *sampled,
               *[f"pipelined gamma {g}: speedup / effective c" for g in piped],
               "realized / theory", "greedy equal"]
    body = []
    for r in rows:
        body.append([r["shape"], fmt((r.get("parameters") or 0) / 1e6, ".1f"),
                     fmt(r.get("draft_fraction"), ".3f"),
                     f"{fmt(r.get('alpha_T0_heldout'), '.3f')} / "
                     f"{fmt(r.get('alpha_T1_heldout'), '.3f')}",
                     f"{fmt(r.get('alpha_T0_own_text'), '.3f')} / "
                     f"{fmt(r.get('alpha_T1_own_text'), '.3f')}",
                     fmt(r.get("draft_step_ms"), ".3f"), fmt(r.get("c"), ".3f"),
                     fmt(r.get("ar_tokens_per_s"), ".0f"), fmt(r.get("alpha"), ".3f"),
                     fmt(r.get("speedup"), ".2f"),
                     f"{fmt(r.get('best_gamma'), 'd')}: {fmt(r.get('best_speedup'), '.2f')}",
                     *[fmt(next((s["speedup"] for s in r.get("sampled") or []
                                 if _label(s) == k), None), ".2f") for k in sampled],
                     *[next((f"{fmt(p['speedup'], '.2f')} / {fmt(p['effective_c'], '.3f')}"
                             for p in r.get("pipelined") or [] if p["gamma"] == g), "-")
                       for g in piped],
                     fmt(r.get("realized_over_theoretical"), ".2f"),
                     greedy_cell(r)])
    return table(headers, body)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    t0 = time.monotonic()
    pair_info = load_json(a.pair_dir / "pair.json")
    if not pair_info or not (a.pair_dir / "qd-fast" / "target").is_dir():
        raise SystemExit(f"{a.pair_dir} needs pair.json and qd-fast/ (a trained pair, exported "
                         "by bench.py --stages train,export)")
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/draft_shapes.py " + shlex.join(argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(),
              "pair": str(a.pair_dir), "target_parameters": pair_info["target"]["parameters"],
              "draft_seconds": a.draft_seconds, "draft_steps": a.draft_steps,
              "rows": [], "runs": {}, "errors": []}
    out_json = a.out / "draft_shapes.json"

    def left() -> float:
        return a.budget - (time.monotonic() - t0)

    def task(kind: str, key: str, spec: dict) -> dict:
        if left() < MIN_SECONDS[kind]:
            res = {"status": "skipped", "wall_seconds": 0.0, "errors": [
                {"kind": "skipped", "message": f"skipped: {left():.0f}s of budget left"}]}
        else:
            res = run_worker(kind, key, spec, a.work / "tasks", timeout=left() - 3)
        result["runs"].setdefault(key.split("/")[0], {})[kind] = res
        result["errors"] += [{**e, "where": key} for e in res.get("errors") or []]
        log(f"{key}: {res.get('status')} in {res['wall_seconds']:.0f}s")
        return res

    def measured(name: str, folder: Path, draft: dict) -> None:
        qd = task("qd", f"{name}/qd-fast", qd_spec(a, folder, "fast", controlled=False))
        result["rows"].append(summary(name, draft, qd))
        dump_json(out_json, result)

    own = {**pair_info["draft"], "draft_fraction": pair_info.get("draft_fraction"),
           "heldout": pair_info.get("heldout"), "own_text": pair_info.get("own_text")}
    measured(OWN, a.pair_dir, own)
    seconds = a.draft_seconds or pair_info["config"]["draft_seconds"]
    own_steps = (pair_info["draft"].get("training") or {})
    per_step = own_steps.get("seconds", 0.0) / max(1, own_steps.get("steps") or 1)
    cached = False  # the first variant with samples writes them
    for name, shape, samples, divergence in a.variants:
        need = (a.draft_steps * per_step if a.draft_steps else seconds) + OVERHEAD_SECONDS
        if samples and not cached:  # the target writes ~50,000 tokens a second on the H200
            need += samples["draft_samples"] * pair_info["config"]["sample_tokens"] / 50_000
        if left() < need:
            result["errors"].append({"kind": "skipped", "where": name,
                                     "message": f"{left():.0f}s of budget left, {need:.0f}s "
                                                "needed"})
            log(f"skip {name}: {left():.0f}s of budget left")
            continue
        folder = a.work / name
        res = task("distill", f"{name}/distill", {
            "pair_dir": str(a.pair_dir), "out_dir": str(folder), "shape": shape,
            "device": a.device, "seconds": None if a.draft_steps else seconds,
            "steps": a.draft_steps, "lr": a.draft_lr, "samples": samples,
            "divergence": divergence,
            "samples_cache": str(a.work / "target_samples.npz")})
        cached = cached or bool(samples and res.get("status") == "ok")
        if res.get("status") != "ok" or "export" not in res:
            dump_json(out_json, result)
            continue
        measured(name, folder, res["draft"])
    result["seconds"] = round(time.monotonic() - t0, 1)
    dump_json(out_json, result)
    text = render(result["rows"], a.gamma)
    (a.out / "draft_shapes.md").write_text(f"`{result['command']}`\n\n{text}\n")
    print("\n" + text, flush=True)
    errors = [e for e in result["errors"] if e.get("kind") == "error"]
    log(f"done in {result['seconds']:.0f}s: {len(errors)} errors, results in {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
