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
import statistics
import time
from pathlib import Path

LATENCY_PAST = 100  # cached tokens before the timed single-token calls
LATENCY_CALLS = 200


def onnx_latency(folder: Path) -> dict:
    """Median ms of one decoding call (1 and 5 new tokens on a 100-token past), 1 thread."""
    import numpy as np
    import onnxruntime as ort

    from quickdraft.manifest import load_manifest

    m = load_manifest(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / m.model_file), options,
                                   providers=["CPUExecutionProvider"])
    out = {}
    for n in (1, 5):
        feeds = {"input_ids": np.ones((1, n), np.int64)}
        if m.has_attention_mask:
            feeds["attention_mask"] = np.ones((1, LATENCY_PAST + n), np.int64)
        if m.has_position_ids:
            feeds["position_ids"] = np.arange(LATENCY_PAST, LATENCY_PAST + n, dtype=np.int64)[None]
        past = np.zeros((1, m.num_kv_heads, LATENCY_PAST, m.head_dim), np.float32)
        for i in range(m.num_layers):
            feeds[m.past_key_template.format(i=i)] = past
            feeds[m.past_value_template.format(i=i)] = past
        for _ in range(20):
            session.run(None, feeds)
        times = []
        for _ in range(LATENCY_CALLS):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        out[f"ms_{n}_token"] = round(1e3 * statistics.median(times), 4)
    return out


