"""Adapters between the benchmark and quickdraft's ONNX Runtime paths.

Every call into ``quickdraft.export`` / ``quickdraft.ort_backend`` that the benchmark makes
is here, in small functions, so that an API change is fixed in one place:

* generic path (issue 4): ``quickdraft.export.export_pair`` (optimum-onnx, dynamic KV
  cache) and ``quickdraft.ort_backend.Generator`` (OrtModel, IOBinding, the generic loop of
  quickdraft.generation);
* fast path (issue 5): ``quickdraft.export.static.export_static_pair`` (onnxruntime-genai's
  builder, GroupQueryAttention, static caches) and ``quickdraft.ort_backend.static.
  StaticOrtModel`` (shared past/present buffers, per-step bindings, CUDA graphs) driven by
  ``quickdraft.ort_backend.static.FastGenerator`` (verification on the device); without
  it the fast models run in the generic loop of :mod:`quickdraft.generation`.

Generation is greedy, exactly ``max_new_tokens`` long (EOS ignored everywhere, so all
systems produce the same number of tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import Unavailable

PATHS = ("generic", "fast")


def dtype_for(device: str) -> str:
    return "fp16" if device == "cuda" else "fp32"


def greedy():
    from quickdraft.sampling import SamplingConfig

    return SamplingConfig(temperature=0.0)


# ----------------------------------------------------------------------------- export


def export(path: str, hf_target: Path, hf_draft: Path, out: Path, *, device: str,
           validate: bool = False) -> dict:
    """Export the pair for ``path`` into ``out`` (replaced if present); a summary dict."""
    t0 = time.perf_counter()
    dtype = dtype_for(device)
    if path not in ("generic", "fast"):
        raise ValueError(f"unknown path {path!r}")
    try:
        from quickdraft.export import export_pair
    except ImportError as e:
        raise Unavailable(f"quickdraft.export.export_pair: {e}") from e
    # the fast path is the static-cache export of the same weights
    report = export_pair(hf_target, hf_draft, out, dtype=dtype, device=device,
                         kv_cache="static" if path == "fast" else "dynamic",
                         validate=validate, overwrite=True)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file()}
    return {"path": path, "dtype": dtype, "device": device, "validated": validate,
            "seconds": round(time.perf_counter() - t0, 2), "bytes": sum(sizes.values()),
            "report_seconds": getattr(report, "seconds", None)}


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedPair:
    path: str
    device: str
    target: object  # a quickdraft LanguageModel
    draft: object | None
    generator: object | None = None  # the backend's own generator, when it has one
    info: dict = field(default_factory=dict)


def _device(device: str):
    try:
        from quickdraft.ort_backend.device import resolve_device
    except ImportError as e:
        raise Unavailable(f"quickdraft.ort_backend.device: {e}") from e
    resolved, note = resolve_device(device)
    return resolved, note


def load(path: str, model_dir: Path, *, device: str, max_gamma: int = 8,
         cuda_graph: bool = True, with_draft: bool = True,
         cache_length: int | None = None) -> LoadedPair:
    """Load an exported pair for ``path``. ``cache_length``: tokens the fast path's static
    caches hold (None: the export's default, its ``max_cache_length``)."""
    dev, note = _device(device)
    if path == "generic":
        try:
            from quickdraft.ort_backend import Generator
        except ImportError as e:
            raise Unavailable(f"quickdraft.ort_backend.Generator: {e}") from e
        gen = Generator.load(model_dir, device=device, draft=with_draft)
        gen.eos_ids = frozenset()  # the benchmark generates exactly max_new_tokens
        gen.tokenizer = None  # token ids in and out: no text decoding per step, as for the
        # other systems (the prompt is given as ids, so the tokenizer is not needed)
        return LoadedPair(path, str(gen.device), gen.target, gen.draft, gen,
                          {"device_note": note or gen.device_note, "loop": "Generator"})
    if path == "fast":
        try:
            from quickdraft.ort_backend.static import StaticOrtModel
        except ImportError as e:
            raise Unavailable(f"quickdraft.ort_backend.static.StaticOrtModel: {e}") from e
        graphs = bool(cuda_graph and dev.kind == "cuda")
        # the target's fixed step lengths: 1 (autoregressive) and gamma + 1 for every gamma
        # of the sweep; the draft's: 1, and 2 after an iteration that accepted everything
        target = StaticOrtModel(model_dir / "target", dev, max_length=cache_length,
                                graph_steps=tuple(range(1, max_gamma + 2)), cuda_graph=graphs)
        draft = None
        if with_draft:
            draft = StaticOrtModel(model_dir / "draft", dev, max_length=cache_length,
                                   graph_steps=(1, 2), cuda_graph=graphs)
        pair = LoadedPair(path, str(dev), target, draft, None,
                          {"device_note": note, "cuda_graph": graphs,
                           "cache_length": target.max_length,
                           "loop": "quickdraft.generation"})
        fg = fast_generator(pair)
        if fg is not None:
            pair.generator = fg
            pair.info["loop"] = "FastGenerator (verify auto: argmax ids when greedy)"
        return pair
    raise ValueError(f"unknown path {path!r}")


def fast_generator(pair: LoadedPair, verify: str = "auto"):
    """The fast path's own generator (``quickdraft.ort_backend.static.FastGenerator``;
    ``verify`` as its: "auto" verifies greedy runs on the target's argmax ids, "device"
    with the verification graph), wrapped; None to run the fast models in
    quickdraft.generation's loop instead."""
    try:
        from quickdraft.ort_backend.static import FastGenerator
    except ImportError:
        return None
    return _FastGeneratorAdapter(FastGenerator, pair, verify)


class _FastGeneratorAdapter:
    """``FastGenerator(target, draft, sampling=)`` with ``autoregressive(prompt, n)`` and
    ``speculative(prompt, n, gamma)`` -> (tokens, stats); stats normalized to the keys the
    benchmark reads (per-call ms of each model, c, drafted tokens per iteration)."""

    def __init__(self, cls, pair: LoadedPair, verify: str = "auto"):
        self.gen = cls(pair.target, pair.draft, sampling=greedy(), verify=verify)
        self.gen.eos_ids = frozenset()  # exactly max_new_tokens

    def autoregressive(self, prompt, n):
        tokens, st = self.gen.autoregressive(list(prompt), n, seed=0)
        st = dict(st)
        calls = max(1, (st.get("target_calls") or 1) - 1)
        st["target"] = {"mean_call_ms": 1e3 * st.get("target_s", 0.0) / calls}
        return list(tokens), st

    def speculative(self, prompt, n, gamma, drafter_factory=None):
        tokens, st = self.gen.speculative(list(prompt), n, gamma, seed=0,
                                          drafter_factory=drafter_factory)
        return list(tokens), _normalize_fast_stats(dict(st), n, gamma)


def _normalize_fast_stats(st: dict, n: int, gamma: int) -> dict:
    from quickdraft.generation import draft_length

    acc = list(st.get("accepted_per_iteration") or [])
    drafted, produced = [], 0
    for a in acc:  # the loop's draft lengths, replayed
        g = draft_length(gamma, n - produced)
        drafted.append(g)
        produced += min(a + 1, n - produced)
    st["drafted_per_iteration"] = drafted
    tc, dc = st.get("target_calls") or 0, st.get("draft_calls") or 0
    if tc:
        st["target"] = {"mean_call_ms": 1e3 * st.get("target_s", 0.0) / tc}
    if dc:
        st["draft"] = {"mean_call_ms": 1e3 * st.get("draft_s", 0.0) / dc}
    if tc and dc and st.get("target_s"):
        st["cost_ratio_c"] = (st["draft_s"] / dc) / (st["target_s"] / tc)
    return st


# ----------------------------------------------------------------------------- generation


def _extra(gs) -> dict:
    """What aggregating over prompts needs beyond GenerationStats.as_dict()."""
    betas = list(getattr(gs, "beta_per_position", []) or [])
    return {"drafted_per_iteration": list(getattr(gs, "drafted_per_iteration", []) or []),
            "beta_sum": float(sum(betas)), "beta_count": len(betas)}


def _generator_stats(res) -> dict:
    out = res.stats.as_dict()
    out.update(_extra(res.stats.generation))
    return out


def _loop_stats(stats, target_times, draft_times) -> dict:
    out = stats.as_dict()
    out.update(_extra(stats))
    out["target"] = target_times.as_dict()
    tc = target_times.mean_call_s
    out["target_s"] = target_times.decode_s
    if draft_times is not None:
        out["draft"] = draft_times.as_dict()
        out["draft_s"] = draft_times.decode_s
        dc = draft_times.mean_call_s
        out["cost_ratio_c"] = dc / tc if tc and tc == tc and dc == dc else None
    return out


def autoregressive(pair: LoadedPair, prompt: list[int], n: int) -> tuple[list[int], dict]:
    """Greedy autoregressive decoding of ``n`` tokens: (tokens, statistics)."""
    import numpy as np

    if pair.generator is not None and pair.path == "generic":
        from quickdraft.ort_backend import DecodeConfig

        res = pair.generator.generate(list(prompt), DecodeConfig(
            max_new_tokens=n, gamma=1, sampling=greedy(), seed=0, autoregressive=True))
        return list(res.tokens), _generator_stats(res)
    if pair.generator is not None:
        return pair.generator.autoregressive(prompt, n)
    from quickdraft.generation import autoregressive_generate
    from quickdraft.ort_backend.timing import ModelTimes, TimedModel

    tt = ModelTimes()
    res = autoregressive_generate(TimedModel(pair.target, tt), prompt, max_new_tokens=n,
                                  sampling=greedy(), rng=np.random.default_rng(0))
    return list(res.tokens), _loop_stats(res.stats, tt, None)


def speculative(pair: LoadedPair, prompt: list[int], n: int, gamma: int,
                drafter_factory=None) -> tuple[list[int], dict]:
    """Greedy speculative decoding: (tokens, statistics).

    ``drafter_factory(draft_model) -> Drafter`` replaces the draft model's own proposals
    (the controlled-alpha drafter). On the fast path it goes into FastGenerator's loop; on
    the generic path such runs use quickdraft.generation's loop over the same models (the
    loop the generic Generator runs).
    """
    import numpy as np

    if pair.path == "fast" and pair.generator is not None:
        return pair.generator.speculative(prompt, n, gamma, drafter_factory=drafter_factory)
    if drafter_factory is None and pair.generator is not None:
        from quickdraft.ort_backend import DecodeConfig

        res = pair.generator.generate(list(prompt), DecodeConfig(
            max_new_tokens=n, gamma=gamma, sampling=greedy(), seed=0))
        return list(res.tokens), _generator_stats(res)
    from quickdraft.generation import ModelDrafter, speculative_generate
    from quickdraft.ort_backend.timing import ModelTimes, TimedModel

    if pair.draft is None:
        raise ValueError("no draft model loaded")
    tt, dt = ModelTimes(), ModelTimes()
    draft = TimedModel(pair.draft, dt)
    drafter = drafter_factory(draft) if drafter_factory else ModelDrafter(draft, greedy())
    res = speculative_generate(TimedModel(pair.target, tt), None, prompt, gamma=gamma,
                               max_new_tokens=n, sampling=greedy(),
                               rng=np.random.default_rng(0), drafter=drafter)
    return list(res.tokens), _loop_stats(res.stats, tt, dt)


# ----------------------------------------------------------------------------- costs


def step_costs(model, prompt: list[int], lengths: list[int], *, reps: int,
               warmup: int = 3) -> dict:
    """Median ms of one forward call of ``k`` tokens after the prompt, for k in ``lengths``,
    through the DecodeState protocol (append, then rewind to the prompt: the cache length
    stays fixed). Includes the host copy of the logits, as in generation. Three warm-up
    calls per length: ONNX Runtime captures a CUDA graph on a step's third run."""
    import statistics

    state = model.new_state()
    state.append(list(prompt))
    base = len(prompt)
    out = {}
    for k in lengths:
        toks = [int(t) for t in (list(prompt) * (k // max(1, len(prompt)) + 1))[:k]]
        times = []
        for r in range(warmup + reps):
            t0 = time.perf_counter()
            state.append(toks)
            dt = time.perf_counter() - t0
            state.rewind(base)
            if r >= warmup:
                times.append(dt)
        out[k] = 1e3 * statistics.median(times)
    return out
