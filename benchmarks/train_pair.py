#!/usr/bin/env python
"""Train the realistic pair of the benchmarks on the machine's own Python sources.

The paper's Table 3 shapes in a Llama-style architecture: a target of ~97M parameters
(d 768, 12 layers, 12 heads) and a draft of ~6M (d 256, 2 layers, 4 heads), over a
byte-level BPE vocabulary of 8192 tokens trained with ``tokenizers``. Each model trains
for a fixed time budget from a fixed seed (bf16 autocast, fused AdamW, warmup + cosine,
windows of 512 tokens): the target first, on next-token cross entropy; then the draft,
distilled from the trained target on the same windows. The draft's loss per batch is

    w * KL(p || q) + (1 - w) * CE,    w = --distill-weight (0.9; 0 = cross entropy alone)

with p and q the target's and the draft's next-token distributions at temperature 1 (the
frozen target's forward on the batch, under the same autocast, is part of every draft step
and of its time budget), KL and CE averaged over the tokens. Matching p as a whole is what
alpha = 1 - TV(p, q) rewards. Both models are then saved as Hugging Face folders
(safetensors and the tokenizer) and evaluated on held-out files: loss, and the acceptance
rate alpha at T=0 and T=1 (mean over held-out positions of sum_x min(p(x), q(x)),
quickdraft.theory.beta), beside the paper's 0.88 / 0.89 for its 97M / 6M pair.

Corpus: the ``*.py`` files of the running interpreter's standard library and its
site-packages (not the folders on PYTHONPATH, not this repository), deduplicated, sorted by
path; when they exceed ``--corpus-mb`` an evenly strided subset is kept; every 20th file of
that list (index % 20 == 19) is held out. The file list and its SHA-256 are recorded:
the corpus depends on what the machine has installed.

    python benchmarks/train_pair.py --out /tmp/qdbench/pairs/trained --device cuda \\
        --target-seconds 150 --draft-seconds 60

The time budget fixes the number of steps once, from the measured time of the first steps
(recorded; pass ``--target-steps/--draft-steps`` to repeat a run step for step).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import site
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import PAPER_ALPHA, REPO, dump_json, log  # noqa: E402

HELDOUT_EVERY = 20


@dataclass
class TrainConfig:
    vocab_size: int = 8192
    ctx: int = 512  # training window
    max_positions: int = 1024  # max_position_embeddings of the saved models
    target: dict = field(default_factory=lambda: dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
        intermediate_size=2048))
    draft: dict = field(default_factory=lambda: dict(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=704))
    target_seconds: float = 150.0
    draft_seconds: float = 60.0
    target_steps: int | None = None  # overrides the time budget
    draft_steps: int | None = None
    batch: int = 32
    target_lr: float = 1e-3
    draft_lr: float = 3e-3
    # draft loss: distill_weight * KL(p || q) + (1 - distill_weight) * CE; 0 = CE alone
    distill_weight: float = 0.9
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    corpus_mb: float = 100.0  # characters of source kept (in millions)
    tokenizer_mb: float = 40.0  # characters the tokenizer trains on (in millions)
    eval_windows: int = 32
    num_prompts: int = 4
    prompt_len: int = 32
    compile: bool = False


SMOKE = dict(
    vocab_size=512, ctx=64, max_positions=256,
    target=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128),
    draft=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, intermediate_size=64),
    target_steps=12, draft_steps=12, batch=4, warmup_steps=2, corpus_mb=0.6, tokenizer_mb=0.3,
    eval_windows=4, num_prompts=2, target_lr=3e-3, draft_lr=3e-3,
)


# ----------------------------------------------------------------------------- corpus


def _excluded_roots() -> list[Path]:
    roots = [REPO.resolve()]
    for p in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if p:
            roots.append(Path(p).resolve())
    return roots


def source_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    cands = [paths.get("stdlib"), paths.get("purelib"), paths.get("platlib")]
    try:
        cands += site.getsitepackages()
    except AttributeError:  # virtualenvs of old
        pass
    out = []
    for c in cands:
        if c and Path(c).is_dir():
            r = Path(c).resolve()
            if r not in out:
                out.append(r)
    return out


def corpus_files(corpus_mb: float) -> dict:
    """The sorted file list, the strided subset kept, and the train / held-out split."""
    excluded = _excluded_roots()
    seen, files = set(), []
    for root in source_roots():
        for p in root.rglob("*.py"):
            try:
                rp = p.resolve()
                if rp in seen or not rp.is_file():
                    continue
                if any(rp.is_relative_to(x) for x in excluded):
                    continue
                size = rp.stat().st_size
            except OSError:
                continue
            if size == 0 or size > 1_000_000:  # skip empty files and generated tables
                continue
            seen.add(rp)
            files.append((str(rp), size))
    files.sort()
    total = sum(s for _, s in files)
    stride = max(1, math.ceil(total / (corpus_mb * 1e6)))
    kept = [f for i, f in enumerate(files) if i % stride == 0]
    train = [Path(f) for i, (f, _) in enumerate(kept) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [Path(f) for i, (f, _) in enumerate(kept) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return {"all_files": len(files), "all_bytes": total, "stride": stride,
            "train": train, "heldout": held, "roots": [str(r) for r in source_roots()]}


def read_texts(files: list[Path]) -> tuple[list[str], list[Path]]:
    texts, ok = [], []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8"))
            ok.append(p)
        except (UnicodeDecodeError, OSError):
            continue
    return texts, ok


def digest(files: list[Path], texts: list[str]) -> str:
    h = hashlib.sha256()
    for p, t in zip(files, texts):
        h.update(str(p).encode() + b"\0" + t.encode() + b"\0")
    return h.hexdigest()


def encode(tokenizer, texts: list[str]):
    """One int32 token stream: each file's tokens followed by <|endoftext|>."""
    import numpy as np

    eos = tokenizer.eos_token_id
    parts = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ----------------------------------------------------------------------------- training


