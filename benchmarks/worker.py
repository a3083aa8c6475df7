"""One benchmark task in a process of its own (started by ``benchmarks/bench.py``).

    python -m benchmarks.worker TASK SPEC.json RESULT.json

A fresh process per task keeps the systems apart (one's allocator pools do not count in
another's peak memory; a crash or a hang costs one task) and lets the orchestrator kill a
task at its time limit. The result file is rewritten after every step, so a killed task
still leaves what it measured. Tasks: bandwidth, train, make, export, distill,
genai-build, qd, genai, hf.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    AUTO_RATE,
    GpuMemory,
    Record,
    Unavailable,
    dump_json,
    load_json,
    log,
    median,
    rate,
    timed_runs,
)

# ----------------------------------------------------------------------------- helpers


def _record_best_gamma(rec, sweep: list[dict]) -> None:
    """The fastest gamma of a sweep (and Theorem 3.8's best, where the run gave it)."""
    if not sweep:
        return
    best = max(sweep, key=lambda r: r["tokens_per_s"] or 0)
    rec.set("best_gamma", {"measured": best["gamma"], "tokens_per_s": best["tokens_per_s"],
                           "speedup": best.get("speedup"),
                           "theory": best.get("best_gamma_theory")})


def _f(x) -> float:
    """A number for a format string: None -> nan."""
    return float("nan") if x is None else float(x)


def _slim(stats: dict) -> dict:
    """Statistics without the per-iteration lists (they are summarized elsewhere)."""
    drop = {"accepted_per_iteration", "drafted_per_iteration", "beta_per_position"}
    return {k: v for k, v in stats.items() if k not in drop}


def _cuda_sync(device: str):
    if device != "cuda":
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.synchronize
    except ImportError:
        pass
    return None


# ----------------------------------------------------------------------------- tasks


def task_bandwidth(spec: dict, rec: Record) -> None:
    """Device memory bandwidth: a large device-to-device copy, (read + written) / time."""
    if spec["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA device")
        nbytes = int(spec.get("bytes", 2 << 30))
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        method = "torch: device-to-device copy_ of a uint8 tensor, CUDA events"
        name = torch.cuda.get_device_name(0)
    else:
        import numpy as np

        nbytes = int(spec.get("bytes", 64 << 20))
        src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - t0)
        method = "numpy copyto on the CPU (smoke only)"
        name = "cpu"
    best, med = min(times), median(times)
    rec.set("bandwidth", {
        "bytes_copied": nbytes, "method": method, "device_name": name,
        "gbps_median": 2 * nbytes / med / 1e9, "gbps_max": 2 * nbytes / best / 1e9,
        "times_s": times})
    log(f"bandwidth: {2 * nbytes / med / 1e9:.0f} GB/s median, {2 * nbytes / best / 1e9:.0f} max")


def task_train(spec: dict, rec: Record) -> None:
    from benchmarks.train_pair import SMOKE, TrainConfig, train_pair

    cfg = TrainConfig(**(SMOKE if spec.get("smoke") else {}))
    for k, v in (spec.get("overrides") or {}).items():
        if v is not None:
            setattr(cfg, k, v)
    rec.set("pair", train_pair(Path(spec["pair_dir"]), cfg, spec["device"]))


def task_make(spec: dict, rec: Record) -> None:
    from benchmarks.models import make_random_pair

    rec.set("pair", make_random_pair(spec["name"], Path(spec["pair_dir"]),
                                     device=spec["device"], num_prompts=spec["num_prompts"],
                                     prompt_len=spec["prompt_len"],
                                     agreement=float(spec.get("agreement", 0.8))))


def task_export(spec: dict, rec: Record) -> None:
    from benchmarks import adapters

    pair = Path(spec["pair_dir"])
    out = pair / f"qd-{spec['path']}"
    rec.set("export", adapters.export(spec["path"], pair / "hf" / "target", pair / "hf" / "draft",
                                      out, device=spec["device"],
                                      validate=bool(spec.get("validate")),
                                      fuse_gate_up=spec.get("fuse_gate_up"),
                                      transpose_weights=spec.get("transpose_weights")))


def task_distill(spec: dict, rec: Record) -> None:
    """A draft of another shape for a trained pair (``benchmarks.train_pair.distill_draft``)
    in ``out_dir``, exported beside the pair's exported target: a pair folder the qd task
    measures (its pair.json the pair's, with this draft's entry and held-out numbers)."""
    from benchmarks import adapters
    from benchmarks.train_pair import SAMPLE_SETTINGS, distill_draft

    pair, out, device = Path(spec["pair_dir"]), Path(spec["out_dir"]), spec["device"]
    cache = spec.get("samples_cache")
    draft = distill_draft(pair, spec["shape"], out, device, seconds=spec.get("seconds"),
                          steps=spec.get("steps"), lr=spec.get("lr"),
                          samples=spec.get("samples"),
                          samples_cache=Path(cache) if cache else None,
                          divergence=spec.get("divergence"))
    rec.set("draft", draft)
    info = load_json(pair / "pair.json")
    # the pair's config with this draft's sample settings and divergence; the pair's
    # samples are not its
    mine = {k: v for k, v in (draft.get("target_samples") or {}).items()
            if k in SAMPLE_SETTINGS}
    divergence = draft["training"].get("divergence") or info["config"].get(
        "distill_divergence", "kl")
    config = {**info["config"], "draft_samples": 0, **mine, "distill_divergence": divergence}
    dump_json(out / "pair.json", {**{k: v for k, v in info.items() if k != "target_samples"},
                                  "config": config, "distill_divergence": divergence,
                                  "draft": {k: v for k, v in draft.items() if k != "heldout"},
                                  "draft_fraction": draft["draft_fraction"],
                                  "heldout": draft["heldout"], "distilled_for": str(pair)})
    shutil.copy(pair / "prompts.json", out / "prompts.json")
    rec.set("export", adapters.export_draft(out / "hf" / "draft", pair / "qd-fast" / "target",
                                            out / "qd-fast", device=device))


