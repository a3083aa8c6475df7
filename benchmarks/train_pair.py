#!/usr/bin/env python
"""Train the realistic pair of the benchmarks on the machine's own Python sources.

The paper's Table 3 shapes in a Llama-style architecture: a target of ~97M parameters
(d 768, 12 layers, 12 heads) and a draft of ~6M (d 256, 2 layers, 4 heads), over a
byte-level BPE vocabulary of 8192 tokens trained with ``tokenizers``. Each model trains
for a fixed time budget from a fixed seed (bf16 autocast, fused AdamW, warmup + cosine,
windows of 512 tokens): the target first, on next-token cross entropy; then the draft,
distilled from the trained target on the same windows. The draft's loss per batch is

    w * D(p, q) + (1 - w) * CE,    w = --distill-weight (0.9; 0 = cross entropy alone)

with p and q the target's and the draft's next-token distributions at temperature 1 (the
frozen target's forward on the batch, under the same autocast, is part of every draft step
and of its time budget), D and CE averaged over the tokens. D is ``--distill-divergence``:
``kl``, KL(p || q) (the default: matching p as a whole), or ``tvd``, the total variation
distance, which is 1 - alpha at T=1 itself. With ``--draft-samples N`` half of every draft batch are
windows of N continuations the trained target wrote itself (half greedy, half sampled at
``--sample-temperature`` / ``--sample-top-p``, 0.8 / 0.95; ``benchmarks.training.
sample_stream``): the text speculative decoding meets. Both models are then saved as
Hugging Face folders (safetensors and the tokenizer) and evaluated on held-out files: loss,
and the acceptance rate alpha at T=0 and T=1 (mean over held-out positions of
sum_x min(p(x), q(x)), quickdraft.theory.beta), beside the paper's 0.88 / 0.89 for its
97M / 6M pair; and on the target's own continuations of held-out prompts (``own_text``:
alpha T=0 over its greedy continuations, T=1 over continuations it sampled at T=1), the
rate a decoding loop meets.

Corpus: the ``*.py`` files of the running interpreter's standard library and its
site-packages (not the folders on PYTHONPATH, not this repository), deduplicated, sorted by
path; when they exceed ``--corpus-mb`` an evenly strided subset is kept; every 20th file of
that list (index % 20 == 19) is held out. The file list and its SHA-256 are recorded:
the corpus depends on what the machine has installed.

    python benchmarks/train_pair.py --out /tmp/qdbench/pairs/trained --device cuda \\
        --target-seconds 150 --draft-seconds 60

The time budget fixes the number of steps once, from the measured time of the first steps
(recorded; pass ``--target-steps/--draft-steps`` to repeat a run step for step).

``--call-seconds S`` makes a long run fit calls of a limited length: the call stops after
about S seconds, keeping ``OUT/checkpoint.pt`` (the model in training with its optimizer,
the window sampler's state, the fixed step count, the models already trained) and the
token streams (``OUT/streams.npz``); the same command again continues, the same steps on
the same windows, until the pair is trained, saved and evaluated:

    for i in 1 2 3 4; do python benchmarks/train_pair.py --out OUT --device cuda \\
        --target-seconds 900 --draft-seconds 600 --call-seconds 540; done
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import site
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import training  # noqa: E402
from benchmarks.common import PAPER_ALPHA, REPO, dump_json, log  # noqa: E402

HELDOUT_EVERY = 20
INCOMPLETE = 3  # the exit status of a call that stopped with a checkpoint (--call-seconds)


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
    # peak learning rates; 1e-3 for the target diverged (NaN) near step 1,500 of a 5,068-step
    # schedule on the H200 (runs of ~3,300 steps had trained at it)
    target_lr: float = 6e-4
    draft_lr: float = 3e-3
    # draft loss: distill_weight * D(p, q) + (1 - distill_weight) * CE; 0 = CE alone
    distill_weight: float = 0.9
    # D: "kl" = KL(p || q); "tvd" = total variation, 1 - alpha at T=1 (training.DIVERGENCES)
    distill_divergence: str = "kl"
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    # characters of source kept (in millions); 400 keeps all of the H200 machine's (376M
    # characters, 111M tokens). At 100 (27M tokens) a 620 s target saw each token ~6 times
    # and memorized: held-out loss 1.95, alpha 0.52 (benchmarks/results/
    # h200_trained_overfit_620s.json)
    corpus_mb: float = 400.0
    tokenizer_mb: float = 40.0  # characters the tokenizer trains on (in millions)
    eval_windows: int = 32
    num_prompts: int = 4
    prompt_len: int = 32
    compile: bool = False
    # continuations the trained target writes itself (half greedy); half of every draft
    # batch is drawn from them (0: the draft trains on the corpus alone)
    draft_samples: int = 0
    sample_tokens: int = 128  # tokens of each such continuation
    sample_temperature: float = 0.8  # the sampled half's temperature
    sample_top_p: float = 0.95  # and its top-p
    sample_batch: int = 256  # continuations written at once (more: faster on a large GPU)


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


def train_model(name: str, model, stream, *, seconds: float, steps: int | None, batch: int,
                ctx: int, lr: float, cfg: TrainConfig, device: str, seed: int,
                teacher=None, distill_weight: float = 0.0, divergence: str = "kl",
                extra=None, resume: dict | None = None, stop_at: float | None = None) -> dict:
    """``benchmarks.training.train`` on random windows of ``stream`` (seeded; half of each
    batch from ``extra`` when given), for a fixed number of steps or for the time budget;
    logs the loss (and its divergence and CE parts) ten times. ``stop_at`` / ``resume``: as
    ``training.train``'s, ``resume`` also carrying the window sampler's state (``rng``)."""
    import numpy as np
    import torch

    g = np.random.default_rng(seed)
    if resume is not None:
        g.bit_generator.state = resume["rng"]  # the windows continue where they stopped
    data = torch.from_numpy(stream.astype(np.int64))
    batches = training.mixed_windows(
        data, extra, batch, ctx, lambda high, n: torch.from_numpy(g.integers(0, high, size=n)))
    t_start = time.perf_counter()
    seen = {"loss": None, "ce": None, "kl": None}  # the batch losses last logged

    def keep(loss, kl, ce):
        seen.update(loss=float(loss.detach()), ce=float(ce), kl=None if kl is None else float(kl))

    def on_step(s, total, loss, kl, ce):
        if steps is None and s < 8:  # the calibration steps (reading the loss waits for it)
            if s == 7:  # the last of them stands in until a later step is logged
                keep(loss, kl, ce)
            return
        log_every = max(1, total // 10)
        if (s + 1) % log_every == 0 or s + 1 == total:
            keep(loss, kl, ce)
            parts = ("" if kl is None else
                     f" ({divergence.upper()} {seen['kl']:.3f}, CE {seen['ce']:.3f})")
            log(f"{name} step {s + 1}/{total} loss {seen['loss']:.3f}{parts} "
                f"({time.perf_counter() - t_start:.0f}s)")

    tr = training.train(name, model, batches, lr=lr, device=device, steps=steps,
                        seconds=seconds, warmup_steps=cfg.warmup_steps,
                        weight_decay=cfg.weight_decay, fused=device == "cuda", autocast=True,
                        compile=cfg.compile, teacher=teacher, distill_weight=distill_weight,
                        divergence=divergence, on_step=on_step, log=log, resume=resume,
                        stop_at=stop_at)
    spent = tr["seconds"] + (resume["seconds"] if resume is not None else 0.0)
    calls = 1 + (resume["calls"] if resume is not None else 0)
    if not tr["done"]:
        return {"done": False, "resume": {**tr["resume"], "rng": g.bit_generator.state,
                                          "seconds": spent, "calls": calls}}
    n = tr["steps"]
    return {"done": True, "steps": n, "batch": batch, "ctx": ctx, "lr": lr,
            "seconds": round(spent, 2), "calls": calls,
            "tokens_seen": n * batch * ctx, "tokens_per_s": n * batch * ctx / spent,
            # times each corpus token was seen (with ``extra``, half of each batch is not)
            "epochs": n * (batch - (batch // 2 if extra is not None else 0)) * ctx
            / max(1, len(stream)),
            "final_loss": seen["loss"], "final_ce": seen["ce"],
            # the last logged divergence (KL or TV, as ``divergence`` says)
            "final_kl": seen["kl"], "divergence": tr["divergence"],
            "objective": tr["objective"], "distill_weight": tr["distill_weight"],
            "teacher": "target" if tr["distill_weight"] else None,
            "budget_seconds": None if steps is not None else seconds,  # steps fixed: none
            "compiled": cfg.compile}


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


def _corpus_and_tokens(out: Path, cfg: TrainConfig, info: dict):
    """The corpus read and split, the tokenizer trained on it (saved in ``out``), both
    token streams; their facts go into ``info``."""
    from quickdraft.export.toy import train_tokenizer

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
    train_stream = training.encode(tokenizer, train_texts)
    held_stream = training.encode(tokenizer, held_texts)
    info["tokenizer"] = {
        "vocab_size": len(tokenizer), "trained_on_chars": size,
        "train_tokens": int(len(train_stream)), "heldout_tokens": int(len(held_stream)),
        "chars_per_token": info["corpus"]["train_chars"] / max(1, len(train_stream)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(f"tokenizer: {len(tokenizer)} tokens, {len(train_stream) / 1e6:.1f}M training tokens, "
        f"{len(held_stream) / 1e6:.2f}M held-out ({info['tokenizer']['seconds']}s)")
    return tokenizer, train_stream, held_stream


def save_model(model, tokenizer, folder: Path) -> None:
    """A trained model as the benchmarks load it: a Hugging Face folder with the
    tokenizer, generating the full length (no EOS)."""
    model.generation_config.eos_token_id = None  # benchmarks generate the full length
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to("cpu").save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def draft_shape(text: str) -> dict:
    """"512x1" -> a Llama draft shape: hidden size 512, 1 layer, heads of 64 (as many
    key-value heads), an MLP 2.75 times as wide (rounded to 64; 704 at 256).
    "targetx2" -> the target's first 2 layers, its embedding, final norm and head, their
    weights copied from the trained target before distillation (:func:`draft_from_target`)."""
    hidden, _, layers = text.strip().lower().partition("x")
    try:
        d, n = (0 if hidden == "target" else int(hidden)), int(layers)
    except ValueError:
        raise ValueError(f"draft shape {text!r} is not HIDDENxLAYERS, e.g. 512x1, or "
                         "targetxLAYERS") from None
    if hidden == "target":
        if n < 1:
            raise ValueError(f"draft shape {text!r}: take at least 1 of the target's layers")
        return {"from_target": True, "num_hidden_layers": n}
    if d < 64 or d % 64 or n < 1:
        raise ValueError(f"draft shape {text!r}: the hidden size must be a positive multiple "
                         "of 64 (heads of 64) and the layers at least 1, e.g. 512x1")
    return dict(hidden_size=d, num_hidden_layers=n, num_attention_heads=d // 64,
                num_key_value_heads=d // 64, intermediate_size=64 * round(d * 2.75 / 64))


def resolve_shape(shape: dict, target: dict) -> dict:
    """A draft shape's Llama dimensions: a ``from_target`` shape takes the ``target``
    shape's, with its own number of layers."""
    if not shape.get("from_target"):
        return shape
    if shape["num_hidden_layers"] > target["num_hidden_layers"]:
        raise ValueError(f"a draft of the target's first {shape['num_hidden_layers']} layers: "
                         f"the target has {target['num_hidden_layers']}")
    return {**target, "num_hidden_layers": shape["num_hidden_layers"]}


