"""``quickdraft generate``: run an exported pair with ONNX Runtime (either cache kind).

The CLI owns all output: the generated text goes to stdout (piece by piece with
``--stream``), notes and a statistics line to stderr; ``--json`` prints one JSON object
(with ``--stream``: one JSON line per step, then the result).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from quickdraft.drafters import DRAFTERS
from quickdraft.ort_backend.device import ATTENTION_KERNELS, DEFAULT_ATTENTION

__all__ = ["add_parser", "run"]



def _gamma(text: str):
    """--gamma: a whole number >= 1, or auto."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_attention_option(p: argparse.ArgumentParser) -> None:
    """``--attention``, as ``generate`` and ``serve`` take it."""
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default=DEFAULT_ATTENTION,
                   help="CUDA: GroupQueryAttention's kernel (default %(default)s; auto is "
                   "ONNX Runtime's own choice)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate text with an exported draft/target pair (ONNX Runtime)",
        description=(
            "Generate with an exported pair on ONNX Runtime: speculative decoding (the "
            "draft proposes --gamma tokens, the target verifies them in one call) or, with "
            "--autoregressive, the target alone. The output follows the target's "
            "distribution either way. Both kinds of export run: dynamic caches (the default "
            "export) and static caches (--kv-cache static: CUDA graphs on CUDA, verification "
            "on the device)."
        ),
    )
    p.add_argument("--model-dir", metavar="OUT_DIR",
                   help="folder written by `quickdraft export` (holds target/ and draft/); "
                   "default: the bundled pair of small Python code models, on the CPU, "
                   "compared with autoregressive decoding")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--gamma", type=_gamma, default=None, metavar="N|auto",
                   help="draft tokens per iteration, or auto: chosen each iteration from the "
                   "running alpha and the measured c (default 5; 4 for the bundled pair)")
    p.add_argument("--drafter", choices=DRAFTERS, default="model",
                   help="model: the draft model (default); ngram: continue the latest "
                   "earlier occurrence of the last tokens (no model); auto: ngram with the "
                   "model behind it, or a bandit over every drafter when the folder has a "
                   "draft_draft; hierarchical: the draft decoded speculatively by the "
                   "draft_draft (or ngram); bandit: an online choice among all of them")
    p.add_argument("--lenience", type=float, default=1.0,
                   help="LOSSY below 1 (appendix A.5): accept more draft tokens; the output "
                   "no longer follows the target exactly (default 1: exact)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0,
                   help="keep the k most likely tokens (0: all; with --temperature > 0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass (1: all; with --temperature > 0)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="stop after this many new tokens (default 64)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed: the same seed gives the same output")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto (default) uses CUDA when available, else the CPU")
    p.add_argument("--autoregressive", action="store_true",
                   help="decode with the target alone, one token per call (the baseline)")
    p.add_argument("--pipelined", action="store_true",
                   help="static pair: the draft drafts the next proposal while the "
                   "target verifies this one, greedy or sampled (sampled draws on the "
                   "device); on CUDA both calls are in flight at once, on the CPU nothing "
                   "overlaps and the plain loop is faster")
    p.add_argument("--min-keep-rate", type=float, default=0.0, metavar="RATE",
                   help="with --pipelined: draft the next proposal beside the verification "
                   "only while the running rate of iterations that kept every candidate is "
                   "at least RATE (0, the default: always); the others verify as the plain "
                   "loop does")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device-verify", dest="verify", action="store_const", const="device",
                       help="verify with an ONNX graph next to the target's logits (default "
                       "for static-cache exports when sampling)")
    where.add_argument("--host-verify", dest="verify", action="store_const", const="host",
                       help="verify in NumPy on the host (default for dynamic-cache exports, "
                       "and for static ones when greedy: the target's argmax ids only)")
    p.set_defaults(verify="auto")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="static caches on CUDA: run the steps without capturing CUDA graphs")
    add_attention_option(p)
    p.add_argument("--compare", action="store_true",
                   help="also run autoregressive decoding with the same settings and report "
                   "the speedup (on by default for the bundled pair)")
    p.add_argument("--stream", action="store_true", help="print text as tokens are accepted")
    p.add_argument("--json", action="store_true", help="print JSON (one line per step with "
                   "--stream, then the result)")
    p.set_defaults(func=run)
    return p


def _summary(stats) -> str:
    d = stats.as_dict()

    def num(key: str, fmt: str) -> str:
        v = d.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    line = (f"{d['mode']} on {d['device']} ({d['kv_cache']} cache): {d['new_tokens']} tokens "
            f"in {d['decode_s']:.3f} s ({num('tokens_per_s', '.1f')} tok/s), target calls "
            f"{d['target_calls']}")
    if d["mode"] == "speculative":
        line += (f", verified on the {d['verifier']}{' (LOSSY)' if d.get('lossy') else ''}, "
                 f"draft calls {d['draft_calls']}, max gamma {d['gamma']}, "
                 f"alpha {num('alpha', '.3f')}, tokens/iteration "
                 f"{num('tokens_per_iteration', '.2f')}, c {num('cost_ratio_c', '.3f')}")
    if d["mode"] == "pipelined":
        pipe = d["pipeline"]
        line += (f", draft calls {d['draft_calls']} ({pipe['shadow_draft_calls']} beside the "
                 f"verification), gamma {d['gamma']}, alpha {num('alpha', '.3f')}, "
                 f"tokens/iteration {num('tokens_per_iteration', '.2f')}, "
                 f"{pipe['warm_iterations']} of {pipe['iterations']} proposals pre-drafted")
    return line


def default_model_dir() -> Path:
    """The bundled pair: small Llama-style Python code models shipped in the package."""
    return Path(__file__).resolve().parent.parent / "models" / "default"