def task_genai_build(spec: dict, rec: Record) -> None:
    from benchmarks import genai

    pair = Path(spec["pair_dir"])
    builds = {}
    for role in ("target", "draft"):
        with rec.step(f"build-{role}"):
            builds[role] = genai.build(pair / "hf" / role, pair / "genai" / role,
                                       device=spec["device"], cache_dir=pair / "genai" / "cache")
            rec.set("builds", builds)


def _preflight_sampling(vocab: int, limit_ms: float = 20.0) -> float:
    """Refuse to spend GPU time when greedy sampling on the host is pathologically slow
    (quickdraft.sampling.adjust_logits once built np.eye(V): 8 s per call at V = 32000)."""
    import numpy as np

    from quickdraft.sampling import SamplingConfig, adjust_logits

    z = np.zeros((2, min(vocab, 2048)), dtype=np.float32)
    t0 = time.perf_counter()
    adjust_logits(z, SamplingConfig(temperature=0.0))
    small = time.perf_counter() - t0
    if small * 1e3 > 5.0:  # a small vocabulary already slow: V x V work, do not try V
        raise Unavailable(
            f"quickdraft.sampling.adjust_logits (greedy) took {small * 1e3:.0f} ms at V = "
            f"{z.shape[1]}; at V = {vocab} it would dominate every step. Fix the greedy branch "
            "(np.eye(V)[argmax] allocates V x V) before benchmarking")
    z = np.zeros((2, vocab), dtype=np.float32)
    t0 = time.perf_counter()
    adjust_logits(z, SamplingConfig(temperature=0.0))
    ms = (time.perf_counter() - t0) * 1e3
    if ms > limit_ms:
        raise Unavailable(f"quickdraft.sampling.adjust_logits (greedy) takes {ms:.0f} ms at "
                          f"V = {vocab}: fix it before benchmarking")
    return ms


def _check_len(tokens_list, n):
    bad = [len(t) for t in tokens_list if len(t) != n]
    if bad:
        raise AssertionError(f"expected {n} new tokens per prompt, got {bad}")


def _verify_cost(t_ms: dict | None, g: int) -> float | None:
    """The target's call on g + 1 tokens over its 1-token step, from the cost stage's ms
    per target call of k tokens (None where either was not measured)."""
    if not t_ms or g + 1 not in t_ms or not t_ms.get(1):
        return None
    return t_ms[g + 1] / t_ms[1]


def _sampled_runs(pair, prompts, n: int, gamma: int, temperature: float, top_p: float,
                  warmup: int, repeats: int, c, costs=None, rates=(), verify=None) -> dict:
    """Autoregressive and speculative sampling at ``temperature`` / ``top_p``, each prompt
    with its own seed, timed side by side as the greedy runs are; with ``costs`` (the cost
    stage's ms per target and draft call), pipelined sampling at ``gamma`` too, and again
    with a ShadowRule of each min_keep_rate in ``rates``. ``verify``: the target's call on
    gamma + 1 tokens over its 1-token step (None: from ``costs`` where given), for the
    theory with the measured verify cost."""
    from benchmarks.analysis import compare, summarize_spec
    from quickdraft.sampling import SamplingConfig

    runner = pair.runner.variant(sampling=SamplingConfig(temperature=temperature, top_p=top_p))
    total = n * len(prompts)

    def ar_all():
        return [runner.autoregressive(p, n, seed=i) for i, p in enumerate(prompts)]

    def spec_all():
        return [runner.speculative(p, n, gamma, seed=i) for i, p in enumerate(prompts)]

    ar_outs, ar_times = timed_runs(ar_all, warmup=warmup, repeats=repeats)
    outs, spec_times = timed_runs(spec_all, warmup=warmup, repeats=repeats)
    _check_len([t for t, _ in outs], n)
    ar = rate(total, ar_times)
    sp = {**rate(total, spec_times), **summarize_spec([s for _, s in outs], gamma)}
    sp["cost_ratio_c_loop"] = sp.pop("cost_ratio_c", None)
    sp["cost_ratio_c"] = c if c is not None else sp["cost_ratio_c_loop"]
    if verify is None and costs is not None:
        verify = _verify_cost(costs[0], gamma)
    sp.update(compare(ar["tokens_per_s"], sp["tokens_per_s"], sp.get("alpha"), gamma,
                      sp.get("cost_ratio_c"), verify))
    if _captures_helpers(runner):  # side by side: the draws and verdicts uncaptured
        plain = runner.variant(capture_helpers=False)
        plain_ar, plain_ar_times = timed_runs(
            lambda: [plain.autoregressive(p, n, seed=i) for i, p in enumerate(prompts)],
            warmup=warmup, repeats=repeats)
        plain_outs, plain_times = timed_runs(
            lambda: [plain.speculative(p, n, gamma, seed=i) for i, p in enumerate(prompts)],
            warmup=warmup, repeats=repeats)
        # the same seeds and arithmetic: the same tokens, captured or not
        ar["uncaptured_draws"] = {**rate(total, plain_ar_times), "tokens_equal":
                                  [t for t, _ in plain_ar] == [t for t, _ in ar_outs]}
        sp["uncaptured_verdicts"] = {**rate(total, plain_times), "tokens_equal":
                                     [t for t, _ in plain_outs] == [t for t, _ in outs]}
    out = {"temperature": temperature, "top_p": top_p, "gamma": gamma, "ar": ar, "spec": sp}
    if costs is not None:
        t_ms, d_ms = costs
        out["pipelined"] = _pipelined_row(runner, prompts, n, gamma, None, ar["tokens_per_s"],
                                          t_ms, d_ms, warmup, repeats, sp, seeded=True)
        out["pipelined_rules"] = []
        for r in rates:  # a rule that cannot be made is recorded, the other rows kept
            try:
                ruled = _with_rule(runner, r, gamma, out["pipelined"])
            except Unavailable as e:
                out["pipelined_rules"].append({"gamma": gamma, "rule": r, "error": str(e)})
                continue
            out["pipelined_rules"].append(_pipelined_row(
                ruled, prompts, n, gamma, None, ar["tokens_per_s"], t_ms, d_ms, warmup,
                repeats, sp, seeded=True, rule=r))
    return out


