"""Training a Llama draft/target pair: the loop both trained pairs use.

``benchmarks/train_pair.py`` (the benchmarks' 97M / 6M pair, time-budgeted, bf16 autocast
on CUDA) and ``scripts/train_default_pair.py`` (the bundled pair, a fixed number of steps,
deterministic) differ in their corpus, shapes and settings; the model, the token stream,
the optimizer and its schedule, one training step, the draft's distillation loss, the
held-out windows and the evaluation are these.

One step: AdamW (betas 0.9 / 0.95, eps 1e-8, weight decay on matrices only), linear warmup
over ``min(warmup_steps, steps // 10)`` steps and a cosine decay to 10% of ``lr``, gradient
norm clipped at 1, on a window batch [B, ctx + 1]; a loss that turns NaN or infinite stops
the run within ``FINITE_CHECK_EVERY`` steps (it never recovers). The loss is the cross
entropy of the
next token; with a teacher and a distillation weight w > 0 it is
``(1 - w) * CE + w * D(teacher, model)`` at temperature 1, D one of ``DIVERGENCES``:
``"kl"``, KL(teacher || model) (the draft learns the target's whole next-token
distribution), or ``"tvd"``, the total variation distance 1/2 sum_x |p(x) - q(x)|, which is
exactly 1 - alpha at T=1 (a loss on the acceptance rate itself; DistillSpec, Zhou et al.
2023). The teacher's forward on the batch is part of the step (and of its time).

torch, transformers and NumPy are imported where used.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

__all__ = ["build_llama", "encode", "random_windows", "mixed_windows", "sample_stream", "train",
           "heldout_windows", "evaluate", "continuations", "own_text_alpha", "bf16",
           "FINITE_CHECK_EVERY", "DIVERGENCES"]

# steps between reads of the all-losses-finite flag (a read waits for the device)
FINITE_CHECK_EVERY = 50
# the distillation divergences D(p, q) and their names in a training's objective
DIVERGENCES = {"kl": "KL(target || {name})", "tvd": "TV(target, {name})"}


def bf16(device: str, enabled: bool = True):
    """The bf16 autocast context on CUDA when ``enabled``, else a null context."""
    import torch

    if enabled and device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_llama(shape: dict, tokenizer, *, vocab_size: int, max_positions: int, tie: bool,
                seed: int):
    """A ``LlamaForCausalLM`` of ``shape`` (hidden_size, num_hidden_layers, ...), its
    weights drawn after ``torch.manual_seed(seed)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie, rope_theta=10000.0,
        attention_dropout=0.0, **shape)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode(tokenizer, texts: list[str]):
    """One int32 token stream [N]: each text's tokens followed by ``<|endoftext|>``."""
    import numpy as np

    eos = tokenizer.eos_token_id
    parts = [np.asarray(enc.ids + [eos], dtype=np.int32)
             for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def random_windows(stream, batch: int, ctx: int, next_starts: Callable[[int, int], object]
                   ) -> Iterator:
    """Endless batches of windows [batch, ctx + 1] of ``stream`` (an int64 tensor) at the
    offsets ``next_starts(high, batch)`` draws (a seeded generator: the same windows for
    every run)."""
    import torch

    high = len(stream) - ctx - 1
    if high <= 0:
        raise ValueError(f"the training stream ({len(stream)} tokens) is too short for "
                         f"windows of {ctx + 1}")
    while True:
        starts = next_starts(high, batch)  # [batch]
        yield stream[starts[:, None] + torch.arange(ctx + 1)[None, :]]  # [batch, ctx + 1]


def mixed_windows(stream, extra, batch: int, ctx: int, next_starts: Callable[[int, int], object]
                  ) -> Iterator:
    """:func:`random_windows` of ``stream``, or, with an ``extra`` stream (the target's own
    samples for a draft), batches whose second half [batch // 2, ctx + 1] comes from it."""
    import torch

    if extra is None:
        yield from random_windows(stream, batch, ctx, next_starts)
        return
    halves = (random_windows(stream, batch - batch // 2, ctx, next_starts),
              random_windows(extra, batch // 2, ctx, next_starts))
    while True:
        yield torch.cat([next(h) for h in halves])  # [batch, ctx + 1]


def sample_stream(model, stream, *, n: int, new_tokens: int, device: str, seed: int,
                  eos: int, prompt_tokens: int = 32, temperature: float = 0.8,
                  top_p: float = 0.95, batch: int = 256):
    """The target's own continuations [N] (a token stream, each followed by EOS): ``n``
    of ``new_tokens`` tokens, after ``prompt_tokens``-token prompts from the training
    stream (a quarter of them at the start of a file), ``batch`` prompts at a time: the
    first half of each batch greedy (what greedy speculative decoding meets), the rest
    sampled at ``temperature`` / ``top_p`` (uniforms from ``seed``), each half one
    :func:`continuations` call; bf16 autocast on CUDA."""
    import torch

    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if temperature <= 0:
        raise ValueError(f"the sampled half needs a temperature above 0, got {temperature}")
    g = torch.Generator().manual_seed(seed)
    starts = (stream[:-prompt_tokens - 1] == eos).nonzero().flatten() + 1  # file starts
    out = []
    for first in range(0, n, batch):
        rows = min(batch, n - first)
        pick = torch.randint(0, len(stream) - prompt_tokens, (rows,), generator=g)
        if len(starts):  # a stream of one file has no file starts to begin at
            files = starts[torch.randint(0, len(starts), (rows // 4,), generator=g)]
            pick[: rows // 4] = files
        ids = stream[pick[:, None] + torch.arange(prompt_tokens)[None]]  # [rows, P]
        half = rows // 2
        u = torch.rand(new_tokens, rows - half, generator=g)  # [k, rows - half]
        parts = [continuations(model, ids[half:], new_tokens=new_tokens,
                               temperature=temperature, top_p=top_p, device=device,
                               uniforms=u, autocast=True)]  # [rows - half, k]
        if half:
            parts.insert(0, continuations(model, ids[:half], new_tokens=new_tokens,
                                          temperature=0.0, device=device,
                                          autocast=True))  # [half, k]
        for row in torch.cat(parts):
            out.append(torch.cat([row, torch.tensor([eos])]))
    return torch.cat(out)


def _loss(logits, labels, teacher_logits, weight: float, divergence: str = "kl"):
    """(loss, divergence or None, CE): CE of ``labels`` [N] under ``logits`` [N, V] (fp32),
    mixed with D(teacher, model) when ``teacher_logits`` are given (``DIVERGENCES``)."""
    import torch

    flat = logits.float()  # [N, V]
    ce = torch.nn.functional.cross_entropy(flat, labels)
    if teacher_logits is None:
        return ce, None, ce.detach()
    log_p = torch.log_softmax(teacher_logits.reshape(flat.shape).float(), dim=-1)  # [N, V]
    log_q = torch.log_softmax(flat, dim=-1)  # [N, V]
    if divergence == "kl":
        d = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    else:  # "tvd": 1/2 sum_x |p - q|, the mean over rows of 1 - beta at T=1
        d = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1).mean()
    return (1 - weight) * ce + weight * d, d.detach(), ce.detach()


def train(name: str, model, batches: Iterator, *, lr: float, device: str,
          steps: int | None = None, seconds: float | None = None, warmup_steps: int = 100,
          weight_decay: float = 0.1, fused: bool = False, autocast: bool = False,
          compile: bool = False, teacher=None, distill_weight: float = 0.0,
          divergence: str = "kl", on_step: Callable | None = None,
          log: Callable[[str], None] = print, resume: dict | None = None,
          stop_at: float | None = None) -> dict:
    """Train ``model`` on ``batches`` (see the module's docstring for one step).

    ``steps`` fixes the number of steps; without it, the steps that fit in ``seconds``,
    from the time of steps 3..7 (the first eight steps run under a provisional schedule
    of 10,000 steps and count as training). ``autocast``: bf16 on CUDA. ``divergence``: the
    distillation's D (``DIVERGENCES``). ``on_step(step, steps, loss, d, ce)`` is called
    after each step (tensors: reading one waits for the device). Returns steps, seconds
    and the objective; the model is left in eval mode.

    Resumable: ``stop_at`` (a ``time.perf_counter()`` value) ends the run after the step
    that passes it; the result then has ``done`` False and ``resume``, the optimizer state
    and the next step, which a later call passes back as ``resume`` (with the model's
    weights restored and ``batches`` continuing where they stopped) to finish the same
    schedule. ``seconds`` and ``stop_at`` need the step count fixed (``steps``) when
    resuming.
    """
    import torch

    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"{name}: distill_weight must lie in [0, 1], got {distill_weight}; "
                         "pass a weight between 0 (cross entropy alone) and 1")
    if divergence not in DIVERGENCES:
        raise ValueError(f"{name}: unknown divergence {divergence!r}; use one of "
                         f"{sorted(DIVERGENCES)}")
    if distill_weight > 0 and teacher is None:
        raise ValueError(f"{name}: distill_weight {distill_weight} needs a teacher model; "
                         "pass teacher= or distill_weight=0")
    distill = teacher is not None and distill_weight > 0
    if steps is None and seconds is None:
        raise ValueError(f"{name}: give steps or seconds")
    if distill:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        teach = torch.compile(teacher) if compile else teacher
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))
    fwd = torch.compile(model) if compile else model
    cast = bf16(device, autocast)

    def lr_at(step: int, total: int) -> float:
        warm = max(1, min(warmup_steps, total // 10))
        if step < warm:
            return lr * (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def one_step(step: int, total: int):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total)
        chunk = next(batches).to(device, non_blocking=True)  # [B, ctx + 1]
        x, y = chunk[:, :-1], chunk[:, 1:].reshape(-1)  # [B, ctx], [B * ctx]
        t_logits = None
        with cast:
            logits = fwd(input_ids=x).logits  # [B, ctx, V]
            if distill:
                with torch.no_grad():
                    t_logits = teach(input_ids=x).logits  # [B, ctx, V]
        loss, kl, ce = _loss(logits.reshape(-1, logits.shape[-1]), y, t_logits,
                             distill_weight, divergence)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss, kl, ce

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    finite = torch.ones((), dtype=torch.bool, device=device)  # every loss so far finite
    checked = [0]  # steps run when the flag was last read

    def check_finite(loss, step: int, total: int, now: bool = False) -> None:
        """Fold ``loss`` into the flag; read it every FINITE_CHECK_EVERY steps (``now``:
        at once)."""
        finite.logical_and_(torch.isfinite(loss.detach()))
        if not now and (step + 1) % FINITE_CHECK_EVERY:
            return
        if not bool(finite):
            raise FloatingPointError(
                f"{name}: the loss became NaN or infinite between steps {checked[0] + 1} and "
                f"{step + 1} (learning rate {lr_at(step, total):.3g} at step {step + 1}, "
                f"peak {lr:g}); "
                "training does not recover from it: lower the learning rate (train_pair.py "
                "--target-lr / --draft-lr) or lengthen the warmup")
        checked[0] = step + 1

    t_start = time.perf_counter()
    first = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        first, steps = int(resume["step"]), int(resume["steps"])
        log(f"{name}: resuming at step {first} of {steps}")
    elif steps is None:  # steps 3..7 (teacher forward included) measure the step time
        provisional = 10_000
        for s in range(8):
            if s == 3:
                sync()
                t0 = time.perf_counter()
            out = one_step(s, provisional)
            check_finite(out[0], s, provisional)
            if on_step:
                on_step(s, provisional, *out)
        sync()
        per_step = (time.perf_counter() - t0) / 5
        steps = max(8, int((seconds - (time.perf_counter() - t_start)) / per_step) + 8)
        first = 8
        log(f"{name}: {per_step * 1e3:.1f} ms/step -> {steps} steps in ~{seconds:.0f}s")
    if resume is not None:
        checked[0] = first
    done = steps
    for s in range(first, steps):
        out = one_step(s, steps)
        stopping = stop_at is not None and s + 1 < steps and time.perf_counter() >= stop_at
        check_finite(out[0], s, steps, now=stopping or s + 1 == steps)
        if on_step:
            on_step(s, steps, *out)
        if stopping:
            done = s + 1
            break
    sync()
    model.eval()
    out = {"steps": steps, "seconds": time.perf_counter() - t_start, "done": done == steps,
           "objective": (f"{distill_weight:g} * {DIVERGENCES[divergence].format(name=name)}"
                         f" + {1 - distill_weight:g} * CE" if distill else "CE"),
           "distill_weight": distill_weight if distill else 0.0,
           "divergence": divergence if distill else None}
    if done < steps:
        out["resume"] = {"optimizer": opt.state_dict(), "step": done, "steps": steps}
    return out


def heldout_windows(stream, ctx: int, n: int):
    """n evenly spaced, non-overlapping windows [n, ctx + 1] of ``stream`` (deterministic;
    a tensor for a tensor, an array for an array)."""
    import numpy as np

    total = len(stream) // (ctx + 1)
    n = min(n, total)
    picks = [int(i * total / n) for i in range(n)]
    rows = [stream[k * (ctx + 1): (k + 1) * (ctx + 1)] for k in picks]
    if hasattr(stream, "unsqueeze"):  # a torch tensor
        import torch

        return torch.stack(rows)
    return np.stack(rows)


def evaluate(target, draft, windows, device: str, *, batch: int = 8,
             autocast: bool = False, skip: int = 0) -> dict:
    """Held-out loss of both models and alpha at T=0 and T=1 over every position of
    ``windows`` (a tensor [n, ctx + 1]) after the first ``skip``: alpha = the mean of
    sum_x min(p(x), q(x)) over the positions (``quickdraft.theory``), of the greedy
    one-hot rows at T=0 (argmax agreement) and of the softmaxes at T=1. ``autocast``: bf16
    forwards on CUDA."""
    import numpy as np
    import torch

    from quickdraft.sampling import SamplingConfig, adjust_logits
    from quickdraft.theory import alpha_from_distributions

    cast = bf16(device, autocast)
    nll = {"target": [], "draft": []}
    betas = {0.0: [], 1.0: []}
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            chunk = windows[i: i + batch].to(device)
            inputs, labels = chunk[:, :-1], chunk[:, 1 + skip:]
            with cast:
                lp, lq = target(input_ids=inputs).logits, draft(input_ids=inputs).logits
            lp, lq = lp[:, skip:].float(), lq[:, skip:].float()  # [B, ctx - skip, V]
            for name, lg in (("target", lp), ("draft", lq)):
                nll[name].append(torch.nn.functional.cross_entropy(
                    lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), reduction="none"
                ).cpu().numpy())
            zp = lp.reshape(-1, lp.shape[-1]).cpu().numpy()  # [B * (ctx - skip), V]
            zq = lq.reshape(-1, lq.shape[-1]).cpu().numpy()  # [B * (ctx - skip), V]
            for t in betas:
                cfg = SamplingConfig(temperature=t)
                p, q = adjust_logits(zp, cfg), adjust_logits(zq, cfg)  # [B * (ctx - skip), V]
                betas[t].append(alpha_from_distributions(p, q) * len(zp))
    positions = sum(len(x) for x in nll["target"])
    out = {"positions": positions}
    for name in nll:
        loss = float(np.concatenate(nll[name]).mean())
        out[f"{name}_loss"] = loss
        out[f"{name}_ppl"] = math.exp(loss)
    out["alpha_T0"] = float(sum(betas[0.0]) / positions)
    out["alpha_T1"] = float(sum(betas[1.0]) / positions)
    return out


def continuations(model, prompts, *, new_tokens: int, temperature: float, device: str,
                  uniforms=None, top_p: float = 1.0, autocast: bool = False):
    """``model``'s own continuations [n, new_tokens] of ``prompts`` [n, P] (tensors), one
    token per step with its KV cache: the argmax at ``temperature`` 0, else the inverse
    CDF of the softmax at ``temperature`` (nucleus ``top_p``: transformers'
    ``TopPLogitsWarper``) at ``uniforms`` [new_tokens, n] (CPU floats drawn by the
    caller). Faster than ``generate`` at the same batch
    (``benchmarks/sample_throughput.py``)."""
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    if temperature > 0 and (uniforms is None or tuple(uniforms.shape) != (new_tokens,
                                                                          len(prompts))):
        raise ValueError(f"sampling {new_tokens} tokens for {len(prompts)} prompts needs "
                         f"uniforms of shape ({new_tokens}, {len(prompts)})")
    cast = bf16(device, autocast)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    nucleus = TopPLogitsWarper(top_p) if top_p < 1 else None
    model.to(device).eval()
    ids, past, out = prompts.to(device), None, []
    with torch.no_grad(), cast:
        for k in range(new_tokens):
            step = model(input_ids=ids, past_key_values=past, use_cache=True,
                         logits_to_keep=1)
            past, z = step.past_key_values, step.logits[:, -1].float()  # [n, V]
            if temperature > 0:
                z = z / temperature
                if nucleus is not None:
                    z = nucleus(ids, z)  # [n, V], -inf outside the nucleus
                cdf = torch.cumsum(torch.softmax(z, dim=-1), dim=-1)  # [n, V]
                total = cdf[:, -1:]  # [n, 1]
                u = uniforms[k].to(device, cdf.dtype)[:, None] * total  # [n, 1]
                u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
                ids = torch.searchsorted(cdf, u, right=True)  # [n, 1], below V
            else:
                ids = z.argmax(dim=-1, keepdim=True)  # [n, 1]
            out.append(ids)
    return torch.cat(out, dim=1).cpu()  # [n, new_tokens]


def own_text_alpha(target, draft, prompts, *, new_tokens: int, device: str, seed: int,
                   batch: int = 8, autocast: bool = False) -> dict:
    """Alpha on the text decoding meets: at T=0 over the target's greedy continuations of
    ``prompts`` [n, P], at T=1 over its continuations sampled at T=1 (uniforms from
    ``seed``), only at the positions that predict a continuation's tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    skip = prompts.shape[1] - 1
    out = {"sequences": len(prompts), "prompt_tokens": prompts.shape[1],
           "new_tokens": new_tokens}
    for t, key in ((0.0, "alpha_T0"), (1.0, "alpha_T1")):
        u = torch.rand(new_tokens, len(prompts), generator=g) if t > 0 else None  # [k, n]
        cont = continuations(target, prompts, new_tokens=new_tokens, temperature=t,
                             device=device, uniforms=u, autocast=autocast)  # [n, k]
        text = torch.cat([prompts, cont], dim=1)  # [n, P + k]
        ev = evaluate(target, draft, text, device, batch=batch, autocast=autocast, skip=skip)
        out[key] = ev[key]
        out["positions"] = ev["positions"]
    return out
