"""Resident memory over one long generation, per cache kind (CPU): MB per generated token.

    python benchmarks/memory_growth.py [--tokens 1500] [--json OUT.json]

Builds a random Llama pair (context 2048) with quickdraft.export.toy, exports it with
dynamic and with static caches, and reads RSS every 100 tokens of one speculative and one
autoregressive generation. Static caches are allocated once, so their growth should be ~0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def build(root: Path) -> dict[str, Path]:
    from quickdraft.export import export_pair
    from quickdraft.export.toy import make_random_model, train_tokenizer

    tok = root / "tok"
    train_tokenizer(tok, vocab_size=512)
    hf = {}
    for role, seed in (("target", 0), ("draft", 1)):
        hf[role] = root / "hf" / role
        make_random_model("llama", hf[role], tok, role=role, seed=seed,
                          max_position_embeddings=2048)
    out = {}
    for kind in ("dynamic", "static"):
        out[kind] = root / kind
        export_pair(hf["target"], hf["draft"], out[kind], kv_cache=kind, validate=False,
                    max_length=2048 if kind == "static" else None)
    return out


def measure(folder: Path, tokens: int, gamma: int | None) -> list[tuple[int, float]]:
    from quickdraft.ort_backend import DecodeConfig, load_pair

    pair = load_pair(folder, device="cpu", max_gamma=gamma or 1)
    marks = []
    with pair.generator(DecodeConfig(max_new_tokens=tokens), gamma=gamma) as gen:
        gen.prefill([5, 17, 300, 41])
        while not gen.done:
            gen.step()
            n = len(gen.new_tokens)
            if n >= 100 * (len(marks) + 1) or gen.done:
                marks.append((n, round(rss_mb(), 2)))
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = build(Path(tmp))
        for kind, folder in folders.items():
            for gamma in (4, None):
                marks = measure(folder, args.tokens, gamma)
                (n0, m0), (n1, m1) = marks[min(4, len(marks) - 1)], marks[-1]
                per_token = (m1 - m0) / max(1, n1 - n0)
                rows.append({"cache": kind, "mode": "speculative" if gamma else "autoregressive",
                             "mb_per_token_after_500": round(per_token, 5), "marks": marks})
    from tabulate import tabulate

    print(tabulate([(r["cache"], r["mode"], r["mb_per_token_after_500"], r["marks"][-1][1])
                    for r in rows], headers=["cache", "mode", "MB/token after 500", "final MB"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