def _with_rule(runner, rate, gamma: int, plain: dict | None):
    """``runner`` pipelining with ShadowRule(min_keep_rate=rate); ``rate`` AUTO_RATE: the
    break-even rate for the hidden share of ``plain``, the pipelined row without a rule
    at ``gamma`` (None, or one without a hidden share: no rule row can be made)."""
    from quickdraft.pipelined import ShadowRule

    if rate != AUTO_RATE:
        return runner.variant(shadow_rule=ShadowRule(min_keep_rate=float(rate)))
    hidden = (plain or {}).get("hidden_share")
    if hidden is None:
        raise Unavailable(f"--shadow-keep-rates {AUTO_RATE}: the plain pipelined row at gamma "
                          f"{gamma} has no hidden share, which needs the cost stage's ms per "
                          f"target call of {gamma + 1} tokens and per draft call; run the "
                          "systems stage with its per-call costs, or give a number")
    rule = ShadowRule.for_hidden_share(gamma, min(1.0, max(0.0, hidden)))
    return runner.variant(shadow_rule=rule)


def _captures_helpers(runner) -> bool:
    """Whether ``runner``'s sampled draws and verdicts run as CUDA graphs."""
    from quickdraft.ort_backend.verify_graph import captures_helpers

    return (runner.capture_helpers if runner.capture_helpers is not None
            else captures_helpers(runner.target))


def max_gamma_of(spec: dict) -> int:
    """The longest proposal a qd task's systems make (sweep, sampled and pipelined gammas):
    the pair is loaded for it (verify steps of up to gamma + 1 tokens, draft chains of
    gamma + 1 steps)."""
    return max([int(g) for g in spec["gammas"]] + [int(spec["gamma"])]
               + [int(g) for key in ("sampling_gammas", "pipelined") for g in spec.get(key) or []])