def relative(path: str | Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def training_record(summary: dict, export_info: dict, repo: Path, heldout: list[str] | None,
                    latency: dict) -> dict:
    """The summary without machine-specific paths, plus the export's sizes and latencies."""
    from quickdraft import theory

    rec = json.loads(json.dumps(summary))
    rec["args"]["out"] = relative(rec["args"]["out"], repo)
    rec["args"]["export_dir"] = relative(rec["args"]["export_dir"], repo)
    rec["corpus"]["stdlib_root"] = relative(rec["corpus"]["stdlib_root"], repo)
    if heldout is not None:
        rec["corpus"]["heldout_files_list"] = heldout
    rec["export"] = {"bytes": export_info["bytes"], "files": export_info["files"]}
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
        "how": f"onnxruntime CPU, 1 intra-op thread, median of {LATENCY_CALLS} calls with a "
               f"{LATENCY_PAST}-token past",
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


def model_card(rec: dict) -> str:
    c, t, d = rec["corpus"], rec["models"]["target"], rec["models"]["draft"]
    ev, ex, lat = rec["heldout"], rec["export"], rec["cpu_latency"]
    files = ex["files"]
    tok = rec["tokenizer"]
    heldout = c.get("heldout_files_list")
    heldout_text = (", ".join(f"`{h}`" for h in heldout) if heldout else
                    "(list not recorded)")
    ts, ds = t["shape"], d["shape"]
    curve = ", ".join(f"{s}: {v:.3f}" for s, v in t.get("heldout_curve", []))
    dcurve = ", ".join(f"{s}: {v:.3f}" for s, v in d.get("heldout_curve", [])[3::4])
    return f"""# quickdraft's default pair: a tiny Python code model and its draft

Two small Llama-architecture causal language models, a **target** and a **draft**, sharing
one byte-level BPE tokenizer, trained from scratch on the Python standard library's own
sources, and shipped inside the package (`quickdraft/models/default`) so that speculative
decoding runs end to end on any machine with nothing to download (the pair
`quickdraft generate` is meant to use when given no model). They write Python-looking
text, not good code: they are demonstration models.

| | target | draft |
| --- | --- | --- |
| architecture | {shape(ts)} | {shape(ds)} |
| parameters (tied input/output embedding counted once) | {t['parameters']:,} | {d['parameters']:,} |
| ONNX file (fp32; the exporter stores the output embedding separately) | {fmt_mb(files['target/model.onnx'])} | {fmt_mb(files['draft/model.onnx'])} |
| context | {rec['args']['ctx']} tokens | {rec['args']['ctx']} tokens |
| held-out loss (nats/token) | {ev['target_loss']:.3f} (perplexity {ev['target_ppl']:.1f}) | {ev['draft_loss']:.3f} (perplexity {ev['draft_ppl']:.1f}) |
| training steps | {t['steps']} | {d['steps']} |
| training time ({rec['device_name']}) | {t['train_seconds']:.0f} s | {d['train_seconds']:.0f} s |

Vocabulary: {tok['vocab_size']} tokens (`<|endoftext|>` = 0 is BOS, EOS and padding;
`<unk>` = 1). Both folders hold the same `tokenizer.json` (SHA-256 `{tok['tokenizer_json_sha256'][:16]}…`).
All shipped files together: **{fmt_mb(ex['bytes'])}**.

## Held-out acceptance rate

alpha = E[sum_x min(p(x), q(x))] (`quickdraft.theory.beta`), the mean over
{ev['positions']:,} positions ({ev['windows']} windows of {ev['ctx']} tokens from the held-out
files) of the two models' next-token distributions, with the same sampling transformation
applied to both (`quickdraft.sampling.adjust_logits`):

| temperature | alpha |
| --- | --- |
| 0 (greedy: the two argmaxes agree) | **{ev['alpha_T0']:.3f}** |
| 1 | **{ev['alpha_T1']:.3f}** |

Re-measure it (CPU, about 20 s): `python scripts/train_default_pair.py --evaluate-only`.

## Speed on the CPU

On a CPU both models are bound by reading their weights, so their cost ratio c is close to
the ratio of their sizes; the draft is made small for this reason. Measured when this
folder was exported ({lat['how']}; {lat['machine']}): target {lat['target']['ms_1_token']:.3f} ms
per token ({lat['target']['ms_5_token']:.3f} ms for 5 tokens), draft {lat['draft']['ms_1_token']:.3f} ms,
so **c = {lat['c']:.2f}**. With the held-out alpha, the paper's expected walltime
improvement (`quickdraft.theory.walltime_improvement`, best gamma) is
{lat['theory_best']['T0']['walltime_improvement']:.2f}x at T=0 (gamma {lat['theory_best']['T0']['gamma']})
and {lat['theory_best']['T1']['walltime_improvement']:.2f}x at T=1 (gamma {lat['theory_best']['T1']['gamma']}).
That counts model calls only: what `quickdraft generate` reports also includes the decoding
loop's own time per iteration, which is large next to models this small.

## Data

- The `*.py` files of the **CPython {c['stdlib'].removeprefix('python')} standard library**
  (the interpreter's `Lib/` folder, as installed by CPython 3.11.7), sorted by path,
  without `test`/`tests` folders, `site-packages`, `encodings/` (codec tables) and
  `pydoc_data/` (one generated docstring): {c['train_files'] + c['heldout_files']} files;
  SHA-256 of their paths and contents: `{c['sha256']}`.
- Held-out split: every 10th file in that order ({c['heldout_rule']}), {c['heldout_files']} files,
  {c['heldout_tokens']:,} tokens, used for nothing but evaluation: {heldout_text}.
- Training: the other {c['train_files']} files, {c['train_chars']:,} characters,
  {c['train_tokens']:,} tokens; each file followed by `<|endoftext|>`.

## Recipe

Everything is in `scripts/train_default_pair.py`, deterministic from `--seed` (0):

1. Byte-level BPE tokenizer (`tokenizers`, {tok['vocab_size']} tokens) trained on the training files.
2. Target: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), learning rate
   {t['lr']} with linear warmup and cosine decay to 10%, {t['steps']} steps of
   {rec['args']['batch']} random windows of {rec['args']['ctx']} + 1 tokens (about
   {t['steps'] * rec['args']['batch'] * rec['args']['ctx'] / c['train_tokens']:.0f} epochs; the held-out loss
   stops improving there: {curve}).
3. Draft: the same optimiser, learning rate {d['lr']}, {d['steps']} steps on the same
   windows, **distilled from the target**: loss = KL(target ‖ draft) at temperature 1
   (`--draft-distill {rec['args']['draft_distill']}`), which is what alpha = 1 − TV(p, q) rewards
   (held-out loss every 1000 steps: {dcurve}).
4. Evaluation on the held-out files, then the ONNX export with quickdraft's own exporter
   (`quickdraft.export.export_pair`, which checks the ONNX logits against PyTorch and greedy
   equality; the numbers are in each `quickdraft.json` under `validation`).

The shipped weights were trained on one NVIDIA H100 with

    {rec['command']}

where `.stdlib/python3.11` was a copy of the files above from the CPython 3.11.7
installation (that machine's Python was {c['python']}), and then exported on the CPU with

    python scripts/train_default_pair.py --export-only

Training took {t['train_seconds'] + d['train_seconds']:.0f} s of the run's {rec['total_seconds']:.0f} s.
Versions: {', '.join(f'{k} {v}' for k, v in rec['versions'].items())}. On a machine whose
Python is 3.11.7, `python scripts/train_default_pair.py --device cuda` reads the same files
from the interpreter itself. Reruns with the same GPU model and versions give bit-identical
weights (the script uses deterministic kernels only; two runs were compared). `--device cpu`
runs the same recipe on the CPU, but takes hours and rounds differently, so its weights
and numbers differ slightly. `training.json` beside this card holds all the numbers.

## License

The training data is the source code of the Python standard library, Copyright (c)
2001-2023 Python Software Foundation; All Rights Reserved, distributed under the **PSF
License Agreement** (Python Software Foundation License Version 2;
https://docs.python.org/3/license.html). The model weights, and the tokenizer's vocabulary
(character sequences taken from that code), are derived from it by training. Whether
trained weights are a "derivative version" in the license's sense is not settled; we treat
them as one: `LICENSE-PYTHON.txt` beside this card is the license file of the CPython
3.11.7 installation the data came from, with PSF's copyright notice and License Agreement,
retained as that agreement asks. The weights are shipped with quickdraft, whose own code
is under Apache-2.0. Like any language model they can reproduce fragments of their
training text.
"""


def write(dest: Path, summary: dict, export_info: dict, repo: Path,
          heldout: list[str] | None, stdlib_root: Path) -> dict:
    """Write LICENSE-PYTHON.txt (from ``stdlib_root``), training.json and MODEL_CARD.md."""
    license_file = stdlib_root / "LICENSE.txt"
    if license_file.is_file():
        shutil.copyfile(license_file, dest / "LICENSE-PYTHON.txt")
    latency = {role: onnx_latency(dest / role) for role in ("target", "draft")}
    rec = training_record(summary, export_info, repo, heldout, latency)
    (dest / "training.json").write_text(json.dumps(rec, indent=2) + "\n")
    (dest / "MODEL_CARD.md").write_text(model_card(rec))
    return rec
