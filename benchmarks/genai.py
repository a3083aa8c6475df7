"""onnxruntime-genai (0.18) as a system to compare with: its builder, its autoregressive
generation (with and without CUDA graphs) and its own speculative decoding.

Model folders (``genai_config.json``, ``model.onnx`` + data), made by its model builder
from the same local Hugging Face folders. quickdraft's static export runs that builder too
and keeps its ``genai_config.json``, so when the fast path's export exists the benchmark
loads those very graphs in onnxruntime-genai (same weights, same graphs; only the runtime
differs); otherwise it runs the builder itself.

Variants, each a folder of symlinks to the model files plus its own ``genai_config.json``
(onnxruntime-genai refuses ``..`` in model paths, so a composite folder links its parts in):

* ``ar``: the target alone;
* ``ar-graph``: the same with ``enable_cuda_graph`` "1" in the CUDA provider options;
* ``spec``: ``model.type`` "speculative" with the draft's decoder block as ``model.draft``
  and ``speculative.max_draft_tokens`` K (set per run with ``set_speculative_options``);
* ``spec-graph``: ``spec`` with CUDA graphs in both provider options (may be refused).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, Unavailable, log

VARIANTS = ("ar", "ar-graph", "spec", "spec-graph")

# Runs the builder with the machine's own transformers when the one on PYTHONPATH is too
# old for it: onnxruntime (GPU build) and onnxruntime_genai are imported first from the
# current path, then the PYTHONPATH entries move to the end of sys.path (so transformers,
# tokenizers and huggingface_hub resolve to the system's), and QD_BUILDER_SITE entries, if
# any, go first.
_LAUNCHER = r"""
import os, runpy, sys
import onnxruntime, onnxruntime_genai  # noqa: F401
for p in [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]:
    for e in list(sys.path):
        if e and os.path.abspath(e) == os.path.abspath(p):
            sys.path.remove(e)
            sys.path.append(e)
for p in reversed([p for p in os.environ.get("QD_BUILDER_SITE", "").split(os.pathsep) if p]):
    sys.path.insert(0, p)
import transformers
print("model builder with transformers", transformers.__version__, "from", transformers.__file__,
      file=sys.stderr)
sys.argv = ["builder"] + sys.argv[1:]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


def _precision(device: str) -> tuple[str, str]:
    return ("fp16", "cuda") if device == "cuda" else ("fp32", "cpu")


def build(hf_dir: Path, out_dir: Path, *, device: str, cache_dir: Path,
          timeout: float = 900) -> dict:
    """Run the model builder on ``hf_dir`` into ``out_dir``: first through quickdraft's own
    runner (transformers 4.x shims), then through the launcher above."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"onnxruntime_genai is not installed: {e}") from e
    precision, ep = _precision(device)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    attempts = []
    t0 = time.perf_counter()
    try:
        from quickdraft.export.builder import run_builder

        run_builder(hf_dir, out_dir, dtype=precision, device=device, cache_dir=cache_dir,
                    timeout=timeout)
        if (out_dir / "genai_config.json").is_file():
            return {"builder": "quickdraft.export.builder.run_builder", "precision": precision,
                    "ep": ep, "seconds": round(time.perf_counter() - t0, 2)}
        attempts.append("run_builder wrote no genai_config.json")
    except Exception as e:  # noqa: BLE001 - try the other way
        attempts.append(f"run_builder: {type(e).__name__}: {str(e)[-600:]}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", _LAUNCHER, "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", ep, "-c", str(cache_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = "\n".join(((done.stdout or "") + (done.stderr or "")).strip().splitlines()[-10:])
        attempts.append(f"launcher: exit {done.returncode}: {tail}")
        raise RuntimeError("onnxruntime-genai's model builder failed:\n" + "\n".join(attempts))
    return {"builder": "launcher (system transformers)", "precision": precision, "ep": ep,
            "seconds": round(time.perf_counter() - t0, 2), "earlier_attempts": attempts}


def _link_files(src: Path, dst: Path, skip: tuple[str, ...] = ("genai_config.json",)) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name in skip or not p.is_file():
            continue
        link = dst / p.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(p.resolve(), link)


def _set_cuda_graph(decoder: dict, on: bool) -> bool:
    """Set enable_cuda_graph in a decoder block's CUDA provider options; False if it has
    no CUDA provider entry."""
    found = False
    for entry in decoder.setdefault("session_options", {}).setdefault("provider_options", []):
        if "cuda" in entry:
            entry["cuda"]["enable_cuda_graph"] = "1" if on else "0"
            found = True
    return found


def prepare(variant: str, target_dir: Path, draft_dir: Path | None, root: Path) -> Path:
    """Make the folder of ``variant`` under ``root`` (rebuilt each time: links and config)."""
    cfg = json.loads((target_dir / "genai_config.json").read_text())
    vdir = root / variant
    if vdir.exists():
        shutil.rmtree(vdir)
    graph = variant.endswith("-graph")
    if variant in ("ar", "ar-graph"):
        _link_files(target_dir, vdir)
        if graph and not _set_cuda_graph(cfg["model"]["decoder"], True):
            raise Unavailable("no CUDA provider in genai_config.json: CUDA graphs need CUDA")
    elif variant in ("spec", "spec-graph"):
        if draft_dir is None:
            raise ValueError("speculative variants need the draft's folder")
        dcfg = json.loads((draft_dir / "genai_config.json").read_text())
        vdir.mkdir(parents=True)
        for role, src in (("target", target_dir), ("draft", draft_dir)):
            os.symlink(src.resolve(), vdir / role)
        decoder = copy.deepcopy(cfg["model"]["decoder"])
        draft = copy.deepcopy(dcfg["model"]["decoder"])
        decoder["filename"] = "target/" + decoder["filename"]
        draft["filename"] = "draft/" + draft["filename"]
        if graph and not (_set_cuda_graph(decoder, True) and _set_cuda_graph(draft, True)):
            raise Unavailable("no CUDA provider in genai_config.json: CUDA graphs need CUDA")
        cfg["model"]["type"] = "speculative"
        cfg["model"]["decoder"] = decoder
        cfg["model"]["draft"] = draft
        cfg["speculative"] = {"max_draft_tokens": 4}
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (target_dir / name).is_file():
                os.symlink((target_dir / name).resolve(), vdir / name)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    (vdir / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return vdir


class GenaiRunner:
    """One loaded onnxruntime-genai model; greedy generations of exactly n tokens."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og = og
        t0 = time.perf_counter()
        self.model = og.Model(str(folder))
        self.load_s = time.perf_counter() - t0

    def generate(self, prompt: list[int], n: int, k: int | None = None) -> tuple[list[int], dict]:
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(prompt) + n
        # min_length keeps EOS from ending the run early: every system makes n tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        if k is not None:
            params.set_speculative_options(max_draft_tokens=int(k))
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        tokens = [int(t) for t in gen.get_sequence(0)][len(prompt):]
        stats = {}
        if k is not None:
            try:
                stats = dict(gen.get_speculative_stats())
            except Exception as e:  # noqa: BLE001
                stats = {"error": f"get_speculative_stats: {e}"}
        del gen
        return tokens, stats