def task_qd(spec: dict, rec: Record) -> None:
    """quickdraft on one path: autoregressive, per-call costs, speculative at gamma, a
    gamma sweep and (optionally) the controlled-alpha drafter."""
    import numpy as np

    from benchmarks import adapters
    from benchmarks.analysis import compare, summarize_spec
    from benchmarks.controlled import ControlledAlphaDrafter
    from benchmarks.models import prompts_of
    from quickdraft import theory

    mem = GpuMemory()
    path, device, n = spec["path"], spec["device"], int(spec["new_tokens"])
    pair_dir = Path(spec["pair_dir"])
    model_dir = pair_dir / f"qd-{path}"
    if not (model_dir / "target").is_dir():
        raise Unavailable(f"{model_dir} does not exist: the export stage did not run or failed")
    prompts = prompts_of(pair_dir)
    total = n * len(prompts)
    gammas = [int(g) for g in spec["gammas"]]
    gamma = int(spec["gamma"])
    max_gamma = max_gamma_of(spec)
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    sweep_repeats = int(spec.get("sweep_repeats", max(1, repeats - 1)))
    rec.set("config", {k: spec[k] for k in ("path", "device", "new_tokens", "gamma", "gammas",
                                              "alphas", "warmup", "repeats", "cache")
                       if k in spec})
    vocab = int((load_json(pair_dir / "pair.json") or {}).get("vocab_size") or 0)
    if vocab:
        rec.set("preflight", {"greedy_adjust_logits_ms": _preflight_sampling(vocab)})

    # static caches sized to the run (the longest prompt, the new tokens and two verify
    # steps past them), as onnxruntime-genai sizes its own (max_length = prompt + new);
    # "export": the export's default length
    cache_length = None
    if spec.get("cache", "run") == "run":
        cache_length = max(len(p) for p in prompts) + n + 2 * (max_gamma + 1)
        limit = int((load_json(model_dir / "target" / "quickdraft.json") or {}).get(
            "max_length") or cache_length)
        cache_length = min(cache_length, limit)
    t0 = time.perf_counter()
    pair = adapters.load(path, model_dir, device=device, max_gamma=max_gamma,
                         cuda_graph=bool(spec.get("cuda_graph", True)),
                         cache_length=cache_length, attention=spec.get("attention"))
    rec.set("load", {"seconds": round(time.perf_counter() - t0, 2), **pair.info,
                     "device": pair.device})
    rec.set("memory", mem.mark("loaded"))

    # autoregressive: the baseline and the greedy reference
    ref: list[list[int]] = []
    ar_tps = None
    with rec.step("ar"):
        def ar_all():
            return [adapters.autoregressive(pair, p, n) for p in prompts]

        outs, times = timed_runs(ar_all, warmup=warmup, repeats=repeats)
        ref = [t for t, _ in outs]
        _check_len(ref, n)
        again = [t for t, _ in ar_all()]
        ar = rate(total, times)
        ar["deterministic"] = again == ref
        ar["stats"] = _slim(outs[0][1])
        ar_tps = ar["tokens_per_s"]
        rec.set("ar", ar)
        rec.set("reference_tokens", ref)
        log(f"qd-{path} AR: {ar['ms_per_token']:.3f} ms/token ({ar['tokens_per_s']:.0f} tok/s)")
        rec.set("memory", mem.mark("ar"))

    # per-call costs through the DecodeState protocol
    c_protocol, t_ms, d_ms = None, None, None
    with rec.step("costs"):
        lengths = list(range(1, max_gamma + 2))
        t_ms = adapters.step_costs(pair.target, prompts[0], lengths, reps=int(spec["cost_reps"]))
        d_ms = adapters.step_costs(pair.draft, prompts[0], [1, 2], reps=int(spec["cost_reps"]))
        c_protocol = d_ms[1] / t_ms[1]
        rec.set("costs", {
            "target_step_ms": t_ms, "draft_step_ms": d_ms,
            "verify_over_step": {g: t_ms[g + 1] / t_ms[1] for g in range(1, max_gamma + 1)},
            "cost_ratio_c": c_protocol,
        })
        log(f"qd-{path} costs: target {t_ms[1]:.3f} ms/step, draft {d_ms[1]:.3f} ms, "
            f"c {c_protocol:.3f}, verify {gamma + 1} tokens / 1: {t_ms[gamma + 1] / t_ms[1]:.2f}")

    def spec_runs(g: int, reps: int, drafter_for=None, warm: int = 1):
        def run_all():
            out = []
            for i, p in enumerate(prompts):
                drafter = drafter_for(i, p, g) if drafter_for else None
                out.append(adapters.speculative(pair, p, n, g, drafter=drafter))
            return out

        outs, times = timed_runs(run_all, warmup=warm, repeats=reps)
        toks = [t for t, _ in outs]
        _check_len(toks, n)
        summary = summarize_spec([s for _, s in outs], g)
        # c of Theorem 3.8: a draft call over a target call of one token (the paper's
        # definition), from the cost stage; the loop's own ratio (its target calls score
        # gamma + 1 tokens) is kept beside it
        summary["cost_ratio_c_loop"] = summary.pop("cost_ratio_c", None)
        summary["cost_ratio_c"] = c_protocol if c_protocol is not None else \
            summary["cost_ratio_c_loop"]
        res = {**rate(total, times), **summary, **greedy_check(pair.target, prompts, toks, ref),
               "stats": _slim(outs[0][1])}
        res.update(compare(ar_tps, res["tokens_per_s"], res.get("alpha"), g,
                           res.get("cost_ratio_c"), _verify_cost(t_ms, g)))
        return res

    with rec.step("spec"):
        sp = spec_runs(gamma, repeats, warm=warmup)
        rec.set("spec", sp)
        log(f"qd-{path} spec gamma {gamma}: {sp['tokens_per_s']:.0f} tok/s, speedup "
            f"{_f(sp.get('speedup')):.2f}, alpha {_f(sp.get('alpha')):.3f}, "
            f"c {_f(sp.get('cost_ratio_c')):.3f}, tokens/iteration "
            f"{_f(sp.get('tokens_per_iteration')):.2f} (Eq. 1 "
            f"{_f(sp.get('expected_tokens_eq1')):.2f}), greedy equal {sp['greedy_equal']}")
        rec.set("memory", mem.mark("spec"))

    with rec.step("sweep"):
        sweep = []
        for g in gammas:
            try:
                r = spec_runs(g, sweep_repeats)
                sweep.append(r)
                log(f"qd-{path} gamma {g}: {r['tokens_per_s']:.0f} tok/s, speedup "
                    f"{_f(r.get('speedup')):.2f}")
            except Exception as e:  # noqa: BLE001
                rec.add_error(e, step="sweep", gamma=g)
            rec.set("sweep", sweep)
        _record_best_gamma(rec, sweep)

    rates = [r if r == AUTO_RATE else float(r)  # pipelined rules
             for r in spec.get("shadow_keep_rates") or []]
    samplings = [(t, p, int(g)) for t, p in spec.get("samplings") or []
                 for g in spec.get("sampling_gammas") or [gamma]]
    for temperature, top_p, g in samplings:
        with rec.step(f"sampled-{temperature}-{top_p}-{g}"):
            sampled = rec.data.get("sampled") or []
            sampled.append(_sampled_runs(pair, prompts, n, g, float(temperature),
                                         float(top_p), warmup, repeats, c_protocol,
                                         (t_ms, d_ms) if spec.get("pipelined") else None,
                                         rates, _verify_cost(t_ms, g)))
            rec.set("sampled", sampled)
            r = sampled[-1]
            log(f"qd-{path} T={temperature} top_p={top_p} gamma {g}: AR "
                f"{r['ar']['tokens_per_s']:.0f} tok/s, speculative "
                f"{r['spec']['tokens_per_s']:.0f} tok/s, speedup "
                f"{_f(r['spec'].get('speedup')):.2f}, alpha {_f(r['spec'].get('alpha')):.3f}")
            if "uncaptured_verdicts" in r["spec"]:
                u, d = r["spec"]["uncaptured_verdicts"], r["ar"]["uncaptured_draws"]
                log(f"qd-{path} T={temperature} top_p={top_p} gamma {g}, draws and verdicts "
                    f"without their CUDA graphs: AR {d['tokens_per_s']:.0f} tok/s, "
                    f"speculative {u['tokens_per_s']:.0f} tok/s, tokens equal "
                    f"{d['tokens_equal']} / {u['tokens_equal']}")
            for pr in [r["pipelined"], *r["pipelined_rules"]] if "pipelined" in r else []:
                log(f"qd-{path} T={temperature} top_p={top_p} pipelined gamma {g} "
                    f"(min keep rate {pr['min_keep_rate']}): {pr['tokens_per_s']:.0f} tok/s, "
                    f"speedup {_f(pr.get('speedup')):.2f}, warm {pr['warm_share']:.2f}, "
                    f"effective c {_f(pr.get('effective_c')):.3f}")

    for g, keep in [(g, k) for g in spec.get("pipelined") or [] for k in [None, *rates]]:
        with rec.step(f"pipelined-{g}" + ("" if keep is None else f"-rule-{keep}")):
            sequential = [r for r in [rec.data.get("spec") or {}, *(rec.data.get("sweep") or [])]
                          if r.get("gamma") == g]
            plain = next((r for r in rec.data.get("pipelined") or []
                          if r.get("gamma") == g and r.get("rule") is None), None)
            runner = pair.runner if keep is None else _with_rule(pair.runner, keep, int(g),
                                                                 plain)
            row = _pipelined_row(runner, prompts, n, int(g), ref, ar_tps, t_ms, d_ms,
                                 warmup, repeats, sequential[0] if sequential else None,
                                 rule=keep)
            rec.set("pipelined", (rec.data.get("pipelined") or []) + [row])
            r = {k: _f(row.get(k)) for k in ("speedup", "sequential_tokens_per_s",
                                               "warm_share", "shadow_over_verify",
                                               "shadow_rate", "hidden_share",
                                               "effective_c")}
            log(f"qd-{path} pipelined gamma {g} (min keep rate {row['min_keep_rate']}): "
                f"{row['tokens_per_s']:.0f} tok/s, speedup "
                f"{r['speedup']:.2f} (sequential {r['sequential_tokens_per_s']:.0f} tok/s), "
                f"warm {r['warm_share']:.2f}, continuations {r['shadow_rate']:.2f}, "
                f"shadow / verify {r['shadow_over_verify']:.2f}, "
                f"hidden {r['hidden_share']:.2f}, effective c {r['effective_c']:.3f}, "
                f"greedy equal {row['greedy_equal']}")

    if spec.get("controlled") and spec.get("alphas"):
        c_for_gamma = (rec.data.get("spec") or {}).get("cost_ratio_c") or c_protocol or 0.0
        controlled = []
        for a in spec["alphas"]:
            a = float(a)
            with rec.step(f"controlled-{a}"):
                g = min(max_gamma, theory.best_gamma(a, float(c_for_gamma), max_gamma=max_gamma))

                def drafter_for(i, p, g, a=a):
                    rng = np.random.default_rng([int(spec.get("seed", 0)), i, int(a * 1000)])
                    return ControlledAlphaDrafter(pair.draft, p, ref[i], a, rng, gamma=g)

                r = spec_runs(g, repeats, drafter_for)
                r["alpha_nominal"] = a
                c_row, verify = float(r.get("cost_ratio_c") or 0.0), _verify_cost(t_ms, g)
                r["theoretical_at_nominal_alpha"] = theory.walltime_improvement(a, g, c_row)
                if verify is not None:
                    r["theoretical_at_nominal_alpha_with_verify"] = theory.walltime_improvement(
                        a, g, c_row, verify)
                controlled.append(r)
                rec.set("controlled", controlled)
                log(f"qd-{path} controlled alpha {a}: gamma {g}, measured alpha "
                    f"{_f(r.get('alpha')):.3f}, speedup {_f(r.get('speedup')):.2f} vs theory "
                    f"{_f(r.get('theoretical_improvement')):.2f} (realized / theory "
                    f"{_f(r.get('realized_over_theoretical')):.2f}; with the measured verify "
                    f"cost {_f(r.get('realized_over_theoretical_with_verify')):.2f})")
    rec.set("memory", mem.mark("end"))


