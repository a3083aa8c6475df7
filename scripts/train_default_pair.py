#!/usr/bin/env python
"""Train quickdraft's bundled default draft/target pair on Python source code.

    python scripts/train_default_pair.py --collect-corpus runs/corpus   # gather the corpus
    python scripts/train_default_pair.py --corpus runs/corpus --device cuda --fast \\
        --target-seconds 280 --draft-seconds 300 --draft-samples 8192   # train + evaluate
    python scripts/train_default_pair.py --export-only --corpus runs/corpus  # ship as ONNX
    python scripts/train_default_pair.py --evaluate-only --corpus runs/corpus  # alpha, CPU

The shipped pair's exact commands (the target and the draft were trained in two runs,
``--skip-draft`` then ``--reuse-target``) are in quickdraft/models/default/MODEL_CARD.md.

What it does:

1. Corpus (``--collect-corpus``): the ``*.py`` files of the standard library and of the
   installed ``PACKAGES`` (permissive licenses; the versions the project's extras
   install), without test and vendored folders and files over 1 MB, copied into one
   folder with their license files and ``corpus.json`` (name, version, license, size of
   each source). Every 10th file of the sorted list (index % 10 == 9) is held out for
   evaluation; the rest is training data. Without ``--corpus`` the running
   interpreter's standard library alone is used (``--stdlib-root`` another one).
2. Tokenizer: a byte-level BPE (``tokenizers``) trained on the training files only;
   ``<|endoftext|>`` (id 0) separates files and is BOS/EOS/PAD.
3. Models: two Llama decoders (``transformers.LlamaForCausalLM``, tied embeddings)
   trained by ``benchmarks/training.py`` (the loop the benchmarks' trained pair uses too:
   AdamW, warmup + cosine), for a number of steps or a time budget. The draft is
   distilled from the target (KL(target || draft), ``--draft-distill``); with
   ``--draft-samples`` half of each of its batches are continuations the target wrote
   itself (half greedy), which is what speculative decoding meets.
4. Evaluation: loss of each model and the acceptance rate alpha = E[sum_x min(p(x),
   q(x))] at T=0 and T=1 (``quickdraft.theory.beta``) on the held-out files, and the
   draft's agreement on the target's own greedy continuations.
5. ``--export`` / ``--export-only``: the weights rounded to their int8 grid
   (``quickdraft.export.int8.snap_to_int8``), quickdraft's exporter
   (``quickdraft.export.export_pair``, static caches) into ``quickdraft/models/default/``
   (what the package ships), the matrices stored as int8 (``store_int8``), and
   ``scripts/default_pair_card.py`` adds ``training.json``, ``MODEL_CARD.md`` and the
   corpus' license files beside it.

Without ``--fast`` the run uses deterministic kernels only (bit-identical reruns on the
same GPU and versions, about 3x slower). Hugging Face folders, the tokenizer and
``summary.json`` go to ``--out`` (``runs/default_pair`` by default, git-ignored). Needs
the ``export`` extra.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # quickdraft and benchmarks/ from this checkout
    sys.path.append(str(REPO))

from benchmarks import training  # noqa: E402  (the training loop both trained pairs use)

DEFAULT_OUT = REPO / "runs" / "default_pair"
SHIPPED = REPO / "quickdraft" / "models" / "default"
EXCLUDED_DIRS = ("encodings", "pydoc_data")
HELDOUT_EVERY = 10  # file i (in sorted order) is held out when i % 10 == 9
# --collect-corpus: installed packages (permissive licenses) whose Python sources join the
# standard library's; their versions are the ones the project's extras pin or pull in
PACKAGES = ("transformers", "torch", "sympy", "numpy", "networkx")
SKIPPED_PARTS = {"site-packages", "test", "tests", "testing", "_vendor", "vendored",
                 "third_party", "__pycache__"}
MAX_FILE_BYTES = 1_000_000  # larger files are generated tables, not code
CORPUS_MANIFEST = "corpus.json"


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


TARGET = Shape(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=512)
# defaults of the shape flags (the shipped pair's shapes are in its MODEL_CARD.md)
DRAFT = Shape(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
              num_key_value_heads=1, intermediate_size=192)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(root: Path, skip_first: tuple[str, ...] = ()) -> list[Path]:
    """``*.py`` under ``root``, sorted, without test and vendored folders, top-level
    ``skip_first`` folders and files over ``MAX_FILE_BYTES``."""
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if set(rel.parts[:-1]) & SKIPPED_PARTS or rel.parts[0] in skip_first:
            continue
        if p.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(p)
    return files


def _distribution(name: str):
    from importlib import metadata

    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"--collect-corpus needs {name} installed (pip install -e '.[test]')"
                         ) from None


def collect_corpus(dest: Path, stdlib: Path | None) -> dict:
    """Copy the standard library's and ``PACKAGES``' Python sources into ``dest`` (one
    folder per source), their license files into ``dest/LICENSES``, and write
    ``dest/corpus.json`` (name, version, license and size of each source)."""
    stdlib = (stdlib or stdlib_root()).resolve()
    if dest.exists():
        shutil.rmtree(dest)
    sources = []
    # a copied standard library may lack the license file: take the interpreter's then
    stdlib_license = stdlib / "LICENSE.txt"
    if not stdlib_license.is_file():
        stdlib_license = stdlib_root() / "LICENSE.txt"
    roots = [("python-stdlib", stdlib, stdlib.name, "PSF-2.0", [stdlib_license])]
    for name in PACKAGES:
        dist = _distribution(name)
        meta = dist.metadata
        lic = meta.get("License-Expression") or meta.get("License") or "see LICENSES"
        lic_files = [Path(dist.locate_file(f)) for f in dist.files or []
                     if str(f).split("/")[0].endswith(".dist-info") and Path(str(f)).name
                     .upper().startswith(("LICENSE", "COPYING", "NOTICE", "AUTHORS"))]
        roots.append((name, Path(dist.locate_file(name)), dist.version, lic.splitlines()[0],
                      lic_files))
    for name, root, version, lic, lic_files in roots:
        files = _python_files(root, EXCLUDED_DIRS if name == "python-stdlib" else ())
        kept = 0
        size = 0
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            target = dest / name / p.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            kept += 1
            size += len(text)
        copied = []
        for f in lic_files:
            if f.is_file():
                inside = Path(*[q for q in f.parts if q][-3:]).as_posix().split(".dist-info/")[-1]
                out = dest / "LICENSES" / f"{name}-{inside.replace('/', '--')}"
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out)
                copied.append(out.name)
        # the source's own license: the shallowest LICENSE* (the others are vendored code's)
        own = sorted((n.count("--"), n) for n in copied
                     if n.removeprefix(f"{name}-").split("--")[-1].upper().startswith("LICENSE"))
        sources.append({"name": name, "version": version, "license": lic, "files": kept,
                        "chars": size, "license_files": copied,
                        "license_file": own[0][1] if own else None})
    record = {"sources": sources, "packages_from": sys.prefix,
              "max_file_bytes": MAX_FILE_BYTES, "skipped_folders": sorted(SKIPPED_PARTS)}
    (dest / CORPUS_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return record


def corpus_files(root: Path | None = None) -> tuple[list[Path], list[Path], Path]:
    """(train files, held-out files, root): deterministic, sorted by path.

    ``root``: a folder written by ``--collect-corpus`` (it holds ``corpus.json``: every
    ``*.py`` in it), or a standard library (the running interpreter's by default) read by
    the rule of ``quickdraft.export.toy.stdlib_files`` (``*.py``, no ``test``/``tests``
    folders, no site-packages) minus ``EXCLUDED_DIRS``. Files that are not UTF-8 are left
    out.
    """
    root = (root or stdlib_root()).resolve()
    collected = (root / CORPUS_MANIFEST).is_file()
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if not collected and (set(rel.parts) & {"site-packages", "test", "tests"}
                              or rel.parts[0] in EXCLUDED_DIRS):
            continue
        try:
            p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(p)
    if not files:
        raise SystemExit(f"no Python sources under {root}")
    train = [p for i, p in enumerate(files) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [p for i, p in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout, root


def corpus_digest(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def encode_files(tokenizer, files: list[Path]):
    """One token stream [N] int64 (a tensor): each file's tokens followed by
    <|endoftext|>."""
    import torch

    texts = [p.read_text(encoding="utf-8") for p in files]
    return torch.from_numpy(training.encode(tokenizer, texts).astype("int64"))


# ----------------------------------------------------------------------------- models


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def heldout_loss(model, windows, device: str, batch: int = 16) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            chunk = windows[i: i + batch].to(device)
            logits = model(input_ids=chunk[:, :-1]).logits.float()  # [B, ctx, V]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += chunk[:, 1:].numel()
    return total / count


def train_model(name: str, model, stream, *, steps: int | None, batch: int, ctx: int,
                lr: float, seed: int, device: str, log_every: int, eval_windows=None,
                eval_every: int = 0, teacher=None, distill: float = 0.0,
                seconds: float | None = None, extra_stream=None, fast: bool = False) -> dict:
    """``benchmarks.training.train`` for ``steps`` steps (or the steps that fit in
    ``seconds``) on the random windows a torch generator seeded with ``seed`` picks (the
    same windows for every model), with the held-out loss every ``eval_every`` steps.
    ``extra_stream``: half of every batch comes from it (the target's own samples for the
    draft). ``fast``: bf16 autocast and fused AdamW on CUDA."""
    import torch

    g = torch.Generator().manual_seed(seed)
    draw = lambda high, n: torch.randint(0, high, (n,), generator=g)  # noqa: E731
    batches = training.mixed_windows(stream, extra_stream, batch, ctx, draw)
    t0 = time.perf_counter()
    smooth = None
    curve = []

    def on_step(step, total, loss, kl, ce):
        nonlocal smooth
        if (step + 1) % log_every and step + 1 != total and not (
                eval_every and (step + 1) % eval_every == 0):
            return  # reading the loss waits for the device: only when it is shown
        value = loss.item()
        smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
        if (step + 1) % log_every == 0 or step + 1 == total:
            log(f"{name} step {step + 1}/{total} loss {value:.3f} (smoothed {smooth:.3f}) "
                f"{time.perf_counter() - t0:.0f}s")
        if eval_windows is not None and eval_every and (
                (step + 1) % eval_every == 0 or step + 1 == total):
            model.eval()
            held = heldout_loss(model, eval_windows, device)
            model.train()
            curve.append([step + 1, round(held, 4)])
            log(f"{name} step {step + 1}: held-out loss {held:.3f}")

    info = training.train(name, model, batches, lr=lr, device=device, steps=steps,
                          seconds=seconds if steps is None else None,
                          teacher=teacher if distill > 0 else None, distill_weight=distill,
                          autocast=fast, fused=fast and device == "cuda", on_step=on_step,
                          log=log)
    return {"steps": info["steps"], "final_loss_smoothed": smooth, "heldout_curve": curve,
            "train_seconds": time.perf_counter() - t0}


def trajectory_alpha(target, draft, prompts: list, device: str, new_tokens: int = 128
                     ) -> float:
    """The share of positions on the target's greedy continuation of each prompt where
    the draft's argmax equals the target's (alpha at T=0 on what greedy speculative
    decoding meets)."""
    import torch

    agree, total = 0, 0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            seq = target.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                  max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
            n = x.shape[1]
            p = target(input_ids=seq).logits[0, n - 1:-1].argmax(-1)  # [new_tokens]
            q = draft(input_ids=seq).logits[0, n - 1:-1].argmax(-1)  # [new_tokens]
            agree += int((p == q).sum())
            total += len(p)
    return agree / max(total, 1)


# ----------------------------------------------------------------------------- export


def snap(out: Path) -> Path:
    """``out/int8/{target,draft}``: the trained models with their weight matrices rounded
    to the int8 grid of their output channels (``quickdraft.export.int8.snap_to_int8``),
    in fp32: the models the package stores and the export validates against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quickdraft.export.int8 import snap_to_int8

    dest = out / "int8"
    for role in ("target", "draft"):
        model = AutoModelForCausalLM.from_pretrained(out / role).float()
        snap_to_int8(model)
        model.save_pretrained(dest / role, safe_serialization=True)
        AutoTokenizer.from_pretrained(out / role).save_pretrained(dest / role)
    return dest


def export(out: Path, dest: Path, summary: dict, stdlib: Path | None) -> dict:
    """Export ``out/{target,draft}`` to ``dest`` with quickdraft's exporter (static caches
    on the CPU, weights stored as int8 and folded back to fp32 when loaded), then write
    ``training.json`` and ``MODEL_CARD.md`` there (scripts/default_pair_card.py)."""
    import default_pair_card

    from quickdraft.export import export_pair
    from quickdraft.export.int8 import store_int8

    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    snapped = snap(out)
    cwd = Path.cwd()
    os.chdir(REPO)  # the manifests record the sources as given: keep them repo-relative
    try:
        sources = [Path(os.path.relpath(snapped / role, REPO)) for role in ("target", "draft")]
        export_pair(*sources, dest, kv_cache="static", max_length=summary["args"]["ctx"])
    finally:
        os.chdir(cwd)
    stored = {role: store_int8(dest / role) for role in ("target", "draft")}
    for role in ("target", "draft"):  # the model's config, which manifests are checked against
        shutil.copyfile(snapped / role / "config.json", dest / role / "config.json")
    seconds = time.perf_counter() - t0
    root = Path(stdlib) if stdlib else None
    licenses = root / "LICENSES" if root is not None else None
    sizes = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*"))
             if p.is_file()}
    info = {"seconds": seconds, "bytes": sum(sizes.values()), "files": sizes,
            "int8": stored}
    rec = default_pair_card.write(dest, summary, info, REPO, licenses)
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return {**info, "bytes_with_card": total, "cpu_latency": rec["cpu_latency"]}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="training outputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512, help="training window (tokens)")
    ap.add_argument("--batch", type=int, default=32, help="windows per step")
    ap.add_argument("--target-steps", type=int, default=1500)
    ap.add_argument("--draft-steps", type=int, default=4000)
    ap.add_argument("--target-lr", type=float, default=3e-3)
    ap.add_argument("--draft-lr", type=float, default=5e-3)
    ap.add_argument("--target-layers", type=int, default=TARGET.num_hidden_layers)
    ap.add_argument("--target-hidden", type=int, default=TARGET.hidden_size)
    ap.add_argument("--target-intermediate", type=int, default=TARGET.intermediate_size)
    ap.add_argument("--target-heads", type=int, default=TARGET.num_attention_heads)
    ap.add_argument("--target-kv-heads", type=int, default=TARGET.num_key_value_heads)
    ap.add_argument("--draft-layers", type=int, default=DRAFT.num_hidden_layers,
                    help="decoder layers of the draft")
    ap.add_argument("--draft-hidden", type=int, default=DRAFT.hidden_size)
    ap.add_argument("--draft-intermediate", type=int, default=DRAFT.intermediate_size)
    ap.add_argument("--draft-heads", type=int, default=DRAFT.num_attention_heads,
                    help="query heads of the draft (one key/value head)")
    ap.add_argument("--reuse-target", type=Path, default=None,
                    help="a target trained by this script (HF folder): train only the draft")
    ap.add_argument("--draft-distill", type=float, default=1.0,
                    help="weight of KL(target || draft) in the draft's loss (0: plain LM)")
    ap.add_argument("--eval-windows", type=int, default=64,
                    help="held-out windows of --ctx tokens for loss and alpha")
    ap.add_argument("--eval-every", type=int, default=250,
                    help="held-out loss every N training steps (0: only at the end)")
    ap.add_argument("--collect-corpus", type=Path, default=None, metavar="DIR",
                    help="write the corpus (the standard library and PACKAGES' sources, "
                    "their licenses, corpus.json) to DIR and stop")
    ap.add_argument("--fast", action="store_true",
                    help="bf16 autocast and fused AdamW on CUDA (faster, not bit-reproducible)")
    ap.add_argument("--target-seconds", type=float, default=None,
                    help="train the target for this long instead of --target-steps")
    ap.add_argument("--draft-seconds", type=float, default=None,
                    help="train the draft for this long instead of --draft-steps")
    ap.add_argument("--draft-kv-heads", type=int, default=DRAFT.num_key_value_heads)
    ap.add_argument("--draft-samples", type=int, default=0,
                    help="continuations the target writes itself (half greedy); half of "
                    "every draft batch is drawn from them")
    ap.add_argument("--sample-tokens", type=int, default=192)
    ap.add_argument("--skip-draft", action="store_true", help="train the target only")
    ap.add_argument("--save-half", action="store_true",
                    help="save the Hugging Face folders in float16 (half the bytes to move)")
    ap.add_argument("--stdlib-root", "--corpus", type=Path, default=None,
                    help="standard library folder to read (default: this interpreter's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--export", action="store_true",
                    help=f"export the trained pair to ONNX in {SHIPPED.relative_to(REPO)}")
    ap.add_argument("--export-only", action="store_true",
                    help="skip training: export the pair already in --out")
    ap.add_argument("--export-dir", type=Path, default=SHIPPED)
    ap.add_argument("--evaluate-only", action="store_true",
                    help="skip training: re-measure held-out loss and alpha of the pair in --out "
                         "(on CPU) and print them")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import tokenizers
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quickdraft.export.toy import train_tokenizer

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.set_num_threads(args.threads)
    # bit-reproducible training: refuse nondeterministic kernels, and on CUDA use the plain
    # ("math") attention, whose backward is deterministic (flash / memory-efficient are not)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    out: Path = args.out.resolve()
    summary_path = out / "summary.json"
    if args.collect_corpus is not None:
        print(json.dumps(collect_corpus(args.collect_corpus.resolve(), args.stdlib_root),
                         indent=2))
        return 0
    if args.fast:
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)

    if args.evaluate_only:
        _, heldout_files, _ = corpus_files(args.stdlib_root)
        tokenizer = AutoTokenizer.from_pretrained(out / "target")
        heldout_stream = encode_files(tokenizer, heldout_files)
        windows = training.heldout_windows(heldout_stream, args.ctx, args.eval_windows)
        target = AutoModelForCausalLM.from_pretrained(out / "target").eval()
        draft = AutoModelForCausalLM.from_pretrained(out / "draft").eval()
        print(json.dumps(training.evaluate(target, draft, windows, "cpu"), indent=2))
        return 0

    if args.export_only:
        summary = json.loads(summary_path.read_text())
        summary.pop("export", None)
        summary["export"] = export(out, args.export_dir.resolve(), summary, args.stdlib_root)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary["export"], indent=2))
        return 0

    t_start = time.perf_counter()
    train_files, heldout_files, root = corpus_files(args.stdlib_root)
    train_text = "\n".join(p.read_text(encoding="utf-8") for p in train_files)
    log(f"corpus: {len(train_files)} training files ({len(train_text) / 1e6:.1f}M chars), "
        f"{len(heldout_files)} held-out files, from {root}")

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok_dir = out / "tokenizer"
    if args.reuse_target is not None:  # its tokenizer, instead of training the same again
        tokenizer = AutoTokenizer.from_pretrained(args.reuse_target)
        tokenizer.save_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(tok_dir, vocab_size=args.vocab_size, text=train_text,
                                    model_max_length=args.ctx)
    vocab = len(tokenizer)
    train_stream = encode_files(tokenizer, train_files)
    heldout_stream = encode_files(tokenizer, heldout_files)
    log(f"tokenizer: {vocab} tokens; {len(train_stream)} training tokens "
        f"({len(train_text) / len(train_stream):.2f} chars/token), "
        f"{len(heldout_stream)} held-out tokens")

    windows = training.heldout_windows(heldout_stream, args.ctx, args.eval_windows)
    results = {}
    teacher = None
    draft_shape = replace(DRAFT, num_hidden_layers=args.draft_layers,
                          hidden_size=args.draft_hidden,
                          intermediate_size=args.draft_intermediate,
                          num_attention_heads=args.draft_heads,
                          num_key_value_heads=args.draft_kv_heads)
    target_shape = Shape(hidden_size=args.target_hidden, num_hidden_layers=args.target_layers,
                         num_attention_heads=args.target_heads,
                         num_key_value_heads=args.target_kv_heads,
                         intermediate_size=args.target_intermediate)
    budgets = {"target": args.target_seconds, "draft": args.draft_seconds}
    sampled = None
    for role, shape, steps, lr in (("target", target_shape, args.target_steps, args.target_lr),
                                   ("draft", draft_shape, args.draft_steps, args.draft_lr)):
        if role == "draft" and args.skip_draft:
            break
        if role == "target" and args.reuse_target is not None:
            src = args.reuse_target.resolve()
            model = AutoModelForCausalLM.from_pretrained(src)
            shutil.copytree(src, out / role)
            results[role] = {"parameters": count_params(model), "reused_from": str(src)}
            prior = src.parent / "target_results.json"  # written by the --skip-draft run
            if prior.is_file():
                results[role] = {**json.loads(prior.read_text())["target"], **results[role]}
            log(f"target: reused from {src}")
        else:
            model = training.build_llama(asdict(shape), tokenizer, vocab_size=vocab,
                                         max_positions=args.ctx, tie=True, seed=args.seed)
            params = count_params(model)
            log(f"{role}: {params:,} parameters {asdict(shape)}")
            seconds = budgets[role]
            info = train_model(role, model, train_stream, steps=None if seconds else steps,
                               seconds=seconds, batch=args.batch, ctx=args.ctx, lr=lr,
                               seed=args.seed, device=args.device, log_every=args.log_every,
                               eval_windows=windows, eval_every=args.eval_every,
                               teacher=teacher, extra_stream=sampled, fast=args.fast,
                               distill=args.draft_distill if teacher is not None else 0.0)
            model.to("cpu")
            (model.half() if args.save_half else model).save_pretrained(
                out / role, safe_serialization=True)
            model.float()
            tokenizer.save_pretrained(out / role)
            results[role] = {"parameters": params, "shape": asdict(shape), "lr": lr, **info}
            if role == "draft" and sampled is not None:
                results[role]["target_samples"] = {"sequences": args.draft_samples,
                                                   "new_tokens": args.sample_tokens,
                                                   "tokens": len(sampled)}
        if role == "target" and args.draft_distill > 0 and not args.skip_draft:
            teacher = model.to(args.device).eval()
            for prm in teacher.parameters():
                prm.requires_grad_(False)
            if args.draft_samples:
                t0 = time.perf_counter()
                sampled = training.sample_stream(teacher, train_stream, n=args.draft_samples,
                                        new_tokens=args.sample_tokens, device=args.device,
                                        seed=args.seed, eos=tokenizer.eos_token_id)
                log(f"target samples: {args.draft_samples} x {args.sample_tokens} tokens "
                    f"({time.perf_counter() - t0:.0f}s)")
        del model
    del teacher
    if args.skip_draft:
        log(f"target only: saved to {out / 'target'}")
        (out / "target_results.json").write_text(json.dumps(results, indent=2) + "\n")
        return 0

    # evaluate from the saved folders (what the exporter reads), in fp32
    target = AutoModelForCausalLM.from_pretrained(out / "target").to(args.device).eval()
    draft = AutoModelForCausalLM.from_pretrained(out / "draft").to(args.device).eval()
    t0 = time.perf_counter()
    ev = training.evaluate(target, draft, windows, args.device)
    starts = [tokenizer(p.read_text(encoding="utf-8")[:200])["input_ids"][:16]
              for p in heldout_files[:48]]
    readme = tokenizer("def quicksort(arr):")["input_ids"]
    ev["trajectory_alpha_T0"] = trajectory_alpha(target, draft, [readme] + starts,
                                                 args.device)
    ev["trajectory_alpha_readme_T0"] = trajectory_alpha(target, draft, [readme], args.device)
    log(f"held-out: target loss {ev['target_loss']:.3f}, draft loss {ev['draft_loss']:.3f}, "
        f"alpha T=0 {ev['alpha_T0']:.3f}, alpha T=1 {ev['alpha_T1']:.3f} "
        f"over {ev['positions']} positions; on greedy continuations "
        f"{ev['trajectory_alpha_T0']:.3f} (the README's prompt "
        f"{ev['trajectory_alpha_readme_T0']:.3f}) ({time.perf_counter() - t0:.0f}s)")

    tok_hash = hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()
    summary = {
        "command": "python scripts/train_default_pair.py " + " ".join(argv or sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": {
            "python": platform.python_version(),  # of the interpreter that trained
            "stdlib": root.name,  # e.g. python3.11: the sources' version
            "stdlib_root": str(root),
            "excluded_dirs": list(EXCLUDED_DIRS),
            "heldout_rule": f"index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1} in sorted order",
            "train_files": len(train_files),
            "heldout_files": len(heldout_files),
            "train_chars": len(train_text),
            "train_tokens": len(train_stream),
            "heldout_tokens": len(heldout_stream),
            "sha256": corpus_digest(train_files + heldout_files, root),
            "heldout_examples": [str(p.relative_to(root)) for p in heldout_files[:8]],
            "sources": (json.loads((root / CORPUS_MANIFEST).read_text())["sources"]
                        if (root / CORPUS_MANIFEST).is_file() else None),
        },
        "tokenizer": {"vocab_size": vocab, "tokenizer_json_sha256": tok_hash},
        "models": results,
        "heldout": {**ev, "windows": len(windows), "ctx": args.ctx},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "numpy": np.__version__},
        "threads": args.threads,
        "device": args.device,
        "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                        else platform.processor() or platform.machine()),
        "total_seconds": None,
    }
    summary["total_seconds"] = time.perf_counter() - t_start
    if args.export:
        summary["export"] = export(out, args.export_dir.resolve(), summary, args.stdlib_root)
        log(f"exported to {args.export_dir}: {summary['export']['bytes'] / 1e6:.2f} MB")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("corpus", "tokenizer", "models", "heldout")},
                     indent=2))
    log(f"done in {summary['total_seconds']:.0f}s; summary in {summary_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
