"""Adapters between the benchmark and quickdraft's ONNX Runtime paths.

Every call into ``quickdraft.export`` / ``quickdraft.ort_backend`` that the benchmark makes
is here, in small functions, so that an API change is fixed in one place:

* generic path: ``quickdraft.export.export_pair`` (optimum-onnx, dynamic KV cache) and
  ``quickdraft.ort_backend.load_pair`` (OrtModel, IOBinding);
* fast path: the static-cache export of the same weights (onnxruntime-genai's builder,
  GroupQueryAttention) and ``quickdraft.ort_backend.StaticOrtModel`` (shared past/present
  buffers, per-step bindings, CUDA graphs).

Both run in :class:`Runner`, whole generations on a ``quickdraft.ort_backend.Generator``
returning ``(tokens, statistics dict)``.

Generation is greedy, exactly ``max_new_tokens`` long (EOS ignored everywhere, so all
systems produce the same number of tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import Unavailable


def dtype_for(device: str) -> str:
    return "fp16" if device == "cuda" else "fp32"


def greedy():
    from quickdraft.sampling import SamplingConfig

    return SamplingConfig(temperature=0.0)


# ----------------------------------------------------------------------------- export


def export(path: str, hf_target: Path, hf_draft: Path, out: Path, *, device: str,
           validate: bool = False, fuse_gate_up: bool | None = None,
           transpose_weights: bool | None = None) -> dict:
    """Export the pair for ``path`` into ``out`` (replaced if present); a summary dict.
    ``fuse_gate_up``, ``transpose_weights``: the fast path's graph settings (None: the
    export's defaults)."""
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
                         validate=validate, overwrite=True,
                         fuse_gate_up=fuse_gate_up if path == "fast" else None,
                         transpose_weights=transpose_weights if path == "fast" else None)
    fused = transposed = None
    if path == "fast":
        from quickdraft.export.builder import FUSE_GATE_UP, TRANSPOSE_WEIGHTS
        fused = FUSE_GATE_UP if fuse_gate_up is None else bool(fuse_gate_up)
        transposed = TRANSPOSE_WEIGHTS if transpose_weights is None else bool(transpose_weights)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file()}
    return {"path": path, "dtype": dtype, "device": device, "validated": validate,
            "seconds": round(time.perf_counter() - t0, 2), "bytes": sum(sizes.values()),
            "report_seconds": getattr(report, "seconds", None), "fuse_gate_up": fused,
            "transpose_weights": transposed}


def export_draft(hf_draft: Path, target_export: Path, out: Path, *, device: str) -> dict:
    """The fast path's folder of another draft for an exported target: ``out/draft``
    exported alone (static cache, the dtype of ``device``), ``out/target`` a link to
    ``target_export`` (the same cache length: both models' context)."""
    t0 = time.perf_counter()
    try:
        from quickdraft.export import export_model
    except ImportError as e:
        raise Unavailable(f"quickdraft.export.export_model: {e}") from e
    if not (target_export / "quickdraft.json").is_file():
        raise Unavailable(f"{target_export} holds no exported target: export the pair first")
    link = out / "target"
    if link.exists() and not link.is_symlink():
        raise Unavailable(f"{link} is a folder of its own, not a link to an exported target: "
                          "give export_draft a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    export_model(hf_draft, out / "draft", dtype=dtype_for(device), device=device,
                 kv_cache="static", validate=False, overwrite=True, role="draft")
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target_export.resolve(), target_is_directory=True)
    return {"path": "fast", "dtype": dtype_for(device), "device": device,
            "seconds": round(time.perf_counter() - t0, 2),
            "draft_bytes": sum(p.stat().st_size for p in (out / "draft").rglob("*")
                               if p.is_file())}


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedPair:
    path: str
    device: str
    target: object  # a quickdraft LanguageModel
    draft: object | None
    runner: Runner
    info: dict = field(default_factory=dict)