def greedy_check(target, prompts, toks, ref, ties: int = 2) -> dict:
    """Whether greedy output ``toks`` equals autoregressive decoding's ``ref`` (None: not
    compared), the mismatches, and for the first ``ties`` prompts that part, the target's
    margin between its two best logits where they part (``divergences``): fp16 kernels
    for 1 and gamma + 1 tokens can round a near-tie (margin about 0) either way, while a
    wide margin means a bug."""
    from benchmarks.controlled import check_greedy_equal
    from benchmarks.greedy_divergence import margin_at

    if not ref:
        return {"greedy_equal": None, "mismatches": []}
    mismatch, divergences = [], []
    for i, (t, r) in enumerate(zip(toks, ref)):
        try:
            check_greedy_equal(t, r)
        except AssertionError as e:
            mismatch.append(f"prompt {i}: {e}")
            if len(divergences) < ties:
                at = next((j for j, (a, b) in enumerate(zip(t, r)) if a != b), None)
                if at is not None:
                    d = {"prompt": i, "autoregressive": int(r[at]), "speculative": int(t[at])}
                    try:
                        d.update(margin_at(target, prompts[i], r, at))
                    except Exception as e:  # noqa: BLE001 - the row is kept, the cause said
                        d["error"] = f"{type(e).__name__}: {e}"
                    divergences.append(d)
    out = {"greedy_equal": not mismatch, "mismatches": mismatch}
    if divergences:
        out["divergences"] = divergences
    return out


