"""Step costs of int4 (MatMulNBits) static-cache targets per step length and per CUDA kernel:
does a per-step-length kernel choice make speculative decoding pay on int4 targets?

    python benchmarks/int4_steps.py HF_DIR [HF_DIR ...] [--device cuda|cpu]
        [--work DIR] [--out OUT.json] [--reuse NAME/KIND=DIR ...] [--draft-dir DIR ...]
        [--ks 1,2,3,4,5,6,8,9] [--past 32] [--new-tokens 128] [--alpha 0.8] [--gamma 4]

For each Hugging Face folder (a random Llama of ``benchmarks/models.py``, e.g.
``/tmp/qdbench/pairs/1b/hf/target``) it exports the static-cache graph twice, float (fp16
on CUDA, fp32 on the CPU) and int4 (``quickdraft.export.builder.export_static_model``,
skipped when ``WORK/NAME/KIND/quickdraft.json`` exists, or replaced by ``--reuse``; the
pair's own fast-path export ``pairs/NAME/qd-fast/target`` is reused for the float graph
when its dtype fits), then measures each variant, every one in a child process of its own
(a crash or a hang costs that row only):

* ``fp16`` (``fp32`` on the CPU): the float graph;
* ``int4``: the int4 graph with ONNX Runtime's default CUDA MatMulNBits kernels
  (``ep.cuda.fpa_intb_gemm=0`` set explicitly, so a stray environment variable cannot
  switch the other kernel on), the CPU's MLAS kernels on the CPU;
* ``int4-fpa``: the same graph with the CUTLASS fpA_intB kernels (``ep.cuda.fpa_intb_gemm=1``,
  CUDA only: recorded as unavailable on the CPU);
* ``int4-fpa-env`` (``--fpa-env``): the fpA_intB kernels switched on by the environment
  variable instead (``ORT_FPA_INTB_GEMM=1``, no session entry), a cross-check of the switch.

Where the switch is documented (checked, not guessed). ONNX Runtime's CUDA MatMulNBits
kernel reads the session config entry ``ep.cuda.fpa_intb_gemm`` ("0"/"off" disables,
anything else enables) and falls back to the environment variable ``ORT_FPA_INTB_GEMM``
when the entry is absent (the entry wins): ``onnxruntime/contrib_ops/cuda/quantization/
matmul_nbits.h`` (``kConfigFpAIntBGemm``, ``ResolveFpAIntBConfigOrEnv``) and
``docs/contrib_ops/cuda/matmul_nbits.md`` section 6 (fpA_intB_gemm path) and section 8
(environment variables) in microsoft/onnxruntime. The entry and the plain on/off flag came
with onnxruntime PR #29622 ("Enable fpA_intB GEMM in CUDA builds and add configurable
options", merged 2026-07-08); before it only ``ORT_FPA_INTB_GEMM`` existed, as a bitmask
(0x01 all, 0x02 GEMV, 0x04 int4, 0x08 int8), and the kernels had to be compiled in
(``onnxruntime_USE_FPA_INTB_GEMM``, ON by default since that PR). The onnxruntime-gpu
1.31.1 wheel's ``libonnxruntime_providers_cuda.so`` holds the strings
``ep.cuda.fpa_intb_gemm``, ``ep.cuda.fpa_intb_profile_m`` and ``ORT_FPA_INTB_GEMM``, and its
"compact" kernel set (the default build since PR #32324) covers fp16 activations with
symmetric (no zero point) int4 weights in blocks of 32, what the builder writes by
default. It is not a CUDA provider option. onnxruntime-genai 0.18's builder writes the
same entry into genai_config.json's session_options with ``--extra_options
enable_cuda_fpa_intb_gemm=1``. The kernel profiles its tactics when the session is made
(``ep.cuda.fpa_intb_profile_m`` sets the M buckets), so CUDA graphs can be captured after.
Whether it engaged is recorded: the session's own options are read back, and the int4 and
int4-fpa logits of one probe step are compared (different kernels round differently).

Per variant, with CUDA graphs on (CUDA; one graph per step length 1 .. max k): the median
ms of one decoder call of k new tokens over a ``--past``-token past (the method of
``benchmarks.adapters.step_costs``: a StaticOrtModel state, append k tokens, rewind; the
host copy of the logits included), the same through ``append_greedy`` (argmax ids only,
what greedy generation calls), greedy autoregressive tokens/s for ``--new-tokens`` tokens
(``benchmarks.adapters.Runner``), and with a draft model (``--draft-dir``, or the pair's
``qd-fast/draft``, or the pair's ``hf/draft`` exported here) the controlled-alpha drafter
(``benchmarks/controlled.py``) at ``--gamma`` and at Theorem 3.8's best gamma for the
measured c: tokens/s and the speedup over that variant's and over the fastest int4
autoregressive run. Then the summary: variant x k -> ms, verify(k=5) / the fastest int4
one-token step, the best int4 variant per k, and the speedup a per-step-length kernel
choice would give (predicted from the measured step costs: E[tokens] * t_AR /
(gamma * t_draft + t_verify), labelled predicted; one session cannot switch kernels per
call today).

JSON (``--out``) is written after every row; a Markdown summary beside it. On the CPU
(``--device cpu``) every row runs with tiny models (the smoke test); the absolute numbers
mean something only on the GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Record,
    dump_json,
    environment,
    error_record,
    load_json,
    log,
    run_logged,
    worker_env,
)

FPA_KEY = "ep.cuda.fpa_intb_gemm"  # session config entry (onnxruntime >= PR #29622)
FPA_ENV = "ORT_FPA_INTB_GEMM"  # the environment variable it overrides
FPA_DOC = ("microsoft/onnxruntime: onnxruntime/contrib_ops/cuda/quantization/matmul_nbits.h "
           "(kConfigFpAIntBGemm, ResolveFpAIntBConfigOrEnv) and "
           "docs/contrib_ops/cuda/matmul_nbits.md sections 6 and 8; session config entry "
           "since PR #29622 (before it: ORT_FPA_INTB_GEMM bitmask only); present in the "
           "onnxruntime-gpu 1.31.1 CUDA provider library")
DEFAULT_KS = (1, 2, 3, 4, 5, 6, 8, 9)
SCRIPT = Path(__file__).resolve()


# ----------------------------------------------------------------------------- variants


def variants_for(device: str, fpa_env: bool) -> list[dict]:
    """The variants to measure: name, export kind, session config entries, extra env."""
    float_name = "fp16" if device == "cuda" else "fp32"
    out = [{"name": float_name, "export": "float", "config": {}, "env": {}},
           {"name": "int4", "export": "int4",
            "config": {FPA_KEY: "0"} if device == "cuda" else {}, "env": {}},
           {"name": "int4-fpa", "export": "int4", "config": {FPA_KEY: "1"}, "env": {},
            "cuda_only": True}]
    if fpa_env:
        out.append({"name": "int4-fpa-env", "export": "int4", "config": {},
                    "env": {FPA_ENV: "1"}, "cuda_only": True})
    return out


def float_dtype(device: str) -> str:
    return "fp16" if device == "cuda" else "fp32"


# ----------------------------------------------------------------------------- the worker


def _graph_facts(folder: Path) -> dict:
    """MatMulNBits nodes of a graph: count, bits, block sizes, accuracy levels, how many
    have zero points (the compact fpA_intB build takes none) or prepacked weights."""
    import onnx

    from quickdraft.manifest import load_manifest

    m = load_manifest(folder)
    graph = onnx.load(str(folder / m.model_file), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    facts = {"matmulnbits": len(nodes), "dtype": m.dtype, "weights": m.weights or "float",
             "execution_provider": m.execution_provider}
    if nodes:
        attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                 for n in nodes]
        facts["bits"] = sorted({a.get("bits") for a in attrs})
        facts["block_size"] = sorted({a.get("block_size") for a in attrs})
        facts["accuracy_level"] = sorted({a.get("accuracy_level", 0) for a in attrs})
        facts["with_zero_points"] = sum(len(n.input) > 3 and bool(n.input[3]) for n in nodes)
        facts["prepacked"] = sum(bool(a.get("weight_prepacked", 0)) for a in attrs)
    return facts


def _probe(model, prompt: list[int], k: int = 5) -> dict:
    """Logits of one k-token step after the prompt, in a fresh state: a hash of all of
    them and a slice, to tell whether two variants ran different kernels."""
    import numpy as np

    state = model.new_state()
    state.append(list(prompt))
    toks = [int(t) for t in (list(prompt) * k)[:k]]
    logits = np.asarray(state.append(toks), dtype=np.float32)  # [k, V]
    state.close()
    return {"k": k, "sha1": hashlib.sha1(logits.tobytes()).hexdigest(),
            "argmax": logits.argmax(-1).tolist(),
            "slice": [[round(float(x), 5) for x in row[:32]] for row in logits],
            "max_abs": float(np.abs(logits).max())}


def worker(spec: dict) -> dict:
    """One variant of one model; every row recorded in ``spec["result"]`` as it comes."""
    import numpy as np

    from benchmarks import adapters
    from benchmarks.common import rate, timed_runs
    from benchmarks.controlled import ControlledAlphaDrafter, check_greedy_equal
    from quickdraft import theory
    from quickdraft.ort_backend import StaticOrtModel, resolve_device
    from quickdraft.ort_backend.device import session_options

    rec = Record(spec["result"], {"variant": spec["variant"], "model": spec["model"],
                                  "rows": {}})
    rows = rec.data["rows"]

    def row(name, fn):
        t0 = time.perf_counter()
        log(f"{spec['model']} {spec['variant']}: {name}")
        try:
            rows[name] = {"status": "ok", **fn()}
        except Exception as e:  # noqa: BLE001 - one row fails, the others still run
            rows[name] = {"status": "error", **error_record(e, row=name)}
            log(f"{spec['model']} {spec['variant']} {name}: ERROR {type(e).__name__}: "
                f"{str(e)[:400]}")
        rows[name]["seconds"] = round(time.perf_counter() - t0, 3)
        rec.save()
        return rows[name]

    import onnxruntime as ort

    ks = [int(k) for k in spec["ks"]]
    max_k = max(ks)
    prompt = [int(t) for t in spec["prompt"]]
    n = int(spec["new_tokens"])
    dev, note = resolve_device(spec["device"])
    graphs = dev.kind == "cuda" and bool(spec.get("cuda_graph", True))
    rec.set("setup", {"onnxruntime": ort.__version__, "device": str(dev), "note": note,
                      "cuda_graph": graphs, "session_config": spec["config"],
                      "env": {FPA_ENV: os.environ.get(FPA_ENV)}})
    state: dict = {}

    def load_target():
        options = session_options()
        for key, value in spec["config"].items():
            options.add_session_config_entry(key, str(value))
        folder = Path(spec["target_dir"])
        limit = int((load_json(folder / "quickdraft.json") or {}).get("max_length") or 10**9)
        cache = min(limit, len(prompt) + n + 2 * (max_k + 1))
        t0 = time.perf_counter()
        model = StaticOrtModel(folder, dev, cache_length=cache,
                               graph_steps=tuple(range(1, max_k + 1)), cuda_graph=graphs,
                               options=options)
        state["target"] = model
        readback = {key: model.session.get_session_options().get_session_config_entry(key)
                    for key in spec["config"]}
        return {"load_s": round(time.perf_counter() - t0, 2), "cache_length": cache,
                "providers": model.session.get_providers(),
                "provider_options": model.provider_options,
                "session_config_readback": readback, "graph": _graph_facts(folder)}

    if row("load", load_target)["status"] != "ok":
        return rec.data
    target = state["target"]
    reps = int(spec["reps"])
    row("steps", lambda: {"ms": adapters.step_costs(target, prompt, ks, reps=reps),
                          "method": "adapters.step_costs (append: logits copied to host)"})
    row("steps_greedy", lambda: {
        "ms": adapters.step_costs(target, prompt, ks, reps=reps, greedy=True),
        "method": "append_greedy (token ids copied to host)"})
    row("probe", lambda: _probe(target, prompt))

    ref: list[int] = []
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])

    def ar():
        runner = adapters.Runner(target)
        outs, times = timed_runs(lambda: runner.autoregressive(prompt, n), warmup=warmup,
                                 repeats=repeats)
        ref.extend(outs[0])
        r = rate(n, times)
        return {**r, "target_ms_per_step": outs[1]["target_ms_per_step"],
                "tokens": list(outs[0])}

    ar_row = row("ar", ar)
    if not spec.get("draft_dir"):
        rows["spec"] = {"status": "unavailable", "message": spec.get("draft_note")
                        or "no draft model"}
        rec.save()
        return rec.data
    if ar_row["status"] != "ok":
        return rec.data

    def load_draft():
        folder = Path(spec["draft_dir"])
        limit = int((load_json(folder / "quickdraft.json") or {}).get("max_length") or 10**9)
        cache = min(limit, target.max_length)
        model = StaticOrtModel(folder, dev, cache_length=cache, graph_steps=(1, 2),
                               cuda_graph=graphs)
        state["draft"] = model
        d_ms = adapters.step_costs(model, prompt, [1, 2], reps=reps)
        return {"folder": str(folder), "ms": d_ms, "graph": _graph_facts(folder)}

    d_row = row("draft", load_draft)
    if d_row["status"] != "ok":
        return rec.data
    draft = state["draft"]
    t1 = (rows.get("steps") or {}).get("ms", {}).get(1) or ar_row["target_ms_per_step"]
    c = d_row["ms"][1] / t1
    alpha = float(spec["alpha"])
    best = theory.best_gamma(alpha, c, max_gamma=max_k - 1)
    gammas = list(dict.fromkeys([int(spec["gamma"]), best]))
    rows["spec_plan"] = {"status": "ok", "c": c, "alpha": alpha, "theory_best_gamma": best,
                         "gammas": gammas}
    rec.save()
    runner = adapters.Runner(target, draft)
    ar_tps = ar_row["tokens_per_s"]
    for g in gammas:
        if g + 1 > max_k:
            rows[f"spec_g{g}"] = {"status": "skipped",
                                  "message": f"gamma {g} needs a step of {g + 1} > max k"}
            continue

        def spec_run(g=g):
            runs = itertools.count()

            def once():  # a fresh seeded drafter per run
                rng = np.random.default_rng([int(spec.get("seed", 0)), next(runs), g])
                drafter = ControlledAlphaDrafter(draft, prompt, ref, alpha, rng, gamma=g)
                return runner.speculative(prompt, n, g, drafter=drafter)

            outs, times = timed_runs(once, warmup=warmup, repeats=repeats)
            tokens, stats = outs
            check_greedy_equal(tokens, ref)
            r = rate(n, times)
            keep = ("alpha", "acceptance_rate", "tokens_per_iteration", "iterations",
                    "cost_ratio_c", "host_ms_per_iteration")
            return {**r, "gamma": g, **{k: stats.get(k) for k in keep},
                    "speedup_over_own_ar": r["tokens_per_s"] / ar_tps if ar_tps else None,
                    "theory_walltime_improvement": theory.walltime_improvement(alpha, g, c),
                    "greedy_equal": True}

        row(f"spec_g{g}", spec_run)
    return rec.data


# ----------------------------------------------------------------------------- exports


def model_name(hf: Path, taken: set[str]) -> str:
    if hf.parent.name == "hf":
        name = hf.parent.parent.name + ("" if hf.name == "target" else f"-{hf.name}")
    else:
        name = hf.name
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def _manifest(folder: Path) -> dict | None:
    return load_json(folder / "quickdraft.json")


def _fits(folder: Path, kind: str, device: str) -> bool:
    """Whether ``folder`` is a static export of ``kind`` (float or int4) for ``device``."""
    m = _manifest(folder)
    if not m or m.get("kv_cache") != "static":
        return False
    if kind == "int4":
        return m.get("weights") == "int4" and m.get("execution_provider") == device
    return not m.get("weights") and m.get("dtype") == float_dtype(device)


def export_one(hf: Path, out: Path, kind: str, device: str, validate: bool) -> dict:
    """Export ``hf`` as a static ``kind`` graph into ``out`` (skipped when present)."""
    if _fits(out, kind, device):
        return {"folder": str(out), "reused": True}
    if (out / "quickdraft.json").is_file():
        raise ValueError(f"{out} holds another kind of export; move it away or give --reuse")
    from quickdraft.export.builder import export_static_model

    dtype = "int4" if kind == "int4" else float_dtype(device)
    t0 = time.perf_counter()
    export_static_model(hf, out, dtype=dtype, device=device, validate=validate,
                        progress=lambda msg: log(f"  {msg}"))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"folder": str(out), "reused": False, "dtype": dtype,
            "seconds": round(time.perf_counter() - t0, 1), "bytes": size}


def prompt_for(hf: Path, past: int, vocab: int, seed: int = 0) -> tuple[list[int], str]:
    """The pair's first prompt (its prompts.json) cut to ``past`` tokens, else random ids."""
    if hf.parent.name == "hf":
        data = load_json(hf.parent.parent / "prompts.json") or {}
        for p in data.get("prompts") or []:
            if len(p) >= past:
                return [int(t) for t in p[:past]], "pair prompts.json"
    import numpy as np

    rng = np.random.default_rng(1000 + seed)
    return rng.integers(3, vocab, size=past).tolist(), "uniform random ids"