def load(path: str, model_dir: Path, *, device: str, max_gamma: int = 8,
         cuda_graph: bool = True, with_draft: bool = True,
         cache_length: int | None = None, attention: str | None = None) -> LoadedPair:
    """Load an exported pair for ``path``. ``cache_length``: tokens the fast path's static
    caches hold (None: the export's default, its ``max_cache_length``); ``attention``: the
    fast path's GroupQueryAttention kernel (None: ``load_pair``'s default)."""
    try:
        from quickdraft.ort_backend import StaticOrtModel, load_pair, resolve_device
    except ImportError as e:
        raise Unavailable(f"quickdraft.ort_backend: {e}") from e
    if path == "generic":
        pair = load_pair(model_dir, device=device, draft=with_draft, max_gamma=max_gamma)
        return LoadedPair(path, str(pair.device), pair.target, pair.draft,
                          Runner(pair.target, pair.draft),
                          {"device_note": pair.device_note, "loop": "Generator"})
    if path == "fast":
        from quickdraft.ort_backend.device import DEFAULT_ATTENTION

        dev, note = resolve_device(device)
        graphs = bool(cuda_graph and dev.kind == "cuda")
        kernel = attention or DEFAULT_ATTENTION
        # the target's fixed step lengths: 1 (autoregressive) and gamma + 1 for every gamma
        # of the sweep; the draft's: 1, and 2 after an iteration that accepted everything
        target = StaticOrtModel(model_dir / "target", dev, cache_length=cache_length,
                                graph_steps=tuple(range(1, max_gamma + 2)), cuda_graph=graphs,
                                attention=kernel)
        draft = None
        if with_draft:
            # chains of up to max_gamma + 1 steps: pipelined continuations
            draft = StaticOrtModel(model_dir / "draft", dev, cache_length=cache_length,
                                   graph_steps=(1, 2), cuda_graph=graphs,
                                   chain_length=max_gamma + 1, attention=kernel)
        return LoadedPair(path, str(dev), target, draft, Runner(target, draft),
                          {"device_note": note, "cuda_graph": graphs, "attention": kernel,
                           "cache_length": target.max_length,
                           "loop": "Generator (verify auto: argmax ids when greedy)"})
    raise ValueError(f"unknown path {path!r}")


# ----------------------------------------------------------------------------- generation


def _ms_per_call(times) -> float:
    """ms per decode-phase call of one model, its cache roll-backs included."""
    return 1e3 * times.decode_s / times.calls if times.calls else float("nan")


class Runner:
    """Whole generations on token ids, each returning ``(tokens, statistics dict)``: the
    measurement helper of every benchmark.

    Each call runs one :class:`quickdraft.ort_backend.Generator` made for it and closed
    after it, so every generation fills its caches from an empty state (the prefill is
    part of every measured generation) and the models' pooled cache slots (with their
    CUDA graphs) are reused from one call to the next. EOS is ignored: exactly
    ``max_new_tokens`` every time. ``verify`` is the Generator's.

    The dict's keys: ``mode``, ``new_tokens``, seconds ``prefill_s``, ``target_s``,
    ``host_s``, ``total_s`` (prefill included) and ``tokens_per_s`` over it, ``target`` /
    ``draft`` ``{"mean_call_ms"}`` (decode phase); autoregressive adds ``target_calls``
    (prefill included) and ``target_ms_per_step``; speculative adds ``gamma``,
    ``iterations``, ``target_calls`` and ``draft_calls`` (decode phase), the accepted and
    drafted counts per iteration, ``acceptance_rate``, ``alpha``, ``tokens_per_iteration``,
    ``draft_s``, ``verify_s``, ``host_ms_per_iteration``, ``cost_ratio_c`` (per-call time
    of the draft over the target's) and ``beta_sum`` / ``beta_count``.
    """

    def __init__(self, target, draft=None, *, sampling=None, verify: str = "auto",
                 compute: str = "float32", capture_helpers: bool | None = None,
                 shadow_rule=None):
        from quickdraft.pipelined import ShadowRule

        self.target, self.draft = target, draft
        self.sampling = sampling if sampling is not None else greedy()
        self.verify, self.compute = verify, compute
        self.capture_helpers = capture_helpers  # the Generator's
        self.shadow_rule = shadow_rule or ShadowRule()  # the Generator's

    def variant(self, **changes) -> Runner:
        """This runner with some of its settings changed (``sampling``, ``verify``,
        ``compute``, ``capture_helpers``, ``shadow_rule``)."""
        settings = dict(sampling=self.sampling, verify=self.verify, compute=self.compute,
                        capture_helpers=self.capture_helpers, shadow_rule=self.shadow_rule)
        return Runner(self.target, self.draft, **{**settings, **changes})

    def generator(self, drafter, n: int, seed: int | None, max_draft: int | None = None,
                  pipelined: bool = False):
        from quickdraft.ort_backend import DecodeConfig, Generator

        config = DecodeConfig(max_new_tokens=n, sampling=self.sampling, seed=seed)
        return Generator(self.target, drafter, config, verify=self.verify,
                         compute=self.compute, max_draft=max_draft, pipelined=pipelined,
                         capture_helpers=self.capture_helpers, shadow_rule=self.shadow_rule)

    def _run(self, drafter, prompt, n: int, seed: int | None, pipelined: bool = False):
        with self.generator(drafter, n, seed, pipelined=pipelined) as gen:
            res = gen.generate(list(prompt))
        s = res.stats
        total = s.prefill_s + s.decode_s
        return list(res.tokens), s, {
            "mode": s.mode, "new_tokens": s.new_tokens, "prefill_s": s.prefill_s,
            "target_s": s.target_s, "host_s": s.host_s, "total_s": total,
            "tokens_per_s": s.new_tokens / total if total > 0 else float("nan"),
        }

    def autoregressive(self, prompt, n: int, *, seed: int | None = 0):
        tokens, s, out = self._run(None, prompt, n, seed)
        out["target_calls"] = s.target_calls
        out["target_ms_per_step"] = _ms_per_call(s.target)
        out["target"] = {"mean_call_ms": out["target_ms_per_step"]}
        return tokens, out

    def speculative(self, prompt, n: int, gamma: int, *, seed: int | None = 0, drafter=None):
        """``drafter`` (any quickdraft Drafter) replaces the draft model's own proposals."""
        from quickdraft.generation import ModelDrafter
        from quickdraft.ort_backend.device_draft import DeviceModelDrafter
        from quickdraft.ort_backend.generator import samples_on_device

        if drafter is None:
            if self.draft is None:
                raise ValueError("no draft model loaded")
            # where the library samples by default (Pair.drafter): on the device for a
            # static draft on CUDA, as the autoregressive baseline's Generator does
            kind = (DeviceModelDrafter if samples_on_device(self.draft, self.sampling)
                    else ModelDrafter)
            drafter = kind(self.draft, self.sampling, gamma)
        tokens, s, out = self._run(drafter, prompt, n, seed)
        g = s.generation
        t_ms, d_ms = _ms_per_call(s.target), _ms_per_call(s.draft)
        betas = g.beta_per_position
        out.update({
            "gamma": gamma, "iterations": g.iterations, "target_calls": s.target.calls,
            "draft_calls": s.draft.calls,
            "accepted_per_iteration": list(g.accepted_per_iteration),
            "drafted_per_iteration": list(g.drafted_per_iteration),
            "acceptance_rate": g.acceptance_rate, "alpha": g.alpha,
            "tokens_per_iteration": g.tokens_per_iteration, "draft_s": s.draft_s,
            "verify_s": s.verify_s,
            "host_ms_per_iteration": 1e3 * s.host_s / max(1, g.iterations),
            "cost_ratio_c": d_ms / t_ms if t_ms == t_ms and d_ms == d_ms else None,
            "target": {"mean_call_ms": t_ms}, "draft": {"mean_call_ms": d_ms},
            "beta_sum": float(sum(betas)), "beta_count": len(betas),
        })
        return tokens, out


    def pipelined(self, prompt, n: int, gamma: int, *, seed: int | None = 0):
        """Pipelined decoding with the draft model (the Generator's ``pipelined``; sampled:
        drawn on the device): the statistics of :meth:`_run` and the loop's ``pipeline``
        dict (iterations, warm ones, draft calls waited for and in the shadow, the seconds
        of each part)."""
        from quickdraft.generation import ModelDrafter
        from quickdraft.ort_backend.device_draft import DeviceModelDrafter

        kind = ModelDrafter if self.sampling.greedy else DeviceModelDrafter
        drafter = kind(self.draft, self.sampling, gamma)
        tokens, s, out = self._run(drafter, prompt, n, seed, pipelined=True)
        out.update(s.as_dict()["pipeline"])
        out["target"] = {"mean_call_ms": _ms_per_call(s.target)}
        out["draft"] = {"mean_call_ms": _ms_per_call(s.draft)}
        out["decode_s"] = s.decode_s
        betas = s.generation.beta_per_position
        out["beta_sum"], out["beta_count"] = float(sum(betas)), len(betas)
        return tokens, out