def _pipelined_row(runner, prompts, n: int, g: int, ref, ar_tps, t_ms, d_ms, warmup: int,
                   repeats: int, sequential: dict | None, *, seeded: bool = False,
                   rule: float | str | None = None) -> dict:
    """Pipelined decoding at ``g`` with ``runner`` (an ``adapters.Runner``, greedy or
    sampled): rate, tokens equal to autoregressive decoding (``ref``, greedy; None: not
    compared), and where the iterations' time went against the calls measured alone
    (``t_ms`` / ``d_ms``: ms per target / draft call of k tokens, from the cost stage).
    ``seeded``: prompt i runs with seed i, as the sampled rows beside it. ``rule``: the
    ShadowRule's rate as asked for (None: no rule; AUTO_RATE: the break-even rate).

    ``effective_c``: (iteration ms - the verify call alone) / (g x one target step): the
    draft's time the verification did not hide (host work included), in Theorem 3.8's
    units. ``shadow_rate``: s, the share of iterations that drafted a continuation (1
    without a rule). ``hidden_share``: of one continuation's L = g + 1 draft steps, the
    share that did not lengthen the shadow beyond the verify call alone. An iteration
    without a continuation waits for the verify call alone, so the shadow's excess over
    it, averaged over all iterations, is divided by s (None where s = 0).
    ``theoretical_with_verify``: the theory with the verify call costing what it was
    measured to, t_ms[g + 1] / t_ms[1] target steps, not 1."""
    from quickdraft import theory

    def run_all():
        return [runner.pipelined(p, n, g, seed=i if seeded else 0)
                for i, p in enumerate(prompts)]

    outs, times = timed_runs(run_all, warmup=warmup, repeats=repeats)
    toks, stats = [t for t, _ in outs], [s for _, s in outs]
    _check_len(toks, n)
    total = lambda key: sum(float(s.get(key) or 0.0) for s in stats)  # noqa: E731
    iters = max(1.0, total("iterations"))
    row = {**rate(n * len(prompts), times), "gamma": g, "iterations": int(iters),
           "min_keep_rate": runner.shadow_rule.min_keep_rate, "rule": rule,
           **greedy_check(runner.target, prompts, toks, ref),
           "warm_share": total("warm_iterations") / iters,
           "tokens_per_iteration": n * len(prompts) / iters,
           "alpha": total("beta_sum") / max(1.0, total("beta_count")),
           "open_draft_calls": int(total("open_draft_calls")),
           "shadow_draft_calls": int(total("shadow_draft_calls")),
           "shadow_rate": total("shadow_iterations") / iters,
           "iteration_ms": 1e3 * total("decode_s") / iters,
           "open_ms_per_iteration": 1e3 * total("open_s") / iters,
           "shadow_ms_per_iteration": 1e3 * total("shadow_s") / iters,
           "stats": _slim(stats[0])}
    if ar_tps and row["tokens_per_s"]:
        row["speedup"] = row["tokens_per_s"] / ar_tps
    if sequential:
        row["sequential_tokens_per_s"] = sequential.get("tokens_per_s")
    if t_ms and d_ms and g + 1 in t_ms:
        verify, step, draft = t_ms[g + 1], t_ms[1], d_ms[1]
        row["verify_ms_alone"], row["draft_step_ms_alone"] = verify, draft
        row["shadow_over_verify"] = row["shadow_ms_per_iteration"] / verify
        share = row["shadow_rate"]
        extra = row["shadow_ms_per_iteration"] - verify  # per iteration, continuation or not
        row["hidden_share"] = 1.0 - extra / (share * (g + 1) * draft) if share > 0 else None
        row["effective_c"] = (row["iteration_ms"] - verify) / (g * step)
        h = 0.0 if share == 0 else min(1.0, max(0.0, row["hidden_share"]))  # s = 0: unused
        th = theory.pipelined_walltime_improvement(row["alpha"], g, draft / step, h,
                                                   shadow_rate=share)
        th_v = theory.pipelined_walltime_improvement(row["alpha"], g, draft / step, h,
                                                     shadow_rate=share, verify=verify / step)
        row["theoretical_improvement"] = th
        row["theoretical_with_verify"] = th_v
        if "speedup" in row:
            row["realized_over_theoretical"] = row["speedup"] / th
            row["realized_over_theoretical_with_verify"] = row["speedup"] / th_v
    return row


