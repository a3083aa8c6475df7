# ruff: noqa: E501  (the model card is a template: its lines are Markdown)
"""The bundled default pair's metadata: ``training.json`` and ``MODEL_CARD.md``.

Used by ``scripts/train_default_pair.py --export`` / ``--export-only`` after the ONNX export:
both files are written from the training summary (``runs/default_pair/summary.json``), so a
rerun of the recipe rewrites them with its own numbers.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

LATENCY_PAST = 100  # cached tokens before the timed single-token calls
LATENCY_CALLS = 200


def onnx_latency(dest: Path) -> dict:
    """Median ms of one greedy decoding call of each model (1 and 5 new tokens on a
    100-token past) through quickdraft's backend, loaded as ``quickdraft generate`` loads
    the pair on the CPU (the target with ONNX Runtime's default threads, the draft with
    one)."""
    from benchmarks.adapters import step_costs
    from quickdraft.ort_backend import load_pair

    pair = load_pair(dest, device="cpu", max_gamma=4)
    prompt = [2 + i % 1000 for i in range(LATENCY_PAST)]
    out = {}
    for role, model in (("target", pair.target), ("draft", pair.draft)):
        ms = step_costs(model, prompt, [1, 5], reps=LATENCY_CALLS, greedy=True)
        out[role] = {"ms_1_token": round(ms[1], 4), "ms_5_token": round(ms[5], 4)}
    return out


def relative(path: str | Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def training_record(summary: dict, export_info: dict, repo: Path, latency: dict) -> dict:
    """The summary without machine-specific paths, plus the export's sizes and latencies."""
    from quickdraft import theory

    rec = json.loads(json.dumps(summary))
    for key in ("out", "export_dir"):
        if key in rec["args"]:
            rec["args"][key] = relative(rec["args"][key], repo)
    rec["export"] = {"bytes": export_info["bytes"], "files": export_info["files"],
                     "int8": export_info.get("int8")}
    c = latency["draft"]["ms_1_token"] / latency["target"]["ms_1_token"]
    improvement = {}
    for t in ("T0", "T1"):
        alpha = rec["heldout"][f"alpha_{t}"]
        gamma = theory.best_gamma(alpha, c)
        improvement[t] = {"gamma": gamma,
                          "walltime_improvement": round(theory.walltime_improvement(alpha, gamma,
                                                                                    c), 3)}
    rec["cpu_latency"] = {
        **latency,
        "c": round(c, 4),
        "machine": platform.processor() or platform.machine(),
        "how": f"quickdraft's backend on the CPU as `quickdraft generate` loads the pair, "
               f"greedy steps, median of {LATENCY_CALLS} calls with a {LATENCY_PAST}-token past",
        "theory_best": improvement,
    }
    return rec


def fmt_mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def shape(s: dict) -> str:
    def n(k: int, word: str) -> str:
        return f"{k} {word}" + ("s" if k != 1 else "")

    return (f"Llama, {n(s['num_hidden_layers'], 'layer')}, width {s['hidden_size']}, "
            f"{n(s['num_attention_heads'], 'head')}, {n(s['num_key_value_heads'], 'KV head')}, "
            f"MLP {s['intermediate_size']}")


def _steps(m: dict) -> str:
    return f"{m['steps']:,}" if m.get("steps") else "not recorded"


