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

Loading, the manifest checks and the session are shared with the dynamic-cache wrapper
(:class:`quickdraft.ort_backend.model.ExportedModel`); generation on these models is
:class:`quickdraft.ort_backend.Generator`'s (``FastGenerator``, importable from here too, is
a ``Generator`` with whole-generation calls for measurements).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from quickdraft.manifest import GREEDY_OUTPUT
from quickdraft.ort_backend.device import Device
from quickdraft.ort_backend.model import ExportedModel, ModelFolderError, TokenState

__all__ = [
    "StaticOrtModel",
    "StaticDecodeState",
    "StaticModelError",
    "STATIC_INPUTS",
]

_INPUT_IDS, _MASK, _LOGITS = "input_ids", "attention_mask", "logits"
STATIC_INPUTS = (_INPUT_IDS, _MASK)  # besides the per-layer past keys and values
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class StaticModelError(ModelFolderError):
    """A folder that is not a static-cache export this backend can run."""


class StaticOrtModel(ExportedModel):
    """A static-cache decoder on one ``InferenceSession``; a ``LanguageModel``.

    Args:
        folder: an exported folder with ``quickdraft.json`` (kv_cache "static").
        device: where to run (``Device("cpu")`` or ``Device("cuda", 0)``).
        max_length: tokens the caches hold (default: the manifest's ``max_cache_length``;
            at most its ``max_length``, the model's context). Memory: 2 * layers *
            kv_heads * max_length * head_dim values.
        graph_steps: step lengths that get their own preallocated binding (and, with
            ``cuda_graph``, their own CUDA graph), e.g. ``(1,)`` for a draft model and
            ``(1, gamma + 1)`` for a target. Other lengths run through a generic binding.
        cuda_graph: capture and replay CUDA graphs for ``graph_steps`` (CUDA only).
        provider_options: extra CUDA execution provider options (strings), merged over
            ``device_id`` and ``enable_cuda_graph``.
        options (onnxruntime.SessionOptions | None): the session's options (default:
            quickdraft's).

    The model owns one set of cache buffers (so nothing is duplicated): ``new_state()``
    starts a new sequence in them and makes any earlier state of this model unusable.
    """

    KV_CACHE = "static"
    DTYPES = tuple(_NP_DTYPES)
    ERROR = StaticModelError

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

        if cuda_graph and device.kind != "cuda":
            raise ValueError("cuda_graph needs device cuda (CUDA graphs are a CUDA feature)")
        cuda_options = {"enable_cuda_graph": "1"} if cuda_graph else {}
        cuda_options.update(provider_options or {})
        super().__init__(folder, device, options, cuda_options)
        m = self.manifest
        self.max_cache = int(max_length) if max_length is not None else int(m.max_cache_length)
        if not 1 <= self.max_cache <= m.max_length:
            raise ValueError(
                f"max_length must be in [1, {m.max_length}] for this export (the model's "
                f"context), got {max_length}"
            )
        self.cuda_graph = bool(cuda_graph)
        self.graph_steps = tuple(sorted({int(s) for s in graph_steps}))
        if any(s < 1 or s > self.max_cache for s in self.graph_steps):
            raise ValueError(f"graph_steps must be in [1, {self.max_cache}], got {graph_steps}")
        # the CUDA provider's options in use ({} on the CPU)
        self.provider_options = self.session.get_provider_options().get(
            "CUDAExecutionProvider", {}) if device.kind == "cuda" else {}
        self.np_dtype = _NP_DTYPES[m.dtype]
        kind, dev = device.kind, device.device_id
        shape = (1, m.num_kv_heads, self.max_cache, m.head_dim)
        # one buffer per cache tensor, bound as past AND present: written in place. (On the
        # CPU an OrtValue made from a NumPy array uses that array's memory: one array each.)
        self.cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.np_dtype), kind, dev)
                      for _ in self.past_names]
        self._mask_host = np.zeros((1, self.max_cache), dtype=np.int64)
        self._mask = ort.OrtValue.ortvalue_from_numpy(self._mask_host, kind, dev)
        self._on_device = kind != "cpu"  # host arrays must be copied into device buffers
        # the graph's greedy_tokens output (quickdraft.export.greedy), when it has one
        self.has_greedy = GREEDY_OUTPUT in m.output_names
        self._steps: dict[int, _StepBinding] = {}
        for graph_id, s in enumerate(self.graph_steps, start=1):
            self._steps[s] = _StepBinding(self, s, graph_id)
        self._generic = self.session.io_binding()
        self._generic_options = _run_options(-1 if self.cuda_graph else None)
        self._generic_greedy = None  # the greedy_tokens OrtValue of the last generic run
        self._owner: StaticDecodeState | None = None
        self.calls = {"captured_steps": 0, "generic_steps": 0, "uploads_skipped": 0}

    def _check_manifest(self) -> None:
        super()._check_manifest()
        m = self.manifest
        if m.has_position_ids or not m.has_attention_mask:
            raise StaticModelError(
                f"{self.folder}: a static graph takes attention_mask and no position_ids "
                "(GroupQueryAttention derives positions from the mask)"
            )

    def __repr__(self) -> str:
        m = self.manifest
        graphs = ", cuda graphs" if self.cuda_graph else ""
        return (f"StaticOrtModel({str(self.folder)!r}, {m.architecture}, {m.num_layers} layers, "
                f"{m.dtype}, {self.device}, cache {self.max_cache}, steps {self.graph_steps}"
                f"{graphs})")

    # -- LanguageModel -------------------------------------------------------------------

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
        if self._on_device:  # on the CPU the bound buffer is the host array itself
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
        if self.has_greedy:
            io.bind_output(GREEDY_OUTPUT, kind, dev)
        self.session.run_with_iobinding(io, self._generic_options)
        outputs = io.get_outputs()  # presents (the cache buffers), logits, greedy tokens
        self._generic_greedy = outputs[-1] if self.has_greedy else None
        return outputs[-2] if self.has_greedy else outputs[-1]

    def run_greedy(self, tokens: Sequence[int], past_length: int) -> np.ndarray:
        """As :meth:`run`, returning the greedy token after each of ``tokens`` [k] int64 on
        the host: the graph's ``greedy_tokens`` (the argmax of each row, plus
        ``vocab_size`` for a row that is not finite), only k integers copied from the
        device."""
        if not self.has_greedy:
            raise ValueError(
                f"{self.folder}: this graph has no {GREEDY_OUTPUT} output (an export from "
                "before it was added); re-export it, or take the argmax of run()'s logits"
            )
        self.run(tokens, past_length)
        step = self._steps.get(len(tokens))
        if step is not None:
            return step.read_greedy()
        return np.array(self._generic_greedy.numpy()[0])

    def _bind_common(self, io) -> None:
        io.bind_ortvalue_input(_MASK, self._mask)
        for past, present, value in zip(self.past_names, self.present_names, self.cache):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)


