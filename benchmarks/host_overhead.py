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

Systems, for each temperature: autoregressive and speculative at each gamma, interleaved
round by round (``--repeats`` rounds, one generation of each system per round, the same
seed every round); the table shows medians. Prefill is excluded.

    python benchmarks/host_overhead.py                        # both pairs, T 0 and 1
    python benchmarks/host_overhead.py --pairs default --json out.json

At temperature 0 every speculative output must equal the autoregressive one (checked).
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


def run_once(gen, prompt, config, clock: OrtClock) -> dict:
    """One generation, step by step: decode wall time and the ORT time inside it."""
    gen.prefill(prompt, config)
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


def measure_pair(name: str, folder: Path, args) -> list[dict]:
    from quickdraft.ort_backend import DecodeConfig, Generator
    from quickdraft.sampling import SamplingConfig

    gen = Generator.load(folder, device=args.device)
    clock = OrtClock()
    vocab = gen.target.vocab_size
    rng = np.random.default_rng(args.seed)
    prompt = [int(t) for t in rng.integers(2, vocab, args.prompt_tokens)]
    if gen.tokenizer is not None and name == "default":
        prompt = gen.encode(args.prompt)
    rows = []
    for temperature in args.temperatures:
        sampling = SamplingConfig(temperature=temperature)
        systems = [("AR", DecodeConfig(max_new_tokens=args.new_tokens, sampling=sampling,
                                        seed=args.seed, autoregressive=True))]
        systems += [(f"SD g={g}", DecodeConfig(max_new_tokens=args.new_tokens, gamma=g,
                                               sampling=sampling, seed=args.seed))
                    for g in args.gammas]
        for _, config in systems:  # warm-up: sessions, verification graphs, caches
            run_once(gen, prompt, config, clock)
        clock.wrap_all(gen)
        runs = {label: [] for label, _ in systems}
        for _ in range(args.repeats):
            for label, config in systems:
                runs[label].append(run_once(gen, prompt, config, clock))
        ar_ms_per_token = None
        for label, _ in systems:
            rs = runs[label]
            if len({tuple(r["tokens"]) for r in rs}) != 1:
                raise SystemExit(f"{name} {label} T={temperature}: output changed between runs")
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
    return rows


def table(rows: list[dict]) -> str:
    head = ("| pair | T | system | tok/it | ms/it | ORT ms/it | host ms/it | host ms/token "
            "| tokens/s | vs AR |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['temperature']:g} | {r['system']} "
            f"| {r['tokens_per_iteration']:.2f} | {r['ms_per_iteration']:.3f} "
            f"| {r['ort_ms_per_iteration']:.3f} | {r['host_ms_per_iteration']:.3f} "
            f"| {r['host_ms_per_token']:.3f} | {r['tokens_per_s']:.0f} "
            f"| {r['speedup_over_ar']:.2f}x |")
    return "\n".join(lines)


def compare(before: dict, after: dict) -> str:
    """Two results files side by side (medians of each), with a check that every system
    produced the same tokens in both."""
    head = ("| pair | T | system | ms/it | host ms/it | host ms/token | tokens/s | vs AR "
            "| same tokens |")
    lines = [head, "|" + "---|" * 9]
    keyed = {(r["pair"], r["temperature"], r["system"]): r for r in after["rows"]}
    for b in before["rows"]:
        a = keyed.get((b["pair"], b["temperature"], b["system"]))
        if a is None:
            continue

        def pair(key, fmt, b=b, a=a):
            return f"{format(b[key], fmt)} -> {format(a[key], fmt)}"

        same = "yes" if a["tokens"] == b["tokens"] else "NO"
        lines.append(
            f"| {b['pair']} | {b['temperature']:g} | {b['system']} "
            f"| {pair('ms_per_iteration', '.3f')} | {pair('host_ms_per_iteration', '.3f')} "
            f"| {pair('host_ms_per_token', '.3f')} | {pair('tokens_per_s', '.0f')} "
            f"| {pair('speedup_over_ar', '.2f')} | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=["default", "static"],
                    choices=["default", "static"])
    ap.add_argument("--default-dir", type=Path, default=REPO / "quickdraft/models/default")
    ap.add_argument("--static-dir", type=Path,
                    default=Path(os.environ.get("TMPDIR", "/tmp")) / "quickdraft-host-static")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--gammas", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", default="import os\nimport sys\n\n\ndef main(argv):\n    ")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="random prompt (static pair)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the rows and the settings here")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"),
                    help="print two --json results side by side and exit")
    args = ap.parse_args(argv)
    if args.compare:
        before, after = (json.loads(path.read_text()) for path in args.compare)
        print(compare(before, after))
        return 0
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
