"""Where greedy speculative output leaves greedy autoregressive output, and why.

    python benchmarks/greedy_divergence.py --model-dir DIR [--device cpu|cuda] \\
        [--gamma 4] [--tokens 128] [--prompt TEXT ...] [--json OUT.json]

Greedy speculative decoding must give the target's greedy tokens; it does whenever the
target's graph gives the same logits for a position whichever step computes it. A graph
whose kernels compute a k-token step in another order than a 1-token step (int4
MatMulNBits on the CPU, fp16 attention kernels on CUDA) can flip the argmax where the two
best tokens are nearly tied. For each prompt this runs both decodings and, at the first
token where they part, computes the target's logits for that position through a 1-token
step after one 1-token step per
generated token (what autoregressive decoding ran) and through steps of 2 .. gamma + 1 tokens ending
at or after it (what verification runs), and reports the 1-token step's margin between its
two best logits and which step lengths choose another token. A tiny margin with flips
means rounding between kernels, not the rule; a wide margin would mean a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["def quicksort(arr):", "def quicksort(arr):\n",
           "The history of the printing press begins",
           "import os\n\ndef main(", "class Stack:\n    def __init__(self):\n        self."]


def _row(model, cached: list[int], step: list[int], index: int) -> np.ndarray:
    """The logits row ``index`` of a step of ``step`` tokens after ``cached`` [V]."""
    state = model.new_state()
    try:
        if cached:
            state.append(cached)
        return np.asarray(state.append(step), dtype=np.float64)[index]
    finally:
        state.close()


def _autoregressive_row(model, prompt: list[int], generated: list[int]) -> np.ndarray:
    """The logits row autoregressive decoding chose ``generated``'s next token from: the
    prompt's prefill, then one 1-token step per generated token [V]."""
    state = model.new_state()
    try:
        row = np.asarray(state.append(prompt), dtype=np.float64)[-1]
        for t in generated:
            row = np.asarray(state.append([t]), dtype=np.float64)[0]
        return row
    finally:
        state.close()


def margin_at(target, prompt: list[int], reference: list[int], at: int) -> dict:
    """Where greedy output parts from ``reference`` (greedy autoregressive decoding's
    tokens after ``prompt``) at new token ``at``: the target's two best tokens there
    through autoregressive decoding's path, and the margin between their logits (a margin
    near 0 is a tie that kernel rounding can break either way)."""
    return {"at": at, **_top2(_autoregressive_row(target, list(prompt), list(reference[:at])))}


def _top2(row: np.ndarray) -> dict:
    """A logits row's two best tokens and the margin between them [V] -> [2]."""
    top = np.argsort(-row)[:2]
    return {"top2": [int(t) for t in top], "margin": float(row[top[0]] - row[top[1]])}


def first_divergence(pair, prompt: str | list[int], gamma: int, tokens: int) -> dict:
    from quickdraft.ort_backend import DecodeConfig

    config = DecodeConfig(max_new_tokens=tokens)
    with pair.generator(config) as auto, pair.generator(config, gamma=gamma) as spec:
        a, s = auto.generate(prompt), spec.generate(prompt)
    ids = list(pair.tokenizer.encode(prompt).ids) if isinstance(prompt, str) else list(prompt)
    at = next((i for i, (x, y) in enumerate(zip(a.tokens, s.tokens)) if x != y), None)
    rec = {"prompt": prompt, "tokens": len(a.tokens), "same": at is None and
           a.tokens == s.tokens}
    if at is None:
        return rec
    context = ids + a.tokens[:at]  # the token at `at` is predicted by the last position
    one = _autoregressive_row(pair.target, ids, a.tokens[:at])  # [V]
    rec.update(at=at, autoregressive=int(a.tokens[at]), speculative=int(s.tokens[at]),
               **_top2(one))
    best = rec["top2"][0]
    chosen = {}
    for k in range(2, gamma + 2):  # a k-token step whose row r is the position in question
        for r in range(k):
            cut = len(context) - 1 - r
            if cut < 1:
                continue
            step = context[cut:] + s.tokens[at:at + k - r - 1]
            if len(step) != k:
                continue
            row = _row(pair.target, context[:cut], step, r)
            chosen[f"k{k}_row{r}"] = {"argmax": int(np.argmax(row)),
                                      "max_abs_diff_vs_1": float(np.abs(row - one).max())}
    rec["steps"] = chosen
    rec["flips"] = sorted(key for key, v in chosen.items() if v["argmax"] != best)
    return rec


def _label(prompt) -> str:
    return repr(prompt) if isinstance(prompt, str) else f"ids {prompt[:4]}... ({len(prompt)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", action="append", default=None)
    ap.add_argument("--prompts-json", type=Path, default=None,
                    help="token-id prompts instead: a benchmark pair's prompts.json "
                    "({\"prompts\": [[ids], ...]}, as benchmarks/bench.py writes it)")
    ap.add_argument("--concurrency-prompts", type=int, default=None, metavar="N",
                    help="instead: the first N prompts benchmarks/concurrency.py sends (32 "
                    "seeded token ids each, decoded to text)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from quickdraft.ort_backend import load_pair

    pair = load_pair(args.model_dir, device=args.device, max_gamma=args.gamma)
    if args.prompts_json:
        prompts = json.loads(args.prompts_json.read_text())["prompts"]
    elif args.concurrency_prompts:
        from benchmarks.concurrency import make_requests

        prompts = [r.prompt for r in make_requests(pair.tokenizer, args.concurrency_prompts, 32)]
    else:
        prompts = args.prompt or PROMPTS
    rows = [first_divergence(pair, p, args.gamma, args.tokens) for p in prompts]
    for r in rows:
        if r["same"]:
            print(f"{_label(r['prompt'])}: same {r['tokens']} tokens")
        else:
            diff = max(v["max_abs_diff_vs_1"] for v in r["steps"].values())
            print(f"{_label(r['prompt'])}: parts at token {r['at']} ({r['autoregressive']} vs "
                  f"{r['speculative']}); 1-token margin {r['margin']:.3g}; "
                  f"{len(r['flips'])} of {len(r['steps'])} longer steps choose another "
                  f"token; max |diff| {diff:.3g}")
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python benchmarks/greedy_divergence.py " + " ".join(sys.argv[1:]),
            "device": args.device, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
