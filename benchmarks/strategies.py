#!/usr/bin/env python
"""Drafting strategies side by side on one loaded pair, in one run.

    python -m benchmarks.strategies --pair-dir /tmp/qdbench/pairs/7b --device cuda \
        --json OUT/strategies_7b.json
    python -m benchmarks.strategies --smoke          # CPU, the bench smoke run's tiny pair

Strategies (the CLI's own drafters, built by ``Pair.drafter``): autoregressive; the draft
model at every fixed gamma of a sweep; ``--gamma auto`` (Theorem 3.8 from the running
alpha and the measured c); Hugging Face's ``num_assistant_tokens`` schedule; n-gram
lookup alone and with the draft model as fallback (``--drafter auto``, fixed and adaptive
gamma); hierarchical (the draft decoded speculatively by n-gram lookup, or by the third
model of a three-model folder); the bandit over them. Prompt sets (built in
:func:`prompt_sets`):

* ``plain``: the pair's prompts (random pairs: random ids; the trained pair: held-out
  windows of Python);
* ``copy``: prompts that hold what the target will write (random pairs: its own greedy
  continuation with one token in 24 changed, then the continuation's first tokens again;
  the trained pair: a held-out window, then its first tokens again);
* ``half``: the copied part covers only the first half of the output, so n-gram lookup's
  alpha drops within each generation;
* ``phased`` (random pairs): the controlled-alpha drafter with alpha 0.95 for the first
  half of the output and 0.4 after, the mix whose alpha changes within a generation.

Greedy, EOS ignored, every strategy's tokens checked against autoregressive decoding.
Runs alternate: each repeat runs every strategy once over the set, in a shuffled order;
tokens/s is the median over repeats of (set tokens / set seconds).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import dump_json, environment, load_json, log, median  # noqa: E402

MAX_GAMMA = 8
PHASES = ((0, 0.95), (0.5, 0.4))  # (fraction of the output, alpha from there on)


# ----------------------------------------------------------------------------- loading


def load(pair_dir: Path, device: str, cache_length: int, *, mid: bool, cuda_graph: bool):
    """The fast-path export of ``pair_dir`` as quickdraft Pairs: ``{"pair": target + draft
    (+ n-gram), "three": target + mid draft + the draft as its draft}`` (the latter with
    ``mid`` and a ``qd-mid`` export)."""
    from quickdraft.ort_backend import Pair, StaticOrtModel, resolve_device

    dev, note = resolve_device(device)
    graphs = bool(cuda_graph and dev.kind == "cuda")
    steps = tuple(range(1, MAX_GAMMA + 2))

    def model(folder: Path):
        return StaticOrtModel(folder, dev, cache_length=cache_length, graph_steps=steps,
                              cuda_graph=graphs)

    root = pair_dir / "qd-fast"
    target, draft = model(root / "target"), model(root / "draft")
    pairs = {"pair": Pair(target, draft, None, max_draft=MAX_GAMMA, device_note=note)}
    if mid and (pair_dir / "qd-mid" / "quickdraft.json").is_file():
        pairs["three"] = Pair(target, model(pair_dir / "qd-mid"), None, max_draft=MAX_GAMMA,
                              draft_draft=draft)
    return pairs, {"device": str(dev), "note": note, "cuda_graph": graphs,
                   "cache_length": cache_length}


def export_mid(pair_dir: Path, device: str) -> dict | None:
    """Export ``hf/mid`` (a larger draft made by ``benchmarks.models``) to ``qd-mid``."""
    from quickdraft.export.builder import export_static_model

    src, out = pair_dir / "hf" / "mid", pair_dir / "qd-mid"
    if not (src / "config.json").is_file() or (out / "quickdraft.json").is_file():
        return None
    t0 = time.perf_counter()
    dtype = "fp16" if device == "cuda" else "fp32"
    export_static_model(src, out, dtype=dtype, device=device, validate=False, overwrite=True)
    return {"seconds": round(time.perf_counter() - t0, 1), "dtype": dtype}


# ----------------------------------------------------------------------------- prompts


def edited(tokens: list[int], every: int, vocab: int, first: int) -> list[int]:
    """``tokens`` with one token in ``every`` replaced (a small change to copied text)."""
    out = list(tokens)
    for i in range(every // 2, len(out), every):
        out[i] = first + (out[i] - first + 1) % (vocab - first)
    return out


def prompt_sets(runner, info: dict, prompts: list[list[int]], long: list[list[int]],
                n: int, vocab: int) -> dict[str, list[list[int]]]:
    """The prompt sets of the module docstring."""
    head = 8  # tokens of the copied text repeated at the end of the prompt
    if info.get("kind") == "random":
        # the target is a bigram in effect: its continuation depends on the last token
        walks = [runner.autoregressive(p, n + head + 8)[0] for p in prompts]
        copy = [edited(w[: n + head + 8], 24, vocab, 3) + w[:head] for w in walks]
        half = [edited(w[: head + n // 2], 24, vocab, 3) + w[:head] for w in walks]
        return {"plain": prompts, "copy": copy, "half": half, "phased": prompts}
    long = long or [sum(prompts, [])]
    copy = [w + w[:head] for w in long]
    half = [w[: head + n // 2] + w[:head] for w in long]
    return {"plain": prompts, "copy": copy, "half": half}


# ----------------------------------------------------------------------------- strategies


def strategies(pairs: dict, set_name: str, sampling, *, phased: bool) -> dict:
    """name -> (drafter factory(prompt, greedy continuation) or None for autoregressive)."""
    from benchmarks.controlled import ControlledAlphaDrafter
    from quickdraft import drafters

    pair = pairs["pair"]
    out: dict = {"autoregressive": None}
    if phased:
        def controlled(g):
            def make(prompt, ref, i):
                phases = [(int(f * len(ref)), a) for f, a in PHASES]
                return ControlledAlphaDrafter(pair.draft, prompt, ref, phases[0][1],
                                              np.random.default_rng([7, i]), gamma=g,
                                              phases=phases)
            return make

        for g in range(1, MAX_GAMMA + 1):
            out[f"gamma {g}"] = controlled(g)
        base = controlled(MAX_GAMMA)
        out["gamma auto"] = lambda p, r, i: drafters.AdaptiveGammaDrafter(
            base(p, r, i), max_gamma=MAX_GAMMA)
        out["heuristic (HF)"] = lambda p, r, i: drafters.HeuristicGammaDrafter(
            base(p, r, i), max_gamma=MAX_GAMMA)
        return out

    def cli(p, gamma, kind):
        return lambda prompt, ref, i: p.drafter(sampling, gamma, kind, seed=i)

    for g in range(1, MAX_GAMMA + 1):
        out[f"gamma {g}"] = cli(pair, g, "model")
    out["gamma auto"] = cli(pair, "auto", "model")
    out["heuristic (HF)"] = lambda prompt, ref, i: drafters.HeuristicGammaDrafter(
        pair.drafter(sampling, MAX_GAMMA, "model"), max_gamma=MAX_GAMMA)
    out["ngram"] = cli(pair, MAX_GAMMA, "ngram")
    out["ngram+draft gamma 4"] = cli(pair, 4, "auto")
    out["ngram+draft auto"] = cli(pair, "auto", "auto")
    out["hierarchical (draft / ngram)"] = cli(pair, MAX_GAMMA, "hierarchical")

    out["bandit"] = cli(pair, "auto", "bandit")
    three = pairs.get("three")
    if three is not None and set_name == "plain":
        for g in (1, 2, 3, 4, 6, 8):
            out[f"mid draft gamma {g}"] = cli(three, g, "model")
        out["mid draft auto"] = cli(three, "auto", "model")
        for g in (2, 4, 6, 8):
            out[f"hierarchical (mid / draft) gamma {g}"] = cli(three, g, "hierarchical")
        out["bandit (three models)"] = cli(three, "auto", "auto")
    return out


def describe(drafter) -> dict:
    """What a drafter chose, for the record (gamma per iteration, arms, fallbacks)."""
    from quickdraft import drafters

    out: dict = {}
    if isinstance(drafter, drafters.BanditDrafter):
        plays = drafter.plays
        out["plays"] = {a: plays.count(a) for a in drafter.arms}
    if isinstance(drafter, drafters.FallbackDrafter):
        out["used"] = dict(drafter.used)
    if isinstance(drafter, (drafters.AdaptiveGammaDrafter, drafters.HeuristicGammaDrafter)):
        chosen = drafter.chosen
        out["mean_gamma"] = float(np.mean(chosen)) if chosen else None
    return out


# ----------------------------------------------------------------------------- measuring


def run_set(runner, prompts, refs, table: dict, n: int, repeats: int, rng, log_prefix: str):
    """Every strategy of ``table`` over ``prompts``, ``repeats`` alternating rounds."""
    rows: dict[str, dict] = {name: {"times": [], "mismatches": 0, "stats": []}
                             for name in table}
    for r in range(repeats):
        order = list(table)
        rng.shuffle(order)
        for name in order:
            make = table[name]
            t_set, toks, accepted, drafted, iters, extra = 0.0, 0, 0, 0, 0, []
            try:
                for i, (p, ref) in enumerate(zip(prompts, refs)):
                    if make is None:
                        tokens, s = runner.autoregressive(p, n)
                    else:
                        drafter = make(p, ref, i)
                        tokens, s = runner.speculative(p, n, MAX_GAMMA, drafter=drafter)
                        accepted += sum(s["accepted_per_iteration"])
                        drafted += sum(s["drafted_per_iteration"])
                        iters += s["iterations"]
                        extra.append(describe(drafter))
                    t_set += s["total_s"]
                    toks += s["new_tokens"]
                    rows[name]["mismatches"] += int(list(tokens) != list(ref))
            except Exception as e:  # noqa: BLE001 - record and go on
                rows[name]["error"] = f"{type(e).__name__}: {e}"[:400]
                log(f"{log_prefix} {name}: {rows[name]['error']}")
                continue
            rows[name]["times"].append(t_set)
            rows[name]["tokens"] = toks
            if r == repeats - 1 and make is not None:
                rows[name]["stats"] = {
                    "acceptance_rate": accepted / drafted if drafted else None,
                    "tokens_per_iteration": toks / iters if iters else None,
                    "draft_tokens_per_iteration": drafted / iters if iters else None,
                    "drafters": extra}
    out = {}
    for name, row in rows.items():
        t = median(row["times"])
        out[name] = {"tokens_per_s": row["tokens"] / t if t else None,
                     "times_s": [round(x, 5) for x in row["times"]],
                     "mismatches": row["mismatches"], **({"error": row["error"]}
                                                         if "error" in row else {}),
                     **(row["stats"] or {})}
    ar = out["autoregressive"]["tokens_per_s"]
    for row in out.values():
        row["speedup"] = row["tokens_per_s"] / ar if ar and row["tokens_per_s"] else None
    return out


def summarize(results: dict) -> dict:
    """The issue's comparisons per set: best fixed gamma, adaptive, heuristic, n-gram,
    hierarchical and bandit against each other."""
    out = {}
    for set_name, rows in results.items():
        fixed = {k: v["tokens_per_s"] for k, v in rows.items()
                 if k.startswith("gamma ") and k != "gamma auto" and v["tokens_per_s"]}
        if not fixed:
            continue
        best = max(fixed, key=fixed.get)

        def tps(k, rows=rows):
            return (rows.get(k) or {}).get("tokens_per_s")

        def ratio(a, b):
            return tps(a) / b if tps(a) and b else None

        singles = {k: tps(k) for k in rows if k not in ("autoregressive", "bandit")
                   and not k.startswith(("mid ", "hierarchical (mid", "bandit ")) and tps(k)}
        best_single = max(singles, key=singles.get) if singles else None
        two_model = {k: tps(k) for k in rows if (k.startswith("gamma ") or
                                                  k.startswith("mid draft")) and tps(k)}
        hier = {k: tps(k) for k in rows if k.startswith("hierarchical") and tps(k)}
        out[set_name] = {
            "best_fixed": best, "best_fixed_tokens_per_s": fixed[best],
            "auto_over_best_fixed": ratio("gamma auto", fixed[best]),
            "auto_over_gamma_4": ratio("gamma auto", fixed.get("gamma 4")),
            "heuristic_over_best_fixed": ratio("heuristic (HF)", fixed[best]),
            "ngram_fallback_over_ar": ratio("ngram+draft gamma 4", tps("autoregressive")),
            "ngram_fallback_auto_over_ar": ratio("ngram+draft auto", tps("autoregressive")),
            "ngram_fallback_over_draft_gamma_4": ratio("ngram+draft gamma 4",
                                                       fixed.get("gamma 4")),
            "best_single": best_single,
            "bandit_over_best_single": ratio("bandit", singles[best_single])
            if best_single else None,
            "best_two_model": max(two_model, key=two_model.get) if two_model else None,
            "best_hierarchical": max(hier, key=hier.get) if hier else None,
            "hierarchical_over_best_two_model": (max(hier.values()) / max(two_model.values())
                                                 if hier and two_model else None),
        }
    return out


def table_md(results: dict) -> str:
    from tabulate import tabulate

    lines = []
    for set_name, rows in results.items():
        body = [[name, r["tokens_per_s"], r["speedup"], r.get("acceptance_rate"),
                 r.get("tokens_per_iteration"), r["mismatches"], r.get("error", "")]
                for name, r in rows.items()]
        lines.append(f"\n{set_name}\n")
        lines.append(tabulate(body, headers=["strategy", "tok/s", "speedup", "accept",
                                             "tokens/iter", "mismatches", "error"],
                              tablefmt="github", floatfmt=".3f"))
    return "\n".join(lines)


def report(paths: list[Path]) -> str:
    """One Markdown table over strategies result files: per pair and prompt set, tokens/s
    of autoregressive decoding and of each strategy's row, as ratios the targets use."""
    from tabulate import tabulate

    def x(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    body = []
    for path in paths:
        data = load_json(path) or {}
        name = Path(path).stem.replace("h200_strategies_", "")
        for set_name, entry in (data.get("sets") or {}).items():
            rows = entry["rows"]
            s = summarize({set_name: rows}).get(set_name, {})

            def tps(k, rows=rows):
                return (rows.get(k) or {}).get("tokens_per_s")

            ar, best = tps("autoregressive"), s.get("best_fixed_tokens_per_s")
            body.append([
                name, set_name, f"{ar:.0f}" if ar else "-",
                f"{s.get('best_fixed', '-').replace('gamma ', 'γ')}: {x(best, ar)}",
                x(tps("gamma 4"), ar), x(tps("gamma auto"), best),
                x(tps("gamma auto"), tps("gamma 4")),
                x(tps("heuristic (HF)"), best), x(tps("ngram"), ar),
                x(tps("ngram+draft auto"), ar), x(tps("ngram+draft gamma 4"), tps("gamma 4")),
                x(max([tps(k) or 0 for k in rows if k.startswith("hierarchical")] or [0]) or None,
                  max(tps(k) or 0 for k in rows if k.startswith(("gamma ", "mid draft")))),
                x(tps("bandit"), (rows.get(s.get("best_single")) or {}).get("tokens_per_s"))])
    return tabulate(body, tablefmt="github", headers=[
        "pair", "prompts", "AR tok/s", "best fixed γ (x AR)", "γ4 x AR", "auto x best fixed",
        "auto x γ4", "HF x best fixed", "ngram x AR", "ngram+draft auto x AR",
        "ngram+draft γ4 x γ4", "best hierarchical x best two-model", "bandit x best single"])


# ----------------------------------------------------------------------------- main


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair-dir", type=Path, default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sets", default="plain,copy,half,phased")
    ap.add_argument("--mid", action="store_true",
                    help="also the three-model rows (needs hf/mid, exported to qd-mid)")
    ap.add_argument("--export-mid-only", action="store_true")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--report", type=Path, nargs="+", default=None,
                    help="print the summary table of these result files and exit")
    a = ap.parse_args(argv)
    if a.report:
        return a
    if a.smoke:
        a.device, a.new_tokens, a.repeats = "cpu", 16, 1
        a.pair_dir = a.pair_dir or Path("/tmp/qdbench-smoke/pairs/tiny")
    if a.pair_dir is None:
        ap.error("--pair-dir is required (or --smoke)")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.report:
        print(report(a.report))
        return 0
    from benchmarks.adapters import Runner, greedy
    from benchmarks.models import prompts_of

    out = {"command": "python -m benchmarks.strategies " + shlex.join(argv),
           "environment": environment(), "pair": str(a.pair_dir), "sets": {}}
    info = load_json(a.pair_dir / "pair.json") or {}
    out["pair_info"] = {k: info.get(k) for k in ("name", "kind", "vocab_size", "target",
                                                  "draft", "mid", "heldout")}
    save = (lambda: dump_json(a.json, out)) if a.json else (lambda: None)
    if a.mid or a.export_mid_only:
        out["export_mid"] = export_mid(a.pair_dir, a.device)
        save()
        if a.export_mid_only:
            return 0
    prompts = prompts_of(a.pair_dir)
    if info.get("kind") == "random" and len(prompts) < 2:
        from benchmarks.models import random_prompts
        prompts = prompts + random_prompts(int(info["vocab_size"]), 2 - len(prompts),
                                           len(prompts[0]), seed=7)
    long = (load_json(a.pair_dir / "prompts.json") or {}).get("long") or []
    longest = max([len(p) for p in prompts + long] + [32]) + a.new_tokens
    cache = 64 * -(-(2 * longest + 2 * (MAX_GAMMA + 1)) // 64)
    t0 = time.perf_counter()
    pairs, out["load"] = load(a.pair_dir, a.device, cache, mid=a.mid,
                              cuda_graph=not a.no_cuda_graph)
    out["load"]["seconds"] = round(time.perf_counter() - t0, 1)
    sampling = greedy()
    runner = Runner(pairs["pair"].target, pairs["pair"].draft, sampling=sampling)
    vocab = int(pairs["pair"].target.vocab_size)
    sets = prompt_sets(runner, info, prompts, long, a.new_tokens, vocab)
    rng = np.random.default_rng(0)
    results = {}
    for set_name in [s for s in a.sets.split(",") if s in sets]:
        ps = sets[set_name]
        refs = [runner.autoregressive(p, a.new_tokens)[0] for p in ps]
        table = strategies(pairs, set_name, sampling, phased=set_name == "phased")
        t1 = time.perf_counter()
        # warm-up: one short generation of each strategy (CUDA graph capture)
        run_set(runner, ps[:1], [r[:16] for r in refs[:1]], table, 16, 1, rng, "warm-up")
        results[set_name] = run_set(runner, ps, refs, table, a.new_tokens, a.repeats, rng,
                                    set_name)
        out["sets"][set_name] = {"prompts": len(ps), "prompt_lengths": [len(p) for p in ps],
                                 "seconds": round(time.perf_counter() - t1, 1),
                                 "rows": results[set_name]}
        out["summary"] = summarize(results)
        save()
        log(f"{a.pair_dir.name} {set_name}: {time.perf_counter() - t1:.0f}s")
    text = table_md(results)
    out["table"] = text
    save()
    print(text)
    for k, v in out.get("summary", {}).items():
        print(k, {x: (round(y, 3) if isinstance(y, float) else y) for x, y in v.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
