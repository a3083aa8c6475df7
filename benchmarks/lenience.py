"""Acceptance rate against lenience on ONNX Runtime (the lossy rule of appendix A.5).

    python benchmarks/lenience.py [--model-dir DIR] [--json OUT.json]

For each lenience l the same prompts are decoded with one seed at T=1; the acceptance rate
(accepted over drafted tokens) rises as l falls, the pattern of the paper's Table 5. l < 1
is lossy: the output no longer follows the target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROMPTS = ["def quicksort(arr):", "import os\n", "class Parser:\n    def __init__(self",
           "    for i in range(", "# Read the configuration file\n"]
LENIENCES = (1.0, 0.5, 0.3, 0.2, 0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="an exported pair (default: the bundled)")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from tabulate import tabulate

    from quickdraft.ort_backend import DecodeConfig, load_pair
    from quickdraft.ort_backend.cli import default_model_dir
    from quickdraft.sampling import SamplingConfig

    pair = load_pair(Path(args.model_dir) if args.model_dir else default_model_dir(),
                     device="cpu", max_gamma=args.gamma)
    rows = []
    for lenience in LENIENCES:
        accepted = drafted = tokens = iterations = 0
        for seed, prompt in enumerate(PROMPTS):
            config = DecodeConfig(max_new_tokens=args.tokens, sampling=SamplingConfig(1.0),
                                  seed=seed, lenience=lenience)
            with pair.generator(config, gamma=args.gamma) as gen:
                g = gen.generate(prompt).stats.generation
            accepted += sum(g.accepted_per_iteration)
            drafted += sum(g.drafted_per_iteration)
            tokens += g.new_tokens
            iterations += g.iterations
        rows.append({"lenience": lenience, "acceptance_rate": round(accepted / drafted, 4),
                     "tokens_per_iteration": round(tokens / iterations, 3),
                     "lossy": lenience != 1.0})
    print(tabulate([(r["lenience"], r["acceptance_rate"], r["tokens_per_iteration"],
                     "yes" if r["lossy"] else "no") for r in rows],
                   headers=["lenience", "acceptance rate", "tokens/iteration", "lossy"]))
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python benchmarks/lenience.py"
            + (f" --model-dir {args.model_dir}" if args.model_dir else "")
            + f" --gamma {args.gamma} --tokens {args.tokens}", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