def build_model(shape: dict, cfg: TrainConfig, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rope_theta=10000.0,
        attention_dropout=0.0, **shape)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def distill_loss(q_logits, p_logits, labels, weight: float, chunk_rows: int = 2048):
    """``weight * KL(p || q) + (1 - weight) * CE(labels)``, each the mean over tokens.

    ``q_logits`` (the student's, with grad) and ``p_logits`` (the teacher's) are [N, V],
    ``labels`` [N]; temperature 1. The softmaxes are taken in fp32, ``chunk_rows`` rows at
    a time, so no fp32 copy of a whole batch's logits is made at once beyond what autograd
    keeps. Returns (loss, kl, ce), the last two detached.
    """
    import torch

    n = q_logits.shape[0]
    kl_sum = q_logits.new_zeros((), dtype=torch.float32)
    ce_sum = q_logits.new_zeros((), dtype=torch.float32)
    for r in range(0, n, chunk_rows):
        log_q = torch.log_softmax(q_logits[r: r + chunk_rows].float(), dim=-1)  # [rows, V]
        with torch.no_grad():
            log_p = torch.log_softmax(p_logits[r: r + chunk_rows].float(), dim=-1)
            p = log_p.exp()
            neg_entropy = (p * log_p).sum()  # sum_x p log p: constant for the student
        kl_sum = kl_sum + neg_entropy - (p * log_q).sum()
        ce_sum = ce_sum - log_q.gather(1, labels[r: r + chunk_rows, None]).sum()
    kl, ce = kl_sum / n, ce_sum / n
    return weight * kl + (1.0 - weight) * ce, kl.detach(), ce.detach()


