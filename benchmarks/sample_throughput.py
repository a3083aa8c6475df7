#!/usr/bin/env python
"""How fast a target writes its own continuations for draft training, by batch size.

Times Hugging Face ``generate`` (sampling at T=1, what ``training.sample_stream`` used
before) and ``training.continuations`` (one token per step with the KV cache, sampled at
T=1 from given uniforms; what ``sample_stream`` uses now) on a random-weight Llama of the
trained pair's target shape (97.5M, vocabulary 8192), over 32-token prompts of a random
token stream, each batch size after a warm-up, side by side in one process:

    python benchmarks/sample_throughput.py --device cuda --sequences 4096 \\
        --batches 256,1024,4096 --json sample_throughput.json

Throughput does not depend on the weights' values, only on the shapes. ``--smoke``: a tiny
model on the CPU (a check that the script runs, not a measurement).
"""

from __future__ import annotations

import argparse
import sys
import time

if __package__ in (None, ""):
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import training
from benchmarks.common import dump_json, environment, log
from benchmarks.train_pair import SMOKE, TrainConfig


class _Ids:  # what build_llama reads of a tokenizer
    bos_token_id, eos_token_id, pad_token_id = 1, 0, 0


def _timed(device: str, run, warm) -> float:
    """Seconds of ``run()`` after ``warm()`` (allocator, kernels), the device drained."""
    import torch

    warm()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _rows_at(model, stream, batch: int, sequences: int, new_tokens: int, device: str,
             g) -> list[dict]:
    """Both methods at one batch size: ``sequences`` continuations each, rounded up to
    whole batches."""
    import torch

    n = max(sequences, batch)
    prompts = stream[: batch * 32].reshape(batch, 32)  # [batch, 32]
    calls = -(-n // batch)

    def generate(k: int):
        ids = prompts.to(device)
        with torch.no_grad(), training.bf16(device):  # generate draws from torch's RNG
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=k, do_sample=True, temperature=1.0,
                                  top_p=None, top_k=None, pad_token_id=0,
                                  eos_token_id=None)

    s = _timed(device, lambda: [generate(new_tokens) for _ in range(calls)],
               lambda: generate(min(4, new_tokens)))
    rows = [{"method": "generate", "batch": batch, "sequences": calls * batch,
             "seconds": s, "tokens_per_s": calls * batch * new_tokens / s}]
    u = torch.rand(new_tokens, batch, generator=g)  # [new_tokens, batch]

    def loop(k: int):
        return training.continuations(model, prompts, new_tokens=k, temperature=1.0,
                                      device=device, uniforms=u[:k], autocast=True)

    s = _timed(device, lambda: [loop(new_tokens) for _ in range(calls)],
               lambda: loop(min(4, new_tokens)))
    rows.append({"method": "continuations (KV loop)", "batch": batch,
                 "sequences": calls * batch, "seconds": s,
                 "tokens_per_s": calls * batch * new_tokens / s})
    return rows


def measure(device: str, sequences: int, new_tokens: int, batches: list[int],
            smoke: bool = False, seed: int = 0) -> dict:
    """{"rows": [one per method and batch: seconds, tokens per second], ...}."""
    import torch

    cfg = TrainConfig(**(SMOKE if smoke else {}))
    model = training.build_llama(cfg.target, _Ids, vocab_size=cfg.vocab_size,
                                 max_positions=cfg.max_positions, tie=False, seed=seed)
    model.generation_config.eos_token_id = None  # the full length, as the pair's samples
    model.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    length = max(200_000, 32 * max(batches))  # room for every batch's 32-token prompts
    stream = torch.randint(1, cfg.vocab_size, (length,), generator=g)  # [N]
    stream[::2000] = 0  # file boundaries
    rows = []
    for batch in batches:
        rows += _rows_at(model, stream, batch, sequences, new_tokens, device, g)
        log(f"batch {batch}: generate {rows[-2]['tokens_per_s']:.0f} tok/s, KV loop "
            f"{rows[-1]['tokens_per_s']:.0f} tok/s")
    return {"rows": rows, "parameters": sum(p.numel() for p in model.parameters()),
            "new_tokens": new_tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--sequences", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="256,1024,4096",
                    help="comma-separated batch sizes")
    ap.add_argument("--smoke", action="store_true", help="a tiny model (CPU check)")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    try:
        batches = [int(b) for b in a.batches.split(",") if b]
    except ValueError:
        raise SystemExit(f"--batches: comma-separated integers, got {a.batches!r}") from None
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches: positive integers, got {a.batches!r}")
    out = {"command": "python benchmarks/sample_throughput.py " + " ".join(argv or sys.argv[1:]),
           "environment": environment(),
           **measure(a.device, a.sequences, a.new_tokens, batches, smoke=a.smoke)}
    from tabulate import tabulate

    print(tabulate([[r["method"], r["batch"], r["sequences"], f"{r['seconds']:.2f}",
                     f"{r['tokens_per_s']:.0f}"] for r in out["rows"]],
                   headers=["method", "batch", "sequences", "seconds", "tokens/s"],
                   tablefmt="github"))
    if a.json:
        dump_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
