"""Two models in flight at once, by the priority of their CUDA streams.

    python benchmarks/stream_priority.py PAIR_DIR --device cuda --gammas 3,5,7 \\
        [--settings default/default,normal/normal,normal/high,high/normal] \\
        [--repeats 100] [--json OUT.json]
    python benchmarks/stream_priority.py --make 97m --work /tmp/sp --device cuda ...

``PAIR_DIR`` is a static export (``quickdraft export --kv-cache static``). For each
setting TARGET/DRAFT (a stream priority of :data:`quickdraft.ort_backend.streams.
STREAM_PRIORITIES` for each model: "default" is the stream ONNX Runtime makes) and each
gamma, it times, after a prompt, the pipelined iteration's two launches one at a time and
together: the target's verify call of gamma + 1 tokens alone, the draft's chain of
gamma + 1 greedy steps alone, then the verify call launched and the chain launched behind
it, the host waiting once for both (as ``Generator(pipelined=True)`` does). Each call is
rewound, so every repeat sees the same cache. ``hidden`` is the share of the shorter call
that the overlap hid: (verify + chain - both) / min(verify, chain). ``--make NAME`` first
builds the random pair ``NAME`` of ``benchmarks.models`` and exports it (fp16, CUDA).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import dump_json, environment  # noqa: E402

DEFAULT_SETTINGS = "default/default,normal/normal,normal/high,high/normal"


def parse_settings(text: str) -> list[tuple[str, str]]:
    from quickdraft.ort_backend.streams import STREAM_PRIORITIES

    settings = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) != 2 or any(p not in STREAM_PRIORITIES for p in parts):
            raise ValueError(f"--settings: {item!r} is not TARGET/DRAFT with each one of "
                             f"{', '.join(STREAM_PRIORITIES)}")
        settings.append((parts[0], parts[1]))
    return settings


def _median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def measure_setting(pair_dir: Path, device: str, setting: tuple[str, str],
                    gammas: list[int], *, repeats: int, warmup: int, prompt_tokens: int,
                    seed: int) -> list[dict]:
    """One row per gamma for ``setting`` (target, draft stream priorities)."""
    from quickdraft.ort_backend.device import Device
    from quickdraft.ort_backend.static import StaticOrtModel
    from quickdraft.ort_backend.streams import cuda_stream_options

    where = Device(device)
    cuda = device == "cuda"
    if not cuda and setting != ("default", "default"):
        raise ValueError("stream priorities are CUDA streams: on the CPU only default/default")
    longest = max(gammas) + 1
    target = StaticOrtModel(pair_dir / "target", where, cuda_graph=cuda,
                            graph_steps=sorted({1, *(g + 1 for g in gammas)}),
                            provider_options=cuda_stream_options(setting[0]) if cuda else None)
    draft = StaticOrtModel(pair_dir / "draft", where, cuda_graph=cuda, graph_steps=(1,),
                           chain_length=longest,
                           provider_options=cuda_stream_options(setting[1]) if cuda else None)
    rng = np.random.default_rng(seed)
    vocab = target.vocab_size
    prompt = [int(t) for t in rng.integers(3, vocab, prompt_tokens)]  # [P]
    rows = []
    t_state, d_state = target.new_state(), draft.new_state()
    try:
        t_state.append_greedy(prompt)
        d_state.append_greedy(prompt)
        past = len(prompt)
        for gamma in gammas:
            scored = [int(t) for t in rng.integers(3, vocab, gamma + 1)]  # [gamma + 1]
            first = scored[0]
            verify, chain, both = [], [], []
            for r in range(warmup + repeats):
                t0 = time.perf_counter()
                t_state.launch_greedy(scored).wait()
                t1 = time.perf_counter()
                t_state.rewind(past)
                d_state.launch_chain(first, gamma + 1).wait()
                t2 = time.perf_counter()
                d_state.rewind(past)
                t3 = time.perf_counter()
                launched = t_state.launch_greedy(scored)
                drafted = d_state.launch_chain(first, gamma + 1)
                launched.wait()
                drafted.wait()
                t4 = time.perf_counter()
                t_state.rewind(past)
                d_state.rewind(past)
                if r >= warmup:
                    verify.append(t1 - t0)
                    chain.append(t2 - t1)
                    both.append(t4 - t3)
            v, c, b = _median_ms(verify), _median_ms(chain), _median_ms(both)
            rows.append({"target_stream": setting[0], "draft_stream": setting[1],
                         "gamma": gamma, "verify_ms": v, "chain_ms": c, "both_ms": b,
                         "sequential_ms": v + c, "hidden": (v + c - b) / min(v, c),
                         "both_over_longer": b / max(v, c)})
    finally:
        t_state.close()
        d_state.close()
        del target, draft
        gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    return tabulate([[f"{r['target_stream']}/{r['draft_stream']}", r["gamma"],
                      f"{r['verify_ms']:.3f}", f"{r['chain_ms']:.3f}", f"{r['both_ms']:.3f}",
                      f"{r['hidden']:.2f}", f"{r['both_over_longer']:.2f}"] for r in rows],
                    headers=["target/draft stream", "gamma", "verify ms", "chain ms",
                             "both ms", "hidden", "both / longer"], tablefmt="github")


def make_pair(name: str, work: Path, device: str) -> Path:
    """The random pair ``name`` of benchmarks.models, exported with static caches."""
    from benchmarks.models import make_random_pair
    from quickdraft.export.builder import export_static_pair

    out = work / "onnx"
    if (out / "target" / "quickdraft.json").is_file():
        return out
    make_random_pair(name, work, device=device)
    dtype = "fp16" if device == "cuda" else "fp32"
    export_static_pair(work / "hf" / "target", work / "hf" / "draft", out, dtype=dtype,
                       device=device, max_length=256, validate=False, overwrite=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pair_dir", type=Path, nargs="?", help="a static export of a pair")
    ap.add_argument("--make", metavar="NAME", help="build and export benchmarks.models' NAME")
    ap.add_argument("--work", type=Path, help="--make's folder")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--gammas", default="3,5,7")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help="comma list of TARGET/DRAFT stream priorities")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if (args.pair_dir is None) == (args.make is None):
        ap.error("give PAIR_DIR or --make NAME (with --work)")
    if args.make and args.work is None:
        ap.error("--make needs --work, the folder to build the pair in")
    try:
        gammas = [int(g) for g in args.gammas.split(",")]
        settings = parse_settings(args.settings)
    except ValueError as e:
        ap.error(str(e))
    if any(g < 1 for g in gammas) or args.repeats < 1 or args.warmup < 0:
        ap.error("gammas and --repeats must be >= 1, --warmup >= 0")
    pair_dir = make_pair(args.make, args.work, args.device) if args.make else args.pair_dir
    rows = []
    for setting in settings:
        rows += measure_setting(pair_dir, args.device, setting, gammas,
                                repeats=args.repeats, warmup=args.warmup,
                                prompt_tokens=args.prompt_tokens, seed=args.seed)
        print(table(rows[-len(gammas):]), file=sys.stderr)
    if args.json:
        dump_json(args.json, {"command": "python benchmarks/stream_priority.py "
                              + " ".join(sys.argv[1:] if argv is None else argv),
                              "pair_dir": str(pair_dir), "device": args.device,
                              "environment": environment(), "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