def train_model(name: str, model, stream, *, seconds: float, steps: int | None, batch: int,
                ctx: int, lr: float, cfg: TrainConfig, device: str, seed: int,
                teacher=None, distill_weight: float = 0.0) -> dict:
    """Train on random windows of ``stream`` (seeded); steps fixed up front or from the
    time budget, measured on the first steps.

    With a ``teacher`` and ``distill_weight`` w > 0 the loss is w * KL(teacher || model) +
    (1 - w) * cross entropy (``distill_loss``); the teacher's forward on each batch (frozen,
    eval mode, no grad, the same autocast) is part of the step, so of its measured time."""
    import numpy as np
    import torch

    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"{name}: distill_weight must lie in [0, 1], got {distill_weight}; "
                         "pass --distill-weight between 0 (cross entropy alone) and 1")
    distill = teacher is not None and distill_weight > 0
    if distill_weight > 0 and teacher is None:
        raise ValueError(f"{name}: distill_weight {distill_weight} needs a teacher model; "
                         "pass teacher= or distill_weight=0")
    if distill:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        teach = torch.compile(teacher) if cfg.compile else teacher
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = device == "cuda"
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    fwd = torch.compile(model) if cfg.compile else model
    g = np.random.default_rng(seed)
    data = torch.from_numpy(stream.astype(np.int64))
    high = len(data) - ctx - 1
    if high <= 0:
        raise ValueError(f"{name}: the training stream ({len(data)} tokens) is too short")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else None

    def one_step(step: int, total: int) -> float:
        warm = max(1, min(cfg.warmup_steps, total // 10))
        if step < warm:
            f = (step + 1) / warm
        else:
            progress = (step - warm) / max(1, total - warm)
            f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in opt.param_groups:
            group["lr"] = lr * f
        starts = torch.from_numpy(g.integers(0, high, size=batch))
        idx = starts[:, None] + torch.arange(ctx + 1)[None, :]
        chunk = data[idx].to(device, non_blocking=True)  # [B, ctx + 1]
        x, y = chunk[:, :-1], chunk[:, 1:].reshape(-1)  # [B, ctx], [B*ctx]
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = fwd(input_ids=x).logits  # [B, ctx, V]
            if distill:
                with torch.no_grad():
                    t_logits = teach(input_ids=x).logits  # [B, ctx, V]
        logits = logits.reshape(-1, logits.shape[-1])  # [B*ctx, V]
        if distill:
            loss, kl, ce = distill_loss(logits, t_logits.reshape(logits.shape), y,
                                        distill_weight)
            del t_logits
        else:
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            kl, ce = None, loss.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss, kl, ce

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    t_start = time.perf_counter()
    losses = []
    calib = 0
    if steps is None:
        # the first steps (warmup LR, part of training) measure the step time
        provisional = 10_000
        for s in range(3):
            losses.append(float(one_step(s, provisional)[0]))
        sync()
        t0 = time.perf_counter()
        for s in range(3, 8):  # teacher forward included when distilling
            losses.append(float(one_step(s, provisional)[0]))
        sync()
        per_step = (time.perf_counter() - t0) / 5
        spent = time.perf_counter() - t_start
        steps = max(8, int((seconds - spent) / per_step) + 8)
        calib = 8
        log(f"{name}: {per_step * 1e3:.1f} ms/step -> {steps} steps in ~{seconds:.0f}s")
    smooth = losses[-1] if losses else None
    log_every = max(1, steps // 10)
    smooth_ce = smooth_kl = None
    for s in range(calib, steps):
        loss, kl, ce = one_step(s, steps)
        if (s + 1) % log_every == 0 or s + 1 == steps:
            value, ce_value = float(loss), float(ce)
            smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
            smooth_ce = ce_value if smooth_ce is None else 0.9 * smooth_ce + 0.1 * ce_value
            parts = ""
            if kl is not None:
                kl_value = float(kl)
                smooth_kl = kl_value if smooth_kl is None else 0.9 * smooth_kl + 0.1 * kl_value
                parts = f" (KL {kl_value:.3f}, CE {ce_value:.3f})"
            log(f"{name} step {s + 1}/{steps} loss {value:.3f}{parts} "
                f"({time.perf_counter() - t_start:.0f}s)")
    sync()
    elapsed = time.perf_counter() - t_start
    model.eval()
    objective = (f"{distill_weight:g} * KL(target || {name}) + {1 - distill_weight:g} * CE"
                 if distill else "CE")
    return {"steps": steps, "batch": batch, "ctx": ctx, "lr": lr, "seconds": round(elapsed, 2),
            "tokens_seen": steps * batch * ctx,
            "tokens_per_s": steps * batch * ctx / elapsed, "final_loss": smooth,
            "final_ce": smooth_ce, "final_kl": smooth_kl, "objective": objective,
            "distill_weight": distill_weight if distill else 0.0,
            "teacher": "target" if distill else None,
            "budget_seconds": seconds, "compiled": cfg.compile}


def heldout_windows(stream, ctx: int, n: int):
    import numpy as np

    total = len(stream) // (ctx + 1)
    n = min(n, total)
    picks = [int(i * total / n) for i in range(n)]
    return np.stack([stream[k * (ctx + 1): (k + 1) * (ctx + 1)] for k in picks]).astype(np.int64)


def evaluate(target, draft, windows, device: str, chunk_rows: int = 1024) -> dict:
    """Held-out loss of both models, alpha at T=0 (argmax agreement: beta of the one-hot
    greedy distributions) and at T=1 (quickdraft.theory.beta of the softmaxes)."""
    import numpy as np
    import torch

    from quickdraft.theory import beta

    nll = {"target": 0.0, "draft": 0.0}
    agree = 0.0
    beta_sum = 0.0
    positions = 0
    batch = 4
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            chunk = torch.from_numpy(windows[i: i + batch]).to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            if device == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    lp, lq = target(input_ids=x).logits, draft(input_ids=x).logits
            else:
                lp, lq = target(input_ids=x).logits, draft(input_ids=x).logits
            lp = lp.float().reshape(-1, lp.shape[-1])  # [B*ctx, V]
            lq = lq.float().reshape(-1, lq.shape[-1])
            yy = y.reshape(-1)
            nll["target"] += float(torch.nn.functional.cross_entropy(lp, yy, reduction="sum"))
            nll["draft"] += float(torch.nn.functional.cross_entropy(lq, yy, reduction="sum"))
            agree += float((lp.argmax(-1) == lq.argmax(-1)).sum())
            for r in range(0, lp.shape[0], chunk_rows):
                p = torch.softmax(lp[r: r + chunk_rows], -1).cpu().numpy()  # [rows, V]
                q = torch.softmax(lq[r: r + chunk_rows], -1).cpu().numpy()
                beta_sum += float(np.sum(beta(p, q)))
            positions += lp.shape[0]
    out = {"positions": positions, "windows": len(windows)}
    for k, v in nll.items():
        out[f"{k}_loss"] = v / positions
        out[f"{k}_ppl"] = math.exp(v / positions)
    out["alpha_T0"] = agree / positions
    out["alpha_T1"] = beta_sum / positions
    out["paper_alpha_T0"] = PAPER_ALPHA["T0"]
    out["paper_alpha_T1"] = PAPER_ALPHA["T1"]
    return out


def prompts_from(stream, n: int, length: int, eos: int, offset: int = 64) -> list[list[int]]:
    """n prompts of ``length`` tokens at evenly spaced places of the held-out stream (none
    crossing a file boundary)."""
    out = []
    total = len(stream)
    for i in range(max(1, n) * 20):
        if len(out) >= n:
            break
        start = offset + int(i * (total - length - offset - 1) / (max(1, n) * 20))
        window = [int(t) for t in stream[start: start + length]]
        if len(window) == length and eos not in window:
            out.append(window)
    return out


# ----------------------------------------------------------------------------- main


def train_pair(out: Path, cfg: TrainConfig, device: str) -> dict:
    import numpy as np
    import torch

    from quickdraft.export.toy import train_tokenizer

    if not 0.0 <= cfg.distill_weight <= 1.0:
        raise ValueError(f"distill_weight must lie in [0, 1], got {cfg.distill_weight}; pass "
                         "--distill-weight between 0 (cross entropy alone) and 1 (KL alone)")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"name": "trained", "kind": "trained", "config": asdict(cfg), "device": device}

    t0 = time.perf_counter()
    c = corpus_files(cfg.corpus_mb)
    train_texts, train_files = read_texts(c["train"])
    held_texts, held_files = read_texts(c["heldout"])
    info["corpus"] = {
        "roots": c["roots"], "all_files": c["all_files"], "all_bytes": c["all_bytes"],
        "stride": c["stride"], "train_files": len(train_files), "heldout_files": len(held_files),
        "train_chars": sum(map(len, train_texts)), "heldout_chars": sum(map(len, held_texts)),
        "heldout_rule": f"index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1} of the kept files",
        "sha256": digest(train_files + held_files, train_texts + held_texts),
        "heldout_examples": [str(p) for p in held_files[:6]],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(f"corpus: {len(train_files)} training files ({info['corpus']['train_chars'] / 1e6:.1f}M "
        f"chars), {len(held_files)} held out, stride {c['stride']} over {c['all_files']} files")

    t0 = time.perf_counter()
    tok_text, size = [], 0
    step = max(1, int(sum(map(len, train_texts)) / (cfg.tokenizer_mb * 1e6)))
    for t in train_texts[::step]:
        tok_text.append(t)
        size += len(t)
    tokenizer = train_tokenizer(out / "tokenizer", vocab_size=cfg.vocab_size,
                                text="\n".join(tok_text), model_max_length=cfg.max_positions)
    train_stream = encode(tokenizer, train_texts)
    held_stream = encode(tokenizer, held_texts)
    info["tokenizer"] = {
        "vocab_size": len(tokenizer), "trained_on_chars": size,
        "train_tokens": int(len(train_stream)), "heldout_tokens": int(len(held_stream)),
        "chars_per_token": info["corpus"]["train_chars"] / max(1, len(train_stream)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(f"tokenizer: {len(tokenizer)} tokens, {len(train_stream) / 1e6:.1f}M training tokens, "
        f"{len(held_stream) / 1e6:.2f}M held-out ({info['tokenizer']['seconds']}s)")

    models = {}
    for role, shape, seconds, steps, lr in (
            ("target", cfg.target, cfg.target_seconds, cfg.target_steps, cfg.target_lr),
            ("draft", cfg.draft, cfg.draft_seconds, cfg.draft_steps, cfg.draft_lr)):
        model = build_model(shape, cfg, tokenizer, cfg.seed)
        params = sum(p.numel() for p in model.parameters())
        log(f"{role}: {params / 1e6:.2f}M parameters {shape}")
        distilled = role == "draft" and cfg.distill_weight > 0
        tr = train_model(role, model, train_stream, seconds=seconds, steps=steps,
                         batch=cfg.batch, ctx=cfg.ctx, lr=lr, cfg=cfg, device=device,
                         seed=cfg.seed, teacher=models["target"] if distilled else None,
                         distill_weight=cfg.distill_weight if distilled else 0.0)
        model.generation_config.eos_token_id = None  # benchmarks generate the full length
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.to("cpu").save_pretrained(out / "hf" / role, safe_serialization=True)
        tokenizer.save_pretrained(out / "hf" / role)
        info[role] = {"parameters": params, "weight_bytes": 2 * params,  # as run: fp16
                      "shape": shape, "training": tr}
        models[role] = model
    info["draft_fraction"] = info["draft"]["parameters"] / info["target"]["parameters"]
    info["distill_weight"] = cfg.distill_weight  # how the draft was trained (0: CE alone)

    t0 = time.perf_counter()
    windows = heldout_windows(held_stream, cfg.ctx, cfg.eval_windows)
    for m in models.values():
        m.to(device)
    info["heldout"] = evaluate(models["target"], models["draft"], windows, device)
    info["heldout"]["seconds"] = round(time.perf_counter() - t0, 2)
    h = info["heldout"]
    log(f"held-out: target loss {h['target_loss']:.3f}, draft loss {h['draft_loss']:.3f}, "
        f"alpha T=0 {h['alpha_T0']:.3f} (paper {PAPER_ALPHA['T0']}), alpha T=1 "
        f"{h['alpha_T1']:.3f} (paper {PAPER_ALPHA['T1']}) over {h['positions']} positions")
    prompts = prompts_from(held_stream, cfg.num_prompts, cfg.prompt_len, tokenizer.eos_token_id)
    dump_json(out / "prompts.json", {"prompts": prompts,
                                     "source": "held-out token stream, evenly spaced windows"})
    info["vocab_size"] = len(tokenizer)
    info["context"] = cfg.max_positions
    info["total_seconds"] = round(time.perf_counter() - t_all, 2)
    info["versions"] = {"torch": torch.__version__, "numpy": np.__version__}
    dump_json(out / "pair.json", info)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="pair folder to write")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and a few steps (CPU)")
    for name in ("target_seconds", "draft_seconds", "corpus_mb", "tokenizer_mb"):
        ap.add_argument("--" + name.replace("_", "-"), type=float)
    ap.add_argument("--distill-weight", type=float,
                    help="draft loss: w * KL(target || draft) + (1 - w) * CE (default 0.9; "
                         "0 = cross entropy alone)")
    for name in ("target_steps", "draft_steps", "batch", "seed", "vocab_size", "eval_windows",
                 "num_prompts"):
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    ap.add_argument("--compile", action="store_true", help="torch.compile the models")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**(SMOKE if args.smoke else {}))
    for k, v in vars(args).items():
        if k in TrainConfig.__dataclass_fields__ and v is not None and v is not False:
            setattr(cfg, k, v)
    info = train_pair(args.out, cfg, args.device)
    log(f"done in {info['total_seconds']}s: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
