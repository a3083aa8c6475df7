"""``quickdraft export``: a draft/target pair to ONNX, with progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time

DTYPES = ("fp32", "fp16", "bf16")
DEVICES = ("cpu", "cuda")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a target and a draft Hugging Face causal LM to ONNX with KV caches",
        description=(
            "Export a target and a draft causal LM (local folders, or hub ids where a hub is "
            "reachable) to OUT/target and OUT/draft: model.onnx with past/present KV caches, "
            "the tokenizer files and a quickdraft.json manifest. Each graph is validated "
            "against PyTorch. Nothing is left at OUT if anything fails."
        ),
    )
    p.add_argument("--target", required=True, metavar="HF_DIR_OR_ID", help="the target model")
    p.add_argument("--draft", required=True, metavar="HF_DIR_OR_ID", help="the draft model")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder to create")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights, logits and KV cache")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where to export and validate")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-validate", action="store_true", help="skip the check against PyTorch")
    p.add_argument("--steps", type=int, default=24, help="greedy steps compared (default 24)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
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
        validate=not args.no_validate,
        steps=args.steps,
        overwrite=args.overwrite,
        progress=progress,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"exported to {report.out} in {report.seconds:.1f} s")
    header = f"{'role':<7} {'arch':<10} {'layers':>6} {'kv heads':>8} {'vocab':>7} {'dtype':<5} "
    print(header + f"{'max |diff|':>11} {'greedy':>9}  path")
    for r in (report.target, report.draft):
        m, v = r.manifest, r.manifest.validation
        diff = f"{max(v['max_abs_diff'], v['max_abs_diff_cached']):.2e}" if v else "-"
        greedy = f"{min(v['greedy_equal_steps'])}/{v['greedy_steps']}" if v else "-"
        print(
            f"{r.role:<7} {m.architecture:<10} {m.num_layers:>6} {m.num_kv_heads:>8} "
            f"{m.vocab_size:>7} {m.dtype:<5} {diff:>11} {greedy:>9}  {r.path}"
        )
    return 0