def autoregressive(pair: LoadedPair, prompt: list[int], n: int) -> tuple[list[int], dict]:
    """Greedy autoregressive decoding of ``n`` tokens: (tokens, statistics)."""
    return pair.runner.autoregressive(prompt, n)


def speculative(pair: LoadedPair, prompt: list[int], n: int, gamma: int,
                drafter=None) -> tuple[list[int], dict]:
    """Greedy speculative decoding: (tokens, statistics). ``drafter`` replaces the draft
    model's own proposals (the controlled-alpha drafter)."""
    return pair.runner.speculative(prompt, n, gamma, drafter=drafter)


# ----------------------------------------------------------------------------- costs


def step_costs(model, prompt: list[int], lengths: list[int], *, reps: int,
               warmup: int = 3, greedy: bool = False) -> dict:
    """Median ms of one forward call of ``k`` tokens after the prompt, for k in ``lengths``,
    through the DecodeState protocol (append, then rewind to the prompt: the cache length
    stays fixed). Includes the host copy of the logits, as in generation. Three warm-up
    calls per length: ONNX Runtime captures a CUDA graph on a step's third run. ``greedy``:
    through ``append_greedy`` (token ids to the host, not logits), as greedy decoding calls."""
    import statistics

    state = model.new_state()
    append = state.append_greedy if greedy else state.append
    append(list(prompt))
    base = len(prompt)
    out = {}
    for k in lengths:
        toks = [int(t) for t in (list(prompt) * (k // max(1, len(prompt)) + 1))[:k]]
        times = []
        for r in range(warmup + reps):
            t0 = time.perf_counter()
            append(toks)
            dt = time.perf_counter() - t0
            state.rewind(base)
            if r >= warmup:
                times.append(dt)
        out[k] = 1e3 * statistics.median(times)
    state.close()  # its cache buffers go back to the model (a static model's pool)
    return out