def spec_summary(stats: dict, k: int, ar_ms_per_token: float | None) -> dict:
    """alpha, tokens per iteration and c from onnxruntime-genai's speculative statistics."""
    rounds = stats.get("rounds") or 0
    evaluated = stats.get("draft_tokens_evaluated") or 0
    accepted = stats.get("draft_tokens_accepted") or 0
    passes = stats.get("draft_forward_passes") or 0
    out = {
        "gamma": k,
        "rounds": rounds,
        "alpha": (accepted / evaluated) if evaluated else None,  # their acceptance_rate
        "tokens_per_iteration": (stats.get("tokens_emitted", 0) / rounds) if rounds else None,
        "draft_ms_per_call": (stats.get("total_draft_ms", 0.0) / passes) if passes else None,
        "verify_ms_per_round": ((stats.get("total_target_verify_ms", 0.0)
                                 / stats.get("target_verify_forward_passes"))
                                if stats.get("target_verify_forward_passes") else None),
        "genai_estimated_speedup": stats.get("estimated_speedup"),
    }
    if ar_ms_per_token and out["draft_ms_per_call"] is not None:
        out["cost_ratio_c"] = out["draft_ms_per_call"] / ar_ms_per_token
    if ar_ms_per_token and out["verify_ms_per_round"] is not None:
        out["verify_over_ar_step"] = out["verify_ms_per_round"] / ar_ms_per_token
    return out


def genai_model_dirs(pair_dir: Path) -> tuple[Path, Path]:
    """Where the genai model folders of a pair are: the fast path's export when it has
    genai configs, else the benchmark's own builds."""
    fast = pair_dir / "qd-fast"
    if (fast / "target" / "genai_config.json").is_file() and \
            (fast / "draft" / "genai_config.json").is_file():
        return fast / "target", fast / "draft"
    return pair_dir / "genai" / "target", pair_dir / "genai" / "draft"


def has_builds(pair_dir: Path) -> bool:
    t, d = genai_model_dirs(pair_dir)
    return (t / "genai_config.json").is_file() and (d / "genai_config.json").is_file()


if __name__ == "__main__":  # manual check: python -m benchmarks.genai HF_DIR OUT_DIR [cpu|cuda]
    sys.path.insert(0, str(REPO))
    dev = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    log(json.dumps(build(Path(sys.argv[1]), Path(sys.argv[2]), device=dev,
                         cache_dir=Path(sys.argv[2]).parent / "cache")))