def task_genai(spec: dict, rec: Record) -> None:
    """onnxruntime-genai, one variant (ar, ar-graph, spec, spec-graph) in this process."""
    from benchmarks import genai
    from benchmarks.analysis import compare
    from benchmarks.models import prompts_of

    mem = GpuMemory()
    variant, n = spec["variant"], int(spec["new_tokens"])
    pair_dir = Path(spec["pair_dir"])
    target_dir, draft_dir = genai.genai_model_dirs(pair_dir)
    if not (target_dir / "genai_config.json").is_file():
        raise Unavailable(f"no onnxruntime-genai model under {target_dir}: build it first")
    vdir = genai.prepare(variant, target_dir, draft_dir, pair_dir / "genai-variants")
    rec.set("model_dirs", {"target": str(target_dir), "draft": str(draft_dir),
                           "variant_dir": str(vdir)})
    prompts = prompts_of(pair_dir)
    total = n * len(prompts)
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    runner = genai.GenaiRunner(vdir)
    rec.set("load", {"seconds": round(runner.load_s, 2)})
    ref = spec.get("reference_tokens")

    def equal_to_ref(toks):
        if not ref:
            return None
        return [t == r[: len(t)] for t, r in zip(toks, ref)]

    if variant.startswith("ar"):
        def run_all():
            return [runner.generate(p, n) for p in prompts]

        outs, times = timed_runs(run_all, warmup=warmup, repeats=repeats)
        toks = [t for t, _ in outs]
        _check_len(toks, n)
        res = rate(total, times)
        res["equal_to_qd_reference"] = equal_to_ref(toks)
        rec.set("ar", res)
        rec.set("tokens", toks)
        log(f"genai {variant}: {res['ms_per_token']:.3f} ms/token")
    else:
        ar_ms = spec.get("ar_ms_per_token")
        ar_tps = 1e3 / ar_ms if ar_ms else None
        sweep = []
        ks = [int(k) for k in spec["gammas"]]
        main_k = int(spec["gamma"])
        order = [main_k] + [k for k in ks if k != main_k]
        for k in order:
            try:
                reps = repeats if k == main_k else int(spec.get("sweep_repeats", 1))

                def run_all(k=k):
                    return [runner.generate(p, n, k) for p in prompts]

                outs, times = timed_runs(run_all, warmup=1, repeats=reps)
                toks = [t for t, _ in outs]
                _check_len(toks, n)
                stats = [s for _, s in outs]
                summ = genai.spec_summary(_sum_stats(stats), k, ar_ms)
                r = {**rate(total, times), **summ, "equal_to_qd_reference": equal_to_ref(toks),
                     "raw_stats": stats[0]}
                r.update(compare(ar_tps, r["tokens_per_s"], r.get("alpha"), k,
                                 r.get("cost_ratio_c")))
                if r.get("alpha") is not None:
                    from quickdraft import theory

                    r["expected_tokens_eq1"] = theory.expected_tokens(r["alpha"], k)
                sweep.append(r)
                if k == main_k:
                    rec.set("spec", r)
                log(f"genai {variant} K={k}: {r['tokens_per_s']:.0f} tok/s, alpha "
                    f"{_f(r.get('alpha')):.3f}, speedup {_f(r.get('speedup')):.2f}")
            except Exception as e:  # noqa: BLE001
                rec.add_error(e, step="spec", gamma=k)
            rec.set("sweep", sweep)
        _record_best_gamma(rec, sweep)
    rec.set("memory", mem.mark("end"))