def _run_options(graph_id: int | None):
    """RunOptions carrying ``gpu_graph_id``, or None without one: a RunOptions without the
    entry makes ONNX Runtime's Python ``run_with_iobinding`` look it up through a raised
    and caught exception on every call (tens of microseconds)."""
    if graph_id is None:
        return None
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


class _StepBinding:
    """A fixed-length step: its own input_ids, logits (and greedy tokens) buffers, binding
    and graph id.

    A 1-token step of a graph with ``greedy_tokens`` writes that output over its own
    ``input_ids`` buffer (the id is read by the embedding before the argmax is written), so
    in a greedy chain (draft tokens, autoregressive decoding) the next call's input is
    already on the device: its upload is skipped when the host knows the buffer holds it.
    """

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
        self.greedy = None  # the greedy_tokens buffer [1, length] int64
        self.chained = model.has_greedy and length == 1  # greedy output over input_ids
        if model.has_greedy:
            self.greedy = self.ids if self.chained else ort.OrtValue.ortvalue_from_shape_and_type(
                (1, length), np.int64, kind, dev)
            self.binding.bind_ortvalue_output(GREEDY_OUTPUT, self.greedy)
        self.options = _run_options(graph_id if model.cuda_graph else None)
        self.runs = 0
        self._on_device: list[int] | None = None  # the ids in the device buffer, if known

    def run(self, tokens: Sequence[int]):
        tokens = list(tokens)
        if not self.model._on_device:  # on the CPU the bound buffer is ids_host itself
            self.ids_host[0, :] = tokens
        elif tokens == self._on_device:  # a greedy chain: the last argmax is the input
            self.model.calls["uploads_skipped"] += 1
        else:
            self.ids_host[0, :] = tokens
            self.ids.update_inplace(self.ids_host)  # same device address: what graphs replay
        self.model.session.run_with_iobinding(self.binding, self.options)
        self.runs += 1
        # a chained step overwrote its input with the argmax, unknown until read
        self._on_device = None if self.chained else tokens
        return self.logits

    def read_greedy(self) -> np.ndarray:
        """The greedy tokens of the last run, [length] int64 on the host (a copy)."""
        out = np.array(self.greedy.numpy()[0])  # [length]
        if self.chained:
            self._on_device = out.tolist()
        return out