# ----------------------------------------------------------------------------- summary


def _ms(result: dict | None, row: str = "steps") -> dict[int, float]:
    r = ((result or {}).get("rows") or {}).get(row) or {}
    return {int(k): float(v) for k, v in (r.get("ms") or {}).items()} \
        if r.get("status") == "ok" else {}


def predicted(alpha: float, t_ar: float, t_draft: float, verify: dict[int, float]) -> dict:
    """Predicted speedup over an autoregressive step of ``t_ar`` ms for each gamma whose
    verify step (gamma + 1 tokens) was measured: Eq. 1's expected tokens * t_ar /
    (gamma * t_draft + t_verify), i.e. Theorem 3.8's improvement with c relative to the
    verify step, scaled by t_ar / t_verify."""
    from quickdraft import theory

    out = {}
    for k, t_v in sorted(verify.items()):
        g = k - 1
        if g < 1:
            continue
        out[g] = theory.walltime_improvement(alpha, g, t_draft / t_v) * t_ar / t_v
    if out:
        best = max(out, key=out.get)
        return {"by_gamma": out, "best_gamma": best, "best": out[best]}
    return {"by_gamma": {}}


def summarize(data: dict, alpha: float, gamma: int) -> tuple[dict, list[str]]:
    """Per model: the tables of the module docstring, and Markdown lines."""
    summary, md = {}, []
    for name, model in (data.get("models") or {}).items():
        res = model.get("variants") or {}
        s: dict = {}
        lines = [f"## {name}", ""]
        for method in ("steps", "steps_greedy"):
            ms = {v: _ms(r, method) for v, r in res.items()}
            ms = {v: m for v, m in ms.items() if m}
            if not ms:
                continue
            ks = sorted({k for m in ms.values() for k in m})
            int4 = {v: m for v, m in ms.items() if v.startswith("int4")}
            t = {"ms": ms}
            ones = {v: m[1] for v, m in int4.items() if 1 in m}
            if ones:
                fastest = min(ones, key=ones.get)
                t["fastest_int4_1token"] = {"variant": fastest, "ms": ones[fastest]}
                t["verify5_over_fastest_int4_1token"] = {
                    v: m[5] / ones[fastest] for v, m in ms.items() if 5 in m}
                t["best_int4_per_k"] = {
                    k: min((v for v in int4 if k in int4[v]), key=lambda v: int4[v][k])
                    for k in ks if any(k in m for m in int4.values())}
                t["mixed_ms"] = {k: int4[v][k] for k, v in t["best_int4_per_k"].items()}
            s[method] = t
            lines += [f"{method} (median ms per call, {'logits' if method == 'steps' else 'ids'}"
                      " to host)", "",
                      "| variant | " + " | ".join(f"k={k}" for k in ks) + " |",
                      "|---|" + "---|" * len(ks)]
            for v, m in ms.items():
                lines.append(f"| {v} | " + " | ".join(
                    f"{m[k]:.3f}" if k in m else "-" for k in ks) + " |")
            if "best_int4_per_k" in t:
                lines.append("| best int4 per k | " + " | ".join(
                    f"{t['mixed_ms'][k]:.3f} ({t['best_int4_per_k'][k]})"
                    if k in t["mixed_ms"] else "-" for k in ks) + " |")
                f = t["fastest_int4_1token"]
                lines += ["", f"fastest int4 1-token step: {f['ms']:.3f} ms ({f['variant']}); "
                          "verify(k=5) / it: " + ", ".join(
                              f"{v} {r:.2f}" for v, r in
                              t["verify5_over_fastest_int4_1token"].items())]
            lines.append("")
        # autoregressive and speculative, measured
        ar = {v: ((r.get("rows") or {}).get("ar") or {}) for v, r in res.items()}
        ar = {v: a["tokens_per_s"] for v, a in ar.items()
              if a.get("status") == "ok" and a.get("tokens_per_s")}
        s["ar_tokens_per_s"] = ar
        int4_ar = {v: x for v, x in ar.items() if v.startswith("int4")}
        best_ar = max(int4_ar, key=int4_ar.get) if int4_ar else None
        spec_rows = []
        for v, r in res.items():
            for key, row in sorted((r.get("rows") or {}).items()):
                if key.startswith("spec_g") and row.get("status") == "ok":
                    spec_rows.append({
                        "variant": v, "gamma": row["gamma"],
                        "tokens_per_s": row["tokens_per_s"], "alpha": row.get("alpha"),
                        "speedup_over_own_ar": row.get("speedup_over_own_ar"),
                        "speedup_over_best_int4_ar": (row["tokens_per_s"] / int4_ar[best_ar]
                                                      if best_ar else None)})
        s["spec_measured"] = spec_rows
        if ar:
            lines += ["autoregressive (greedy, tokens/s): " + ", ".join(
                f"{v} {x:.1f}" for v, x in ar.items()), ""]
        if spec_rows:
            lines += [f"speculative, controlled alpha {alpha}, measured (speedup over the "
                      f"best int4 AR: {best_ar})", "",
                      "| variant | gamma | tok/s | alpha | x own AR | x best int4 AR |",
                      "|---|---|---|---|---|---|"]
            for r in spec_rows:
                lines.append(f"| {r['variant']} | {r['gamma']} | {r['tokens_per_s']:.1f} | "
                             f"{_f(r['alpha'])} | {_f(r['speedup_over_own_ar'])} | "
                             f"{_f(r['speedup_over_best_int4_ar'])} |")
            lines.append("")
        # predicted: per variant and with the best int4 kernel per step length
        drafts = [_ms(r, "draft") for r in res.values()]
        drafts = [d[1] for d in drafts if 1 in d]
        if drafts:
            t_d = statistics.median(drafts)
            pred = {"draft_ms": t_d, "alpha": alpha, "label": "predicted"}
            for method in ("steps", "steps_greedy"):
                t = s.get(method) or {}
                if "fastest_int4_1token" not in t:
                    continue
                t_ar = t["fastest_int4_1token"]["ms"]
                per = {v: predicted(alpha, t_ar, t_d, {k: x for k, x in m.items() if k > 1})
                       for v, m in t["ms"].items()}
                per["per-k best int4"] = predicted(
                    alpha, t_ar, t_d, {k: x for k, x in t["mixed_ms"].items() if k > 1})
                pred[method] = per
            s["predicted"] = pred
            for method in ("steps", "steps_greedy"):
                per = pred.get(method)
                if not per:
                    continue
                lines += [f"PREDICTED speedup over the fastest int4 AR step ({method} costs, "
                          f"draft {t_d:.3f} ms, alpha {alpha}; E[tokens] t_AR / "
                          f"(gamma t_draft + t_verify))", "",
                          f"| target kernels | gamma {gamma} | best gamma | best |",
                          "|---|---|---|---|"]
                for v, p in per.items():
                    if not p.get("by_gamma"):
                        continue
                    lines.append(f"| {v} | {_f(p['by_gamma'].get(gamma))} | "
                                 f"{p['best_gamma']} | {_f(p['best'])} |")
                lines.append("")
        # did the fpA_intB kernel engage?
        probes = {v: ((r.get("rows") or {}).get("probe") or {}) for v, r in res.items()}
        if probes.get("int4", {}).get("sha1") and probes.get("int4-fpa", {}).get("sha1"):
            a, b = probes["int4"], probes["int4-fpa"]
            diff = max(abs(x - y) for ra, rb in zip(a["slice"], b["slice"])
                       for x, y in zip(ra, rb))
            s["fpa_engaged"] = {"logits_identical": a["sha1"] == b["sha1"],
                                "max_abs_diff_slice": diff,
                                "argmax_equal": a["argmax"] == b["argmax"]}
            lines += [f"int4 vs int4-fpa probe logits: identical {a['sha1'] == b['sha1']}, "
                      f"max |diff| (first 32 logits of 5 rows) {diff:.3g} (identical logits "
                      "would mean the fpA_intB kernel did not engage)", ""]
        missing = {}
        for v, r in res.items():
            if r.get("status") == "ok":
                continue
            failed = [f"{key}: {row.get('type')}: {str(row.get('message'))[:160]}"
                      for key, row in (r.get("rows") or {}).items()
                      if row.get("status") == "error"]
            missing[v] = "; ".join([r.get("message") or r.get("status"), *failed])
        if missing:
            s["not_measured"] = missing
            lines += ["not measured: " + "; ".join(f"{v} ({why})" for v, why in
                                                   missing.items()), ""]
        summary[name] = s
        md += lines
    return summary, md


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dirs", nargs="*", type=Path, help="Hugging Face model folders")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qdbench/int4-steps"),
                    help="exports go to WORK/NAME/{float,int4,draft}")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default $OUT/int4_steps.json, else "
                         "runs/int4-steps/int4_steps.json)")
    ap.add_argument("--reuse", action="append", default=[], metavar="NAME/KIND=DIR",
                    help="use an existing export folder (KIND float, int4 or draft)")
    ap.add_argument("--draft-dir", action="append", default=[], type=Path,
                    help="the draft's static export, one per model in order")
    ap.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)))
    ap.add_argument("--past", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50, help="timed calls per step length")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations")
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--fpa-env", action="store_true",
                    help="also measure int4 with ORT_FPA_INTB_GEMM=1 (no session entry)")
    ap.add_argument("--no-spec", action="store_true", help="no draft, no speculative rows")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--validate", action="store_true", help="exports checked against PyTorch")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep variants already measured ok in --out")
    ap.add_argument("--worker-timeout", type=float, default=600.0)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new export or variant starts")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def resolve_device_name(name: str) -> str:
    if name != "auto":
        return name
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def run_variant(spec: dict, env_extra: dict, timeout: float) -> dict:
    """Run one variant's worker in a child process; its (possibly partial) results."""
    spec_path = Path(spec["result"]).with_suffix(".spec.json")
    dump_json(spec_path, spec)
    Path(spec["result"]).unlink(missing_ok=True)
    env = worker_env(env_extra)
    if FPA_ENV not in env_extra:
        env.pop(FPA_ENV, None)  # only the variant that asks for it sees it
    t0 = time.perf_counter()
    rc = run_logged([sys.executable, str(SCRIPT), "--worker", str(spec_path)],
                    timeout=timeout, env=env, prefix=f"  [{spec['model']} {spec['variant']}] ")
    result = load_json(spec["result"]) or {"rows": {}}
    result["returncode"] = rc
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if rc != 0:
        result["status"] = "timeout" if rc == 124 else "crashed"
    else:
        rows = result.get("rows") or {}
        result["status"] = "ok" if rows.get("load", {}).get("status") == "ok" else "error"
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker.read_text()))
        return 0
    if not args.hf_dirs:
        print("give at least one Hugging Face model folder", file=sys.stderr)
        return 2
    device = resolve_device_name(args.device)
    out = args.out or (Path(os.environ["OUT"]) / "int4_steps.json" if os.environ.get("OUT")
                       else Path("runs/int4-steps/int4_steps.json"))
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    previous = load_json(out) if args.resume else None
    rec = Record(out, {"command": " ".join([sys.executable, *sys.argv]),
                       "device": device, "ks": ks, "past": args.past,
                       "new_tokens": args.new_tokens, "alpha": args.alpha, "gamma": args.gamma,
                       "fpa_switch": {"session_config": FPA_KEY, "env": FPA_ENV,
                                      "documented": FPA_DOC},
                       "environment": environment(), "models": {}})
    reuse = {}
    for item in args.reuse:
        key, _, folder = item.partition("=")
        reuse[key.strip()] = Path(folder.strip())
    t_start = time.perf_counter()

    def over_budget() -> bool:
        return args.budget is not None and time.perf_counter() - t_start > args.budget

    taken: set[str] = set()
    for index, hf in enumerate(args.hf_dirs):
        hf = hf.resolve()
        name = model_name(hf, taken)
        model = rec.data["models"].setdefault(name, {"hf": str(hf), "exports": {},
                                                     "variants": {}})
        rec.save()
        pair = hf.parent.parent if hf.parent.name == "hf" else None
        # exports: the float and the int4 graph, and the draft
        folders: dict[str, Path | None] = {}
        auto = {"float": pair / "qd-fast" / hf.name if pair else None,
                "draft": pair / "qd-fast" / "draft" if pair and hf.name == "target" else None}
        for kind in ("float", "int4", "draft"):
            if kind == "draft" and args.no_spec:
                continue
            if kind == "draft" and index < len(args.draft_dir):
                folders[kind] = args.draft_dir[index]
                model["exports"][kind] = {"folder": str(args.draft_dir[index]), "given": True}
                continue
            given = reuse.get(f"{name}/{kind}")
            if given is not None:
                folders[kind] = given
                model["exports"][kind] = {"folder": str(given), "given": True}
                continue
            if auto.get(kind) is not None and _fits(auto[kind], "float", device):
                folders[kind] = auto[kind]
                model["exports"][kind] = {"folder": str(auto[kind]), "reused": True,
                                          "from": "the pair's qd-fast export"}
                continue
            src = hf
            if kind == "draft":
                src = pair / "hf" / "draft" if pair else None
                if src is None or not (src / "config.json").is_file():
                    folders[kind] = None
                    model["exports"][kind] = {"status": "unavailable",
                                              "message": "no draft: give --draft-dir"}
                    continue
            if over_budget():
                model["exports"][kind] = {"status": "skipped", "message": "budget"}
                folders[kind] = None
                continue
            target_dir = args.work / name / kind
            log(f"{name}: {kind} export of {src} -> {target_dir}")
            try:
                model["exports"][kind] = {"status": "ok", **export_one(
                    src, target_dir, "int4" if kind == "int4" else "float", device,
                    args.validate)}
                folders[kind] = target_dir
            except Exception as e:  # noqa: BLE001
                model["exports"][kind] = {"status": "error", **error_record(e, export=kind)}
                folders[kind] = None
                log(f"{name}: {kind} export failed: {type(e).__name__}: {str(e)[:500]}")
            rec.save()
        rec.save()
        if args.export_only:
            continue
        vocab = int((_manifest(folders.get("float") or folders.get("int4") or hf) or {}).get(
            "vocab_size") or (load_json(hf / "config.json") or {}).get("vocab_size") or 1000)
        prompt, source = prompt_for(hf, args.past, vocab)
        model["prompt"] = {"tokens": len(prompt), "source": source}
        for variant in variants_for(device, args.fpa_env):
            v = variant["name"]
            old = ((previous or {}).get("models", {}).get(name, {}).get("variants", {})
                   .get(v))
            if old and old.get("status") == "ok":
                model["variants"][v] = old
                rec.save()
                continue
            if variant.get("cuda_only") and device != "cuda":
                model["variants"][v] = {"status": "unavailable", "message": (
                    "the fpA_intB MatMulNBits kernels are CUDA-only (" + FPA_KEY + ")")}
                rec.save()
                continue
            folder = folders.get(variant["export"])
            if folder is None:
                model["variants"][v] = {"status": "unavailable",
                                        "message": f"no {variant['export']} export"}
                rec.save()
                continue
            if over_budget():
                model["variants"][v] = {"status": "skipped", "message": "budget"}
                rec.save()
                continue
            spec = {"model": name, "variant": v, "device": device, "target_dir": str(folder),
                    "draft_dir": None if args.no_spec or folders.get("draft") is None
                    else str(folders["draft"]),
                    "draft_note": (model["exports"].get("draft") or {}).get("message"),
                    "config": variant["config"], "ks": ks, "prompt": prompt,
                    "new_tokens": args.new_tokens, "reps": args.reps, "warmup": args.warmup,
                    "repeats": args.repeats, "alpha": args.alpha, "gamma": args.gamma,
                    "cuda_graph": not args.no_cuda_graph,
                    "result": str(args.work / "workers" / f"{name}.{v}.json")}
            try:
                model["variants"][v] = run_variant(spec, variant["env"], args.worker_timeout)
            except Exception as e:  # noqa: BLE001
                model["variants"][v] = {"status": "error", **error_record(e, variant=v)}
            rec.save()
            summary, _ = summarize(rec.data, args.alpha, args.gamma)
            rec.set("summary", summary)
    summary, md = summarize(rec.data, args.alpha, args.gamma)
    rec.set("summary", summary)
    rec.set("seconds", round(time.perf_counter() - t_start, 1))
    text = "\n".join([f"# int4 step costs ({device}, past {args.past}, "
                      f"{args.new_tokens} new tokens)", "", *md])
    out.with_suffix(".md").write_text(text + "\n")
    print(text, flush=True)
    bad = [(n, v) for n, m in rec.data["models"].items()
           for v, r in m["variants"].items() if r.get("status") in ("error", "crashed")]
    for n, m in rec.data["models"].items():
        for v, r in m["variants"].items():
            for key, row in (r.get("rows") or {}).items():
                if row.get("status") == "error":
                    bad.append((n, v, key))
    if bad:
        log(f"errors in {bad}; see {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