# the bundled pair: the fastest fixed gamma measured on a 2-core CPU for the README's
# prompt (alpha about 0.84 on the target's greedy code, c about 0.11; docs/benchmarks.md)
BUNDLED_GAMMA = 4
COMPARE_ROUNDS = 3  # runs of each mode, alternating, after a warm-up; medians are reported


def _rounds(spec_gen, auto_gen, prompt: str) -> dict:
    """Speculative against autoregressive decoding of the same prompt with the same
    settings: after a warm-up of both, ``COMPARE_ROUNDS`` alternating runs of each, compared
    by median tokens per second; ``median_run`` is the speculative run of median speed."""
    auto_gen.generate(prompt)  # warm-up (the speculative one already ran)
    spec_runs, auto_runs = [], []
    for _ in range(COMPARE_ROUNDS):
        spec_runs.append(spec_gen.generate(prompt))
        auto_runs.append(auto_gen.generate(prompt))
    rate = lambda g: g.stats.as_dict()["tokens_per_s"] or 0.0  # noqa: E731
    spec_runs.sort(key=rate)
    s_rate = statistics.median(rate(g) for g in spec_runs)
    a_rate = statistics.median(rate(g) for g in auto_runs)
    same = all(g.tokens == auto_runs[0].tokens for g in spec_runs + auto_runs)
    return {
        "autoregressive_tokens_per_s": a_rate,
        "speculative_tokens_per_s": s_rate,
        "speedup": s_rate / a_rate if a_rate else math.nan,
        "rounds": COMPARE_ROUNDS,
        "acceptance_rate": spec_runs[len(spec_runs) // 2].stats.as_dict().get("acceptance_rate"),
        "same_tokens": same,
        "median_run": spec_runs[len(spec_runs) // 2],
    }


def run(args: argparse.Namespace) -> int:
    from quickdraft.ort_backend.generator import DEFAULT_MAX_GAMMA, DecodeConfig, load_pair
    from quickdraft.pipelined import ShadowRule
    from quickdraft.sampling import SamplingConfig

    bundled = not args.model_dir
    model_dir = default_model_dir() if bundled else Path(args.model_dir)
    device = "cpu" if bundled and args.device == "auto" else args.device
    compare = (args.compare or bundled) and not args.autoregressive
    gamma = args.gamma if args.gamma is not None else (BUNDLED_GAMMA if bundled else 5)
    # check every setting before loading anything
    config = DecodeConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p),
        seed=args.seed,
        lenience=args.lenience,
    )
    if not args.prompt:
        raise ValueError("the prompt is empty: give some text to continue")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as surrogates
        raise ValueError(
            f"--prompt is not valid UTF-8 text (byte {e.start} of it); pass UTF-8 text, "
            "e.g. convert it with iconv -t utf-8") from None
    if args.pipelined and (args.autoregressive or args.drafter != "model"):
        raise ValueError("--pipelined drafts with the draft model: drop --autoregressive "
                         "and --drafter")
    if args.min_keep_rate and not args.pipelined:
        raise ValueError("--min-keep-rate decides when a pipelined loop drafts ahead: add "
                         "--pipelined, or drop it")
    if not 0.0 <= args.min_keep_rate <= 1.0:
        raise ValueError(f"--min-keep-rate must be in [0, 1], got {args.min_keep_rate}")
    rule = ShadowRule(min_keep_rate=args.min_keep_rate)
    if config.lenience != 1.0:
        print(f"quickdraft generate: lenience {config.lenience} is LOSSY: the output does not "
              "follow the target's distribution exactly", file=sys.stderr)
    pair = load_pair(model_dir, device=device, draft=not args.autoregressive,
                     cuda_graph=args.cuda_graph, attention=args.attention,
                     max_gamma=DEFAULT_MAX_GAMMA if gamma == "auto" else gamma)
    if pair.device_note:
        print(f"quickdraft generate: {pair.device_note}", file=sys.stderr)
    spec_gen = pair.generator(config, gamma=None if args.autoregressive else gamma,
                              drafter=None if args.autoregressive or args.pipelined
                              else args.drafter, verify=args.verify,
                              pipelined=args.pipelined, shadow_rule=rule)
    out = sys.stdout
    with spec_gen:
        if args.stream:
            for piece in spec_gen.pieces(args.prompt):
                if args.json:
                    out.write(json.dumps({"tokens": piece.tokens, "text": piece.text}) + "\n")
                elif piece.text:
                    out.write(piece.text)
                out.flush()
            result = spec_gen.result
            if not args.json:
                out.write("\n")
        else:
            result = spec_gen.generate(args.prompt)
            if not args.json:
                out.write(result.text + "\n")
        out.flush()
        report = None
        if compare:
            with pair.generator(config) as auto_gen:
                report = _rounds(spec_gen, auto_gen, args.prompt)
    if report:  # the statistics of the median run agree with the comparison line
        result = report.pop("median_run")
    if args.json:
        extra = {"comparison": report} if report else {}
        out.write(json.dumps({"done": True, **result.as_dict(), **extra}) + "\n")
    else:
        print(_summary(result.stats), file=sys.stderr)
        if report:
            print(f"acceptance rate {report['acceptance_rate']:.3f}; speedup over "
                  f"autoregressive decoding {report['speedup']:.2f}x "
                  f"({report['speculative_tokens_per_s']:.0f} vs "
                  f"{report['autoregressive_tokens_per_s']:.0f} tok/s, medians of "
                  f"{report['rounds']} alternating runs, same settings"
                  + (", same tokens" if report["same_tokens"] else "") + ")",
                  file=sys.stderr)
    out.flush()
    return 0