def _sum_stats(stats: list[dict]) -> dict:
    """Add up onnxruntime-genai's per-generation counters (one generation per prompt)."""
    out: dict = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def task_hf(spec: dict, rec: Record) -> None:
    """Hugging Face transformers on torch: generate() greedy and assisted generation."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from benchmarks.analysis import compare
    from benchmarks.controlled import alpha_from_tokens_per_iteration
    from benchmarks.models import prompts_of

    mem = GpuMemory()
    device, n = spec["device"], int(spec["new_tokens"])
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("torch sees no CUDA device")
    dtype = torch.float16 if device == "cuda" else torch.float32
    pair_dir = Path(spec["pair_dir"])
    prompts = prompts_of(pair_dir)
    total = n * len(prompts)
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    sync = _cuda_sync(device)
    rec.set("versions", {"transformers": transformers.__version__, "torch": torch.__version__,
                         "transformers_file": transformers.__file__})
    log(f"hf: transformers {transformers.__version__}, torch {torch.__version__}")

    def load(role):
        model = AutoModelForCausalLM.from_pretrained(pair_dir / "hf" / role, dtype=dtype)
        model = model.to(device=device, dtype=dtype).eval()
        gc = model.generation_config
        gc.eos_token_id = None  # exactly n tokens, as everywhere else
        if gc.pad_token_id is None:
            gc.pad_token_id = 0
        return model

    def peak_mib():
        return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None

    calls = {"n": 0}

    def count(_module, _args):
        calls["n"] += 1

    t0 = time.perf_counter()
    target = load("target")
    target.register_forward_pre_hook(count)
    rec.set("load", {"target_seconds": round(time.perf_counter() - t0, 2),
                     "attn_implementation": getattr(target.config, "_attn_implementation", None)})
    inputs = [torch.tensor([p], device=device) for p in prompts]

    def gen_all(model, **kw):
        outs = []
        with torch.inference_mode():
            for x in inputs:
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                   do_sample=False, **kw)
                outs.append(y[0, x.shape[1]:].tolist())
        return outs

    ref = spec.get("reference_tokens")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    greedy = None
    with rec.step("greedy"):
        greedy, times = timed_runs(lambda: gen_all(target), warmup=warmup, repeats=repeats,
                                   sync=sync)
        _check_len(greedy, n)
        res = rate(total, times)
        res["torch_max_allocated_mib"] = peak_mib()
        res["equal_to_qd_reference"] = ([g == r for g, r in zip(greedy, ref)] if ref else None)
        rec.set("ar", res)
        log(f"hf greedy: {res['ms_per_token']:.2f} ms/token")
    rec.set("memory", mem.mark("ar"))
    ar_tps = (rec.data.get("ar") or {}).get("tokens_per_s")

    draft = load("draft")
    c = None
    with rec.step("draft-ar"):
        _, times = timed_runs(lambda: gen_all(draft), warmup=1, repeats=max(1, repeats - 1),
                              sync=sync)
        d = rate(total, times)
        rec.set("draft_ar", d)
        if ar_tps:
            c = d["ms_per_token"] / (1e3 / ar_tps)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sweep = []
    for g in spec["hf_gammas"]:
        with rec.step(f"assisted-{g}"):
            agc = draft.generation_config
            agc.num_assistant_tokens = int(g)
            agc.num_assistant_tokens_schedule = "constant"
            if hasattr(agc, "assistant_confidence_threshold"):
                agc.assistant_confidence_threshold = 0.0  # fixed gamma: never stop early
            reps = repeats if g == spec["hf_gammas"][0] else int(spec.get("sweep_repeats", 1))
            calls["n"] = 0
            outs, times = timed_runs(lambda: gen_all(target, assistant_model=draft),
                                     warmup=1, repeats=reps, sync=sync)
            per_run = calls["n"] / (1 + reps)
            tpi = total / per_run if per_run else None
            alpha = alpha_from_tokens_per_iteration(tpi, int(g))
            r = {**rate(total, times), "gamma": int(g), "target_calls_per_run": per_run,
                 "tokens_per_iteration": tpi, "alpha": alpha,
                 "alpha_method": "Eq. 1 inverted from tokens per target call",
                 "cost_ratio_c": c, "torch_max_allocated_mib": peak_mib(),
                 "equal_to_greedy": ([a == b for a, b in zip(outs, greedy)] if greedy else None)}
            r.update(compare(ar_tps, r["tokens_per_s"], alpha, int(g), c))
            sweep.append(r)
            rec.set("sweep", sweep)
            if g == spec["hf_gammas"][0]:
                rec.set("spec", r)
            log(f"hf assisted gamma {g}: {r['ms_per_token']:.2f} ms/token, speedup "
                f"{_f(r.get('speedup')):.2f}, alpha {_f(alpha):.3f}")
    _record_best_gamma(rec, sweep)
    rec.set("memory", mem.mark("end"))


TASKS = {
    "bandwidth": task_bandwidth,
    "train": task_train,
    "make": task_make,
    "export": task_export,
    "distill": task_distill,
    "genai-build": task_genai_build,
    "qd": task_qd,
    "genai": task_genai,
    "hf": task_hf,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in TASKS:
        print(__doc__, file=sys.stderr)
        return 2
    task, spec_path, result_path = argv
    spec = load_json(spec_path)
    rec = Record(result_path, {"task": task, "status": "running", "started": time.time()})
    t0 = time.perf_counter()
    try:
        TASKS[task](spec, rec)
        rec.data["status"] = "ok" if not any(e["kind"] == "error" for e in rec.data["errors"]) \
            else "partial"
    except Exception as e:  # noqa: BLE001 - recorded for the orchestrator
        err = rec.add_error(e, step=task)
        rec.data["status"] = err["kind"]
    rec.data["seconds"] = round(time.perf_counter() - t0, 2)
    rec.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