def draft_lr(cfg: TrainConfig, shape: dict) -> float:
    """The draft's peak learning rate: the target's for a draft made of the target's
    layers (they continue at the rate they trained at), else the configured draft rate
    scaled by the hidden sizes, the configured draft's over this one's (Adam's rule for
    wider layers)."""
    if shape.get("from_target"):
        return cfg.target_lr
    own = resolve_shape(cfg.draft, cfg.target)
    return cfg.draft_lr * (own["hidden_size"] / shape["hidden_size"])  # exact at 1


def draft_from_target(target, layers: int):
    """A draft made of ``target``'s embedding, first ``layers`` decoder layers, final norm
    and head, the weights copied (an early exit of the target), to be distilled further."""
    import copy

    from transformers import LlamaForCausalLM

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    model = LlamaForCausalLM(config)
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    model.load_state_dict(state)  # strict: every weight of the draft comes from the target
    model.generation_config = copy.deepcopy(target.generation_config)
    return model


def check_divergence(cfg: TrainConfig) -> None:
    """The draft loss's divergence, checked before anything trains."""
    if cfg.distill_divergence not in training.DIVERGENCES:
        raise ValueError(f"--distill-divergence {cfg.distill_divergence!r} is not one of "
                         f"{sorted(training.DIVERGENCES)}: pass kl (KL(p || q)) or tvd "
                         "(total variation)")