class StaticDecodeState(TokenState):
    """A :class:`~quickdraft.protocols.DecodeState` over a :class:`StaticOrtModel`.

    ``rewind`` only shortens the valid length: positions past it are overwritten by the
    next ``append``.
    """

    def _check_owner(self) -> None:
        if self.model._owner is not self:
            raise RuntimeError(
                "this decode state is stale: its model started a newer state, which now "
                "owns the static cache buffers"
            )

    def append_device(self, tokens: Sequence[int]):
        """Consume ``tokens``; return the logits OrtValue [1, len(tokens), V] on the device."""
        self._check_owner()
        tokens = self._checked(tokens)
        if not tokens:
            raise ValueError("append_device needs at least one token")
        value = self.model.run(tokens, len(self._tokens))
        self._tokens.extend(tokens)
        return value

    def append(self, tokens: Sequence[int]) -> np.ndarray:
        """Consume ``tokens``; return logits [len(tokens), V] on the host (a copy)."""
        if len(tokens) == 0:
            self._check_owner()
            return np.zeros((0, self.model.vocab_size), dtype=self.model.np_dtype)
        return np.array(self.append_device(tokens).numpy()[0])

    def append_greedy(self, tokens: Sequence[int]) -> np.ndarray:
        """Consume ``tokens``; return the greedy token after each of them [len(tokens)]
        int64: the argmax of each row's logits (the first on ties), computed on the device
        by the graph's ``greedy_tokens`` output, so only the token ids reach the host
        (``quickdraft.sampling.greedy_tokens`` of :meth:`append`'s logits for a graph
        without it). Refuses a row with a NaN or an infinity anywhere in it (stricter than
        ``greedy_tokens``, which looks at the row's maximum: raw model logits are finite)."""
        self._check_owner()
        tokens = self._checked(tokens)
        if not tokens:
            return np.zeros(0, dtype=np.int64)
        if not self.model.has_greedy:
            from quickdraft.sampling import greedy_tokens

            return greedy_tokens(self.append(tokens))
        choices = self.model.run_greedy(tokens, len(self._tokens))  # [k]
        self._tokens.extend(tokens)
        if choices.max() >= self.model.vocab_size:
            raise ValueError(
                "logits contain NaN or an infinity; the model produced invalid scores (with "
                "fp16 weights this is usually an overflow: export it in fp32, on the CPU "
                "with --kv-cache static or anywhere with the default dynamic cache)"
            )
        return choices

    def rewind(self, length: int) -> None:
        self._check_owner()
        self._check_rewind(length)
        del self._tokens[length:]


def __getattr__(name: str):
    if name == "FastGenerator":  # lives with the generator it specialises
        from quickdraft.ort_backend.generator import FastGenerator

        return FastGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
