"""``quickdraft export``: a draft/target pair (and optionally the draft's own draft) to
ONNX, with progress on stderr."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from quickdraft.manifest import KV_CACHES

DTYPES = ("fp32", "fp16", "bf16", "int4", "int8")
DEVICES = ("cpu", "cuda")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a target and a draft Hugging Face causal LM to ONNX with KV caches",
        description=(
            "Export a target and a draft causal LM (local folders, or hub ids where a hub is "
            "reachable) to OUT/target and OUT/draft: model.onnx with past/present KV caches, "
            "the tokenizer files and a quickdraft.json manifest; with --draft-draft, a third "
            "model (the draft's own draft) to OUT/draft_draft. Each graph is validated "
            "against PyTorch. Nothing is left at OUT if anything fails. --kv-cache dynamic "
            "(default) exports with optimum-onnx (any architecture it covers); --kv-cache "
            "static builds GroupQueryAttention graphs with onnxruntime-genai's model builder "
            "(llama, qwen2, mistral, qwen3; --dtype fp32 --device cpu or --dtype fp16 "
            "--device cuda, or --dtype int4: 4-bit MatMulNBits weights, validated against "
            "PyTorch to a quantization tolerance, with --device cpu or cuda) for "
            "preallocated caches and CUDA graphs. A model may also be a "
            "GGUF file (FILE.gguf, an architecture transformers' GGUF loader covers): it is "
            "dequantized once into a temporary Hugging Face folder, its tokenizer checked "
            "(and rebuilt from the file if transformers builds it wrongly), and exported and "
            "validated from there."
        ),
    )
    p.add_argument("--target", required=True, metavar="HF_DIR_ID_OR_GGUF",
                   help="the target model")
    p.add_argument("--draft", required=True, metavar="HF_DIR_ID_OR_GGUF",
                   help="the draft model")
    p.add_argument("--draft-draft", default=None, metavar="HF_DIR_ID_OR_GGUF",
                   help="optional: a smaller draft of the draft, exported to OUT/draft_draft "
                   "for hierarchical speculative decoding (same vocabulary as the others)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder to create")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="weights, logits and KV cache; int4 (--kv-cache static only): 4-bit "
                   "weights, fp32 logits and cache on the CPU, fp16 on CUDA; int8 (CPU, "
                   "Hugging Face sources): weights rounded to int8 per output channel and "
                   "stored so, computed in fp32 (a quarter of the fp32 file)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where to export and validate")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="dynamic",
                   help="dynamic: the cache grows per call (optimum-onnx, default); static: "
                   "one preallocated buffer per layer (onnxruntime-genai's builder)")
    p.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                   help="static caches: tokens each cache holds (default: the models' context)")
    p.add_argument("--fuse-gate-up", action=argparse.BooleanOptionalAction, default=None,
                   help="static caches: each gated MLP's gate and up projections as one "
                   "MatMul (default: on; the dynamic export refuses it)")
    p.add_argument("--transpose-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="static caches: every MatMul weight stored transposed, multiplied as "
                   "FusedMatMul(transB=1) (default: off; the dynamic export refuses it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds a previous quickdraft export")
    p.add_argument("--no-validate", action="store_true", help="skip the check against PyTorch")
    p.add_argument("--steps", type=int, default=24, help="greedy steps compared (default 24)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The verb: 0 on success, 1 on an error (one line), 128 + the signal when stopped by
    Ctrl-C or SIGTERM (the partial export removed)."""
    try:
        return _run(args)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"quickdraft export: interrupted ({signal.Signals(signum).name}); the partial "
              f"export was removed and {args.out} is unchanged", file=sys.stderr)
        return 128 + signum
    except OSError as e:  # a file system error while writing (disk full, permissions)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"quickdraft export: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from quickdraft.export.api import export_pair

    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    report = export_pair(
        args.target,
        args.draft,
        args.out,
        dtype=args.dtype,
        device=args.device,
        kv_cache=args.kv_cache,
        max_length=args.max_length,
        validate=not args.no_validate,
        steps=args.steps,
        overwrite=args.overwrite,
        progress=progress,
        draft_draft=args.draft_draft,
        fuse_gate_up=args.fuse_gate_up,
        transpose_weights=args.transpose_weights,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"exported to {report.out} ({args.kv_cache} KV cache) in {report.seconds:.1f} s")
    models = report.models
    w = max(7, *(len(r.role) for r in models))
    header = f"{'role':<{w}} {'arch':<10} {'layers':>6} {'kv heads':>8} {'vocab':>7} {'dtype':<9} "
    print(header + f"{'max |diff|':>11} {'greedy':>9}  path")
    for r in models:
        m, v = r.manifest, r.manifest.validation
        diffs = [v[k] for k in ("max_abs_diff", "max_abs_diff_cached", "static_max_abs_diff")
                 if k in v]
        diff = f"{max(diffs):.2e}" if diffs else "-"
        greedy = f"{min(v['greedy_equal_steps'])}/{v['greedy_steps']}" if v else "-"
        if v and "greedy_agreement" in v:  # quantized weights: the share of agreeing steps
            greedy = f"{v['greedy_agreement']:.0%}"
        dtype = f"{m.weights}/{m.dtype}" if m.weights else m.dtype
        print(
            f"{r.role:<{w}} {m.architecture:<10} {m.num_layers:>6} {m.num_kv_heads:>8} "
            f"{m.vocab_size:>7} {dtype:<9} {diff:>11} {greedy:>9}  {r.path}"
        )
    return 0