def check_samples(cfg: TrainConfig) -> None:
    """The target-sample settings, checked before anything trains (they are used only after
    the target has)."""
    if cfg.draft_samples < 0:
        raise ValueError(f"--draft-samples must be 0 (none) or more, got {cfg.draft_samples}")
    if not cfg.draft_samples:
        return
    if cfg.sample_tokens < 1 or cfg.sample_batch < 1:
        raise ValueError(f"--sample-tokens and --sample-batch must be at least 1, got "
                         f"{cfg.sample_tokens} and {cfg.sample_batch}")
    if cfg.sample_temperature <= 0:
        raise ValueError(f"--sample-temperature must be above 0 (the sampled half; the other "
                         f"half is greedy), got {cfg.sample_temperature}")
    if not 0 < cfg.sample_top_p <= 1:
        raise ValueError(f"--sample-top-p must lie in (0, 1], got {cfg.sample_top_p}")


SAMPLE_SETTINGS = ("draft_samples", "sample_tokens", "sample_temperature", "sample_top_p",
                   "sample_batch")


def _fingerprint(model) -> str:
    """A short hash of a model's first and last parameters (which any training moves)."""
    import numpy as np

    params = list(model.parameters())
    h = hashlib.sha256()
    for t in (params[0], params[-1]):
        h.update(np.ascontiguousarray(t.detach().float().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def target_samples(target, train_stream, eos: int, cfg: TrainConfig, device: str,
                   cache: Path | None = None):
    """``cfg.draft_samples`` continuations the target writes for its draft
    (``training.sample_stream`` with ``cfg``'s sample settings and seed) and their entry
    for the results; read back from ``cache`` (an .npz) when it holds them for the same
    settings, target, stream and device, else written there too (whole or not at all)."""
    import json

    import numpy as np
    import torch

    settings = {k: getattr(cfg, k) for k in SAMPLE_SETTINGS} | {"seed": cfg.seed}
    key = {**settings, "target": _fingerprint(target), "stream_tokens": len(train_stream),
           "eos": int(eos), "device": device}
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as z:
                if json.loads(str(z["key"])) == key:
                    stream = torch.from_numpy(z["samples"])
                    return stream, {**settings, "tokens": len(stream), "cached": True}
        except (OSError, ValueError, KeyError):  # a damaged cache is a miss
            pass
    t0 = time.perf_counter()
    stream = training.sample_stream(
        target, torch.from_numpy(train_stream.astype(np.int64)), n=cfg.draft_samples,
        new_tokens=cfg.sample_tokens, device=device, seed=cfg.seed, eos=eos,
        temperature=cfg.sample_temperature, top_p=cfg.sample_top_p, batch=cfg.sample_batch)
    entry = {**settings, "tokens": len(stream), "seconds": round(time.perf_counter() - t0, 2)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        part = cache.with_name(cache.name + ".part.npz")
        np.savez(part, samples=stream.numpy(), key=json.dumps(key))
        os.replace(part, cache)
    return stream, entry


def own_text(target, draft, held_stream, eos: int, cfg: TrainConfig, device: str) -> dict:
    """Alpha on the target's own continuations (``training.own_text_alpha``) of
    ``cfg.eval_windows`` held-out prompts, ``cfg.sample_tokens`` tokens each: the acceptance
    rate decoding meets, which held-out text need not show."""
    import torch

    prompts = prompts_from(held_stream, cfg.eval_windows, cfg.prompt_len, eos, offset=96)
    if not prompts:
        return {"error": f"no {cfg.prompt_len}-token prompt inside one held-out file"}
    t0 = time.perf_counter()
    try:  # a measurement beside the trained pair: its failure must not lose the pair
        out = training.own_text_alpha(target, draft, torch.tensor(prompts, dtype=torch.int64),
                                      new_tokens=cfg.sample_tokens, device=device,
                                      seed=cfg.seed + 1, batch=4, autocast=True)
    except (RuntimeError, ValueError) as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    return {**out, "seconds": round(time.perf_counter() - t0, 2)}


def distill_draft(pair: Path, shape: dict, out: Path, device: str, *,
                  seconds: float | None = None, steps: int | None = None,
                  lr: float | None = None, samples: dict | None = None,
                  samples_cache: Path | None = None, divergence: str | None = None) -> dict:
    """A draft of ``shape`` distilled from the trained target of ``pair`` (a folder
    ``train_pair`` wrote) as the pair's own draft was: its batch, window, loss, seed and
    windows of the corpus (and the target's samples only with ``samples``), for
    ``seconds`` (default: the pair's draft budget) or ``steps``. ``shape`` may be the
    target's first layers (``draft_shape("targetx1")``), starting from their weights. The
    peak learning rate ``lr`` defaults to :func:`draft_lr`'s. Saved to ``out/hf/draft``;
    returns its entry (parameters, training) with the held-out loss and alphas on the
    pair's held-out windows, the target's beside them, and alpha on the target's own text
    (``own_text``).
    ``samples``: sample settings (``SAMPLE_SETTINGS``, e.g. ``{"draft_samples": 4096}``)
    over the pair's: half of every batch from the target's continuations, as
    ``train_pair --draft-samples`` does, kept in ``samples_cache`` for the next draft.
    ``divergence``: the distillation's D (``training.DIVERGENCES``; default the pair's)."""
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from benchmarks.common import load_json

    info = load_json(pair / "pair.json")
    if not info or "config" not in info:
        raise FileNotFoundError(f"{pair / 'pair.json'} is missing: {pair} is not a trained "
                                "pair; run benchmarks/train_pair.py first")
    cfg = TrainConfig(**info["config"])  # the pair's: its training and evaluation
    if divergence is not None:
        cfg = replace(cfg, distill_divergence=divergence)
    check_divergence(cfg)
    unknown = set(samples or {}) - set(SAMPLE_SETTINGS)
    if unknown:
        raise ValueError(f"unknown sample settings {sorted(unknown)}; use {SAMPLE_SETTINGS}")
    sampling = replace(cfg, **{"draft_samples": 0, **(samples or {})})  # this draft's samples
    check_samples(sampling)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = PreTrainedTokenizerFast.from_pretrained(pair / "tokenizer")
    train_stream, held_stream = load_streams(pair)
    target = LlamaForCausalLM.from_pretrained(pair / "hf" / "target").eval()
    if lr is None:
        lr = draft_lr(cfg, shape)
    model, dims = _new_draft(shape, target, tokenizer, cfg)
    params = sum(p.numel() for p in model.parameters())
    embedding = 2 * len(tokenizer) * dims["hidden_size"]  # the input table and the head
    log(f"draft {shape}: {params / 1e6:.2f}M parameters ({embedding / 1e6:.2f}M embedding)")
    distilled = cfg.distill_weight > 0
    extra, sampled = None, None
    if sampling.draft_samples:
        extra, sampled = target_samples(target, train_stream, tokenizer.eos_token_id,
                                        sampling, device, samples_cache)
        log(f"target samples: {sampling.draft_samples} x {sampling.sample_tokens} tokens"
            + (" (cached)" if sampled.get("cached") else f" ({sampled['seconds']}s)"))
    tr = train_model("draft", model, train_stream,
                     seconds=cfg.draft_seconds if seconds is None else seconds,
                     steps=steps, batch=cfg.batch, ctx=cfg.ctx, lr=lr, cfg=cfg,
                     device=device, seed=cfg.seed, teacher=target if distilled else None,
                     distill_weight=cfg.distill_weight if distilled else 0.0,
                     divergence=cfg.distill_divergence, extra=extra)
    del tr["done"]
    windows = training.heldout_windows(held_stream.astype(np.int64), cfg.ctx, cfg.eval_windows)
    heldout = training.evaluate(target.to(device), model.to(device), torch.from_numpy(windows),
                                device, batch=4, autocast=True)
    own = own_text(target, model, held_stream, tokenizer.eos_token_id, cfg, device)
    save_model(model, tokenizer, out / "hf" / "draft")
    return {"own_text": own, "parameters": params, "embedding_parameters": embedding,
            "weight_bytes": 2 * params, "shape": dims, "training": tr,
            "init": "target" if shape.get("from_target") else "random",
            "target_parameters": info["target"]["parameters"],
            "draft_fraction": params / info["target"]["parameters"],
            "pair_used_target_samples": bool(cfg.draft_samples),
            "target_samples": sampled,
            "heldout": {**heldout, "windows": len(windows)}}


def _new_draft(shape: dict, target, tokenizer, cfg: TrainConfig):
    """(the draft model to train, its Llama dimensions): random weights from the seed, or
    the target's first layers for a ``from_target`` shape."""
    dims = resolve_shape(shape, {k: getattr(target.config, k) for k in cfg.target})
    if shape.get("from_target"):
        return draft_from_target(target, shape["num_hidden_layers"]), dims
    return training.build_llama(dims, tokenizer, vocab_size=len(tokenizer),
                                max_positions=cfg.max_positions, tie=False,
                                seed=cfg.seed), dims


def load_streams(out: Path):
    """The training and held-out token streams a ``train_pair`` run kept in ``out``."""
    import numpy as np

    path = out / "streams.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {out} is not a pair trained by "
                                "benchmarks/train_pair.py (or bench.py's train stage); "
                                "train it first")
    with np.load(path) as z:
        return z["train"], z["held"]


def _checkpoint(out: Path) -> Path:
    return out / "checkpoint.pt"


def train_pair(out: Path, cfg: TrainConfig, device: str,
               call_seconds: float | None = None) -> dict:
    """Train, save and evaluate the pair; with ``call_seconds``, stop after about that
    long, keeping ``out/checkpoint.pt`` (the models, the optimizer, the sampler and the
    schedule) and the token streams, and return ``{"incomplete": True}``: the same call
    again continues where this one stopped, the same steps on the same windows."""
    import numpy as np
    import torch


    stop_at = None if call_seconds is None else time.perf_counter() + float(call_seconds)
    ckpt = _checkpoint(out)
    saved = (torch.load(ckpt, weights_only=False) if call_seconds is not None and ckpt.is_file()
             else None)
    if saved is not None and saved["config"] != asdict(cfg):
        raise ValueError(f"{ckpt} was made with other settings; remove it (or the --out "
                         "folder) to start again, or pass the same options")

    if not 0.0 <= cfg.distill_weight <= 1.0:
        raise ValueError(f"distill_weight must lie in [0, 1], got {cfg.distill_weight}; pass "
                         "--distill-weight between 0 (cross entropy alone) and 1 (KL alone)")
    check_divergence(cfg)
    check_samples(cfg)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"name": "trained", "kind": "trained", "config": asdict(cfg), "device": device}

    streams = out / "streams.npz"
    if saved is not None and streams.is_file():  # a resumed run: the same tokens as before
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
        train_stream, held_stream = load_streams(out)
        if len(train_stream) != saved["info"]["tokenizer"]["train_tokens"]:
            raise ValueError(f"{streams} holds {len(train_stream)} training tokens, not the "
                             f"{saved['info']['tokenizer']['train_tokens']} of {ckpt}: another "
                             "run wrote into this folder; remove it to start again")
        info["corpus"], info["tokenizer"] = saved["info"]["corpus"], saved["info"]["tokenizer"]
        log(f"corpus and tokens of the first call ({streams})")
    else:  # kept: a resumed call and benchmarks/draft_shapes.py read the same tokens
        tokenizer, train_stream, held_stream = _corpus_and_tokens(out, cfg, info)
        np.savez(streams, train=train_stream, held=held_stream)

    models = {}
    sampled = None
    finished = {} if saved is None else saved["finished"]  # role -> its info entry
    if saved is not None and "target_samples" in saved["info"]:
        info["target_samples"] = saved["info"]["target_samples"]
    for role, shape, seconds, steps, lr in (
            ("target", cfg.target, cfg.target_seconds, cfg.target_steps, cfg.target_lr),
            ("draft", cfg.draft, cfg.draft_seconds, cfg.draft_steps, cfg.draft_lr)):
        if role in finished:  # trained by an earlier call
            from transformers import LlamaForCausalLM

            models[role] = LlamaForCausalLM.from_pretrained(out / "hf" / role).eval()
            info[role] = finished[role]
            log(f"{role}: trained by an earlier call")
            continue
        if role == "draft":
            model, dims = _new_draft(shape, models["target"], tokenizer, cfg)
            lr = draft_lr(cfg, shape)  # the configured rate, or the target's for its layers
        else:
            model, dims = training.build_llama(shape, tokenizer, vocab_size=len(tokenizer),
                                               max_positions=cfg.max_positions, tie=False,
                                               seed=cfg.seed), shape
        resume = None
        if saved is not None and saved.get("role") == role:
            model.load_state_dict(saved["model"])
            resume = saved["resume"]
        params = sum(p.numel() for p in model.parameters())
        log(f"{role}: {params / 1e6:.2f}M parameters {shape}")
        distilled = role == "draft" and cfg.distill_weight > 0
        if role == "draft" and cfg.draft_samples and saved is not None and \
                saved.get("samples") is not None:
            sampled = torch.from_numpy(saved["samples"])
        elif role == "draft" and cfg.draft_samples:
            sampled, info["target_samples"] = target_samples(
                models["target"], train_stream, tokenizer.eos_token_id, cfg, device)
            log(f"target samples: {cfg.draft_samples} x {cfg.sample_tokens} tokens "
                f"({info['target_samples']['seconds']}s)")
        tr = train_model(role, model, train_stream, seconds=seconds, steps=steps,
                         batch=cfg.batch, ctx=cfg.ctx, lr=lr, cfg=cfg, device=device,
                         seed=cfg.seed, teacher=models["target"] if distilled else None,
                         distill_weight=cfg.distill_weight if distilled else 0.0,
                         divergence=cfg.distill_divergence, extra=sampled, resume=resume,
                         stop_at=stop_at)
        samples = None if sampled is None else sampled.numpy()
        if not tr["done"]:  # this call's time is up: keep everything the next one needs
            torch.save({"config": asdict(cfg), "finished": finished, "role": role,
                        "model": model.state_dict(), "resume": tr["resume"],
                        "samples": samples, "info": info}, ckpt)
            log(f"{role}: stopped at step {tr['resume']['step']} of {tr['resume']['steps']}; "
                f"run the same command again to continue ({ckpt})")
            return {"incomplete": True, "role": role, "step": tr["resume"]["step"],
                    "steps": tr["resume"]["steps"], "checkpoint": str(ckpt)}
        del tr["done"]
        save_model(model, tokenizer, out / "hf" / role)
        info[role] = {"parameters": params, "weight_bytes": 2 * params,  # as run: fp16
                      "shape": dims, "training": tr,
                      **({"init": "target" if shape.get("from_target") else "random"}
                         if role == "draft" else {})}
        models[role] = model
        finished[role] = info[role]
        if call_seconds is not None:  # a crash later does not train this role again
            torch.save({"config": asdict(cfg), "finished": finished, "samples": samples,
                        "info": info}, ckpt)
    info["draft_fraction"] = info["draft"]["parameters"] / info["target"]["parameters"]
    info["distill_weight"] = cfg.distill_weight  # how the draft was trained (0: CE alone)
    info["distill_divergence"] = cfg.distill_divergence

    t0 = time.perf_counter()
    windows = training.heldout_windows(held_stream.astype(np.int64), cfg.ctx, cfg.eval_windows)
    for m in models.values():
        m.to(device)
    info["heldout"] = training.evaluate(models["target"], models["draft"],
                                        torch.from_numpy(windows), device, batch=4,
                                        autocast=True)
    info["heldout"].update(windows=len(windows), paper_alpha_T0=PAPER_ALPHA["T0"],
                           paper_alpha_T1=PAPER_ALPHA["T1"])
    info["heldout"]["seconds"] = round(time.perf_counter() - t0, 2)
    h = info["heldout"]
    log(f"held-out: target loss {h['target_loss']:.3f}, draft loss {h['draft_loss']:.3f}, "
        f"alpha T=0 {h['alpha_T0']:.3f} (paper {PAPER_ALPHA['T0']}), alpha T=1 "
        f"{h['alpha_T1']:.3f} (paper {PAPER_ALPHA['T1']}) over {h['positions']} positions")
    info["own_text"] = own_text(models["target"], models["draft"], held_stream,
                               tokenizer.eos_token_id, cfg, device)
    o = info["own_text"]
    log(f"on the target's own continuations: alpha T=0 {o['alpha_T0']:.3f}, T=1 "
        f"{o['alpha_T1']:.3f} ({o['sequences']} x {o['new_tokens']} tokens)" if "error" not in o
        else f"alpha on the target's own continuations not measured: {o['error']}")
    prompts = prompts_from(held_stream, cfg.num_prompts, cfg.prompt_len, tokenizer.eos_token_id)
    # long windows: the copied text of the drafting-strategy benchmark's copy-heavy prompts
    long = prompts_from(held_stream, cfg.num_prompts, 4 * cfg.prompt_len + 32,
                        tokenizer.eos_token_id, offset=64 + cfg.prompt_len)
    dump_json(out / "prompts.json", {"prompts": prompts, "long": long,
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
    for name in ("target_seconds", "draft_seconds", "corpus_mb", "tokenizer_mb", "target_lr",
                 "draft_lr"):
        ap.add_argument("--" + name.replace("_", "-"), type=float)
    ap.add_argument("--distill-weight", type=float,
                    help="draft loss: w * D(target, draft) + (1 - w) * CE (default 0.9; "
                         "0 = cross entropy alone)")
    ap.add_argument("--distill-divergence", choices=sorted(training.DIVERGENCES),
                    help="D of the draft loss: kl = KL(target || draft) (default), tvd = "
                         "total variation, 1 - alpha at T=1")
    for name in ("target_steps", "draft_steps", "batch", "seed", "vocab_size", "eval_windows",
                 "num_prompts", "draft_samples", "sample_tokens", "sample_batch"):
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("sample_temperature", "sample_top_p"):
        ap.add_argument("--" + name.replace("_", "-"), type=float,
                        help="the sampled half of --draft-samples (default 0.8 / 0.95)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models")
    ap.add_argument("--draft-shape", default=None,
                    help="the draft as HIDDENxLAYERS, e.g. 512x1 (default 256x2, the paper's), "
                         "or targetxLAYERS: the target's first layers, its weights to start")
    ap.add_argument("--call-seconds", type=float, default=None,
                    help="stop after about this long, keeping a checkpoint in --out; the same "
                    "command again continues (runs that fit a time limit per call)")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**(SMOKE if args.smoke else {}))
    for k, v in vars(args).items():
        if k in TrainConfig.__dataclass_fields__ and v is not None and v is not False:
            setattr(cfg, k, v)
    if args.draft_shape:
        try:
            cfg.draft = draft_shape(args.draft_shape)
        except ValueError as e:
            raise SystemExit(f"--draft-shape: {e}") from None
    info = train_pair(args.out, cfg, args.device, call_seconds=args.call_seconds)
    if info.get("incomplete"):
        log(f"not finished: {info['role']} at step {info['step']} of {info['steps']}")
        return INCOMPLETE
    log(f"done in {info['total_seconds']}s: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
