"""Where the time of one fast-path generation goes: a profile of the host side.

Loads a static-cache export (``quickdraft export --kv-cache static``, or the ``qd-fast``
folder ``benchmarks/bench.py`` leaves in its work folder) with CUDA graphs on CUDA,
generates greedily, autoregressive and speculative, on the pair's first prompt, and
reports for each:

* the split of decode time the generator measures itself (target calls, draft calls,
  verification, the rest on the host), per token or per iteration;
* Python's ``cProfile`` of the same generations (``--repeats`` of them after a warm-up),
  the functions with the largest own time: ONNX Runtime's ``run_with_iobinding`` and the
  copies between host and device are where the device work and its waits are; everything
  else is host time.

    python benchmarks/profile_fast.py /tmp/qdbench/pairs/1b --gamma 4
    python benchmarks/profile_fast.py MODEL_DIR --prompt-ids 1,2,3 --device cpu

The first argument is a pair folder of the benchmark (``qd-fast/`` and ``prompts.json``
inside) or an export folder (``target/`` and ``draft/`` inside; then give
``--prompt-ids``). Writes ``profile_fast.json`` to ``--out`` (default: ``$OUT`` or the
current folder) and prints the tables.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _model_dir_and_prompt(folder: Path, prompt_ids: str | None) -> tuple[Path, list[int]]:
    if (folder / "qd-fast" / "target").is_dir():
        model_dir = folder / "qd-fast"
    elif (folder / "target").is_dir():
        model_dir = folder
    else:
        raise SystemExit(f"{folder}: neither a benchmark pair folder (qd-fast/ inside) nor an "
                         "export folder (target/ and draft/ inside)")
    if prompt_ids:
        return model_dir, [int(t) for t in prompt_ids.split(",")]
    prompts = folder / "prompts.json"
    if not prompts.is_file():
        raise SystemExit(f"{prompts} does not exist: give --prompt-ids")
    return model_dir, [int(t) for t in json.loads(prompts.read_text())["prompts"][0]]


def _top(profile: cProfile.Profile, calls_per: int, limit: int) -> list[dict]:
    """The functions with the largest own time, per generation."""
    stats = pstats.Stats(profile)
    rows = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = name if file == "~" else f"{Path(file).name}:{line}({name})"
        rows.append({"function": where, "calls": ncalls / calls_per,
                     "own_ms": 1e3 * tottime / calls_per, "cum_ms": 1e3 * cumtime / calls_per})
    rows.sort(key=lambda r: -r["own_ms"])
    return rows[:limit]


def profile_mode(gen, prompt: list[int], n: int, gamma: int | None, repeats: int,
                 limit: int) -> dict:
    """Warm up, then time and profile ``repeats`` generations of one mode."""
    def once():
        if gamma is None:
            return gen.autoregressive(prompt, n, seed=0)
        return gen.speculative(prompt, n, gamma, seed=0)

    once()  # sessions, CUDA-graph capture, verification graphs
    walls, stats = [], []
    for _ in range(repeats):  # unprofiled: the times to compare with
        t0 = time.perf_counter()
        _, st = once()
        walls.append(time.perf_counter() - t0)
        stats.append(st)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(repeats):
        once()
    profile.disable()
    st = stats[len(stats) // 2]
    units = st.get("iterations") or st.get("new_tokens") or 1
    split = {k: 1e3 * float(st.get(k) or 0.0) / units
             for k in ("target_s", "draft_s", "verify_s", "host_s")}
    return {
        "mode": "autoregressive" if gamma is None else f"speculative, gamma {gamma}",
        "per": "token" if gamma is None else "iteration",
        "wall_ms_median": 1e3 * statistics.median(walls),
        "tokens_per_s": n / statistics.median(walls),
        "iterations": st.get("iterations"),
        "alpha": st.get("alpha"),
        "ms_split": split,
        "top": _top(profile, repeats, limit),
    }


def render(report: dict) -> str:
    from tabulate import tabulate

    lines = [f"device {report['device']}, {report['new_tokens']} new tokens, "
             f"{report['repeats']} repeats"]
    for m in report["modes"]:
        sp = m["ms_split"]
        lines.append("")
        lines.append(f"## {m['mode']}: {m['tokens_per_s']:.0f} tok/s; ms per {m['per']}: "
                     f"target {sp['target_s']:.3f}, draft {sp['draft_s']:.3f}, "
                     f"verify {sp['verify_s']:.3f}, host {sp['host_s']:.3f}")
        lines.append(tabulate(
            [(f"`{r['function']}`", f"{r['calls']:.0f}", f"{r['own_ms']:.3f}",
              f"{r['cum_ms']:.3f}") for r in m["top"]],
            headers=("function", "calls", "own ms", "cumulative ms"), tablefmt="github",
            disable_numparse=True))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a benchmark pair folder or an export folder")
    ap.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=25, help="functions listed per mode")
    ap.add_argument("--cache-length", type=int, default=None,
                    help="tokens the static caches hold (default: the export's)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "."))
    args = ap.parse_args(argv)

    from benchmarks.adapters import Runner
    from quickdraft.ort_backend.device import resolve_device
    from quickdraft.ort_backend.static import StaticOrtModel
    from quickdraft.sampling import SamplingConfig

    model_dir, prompt = _model_dir_and_prompt(args.folder, args.prompt_ids)
    device, _ = resolve_device(args.device)
    graphs = device.kind == "cuda"
    target = StaticOrtModel(model_dir / "target", device, cache_length=args.cache_length,
                            graph_steps=(1, args.gamma + 1), cuda_graph=graphs)
    draft = StaticOrtModel(model_dir / "draft", device, cache_length=args.cache_length,
                           graph_steps=(1, 2), cuda_graph=graphs)
    gen = Runner(target, draft, sampling=SamplingConfig(temperature=0.0))  # no EOS: new_tokens
    modes = [profile_mode(gen, prompt, args.new_tokens, g, args.repeats, args.top)
             for g in (None, args.gamma)]
    report = {"device": str(device), "model_dir": str(model_dir), "new_tokens": args.new_tokens,
              "repeats": args.repeats, "cuda_graphs": graphs, "cache_length": target.max_length,
              "modes": modes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_fast.json").write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
