"""The fast path on a GPU: build, export, check and time, in one call.

    python benchmarks/fast_path_gpu.py --size 1b                    # on a GPU machine
    python benchmarks/fast_path_gpu.py --size tiny --device cpu     # smoke test on a CPU

1. A random Llama pair of the named size (``benchmarks.models.make_random_pair``: Llama
   shapes, structured weights with wide greedy margins and a known acceptance rate), built
   on the device and saved as Hugging Face folders.
2. Exports of the same weights: the fast path (``export_static_pair``: onnxruntime-genai's
   builder, GroupQueryAttention, static caches; fp16 on CUDA, fp32 on the CPU) and the
   previous path (``export_pair``: optimum-onnx, dynamic caches), unless ``--no-optimum``.
3. One child process per configuration (so each has its own memory and a crash stays
   contained; the children import onnxruntime but not torch):

   * ``static``: StaticOrtModel without CUDA graphs;
   * ``static-graphs``: the same with CUDA graphs (draft step: graph ids 1, 2; target:
     one id per step length 1 .. gamma + 1; prefill uncaptured);
   * ``optimum``: the generic OrtModel (IOBinding, dynamic caches).

   Each measures: target and draft ms per step (1 token), the target's ms for gamma + 1
   tokens (the verify step) against 1, greedy and sampled generation (tokens/s, host
   time per iteration, acceptance), greedy speculative = greedy autoregressive token for
   token, the verification graph against NumPy's ``verify`` on the device (static configs),
   and the GPU memory of the process (NVML) after loading and at the end.
4. A table (printed last) and everything as JSON in ``$OUT/fast_path.json`` (or the work
   folder when OUT is unset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- parent: build and export ---------------------------------------------------------------


def build_and_export(args) -> dict:
    from benchmarks.models import make_random_pair, prompts_of

    work = Path(args.work)
    pair_dir = work / "pair"
    info: dict = {}
    if not (pair_dir / "hf" / "draft" / "config.json").is_file():
        log(f"building the random {args.size} pair on {args.device}")
        t0 = time.perf_counter()
        info["pair"] = make_random_pair(args.size, pair_dir, device=args.device,
                                        num_prompts=args.prompts, prompt_len=args.prompt_len,
                                        agreement=args.agreement)
        info["build_s"] = round(time.perf_counter() - t0, 1)
    info["prompts"] = prompts_of(pair_dir)[: args.prompts]
    dtype = "fp16" if args.device == "cuda" else "fp32"
    hf = pair_dir / "hf"
    need = args.prompt_len + args.new_tokens + args.gamma + 8
    static_dir = work / "static"
    if not (static_dir / "draft" / "quickdraft.json").is_file():
        from quickdraft.export.builder import export_static_pair

        log("exporting the static pair (onnxruntime-genai builder)")
        t0 = time.perf_counter()
        report = export_static_pair(hf / "target", hf / "draft", static_dir, dtype, args.device,
                                    max_length=max(need, 256), validate=not args.no_validate,
                                    steps=8, overwrite=True, progress=log)
        info["static_export"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "target_validation": report.target.manifest.validation,
            "draft_validation": report.draft.manifest.validation,
        }
    if not args.no_optimum and not (work / "optimum" / "draft" / "quickdraft.json").is_file():
        from quickdraft.export import export_pair

        log("exporting the optimum pair (dynamic caches)")
        t0 = time.perf_counter()
        try:
            export_pair(hf / "target", hf / "draft", work / "optimum", dtype, args.device,
                        validate=False, overwrite=True, progress=log)
            info["optimum_export_s"] = round(time.perf_counter() - t0, 1)
        except Exception as e:
            info["optimum_export_error"] = f"{type(e).__name__}: {e}"
            log(f"optimum export failed: {e}")
    return info


# -- child: one configuration -----------------------------------------------------------------


def _time_steps(state, tokens, position: int, repeats: int, warmup: int, append) -> dict:
    """ms of ``append(tokens)`` at a fixed position (rewound between calls, not timed)."""
    times = []
    for i in range(warmup + repeats):
        state.rewind(position)
        t0 = time.perf_counter()
        append(tokens)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    times.sort()
    return {"mean_ms": 1e3 * sum(times) / len(times), "median_ms": 1e3 * times[len(times) // 2],
            "min_ms": 1e3 * times[0], "repeats": repeats}


def _load(config: str, work: Path, device: str, gamma: int):
    from quickdraft.ort_backend.device import Device

    dev = Device(device)
    if config == "optimum":
        from quickdraft.ort_backend import OrtModel

        return OrtModel(work / "optimum" / "target", dev), OrtModel(work / "optimum" / "draft", dev)
    from quickdraft.ort_backend.static import StaticOrtModel

    graphs = config == "static-graphs"
    target = StaticOrtModel(work / "static" / "target", dev,
                            graph_steps=tuple(range(1, gamma + 2)), cuda_graph=graphs)
    draft = StaticOrtModel(work / "static" / "draft", dev, graph_steps=(1, 2), cuda_graph=graphs)
    return target, draft


def verify_spot_check(device: str, vocab: int, cases: int = 100) -> dict:
    """The verification graph on the device against NumPy's verify (random rows; sampled
    settings only: greedy proposals are decided on argmax ids, with no graph)."""
    import numpy as np

    from quickdraft.ort_backend.device import Device
    from quickdraft.ort_backend.verify_graph import DeviceVerifier
    from quickdraft.sampling import SamplingConfig, adjust_logits, sample_token
    from quickdraft.verification import verify

    rng = np.random.default_rng(0)
    result = {}
    for name, cfg in (("t1", SamplingConfig()),
                      ("t0.8_k50_p0.9", SamplingConfig(0.8, 50, 0.9))):
        gamma = 4
        ver = DeviceVerifier(gamma, vocab, cfg, device=Device(device))
        agree = 0
        for _ in range(cases):
            target = (rng.normal(size=(gamma + 1, vocab)) * 3).astype(np.float32)
            q = adjust_logits(target[:gamma] + rng.normal(size=(gamma, vocab)), cfg)
            x = np.asarray([sample_token(q[i], rng.random()) for i in range(gamma)])
            u, s = rng.random(gamma), float(rng.random())
            agree += verify(adjust_logits(target, cfg), q, x, u, s) == ver(target, q, x, u, s)
        result[name] = f"{agree}/{cases}"
    return result


def run_child(args) -> dict:
    import numpy as np

    from benchmarks.common import gpu_memory_mib
    from quickdraft.generation import (
        GenerationStats,
        ModelDrafter,
        autoregressive_stream,
        speculative_stream,
    )
    from quickdraft.sampling import SamplingConfig

    work, config, gamma = Path(args.work), args.child, args.gamma
    prompts = json.loads((work / "pair" / "prompts.json").read_text())["prompts"][: args.prompts]
    res: dict = {"config": config, "memory": {"start": gpu_memory_mib()}}
    t0 = time.perf_counter()
    target, draft = _load(config, work, args.device, gamma)
    res["load_s"] = round(time.perf_counter() - t0, 2)
    res["memory"]["loaded"] = gpu_memory_mib()
    if config != "optimum":
        res["cache_bytes"] = {"target": target.cache_bytes, "draft": draft.cache_bytes}
    weights = {}
    for role in ("target", "draft"):
        folder = work / ("optimum" if config == "optimum" else "static") / role
        weights[role] = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    res["weight_file_bytes"] = weights

    prompt = [int(t) for t in prompts[0]]
    pos = len(prompt)
    # -- per-step costs, at the end of the prompt ------------------------------------------
    steps = {}
    for role, model in (("target", target), ("draft", draft)):
        state = model.new_state()
        state.append(prompt)
        # append: logits to the host, as the generic loop uses them (comparable across
        # configs); append_device (static only): the logits stay on the device
        steps[f"{role}_1"] = _time_steps(state, [prompt[-1]], pos, args.repeats, 5,
                                         state.append)
        if role == "target":
            toks = (prompt * 3)[: gamma + 1]
            steps[f"target_{gamma + 1}"] = _time_steps(state, toks, pos, args.repeats, 5,
                                                       state.append)
            if hasattr(state, "append_device"):
                steps[f"target_{gamma + 1}_device"] = _time_steps(
                    state, toks, pos, args.repeats, 5, state.append_device)
        state.close()  # its cache slot goes back to the model's pool
    res["steps"] = steps
    res["verify_cost_ratio"] = steps[f"target_{gamma + 1}"]["median_ms"] / steps["target_1"][
        "median_ms"]
    res["draft_target_cost_ratio_c"] = steps["draft_1"]["median_ms"] / steps["target_1"][
        "median_ms"]

    # -- generation -------------------------------------------------------------------------
    n = args.new_tokens
    greedy, sampled = SamplingConfig(temperature=0), SamplingConfig(temperature=1.0)
    gens: dict = {}
    tokens: dict = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        try:
            out, stats = fn()
        except Exception as e:  # keep going: report it
            gens[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{config} {name} failed: {e}")
            return
        stats = dict(stats)
        stats.setdefault("total_s", time.perf_counter() - t0)
        stats.setdefault("tokens_per_s", len(out) / stats["total_s"])
        gens[name] = stats
        tokens[name] = out

    def generic(mode, sampling, seed=0):
        """quickdraft.generation's loop over the models (host verification), its states
        closed after (static caches go back to the model's pool)."""
        def go():
            t0 = time.perf_counter()
            stats = GenerationStats()
            state = target.new_state()
            drafter = None if mode == "ar" else ModelDrafter(draft, sampling, gamma)
            common = dict(max_new_tokens=n, sampling=sampling, rng=np.random.default_rng(seed),
                          stats=stats, state=state)
            try:
                stream = (autoregressive_stream(target, prompt, **common) if mode == "ar" else
                          speculative_stream(target, None, prompt, drafter=drafter, **common))
                out = [t for piece in stream for t in piece]
            finally:
                for st in [state, *(drafter.states if drafter else [])]:
                    st.close()
            total = time.perf_counter() - t0
            return out, {**stats.as_dict(), "total_s": total, "tokens_per_s": len(out) / total}
        return go

    if config != "optimum":
        from benchmarks.adapters import Runner

        fg, fs = Runner(target, draft, sampling=greedy), Runner(target, draft, sampling=sampled)
    for _ in range(2):  # the first round warms up (sessions, arenas, CUDA graph captures)
        timed("ar_greedy_generic_loop", generic("ar", greedy))
        timed("spec_greedy_numpy_verify", generic("spec", greedy))
        timed("spec_t1_numpy_verify", generic("spec", sampled, seed=1))
        if config != "optimum":
            # greedy: decided on the target's argmax ids; sampled: the verification graph
            timed("ar_greedy_fast", lambda: fg.autoregressive(prompt, n))
            timed("spec_greedy_fast", lambda: fg.speculative(prompt, n, gamma))
            timed("spec_t1_device_verify", lambda: fs.speculative(prompt, n, gamma, seed=1))
    res["generation"] = gens
    res["tokens"] = {k: v for k, v in tokens.items()}
    ar = tokens.get("ar_greedy_generic_loop")
    res["greedy_equal"] = {k: (v == ar) for k, v in tokens.items() if "greedy" in k}
    if config != "optimum":
        res["captured_calls"] = {}
        for role, model in (("target", target), ("draft", draft)):
            state = model.new_state()  # the pooled slot every run above used
            res["captured_calls"][role] = state.calls
            state.close()
        try:
            res["verify_spot_check"] = verify_spot_check(args.device, target.vocab_size)
        except Exception as e:
            res["verify_spot_check"] = {"error": f"{type(e).__name__}: {e}"}
    res["memory"]["end"] = gpu_memory_mib()
    return res


# -- parent: run the children and report -----------------------------------------------------


def run_config(args, config: str) -> dict:
    from benchmarks.common import load_json, run_logged, worker_env

    result = Path(args.work) / f"{config}.result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", config, "--work", args.work, "--size", args.size,
           "--device", args.device, "--gamma", str(args.gamma), "--new-tokens",
           str(args.new_tokens), "--prompts", str(args.prompts), "--repeats", str(args.repeats)]
    t0 = time.perf_counter()
    rc = run_logged(cmd, timeout=args.child_timeout, env=worker_env(), prefix=f"[{config}] ")
    out = load_json(result)
    if rc != 0 or out is None:
        log(f"{config} failed (exit {rc})")
        return {"config": config, "error": f"exit {rc}"}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def table(results: list[dict], gamma: int) -> str:
    from tabulate import tabulate

    head = ("config", "tgt ms/1", f"tgt ms/{gamma + 1}", "ratio", "dft ms/1", "AR tok/s",
            "spec tok/s", "spec fast tok/s", "host ms/it", "alpha", "greedy=", "mem MiB")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["config"], "error"))
            continue
        s, g = r["steps"], r["generation"]
        ar = g.get("ar_greedy_fast") or g.get("ar_greedy_generic_loop") or {}
        sp = g.get("spec_greedy_numpy_verify", {})
        fast = g.get("spec_greedy_fast", {})
        mem = max((m.get("process_mib") or 0) for m in r["memory"].values())
        rows.append((
            r["config"], s["target_1"]["median_ms"], s[f"target_{gamma + 1}"]["median_ms"],
            r["verify_cost_ratio"], s["draft_1"]["median_ms"], ar.get("tokens_per_s"),
            sp.get("tokens_per_s"), fast.get("tokens_per_s"), fast.get("host_ms_per_iteration"),
            fast.get("acceptance_rate", sp.get("acceptance_rate")),
            "yes" if r["greedy_equal"] and all(r["greedy_equal"].values()) else "NO",
            mem or None))
    return tabulate(rows, headers=head, floatfmt=".2f", missingval="-")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1b", help="pair size in benchmarks.models.SHAPES")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--agreement", type=float, default=0.8, help="draft agreement (~alpha)")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per step shape")
    p.add_argument("--work", default="/tmp/quickdraft-fast-path")
    p.add_argument("--no-optimum", action="store_true", help="skip the optimum comparison")
    p.add_argument("--no-validate", action="store_true", help="skip export validation")
    p.add_argument("--child-timeout", type=int, default=400)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = Path(args.work) / f"{args.child}.result.json"
        out.write_text(json.dumps(run_child(args), default=str))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    if args.device == "cuda":
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            log("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu first")
            return 2
    info = build_and_export(args)
    configs = ["static"]
    if args.device == "cuda":
        configs.append("static-graphs")
    if not args.no_optimum and (Path(args.work) / "optimum" / "draft").is_dir():
        configs.append("optimum")
    results = [run_config(args, c) for c in configs]
    greedy = [r["tokens"].get("ar_greedy_generic_loop") for r in results if "tokens" in r]
    summary = {
        "args": vars(args), "info": info, "results": results,
        "greedy_ar_equal_across_configs": len({json.dumps(t) for t in greedy}) <= 1,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out_dir = Path(os.environ.get("OUT") or args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fast_path.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nfast path, {args.size} pair on {args.device}, gamma {args.gamma}, "
          f"{args.new_tokens} new tokens; JSON: {out_dir / 'fast_path.json'}")
    print(table(results, args.gamma))
    return 0


if __name__ == "__main__":
    sys.exit(main())
