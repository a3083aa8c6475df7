"""Host time per iteration and per autoregressive token, on the CPU.

Runs quickdraft's ONNX Runtime generator on two pairs, autoregressive and speculative, and
splits every decode step's wall time into time inside ONNX Runtime (every run call of the
target, the draft, the cache slicer and the verification graph: the session's
``run_with_iobinding``) and the rest, host
time: Python and NumPy between the calls (sampling, verification on the host,
bookkeeping, binding inputs and outputs).

Pairs:

* ``default``: the bundled pair (``quickdraft/models/default``, dynamic optimum graphs,
  verification on the host);
* ``static``: a tiny random Llama pair (target 2 layers d 64, draft 1 layer d 32, 512
  tokens) exported with ``--kv-cache static`` (GroupQueryAttention, shared past/present
  buffers), verification on the device (the ONNX graph, here on the CPU provider). Built
  into ``--static-dir`` on first use (needs the ``export`` extra).

Systems, for each temperature: autoregressive and speculative at each gamma (on the static
pair also pipelined at each ``--pipelined`` gamma, plain and with each
``--shadow-keep-rates`` ShadowRule), interleaved
round by round (``--repeats`` rounds, one generation of each system per round, the same
seed every round); the table shows medians. Prefill is excluded.

    python benchmarks/host_overhead.py                        # both pairs, T 0 and 1
    python benchmarks/host_overhead.py --pairs default --json out.json

At temperature 0 every speculative output must equal the autoregressive one (checked).
``--profile N`` then runs N more generations of each system under ``cProfile`` and adds
the functions with the most time of their own (ms per iteration) to each row, ORT's run
calls among them: where the host time goes (profiling slows the Python side, so read the
shares, not the absolute times).
``--device cuda`` runs the same on a GPU (the static pair then has to be a CUDA export:
``--dtype fp16 --device cuda``, given with ``--static-dir``).

Runs against whichever ``quickdraft`` is importable (``PYTHONPATH=DIR`` to measure another
checkout with this same script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


class OrtClock:
    """Seconds spent inside ``run_with_iobinding`` of the sessions it wraps."""

    def __init__(self):
        self.s = 0.0
        self.calls = 0
        self._wrapped: set[tuple[int, str]] = set()

    def wrap(self, obj, attr: str = "run_with_iobinding") -> None:
        """Time ``obj.attr`` (a run method) through an instance attribute shadowing it."""
        if (id(obj), attr) in self._wrapped:
            return
        self._wrapped.add((id(obj), attr))
        run = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                self.s += time.perf_counter() - t0
                self.calls += 1

        setattr(obj, attr, timed)

    def wrap_all(self, root, depth: int = 5) -> None:
        """Wrap every InferenceSession reachable from ``root`` through attributes, lists
        and dicts (the models, their cache slicers, the verifier's graphs)."""
        import onnxruntime as ort

        seen: set[int] = set()

        def walk(obj, d):
            if id(obj) in seen or d < 0:
                return
            seen.add(id(obj))
            if isinstance(obj, ort.InferenceSession):
                self.wrap(obj)
                return
            if isinstance(obj, dict):
                children = list(obj.values())
            elif isinstance(obj, (list, tuple)):
                children = list(obj)
            elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("quickdraft"):
                children = list(vars(obj).values())
            else:
                return
            for child in children:
                walk(child, d - 1)

        walk(root, depth)


def build_static_pair(out: Path) -> None:
    """The tiny random Llama pair, exported with static caches (seconds on 2 cores)."""
    import tempfile

    from quickdraft.cli import main as cli_main
    from quickdraft.export.toy import make_random_model, train_tokenizer

    with tempfile.TemporaryDirectory(prefix="qd-host-") as tmp:
        tmp = Path(tmp)
        train_tokenizer(tmp / "tok", vocab_size=512)
        for role, seed in (("target", 0), ("draft", 1)):
            make_random_model("llama", tmp / role, tmp / "tok", role=role, seed=seed)
        rc = cli_main(["export", "--target", str(tmp / "target"), "--draft", str(tmp / "draft"),
                       "--out", str(out), "--kv-cache", "static", "--max-length", "256",
                       "--steps", "4"])
        if rc != 0:
            raise SystemExit(f"static export failed ({rc})")


def run_once(gen, prompt, clock: OrtClock) -> dict:
    """One generation, step by step: decode wall time and the ORT time inside it."""
    gen.prefill(prompt)
    gen.stats.decode_s = 0.0
    clock.s, clock.calls = 0.0, 0
    while not gen.done:
        gen.step()
    s = gen.stats
    g = s.generation
    return {
        "decode_s": s.decode_s,
        "ort_s": clock.s,
        "ort_calls": clock.calls,
        "new_tokens": s.new_tokens,
        "iterations": g.iterations,
        "tokens": list(gen.new_tokens),
    }


def host_profile(gen, prompt, runs: int, top: int = 15) -> list[dict]:
    """The ``top`` functions by own time over the decode steps of ``runs`` profiled
    generations, per iteration."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    iterations = 0
    for _ in range(runs):  # the decode steps only, as run_once times them
        gen.prefill(prompt)
        profiler.enable()
        while not gen.done:
            gen.step()
        profiler.disable()
        iterations += gen.stats.generation.iterations
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(file).name}:{line}({fn})",
             "calls_per_iteration": nc / iterations,
             "ms_per_iteration": 1e3 * tt / iterations,
             "cumulative_ms_per_iteration": 1e3 * ct / iterations}
            for (file, line, fn), (_, nc, tt, ct, _) in rows]


def measure_pair(name: str, folder: Path, args) -> list[dict]:
    from quickdraft.ort_backend import DecodeConfig, load_pair
    from quickdraft.pipelined import ShadowRule
    from quickdraft.sampling import SamplingConfig

    pipelined = args.pipelined if name == "static" else []
    pair = load_pair(folder, device=args.device, attention=args.attention,
                     max_gamma=max(args.gammas + pipelined))
    clock = OrtClock()
    vocab = pair.target.vocab_size
    rng = np.random.default_rng(args.seed)
    prompt = [int(t) for t in rng.integers(2, vocab, args.prompt_tokens)]
    if name == "default":
        prompt = list(pair.tokenizer.encode(args.prompt).ids)
    rows = []
    for temperature in args.temperatures:
        config = DecodeConfig(max_new_tokens=args.new_tokens,
                              sampling=SamplingConfig(temperature=temperature), seed=args.seed)
        # one generator per system, reused round after round (as a server keeps one per
        # sequence); each generation starts from its prompt, the prefill is not timed
        systems = [("AR", pair.generator(config))]
        systems += [(f"SD g={g}", pair.generator(config, gamma=g)) for g in args.gammas]
        if name == "static":  # pipelining needs static caches
            systems += [(f"PL g={g}", pair.generator(config, gamma=g, pipelined=True))
                        for g in args.pipelined]
            systems += [(f"PL g={g} keep>={rate:g}",
                         pair.generator(config, gamma=g, pipelined=True,
                                        shadow_rule=ShadowRule(min_keep_rate=rate)))
                        for g in args.pipelined for rate in args.shadow_keep_rates]
        for _, gen in systems:  # warm-up: sessions, verification graphs, caches
            run_once(gen, prompt, clock)
            clock.wrap_all(gen)
        runs = {label: [] for label, _ in systems}
        for _ in range(args.repeats):
            for label, gen in systems:
                runs[label].append(run_once(gen, prompt, clock))
        profiles = {label: host_profile(gen, prompt, args.profile)
                    for label, gen in systems} if args.profile else {}
        for _, gen in systems:
            gen.close()
        ar_ms_per_token = None
        for label in runs:
            rs = runs[label]
            if len({tuple(r["tokens"]) for r in rs}) != 1:
                raise SystemExit(f"{name} {label} T={temperature}: output changed between runs "
                                 f"(attention {args.attention}; on CUDA cuDNN's attention "
                                 "is not deterministic run to run: pass --attention xqa)")
            if temperature == 0 and rs[0]["tokens"] != runs["AR"][0]["tokens"]:
                raise SystemExit(f"{name} {label}: greedy output differs from autoregressive")
            it = rs[0]["iterations"]
            new = rs[0]["new_tokens"]
            decode = statistics.median(r["decode_s"] for r in rs)
            ort = statistics.median(r["ort_s"] for r in rs)
            host = statistics.median(r["decode_s"] - r["ort_s"] for r in rs)
            ms_per_token = 1e3 * decode / new
            if label == "AR":
                ar_ms_per_token = ms_per_token
            rows.append({
                "pair": name, "temperature": temperature, "system": label,
                "new_tokens": new, "iterations": it, "tokens_per_iteration": new / it,
                "ort_calls_per_iteration": rs[0]["ort_calls"] / it,
                "ms_per_iteration": 1e3 * decode / it, "ort_ms_per_iteration": 1e3 * ort / it,
                "host_ms_per_iteration": 1e3 * host / it,
                "ms_per_token": ms_per_token, "host_ms_per_token": 1e3 * host / new,
                "tokens_per_s": new / decode,
                "speedup_over_ar": ar_ms_per_token / ms_per_token,
                "tokens": rs[0]["tokens"],
            })
            if label in profiles:
                rows[-1]["host_profile"] = profiles[label]
    return rows


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    return tabulate(
        [(r["pair"], f"{r['temperature']:g}", r["system"], f"{r['tokens_per_iteration']:.2f}",
          f"{r['ms_per_iteration']:.3f}", f"{r['ort_ms_per_iteration']:.3f}",
          f"{r['host_ms_per_iteration']:.3f}", f"{r['host_ms_per_token']:.3f}",
          f"{r['tokens_per_s']:.0f}", f"{r['speedup_over_ar']:.2f}x") for r in rows],
        headers=("pair", "T", "system", "tok/it", "ms/it", "ORT ms/it", "host ms/it",
                 "host ms/token", "tokens/s", "vs AR"),
        tablefmt="github", disable_numparse=True)


def profile_table(row: dict, top: int = 10) -> str:
    from tabulate import tabulate

    return tabulate(
        [(p["function"], f"{p['calls_per_iteration']:.1f}", f"{p['ms_per_iteration']:.3f}",
          f"{p['cumulative_ms_per_iteration']:.3f}") for p in row["host_profile"][:top]],
        headers=(f"{row['pair']} T={row['temperature']:g} {row['system']}: function",
                 "calls/it", "own ms/it", "cumulative ms/it"),
        tablefmt="github", disable_numparse=True)


def compare(before: dict, after: dict) -> str:
    """Two results files side by side (medians of each), with a check that every system
    produced the same tokens in both."""
    from tabulate import tabulate

    keyed = {(r["pair"], r["temperature"], r["system"]): r for r in after["rows"]}
    body = []
    for b in before["rows"]:
        a = keyed.get((b["pair"], b["temperature"], b["system"]))
        if a is None:
            continue
        body.append([b["pair"], f"{b['temperature']:g}", b["system"]] + [
            f"{format(b[key], spec)} -> {format(a[key], spec)}" for key, spec in (
                ("ms_per_iteration", ".3f"), ("host_ms_per_iteration", ".3f"),
                ("host_ms_per_token", ".3f"), ("tokens_per_s", ".0f"),
                ("speedup_over_ar", ".2f"))] + ["yes" if a["tokens"] == b["tokens"] else "NO"])
    return tabulate(body, headers=("pair", "T", "system", "ms/it", "host ms/it",
                                   "host ms/token", "tokens/s", "vs AR", "same tokens"),
                    tablefmt="github", disable_numparse=True)


def main(argv=None) -> int:
    from quickdraft.ort_backend.device import ATTENTION_KERNELS, DEFAULT_ATTENTION

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=["default", "static"],
                    choices=["default", "static"])
    ap.add_argument("--default-dir", type=Path, default=REPO / "quickdraft/models/default")
    ap.add_argument("--static-dir", type=Path,
                    default=Path(os.environ.get("TMPDIR", "/tmp")) / "quickdraft-host-static")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--attention", choices=ATTENTION_KERNELS, default=DEFAULT_ATTENTION,
                    help="CUDA: GroupQueryAttention's kernel (default %(default)s)")
    ap.add_argument("--gammas", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--pipelined", type=int, nargs="*", default=[], metavar="GAMMA",
                    help="static pair: pipelined systems at these gammas too")
    ap.add_argument("--shadow-keep-rates", type=float, nargs="*", default=[], metavar="RATE",
                    help="and each pipelined gamma again with a ShadowRule of this min_keep_rate")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", default="import os\nimport sys\n\n\ndef main(argv):\n    ")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="random prompt (static pair)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then N profiled generations per system (cProfile, own time)")
    ap.add_argument("--json", type=Path, help="write the rows and the settings here")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"),
                    help="print two --json results side by side and exit")
    args = ap.parse_args(argv)
    if args.compare:
        before, after = (json.loads(path.read_text()) for path in args.compare)
        print(compare(before, after))
        return 0
    if any(g < 1 for g in args.gammas + args.pipelined):
        ap.error("--gammas and --pipelined take gammas >= 1")
    if args.shadow_keep_rates and not args.pipelined:
        ap.error("--shadow-keep-rates sets the ShadowRule of pipelined systems: give "
                 "--pipelined GAMMA too")
    if args.pipelined and "static" not in args.pairs:
        ap.error("--pipelined needs static caches: add --pairs static (the default pair's "
                 "caches grow)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import onnxruntime as ort

    import quickdraft

    where = Path(quickdraft.__file__).resolve().parent
    print(f"quickdraft from {where}; onnxruntime {ort.__version__}; numpy {np.__version__}; "
          f"{os.cpu_count()} CPUs; device {args.device}", file=sys.stderr)
    rows = []
    for name in args.pairs:
        folder = args.default_dir if name == "default" else args.static_dir
        if name == "static" and not (folder / "target" / "quickdraft.json").is_file():
            print(f"building the static pair in {folder}", file=sys.stderr)
            build_static_pair(folder)
        rows += measure_pair(name, folder, args)
    if args.json:
        args.json.write_text(json.dumps({
            "quickdraft": str(where), "onnxruntime": ort.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "device": args.device, "argv": sys.argv[1:],
            "rows": rows}, indent=1))
    print(table(rows))
    for row in rows:
        if "host_profile" in row and row["system"] != "AR":
            print(profile_table(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
