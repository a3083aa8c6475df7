"""The fast path: a decoder with static KV caches on ONNX Runtime (CPU or CUDA).

A static export (``quickdraft export --kv-cache static``, see :mod:`quickdraft.export.static`)
is a GroupQueryAttention graph built by onnxruntime-genai's model builder. Its interface:

* inputs ``input_ids`` int64 [1, S], ``attention_mask`` int64 [1, T] and, per layer,
  ``past_key_values.{i}.key`` / ``.value`` [1, kv_heads, P, head_dim];
* outputs ``logits`` [1, S, V] and ``present.{i}.key`` / ``.value``.

Inside the graph, GroupQueryAttention gets ``seqlens_k = sum(attention_mask) - 1`` and
``total_sequence_length = T`` (the mask's width), and applies the rotary embedding itself
at positions ``seqlens_k + 1 - S .. seqlens_k``. So the cache length is told by the number
of ones in the mask, not by the cache's shape. :class:`StaticOrtModel` uses that:

* one buffer per layer and per key/value of [1, kv_heads, max_length, head_dim], made once,
  is bound as both the past input and the present output: GroupQueryAttention writes the
  new keys and values into it in place (ORT shares the buffer when both point at the same
  memory);
* ``attention_mask`` is always [1, max_length]: ones over the valid length, zeros after;
* rolling back after a rejection is only a shorter valid length (no copy, no kernel);
* so the shape of every call depends on the number of new tokens alone: the draft step
  (1 token) and the verify step (gamma + 1 tokens) have fixed shapes.

On CUDA, ``cuda_graph=True`` turns on ONNX Runtime's CUDA graphs (``enable_cuda_graph``).
Each step length in ``graph_steps`` gets its own IOBinding with its inputs and outputs in
device buffers made once (``input_ids`` [1, S], the mask, the caches and ``logits``
[1, S, V]); a call writes the new token ids and the mask into those buffers in place and
runs with the run option ``gpu_graph_id`` set to that length's own id (1, 2, ...). ORT
runs each id normally twice (its warm-up for memory allocation), captures it on the third
run and replays the graph from then on. Any other length (the prompt, a short final
iteration) runs uncaptured with ``gpu_graph_id = -1``. ORT keeps captured graphs per
thread: call a model from the thread that captured it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quickdraft.export.manifest import ModelManifest, load_manifest
from quickdraft.ort_backend.device import Device, session_options

__all__ = [
    "StaticOrtModel",
    "StaticDecodeState",
    "StaticModelError",
    "FastGenerator",
    "STATIC_INPUTS",
]

_INPUT_IDS, _MASK, _LOGITS = "input_ids", "attention_mask", "logits"
STATIC_INPUTS = (_INPUT_IDS, _MASK)  # besides the per-layer past keys and values
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
_ORT_TYPES = {"fp32": "tensor(float)", "fp16": "tensor(float16)"}


class StaticModelError(ValueError):
    """A folder that is not a static-cache export this backend can run."""


class StaticOrtModel:
    """A static-cache decoder on one ``InferenceSession``; a ``LanguageModel``.

    Args:
        folder: an exported folder with ``quickdraft.json`` (kv_cache "static").
        device: where to run (``Device("cpu")`` or ``Device("cuda", 0)``).
        max_length: tokens the caches hold (default and upper bound: the manifest's
            ``max_length``). Memory: 2 * layers * kv_heads * max_length * head_dim values.
        graph_steps: step lengths that get their own preallocated binding (and, with
            ``cuda_graph``, their own CUDA graph), e.g. ``(1,)`` for a draft model and
            ``(1, gamma + 1)`` for a target. Other lengths run through a generic binding.
        cuda_graph: capture and replay CUDA graphs for ``graph_steps`` (CUDA only).
        provider_options: extra CUDA execution provider options (strings), merged over
            ``device_id`` and ``enable_cuda_graph``.
        options: ``onnxruntime.SessionOptions`` (default: quickdraft's).

    The model owns one set of cache buffers (so nothing is duplicated): ``new_state()``
    starts a new sequence in them and makes any earlier state of this model unusable.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        device: Device = Device("cpu"),
        *,
        max_length: int | None = None,
        graph_steps: Sequence[int] = (1,),
        cuda_graph: bool = False,
        provider_options: dict | None = None,
        options=None,
    ):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest: ModelManifest = load_manifest(self.folder)
        m = self.manifest
        self.device = device
        _check_manifest(m, self.folder)
        if cuda_graph and device.kind != "cuda":
            raise ValueError("cuda_graph needs device cuda (CUDA graphs are a CUDA feature)")
        self.max_cache = int(max_length) if max_length is not None else int(m.max_length)
        if not 1 <= self.max_cache <= m.max_length:
            raise ValueError(
                f"max_length must be in [1, {m.max_length}] for this export, got {max_length}"
            )
        self.cuda_graph = bool(cuda_graph)
        self.graph_steps = tuple(sorted({int(s) for s in graph_steps}))
        if any(s < 1 or s > self.max_cache for s in self.graph_steps):
            raise ValueError(f"graph_steps must be in [1, {self.max_cache}], got {graph_steps}")
        if device.kind == "cuda":
            from quickdraft.ort_backend.device import CudaUnavailableError, cuda_problem

            problem = cuda_problem()
            if problem is not None:
                raise CudaUnavailableError(f"CUDA was requested but {problem}")
            cuda_options = {"device_id": str(device.device_id)}
            if self.cuda_graph:
                cuda_options["enable_cuda_graph"] = "1"
            cuda_options.update({k: str(v) for k, v in (provider_options or {}).items()})
            providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.provider_options = providers[0][1] if device.kind == "cuda" else {}
        path = self.folder / m.model_file
        options = options if options is not None else session_options()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=providers)
        except Exception as e:  # ORT raises its own exception types
            raise RuntimeError(
                f"onnxruntime could not load {path} on {device}: {type(e).__name__}: {e}"
            ) from e
        if device.kind == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"the CUDA execution provider did not start for {path}")
        _check_graph(m, self.session, self.folder)
        self.np_dtype = _NP_DTYPES[m.dtype]
        self._past = [t.format(i=i) for i in range(m.num_layers)
                      for t in (m.past_key_template, m.past_value_template)]
        self._present = [t.format(i=i) for i in range(m.num_layers)
                         for t in (m.present_key_template, m.present_value_template)]
        kind, dev = device.kind, device.device_id
        shape = (1, m.num_kv_heads, self.max_cache, m.head_dim)
        # one buffer per cache tensor, bound as past AND present: written in place. (On the
        # CPU an OrtValue made from a NumPy array uses that array's memory: one array each.)
        self.cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.np_dtype), kind, dev)
                      for _ in self._past]
        self._mask_host = np.zeros((1, self.max_cache), dtype=np.int64)
        self._mask = ort.OrtValue.ortvalue_from_numpy(self._mask_host, kind, dev)
        self._steps: dict[int, _StepBinding] = {}
        for graph_id, s in enumerate(self.graph_steps, start=1):
            self._steps[s] = _StepBinding(self, s, graph_id)
        self._generic = self.session.io_binding()
        self._generic_options = ort.RunOptions()
        if self.cuda_graph:
            self._generic_options.add_run_config_entry("gpu_graph_id", "-1")
        self._owner: StaticDecodeState | None = None
        self.calls = {"captured_steps": 0, "generic_steps": 0}

    def __repr__(self) -> str:
        m = self.manifest
        graphs = ", cuda graphs" if self.cuda_graph else ""
        return (f"StaticOrtModel({str(self.folder)!r}, {m.architecture}, {m.num_layers} layers, "
                f"{m.dtype}, {self.device}, cache {self.max_cache}, steps {self.graph_steps}"
                f"{graphs})")

    # -- LanguageModel -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def max_length(self) -> int:
        return self.max_cache

    def new_state(self) -> StaticDecodeState:
        state = StaticDecodeState(self)
        self._owner = state
        return state

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the KV cache buffers."""
        return sum(int(np.prod(v.shape())) for v in self.cache) * np.dtype(self.np_dtype).itemsize

    # -- running the graph ---------------------------------------------------------------

    def run(self, tokens: Sequence[int], past_length: int):
        """Write ``tokens`` at positions ``past_length ..`` of the caches; return the logits
        OrtValue [1, len(tokens), V] on the model's device.

        A length in ``graph_steps`` returns that length's own output buffer, overwritten by
        its next call; copy what you keep (``.numpy()`` copies to the host).
        """
        k = len(tokens)
        total = past_length + k
        if total > self.max_cache:
            raise ValueError(
                f"sequence of {total} tokens exceeds the static cache of {self.max_cache} "
                "tokens; export or load with a larger max_length"
            )
        mask = self._mask_host
        mask[0, :total] = 1
        mask[0, total:] = 0
        self._mask.update_inplace(mask)  # the mask buffer is bound by every binding
        step = self._steps.get(k)
        if step is not None:
            self.calls["captured_steps"] += 1
            return step.run(tokens)
        self.calls["generic_steps"] += 1
        io = self._generic
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        kind, dev = self.device.kind, self.device.device_id
        import onnxruntime as ort

        ids = np.asarray(tokens, dtype=np.int64).reshape(1, k)
        io.bind_ortvalue_input(_INPUT_IDS, ort.OrtValue.ortvalue_from_numpy(ids, kind, dev))
        self._bind_common(io)
        io.bind_output(_LOGITS, kind, dev)
        self.session.run_with_iobinding(io, self._generic_options)
        return io.get_outputs()[-1]

    def _bind_common(self, io) -> None:
        io.bind_ortvalue_input(_MASK, self._mask)
        for past, present, value in zip(self._past, self._present, self.cache):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)


class _StepBinding:
    """A fixed-length step: its own input_ids and logits buffers, binding and graph id."""

    def __init__(self, model: StaticOrtModel, length: int, graph_id: int):
        import onnxruntime as ort

        kind, dev = model.device.kind, model.device.device_id
        self.model = model
        self.length = length
        self.graph_id = graph_id
        self.ids_host = np.zeros((1, length), dtype=np.int64)
        self.ids = ort.OrtValue.ortvalue_from_numpy(self.ids_host, kind, dev)
        shape = (1, length, model.manifest.vocab_size)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type(shape, model.np_dtype, kind, dev)
        self.binding = model.session.io_binding()
        self.binding.bind_ortvalue_input(_INPUT_IDS, self.ids)
        model._bind_common(self.binding)
        self.binding.bind_ortvalue_output(_LOGITS, self.logits)
        self.options = ort.RunOptions()
        if model.cuda_graph:
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.runs = 0

    def run(self, tokens: Sequence[int]):
        self.ids_host[0, :] = tokens
        self.ids.update_inplace(self.ids_host)  # same device address: what a graph replays
        self.model.session.run_with_iobinding(self.binding, self.options)
        self.runs += 1
        return self.logits


class StaticDecodeState:
    """A :class:`~quickdraft.protocols.DecodeState` over a :class:`StaticOrtModel`.

    ``rewind`` only shortens the valid length: positions past it are overwritten by the
    next ``append``.
    """

    def __init__(self, model: StaticOrtModel):
        self.model = model
        self._tokens: list[int] = []

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def _check_owner(self) -> None:
        if self.model._owner is not self:
            raise RuntimeError(
                "this decode state is stale: its model started a newer state, which now "
                "owns the static cache buffers"
            )

    def append_device(self, tokens: Sequence[int]):
        """Consume ``tokens``; return the logits OrtValue [1, len(tokens), V] on the device."""
        self._check_owner()
        tokens = [int(t) for t in tokens]
        vocab = self.model.vocab_size
        if not tokens:
            raise ValueError("append_device needs at least one token")
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        value = self.model.run(tokens, len(self._tokens))
        self._tokens.extend(tokens)
        return value

    def append(self, tokens: Sequence[int]) -> np.ndarray:
        """Consume ``tokens``; return logits [len(tokens), V] on the host (a copy)."""
        if len(tokens) == 0:
            self._check_owner()
            return np.zeros((0, self.model.vocab_size), dtype=self.model.np_dtype)
        return np.array(self.append_device(tokens).numpy()[0])

    def rewind(self, length: int) -> None:
        self._check_owner()
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"cannot rewind to {length}: state holds {len(self._tokens)} tokens")
        del self._tokens[length:]


# -- checks --------------------------------------------------------------------------------


def _check_manifest(m: ModelManifest, folder: Path) -> None:
    if m.kv_cache != "static":
        raise StaticModelError(
            f"{folder}: kv_cache is {m.kv_cache!r}; the static backend runs folders exported "
            "with --kv-cache static (use quickdraft.ort_backend.OrtModel for the others)"
        )
    if m.kv_layout != "bnsh":
        raise StaticModelError(f"{folder}: kv_layout {m.kv_layout!r} is not 'bnsh'")
    if m.dtype not in _NP_DTYPES:
        raise StaticModelError(
            f"{folder}: static graphs of dtype {m.dtype!r} are not supported (fp32 or fp16)"
        )
    if m.has_position_ids or not m.has_attention_mask:
        raise StaticModelError(
            f"{folder}: a static graph takes attention_mask and no position_ids "
            "(GroupQueryAttention derives positions from the mask)"
        )
    missing = [n for n in [m.model_file, *m.external_data] if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is incomplete: {', '.join(missing)} missing; re-export the model"
        )


def _check_graph(m: ModelManifest, session, folder: Path) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    past = [t.format(i=i) for i in range(m.num_layers)
            for t in (m.past_key_template, m.past_value_template)]
    present = [t.format(i=i) for i in range(m.num_layers)
               for t in (m.present_key_template, m.present_value_template)]

    def fail(what: str) -> None:
        raise StaticModelError(
            f"{folder}: {m.model_file} is not a static-cache graph quickdraft can run: {what}"
        )

    if set(inputs) != {*STATIC_INPUTS, *past}:
        fail(f"inputs {sorted(inputs)} are not input_ids, attention_mask and "
             f"{m.num_layers} layers' past keys and values")
    if not {_LOGITS, *present} <= set(outputs):
        fail(f"outputs {sorted(outputs)} lack logits or a present key/value")
    for name in past:
        if inputs[name].type != _ORT_TYPES[m.dtype]:
            fail(f"{name} is {inputs[name].type}, the manifest says {m.dtype}")
        shape = inputs[name].shape
        if len(shape) != 4 or shape[1] != m.num_kv_heads:
            fail(f"{name} has shape {shape}, expected [1, {m.num_kv_heads}, seq, head_dim]")


# -- a generator for the fast path --------------------------------------------------------


class FastGenerator:
    """Autoregressive and speculative generation on static models, verification on the
    device (:mod:`quickdraft.ort_backend.verify_graph`), with a time breakdown.

    The loop is :func:`quickdraft.generation.speculative_stream`'s: the same uniforms per
    iteration (``rng.random(2 g + 1)``, g = ``draft_length(gamma, remaining)``) and the
    same draft (:class:`~quickdraft.generation.ModelDrafter`), so with a seed it gives the
    NumPy path's tokens (up to rounding at a decision boundary); only the verification runs
    as a graph next to the target's logits, which never cross to the host.

    ``target`` should have ``graph_steps`` covering 1 and every g + 1 used (then each
    iteration's target call has a fixed shape); ``draft`` (1, 2).
    """

    def __init__(self, target: StaticOrtModel, draft: StaticOrtModel | None = None, *,
                 sampling=None, compute: str = "float32"):
        from quickdraft.sampling import SamplingConfig

        self.target, self.draft = target, draft
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.compute = compute
        self.eos_ids: frozenset[int] = frozenset(target.manifest.eos_token_ids or [])
        self._verifiers: dict = {}
        if draft is not None and draft.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft vocabulary ({draft.vocab_size}) differs from the target's "
                f"({target.vocab_size})"
            )

    def verifier(self, gamma: int):
        from quickdraft.ort_backend.verify_graph import DeviceVerifier

        if gamma not in self._verifiers:
            self._verifiers[gamma] = DeviceVerifier(
                gamma, self.target.vocab_size, self.sampling, device=self.target.device,
                logits_dtype=self.target.manifest.dtype, compute=self.compute)
        return self._verifiers[gamma]

    def _check(self, prompt_ids, max_new_tokens) -> list[int]:
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(ids) + max_new_tokens > self.target.max_length:
            raise ValueError(
                f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) exceeds the static "
                f"cache of {self.target.max_length} tokens"
            )
        return ids

    def _truncate(self, out: list[int]) -> tuple[list[int], bool]:
        for i, t in enumerate(out):
            if t in self.eos_ids:
                return out[: i + 1], True
        return out, False

    def autoregressive(self, prompt_ids, max_new_tokens: int, *, seed: int | None = None):
        """One target call per token. Returns (tokens, stats dict)."""
        import time

        from quickdraft.sampling import adjust_logits, sample_token

        ids = self._check(prompt_ids, max_new_tokens)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        state = self.target.new_state()
        logits = state.append(ids)[-1]
        prefill_s = time.perf_counter() - start
        target_s, tokens = 0.0, []
        while True:
            q = adjust_logits(logits, self.sampling)
            token = sample_token(q, float(rng.random()))
            tokens.append(token)
            if len(tokens) >= max_new_tokens or token in self.eos_ids:
                break
            t0 = time.perf_counter()
            logits = state.append([token])[-1]
            target_s += time.perf_counter() - t0
        total = time.perf_counter() - start
        steps = len(tokens) - 1
        return tokens, {
            "mode": "autoregressive", "new_tokens": len(tokens), "target_calls": steps + 1,
            "prefill_s": prefill_s, "target_s": target_s, "total_s": total,
            "host_s": total - prefill_s - target_s,
            "target_ms_per_step": 1e3 * target_s / steps if steps else float("nan"),
            "tokens_per_s": len(tokens) / total,
        }

    def speculative(self, prompt_ids, max_new_tokens: int, gamma: int, *,
                    seed: int | None = None):
        """Speculative sampling with verification on the device. Returns (tokens, stats)."""
        import time

        from quickdraft.generation import ModelDrafter, draft_length
        from quickdraft.ort_backend.verify_graph import advance_device

        if self.draft is None:
            raise ValueError("speculative decoding needs a draft model")
        if int(gamma) != gamma or gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {gamma}")
        ids = self._check(prompt_ids, max_new_tokens)
        for g in range(1, gamma + 1):  # sessions made before the clock starts (kept)
            self.verifier(g)
        prompt_len = len(ids)
        rng = np.random.default_rng(seed)
        times = {"draft_s": 0.0, "target_s": 0.0, "verify_s": 0.0}
        start = time.perf_counter()
        state = self.target.new_state()
        drafter = ModelDrafter(_Timed(self.draft, times, "draft_s"), self.sampling)
        if len(ids) > 1:  # prefill both caches with all but the last prompt token
            state.append_device(ids[:-1])
            drafter.state.append(ids[:-1])
        prefill_s = time.perf_counter() - start
        times["draft_s"] = 0.0
        accepted, iterations, draft_calls = [], 0, 0
        while len(ids) - prompt_len < max_new_tokens:
            remaining = max_new_tokens - (len(ids) - prompt_len)
            g = draft_length(gamma, remaining)
            u = rng.random(2 * g + 1)
            verify = self.verifier(g)
            cand = drafter.get_candidates(ids, g, u[:g])
            t0 = time.perf_counter()
            logits = advance_device(state, ids + cand.tokens.tolist(), g + 1)
            t1 = time.perf_counter()
            n, token = verify(logits, cand.probs, cand.tokens, u[g: 2 * g], float(u[2 * g]))
            t2 = time.perf_counter()
            times["target_s"] += t1 - t0
            times["verify_s"] += t2 - t1
            out, stop = self._truncate((cand.tokens[:n].tolist() + [token])[:remaining])
            ids += out
            iterations += 1
            draft_calls += cand.model_calls
            accepted.append(n)
            if stop:
                break
        total = time.perf_counter() - start
        new = ids[prompt_len:]
        decode = total - prefill_s
        return new, {
            "mode": "speculative", "gamma": gamma, "new_tokens": len(new),
            "iterations": iterations, "target_calls": iterations, "draft_calls": draft_calls,
            "accepted_per_iteration": accepted,
            "acceptance_rate": sum(accepted) / max(1, gamma * iterations),
            "tokens_per_iteration": len(new) / max(1, iterations),
            "prefill_s": prefill_s, **times, "total_s": total,
            "host_s": decode - sum(times.values()),
            "host_ms_per_iteration": 1e3 * (decode - sum(times.values())) / max(1, iterations),
            "tokens_per_s": len(new) / total,
        }


class _Timed:
    """A LanguageModel whose states add their ``append`` time to ``times[key]``."""

    def __init__(self, model, times: dict, key: str):
        self.model, self.times, self.key = model, times, key

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_length(self) -> int:
        return self.model.max_length

    def new_state(self):
        return _TimedState(self.model.new_state(), self.times, self.key)


class _TimedState:
    def __init__(self, inner, times: dict, key: str):
        self.inner, self.times, self.key = inner, times, key

    @property
    def tokens(self) -> list[int]:
        return self.inner.tokens

    def append(self, tokens):
        import time

        t0 = time.perf_counter()
        out = self.inner.append(tokens)
        self.times[self.key] += time.perf_counter() - t0
        return out

    def rewind(self, length: int) -> None:
        self.inner.rewind(length)