def model_card(rec: dict) -> str:
    c, t, d = rec["corpus"], rec["models"]["target"], rec["models"]["draft"]
    ev, ex, lat = rec["heldout"], rec["export"], rec["cpu_latency"]
    files = ex["files"]
    tok = rec["tokenizer"]
    ts, ds = t["shape"], d["shape"]
    curve = ", ".join(f"{s}: {v:.3f}" for s, v in t.get("heldout_curve", []))
    sources = "\n".join(
        f"| {s['name']} | {s['version']} | {s['license']} | {s['files']:,} | "
        f"{s['chars'] / 1e6:.1f}M |" for s in c["sources"])
    samples = d.get("target_samples", {})
    epochs = t["steps"] * rec["args"]["batch"] * rec["args"]["ctx"] / c["train_tokens"]
    return f"""# quickdraft's default pair: a small Python code model and its draft

Two Llama-architecture causal language models, a **target** and a **draft**, sharing one
byte-level BPE tokenizer, trained from scratch on Python source code (the standard library
and five permissively licensed packages), and shipped inside the package
(`quickdraft/models/default`) so that speculative decoding runs end to end on any machine
with nothing to download: the pair `quickdraft generate` uses when given no model. They
write Python that reads like code, not code that is correct: they are demonstration
models.

| | target | draft |
| --- | --- | --- |
| architecture | {shape(ts)} | {shape(ds)} |
| parameters (tied input/output embedding counted once) | {t['parameters']:,} | {d['parameters']:,} |
| ONNX file (int8 weights, computed in fp32) | {fmt_mb(files['target/model.onnx'])} | {fmt_mb(files['draft/model.onnx'])} |
| context | {rec['args']['ctx']} tokens | {rec['args']['ctx']} tokens |
| held-out loss (nats/token) | {ev['target_loss']:.3f} (perplexity {ev['target_ppl']:.1f}) | {ev['draft_loss']:.3f} (perplexity {ev['draft_ppl']:.1f}) |
| training steps | {_steps(t)} | {_steps(d)} |
| training time ({rec['device_name']}) | {t['train_seconds']:.0f} s | {d['train_seconds']:.0f} s |

Vocabulary: {tok['vocab_size']} tokens (`<|endoftext|>` = 0 is BOS, EOS and padding;
`<unk>` = 1). Both folders hold the same `tokenizer.json` (SHA-256 `{tok['tokenizer_json_sha256'][:16]}…`).
All shipped files but this card and `training.json`: **{fmt_mb(ex['bytes'])}**.

## Storage: int8 weights, fp32 arithmetic

Every weight matrix lies on an int8 grid (one scale per output channel: the trained weights
were rounded there before the export, `quickdraft.export.int8.snap_to_int8`) and is stored
as int8 read through `DequantizeLinear` (`quickdraft.export.int8.store_int8`). ONNX Runtime
folds the matrices back to fp32 when the session is created (the backend sets
`session.disable_quant_qdq` for manifests with `weights: "int8"`), so the pair computes in
fp32 at a quarter of the fp32 file size. Without that option ONNX Runtime 1.32 runs the
same graph 1.85x slower per 1-token step on a 2-core CPU (8.19 against 4.43 ms; 5-token
verification steps cost 1.24x a 1-token step folded: `benchmarks/int8_cpu_steps.py`,
`docs/benchmarks.md`). The export was validated against the rounded
PyTorch models (`validation` in each `quickdraft.json`).

## Acceptance rate

alpha = E[sum_x min(p(x), q(x))] (`quickdraft.theory.beta`), the mean over
{ev['positions']:,} positions ({ev['windows']} windows of {ev['ctx']} tokens from the held-out
files) of the two models' next-token distributions, with the same sampling transformation
applied to both (`quickdraft.sampling.adjust_logits`), and on the target's own greedy
continuations (128 tokens after the README's prompt and after the first 16 tokens of
48 held-out files), which is what greedy speculative decoding meets:

| | alpha |
| --- | --- |
| held-out text, T=0 (the two argmaxes agree) | **{ev['alpha_T0']:.3f}** |
| held-out text, T=1 | **{ev['alpha_T1']:.3f}** |
| the target's greedy continuations, T=0 | **{ev['trajectory_alpha_T0']:.3f}** |
| the target's greedy continuation of `def quicksort(arr):`, T=0 | **{ev['trajectory_alpha_readme_T0']:.3f}** |

## Speed on the CPU

Measured when this folder was exported ({lat['how']}; {lat['machine']}): target
{lat['target']['ms_1_token']:.3f} ms per token ({lat['target']['ms_5_token']:.3f} ms for 5 tokens),
draft {lat['draft']['ms_1_token']:.3f} ms, so **c = {lat['c']:.2f}**. With the held-out alpha,
the paper's expected walltime improvement (`quickdraft.theory.walltime_improvement`, best
gamma) is {lat['theory_best']['T0']['walltime_improvement']:.2f}x at T=0 (gamma {lat['theory_best']['T0']['gamma']})
and {lat['theory_best']['T1']['walltime_improvement']:.2f}x at T=1 (gamma {lat['theory_best']['T1']['gamma']}).
What `quickdraft generate` reports is measured, with the decoding loop's own time:
`docs/benchmarks.md` has the side-by-side runs.

## Data

Built by `python scripts/train_default_pair.py --collect-corpus DIR` from the Python
installation the project's `test` extra makes: the `*.py` files of each source below,
sorted by path, without `test`/`tests`/`testing` folders, vendored code (`_vendor`,
`vendored`, `third_party`) and files over 1 MB (generated tables); from the standard
library also without `encodings/` (codec tables) and `pydoc_data/`.

| source | version | license | files | characters |
| --- | --- | --- | --- | --- |
{sources}

- Held-out split: every 10th file of the whole sorted list ({c['heldout_rule']}),
  {c['heldout_files']} files, {c['heldout_tokens']:,} tokens, used for nothing but evaluation.
- Training: the other {c['train_files']} files, {c['train_chars']:,} characters,
  {c['train_tokens']:,} tokens; each file followed by `<|endoftext|>`.
- SHA-256 of the paths and contents of all files: `{c['sha256']}`.

## Recipe

Everything is in `scripts/train_default_pair.py`:

1. Byte-level BPE tokenizer (`tokenizers`, {tok['vocab_size']} tokens) trained on the training files.
2. Target: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), learning rate
   {t['lr']} with linear warmup and cosine decay to 10%, {_steps(t)} steps of
   {rec['args']['batch']} random windows of {rec['args']['ctx']} + 1 tokens (about
   {epochs:.1f} epochs) in a budget of {t['train_seconds']:.0f} s, bf16 autocast (held-out loss:
   {curve}).
3. Draft: the same optimiser, learning rate {d['lr']}, for {d['train_seconds']:.0f} s,
   **distilled from the target**: loss = KL(target ‖ draft) at temperature 1, which is
   what alpha = 1 − TV(p, q) rewards; half of every batch are windows of the training
   files, half of {samples.get('sequences', 0):,} continuations of {samples.get('new_tokens', 0)} tokens the
   target wrote itself (half greedy, half sampled at T=0.8, top-p 0.95, after 32-token
   prompts from the training files, a quarter of them at the start of a file).
4. Evaluation, then `--export-only`: the weights rounded to the int8 grid, the static-cache
   ONNX export (`quickdraft.export.export_pair(..., kv_cache="static")`, which checks the
   ONNX logits against PyTorch and greedy equality) and the int8 storage.

Trained on one {rec['device_name']} with

    {rec['command']}
    {rec.get('command_draft', '')}

and exported on the CPU with `python scripts/train_default_pair.py --export-only`.
{d.get('note', '').capitalize()}{'.' if d.get('note') else ''}
Versions: {', '.join(f'{k} {v}' for k, v in rec['versions'].items())}. `--fast` (bf16
autocast, fused AdamW, flash attention) trades bit-reproducibility for speed: a rerun gives
weights and numbers close to these, not equal. `training.json` beside this card holds all
the numbers.

## License

The training data is source code under the licenses in the table above: the Python
standard library (Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved;
PSF License Agreement), transformers (Apache-2.0, Copyright The HuggingFace Team), torch
(BSD-3-Clause style, Copyright Facebook, Inc. and its contributors), sympy, numpy and
networkx (BSD-3-Clause, Copyright their development teams). The model weights, and the
tokenizer's vocabulary (character sequences taken from that code), are derived from it
by training. Whether trained weights are derivative works of their training data is not
settled; we treat them as if they were: `LICENSES/` beside this card holds each source's
license file as installed (`LICENSE-<source>`), with its copyright notices, retained as
those licenses ask. The weights are shipped with quickdraft, whose own code is under
Apache-2.0. Like any language model they can reproduce fragments of their training text.
"""


def write(dest: Path, summary: dict, export_info: dict, repo: Path,
          licenses: Path | None) -> dict:
    """Write ``LICENSES/`` (each corpus source's own license file, as ``corpus.json`` beside
    ``licenses`` names it), training.json and MODEL_CARD.md."""
    corpus = licenses.parent / "corpus.json" if licenses is not None else None
    if corpus is not None and corpus.is_file():  # each source's own license, as collected
        for source in json.loads(corpus.read_text())["sources"]:
            name = source.get("license_file")
            if name and (licenses / name).is_file():
                (dest / "LICENSES").mkdir(exist_ok=True)
                shutil.copyfile(licenses / name, dest / "LICENSES" / f"LICENSE-{source['name']}")
    latency = onnx_latency(dest)
    sizes = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*"))
             if p.is_file()}
    export_info = {**export_info, "files": sizes, "bytes": sum(sizes.values())}
    rec = training_record(summary, export_info, repo, latency)
    (dest / "training.json").write_text(json.dumps(rec, indent=2) + "\n")
    (dest / "MODEL_CARD.md").write_text(model_card(rec))
    return rec
