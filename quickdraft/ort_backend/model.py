"""One exported decoder graph on ONNX Runtime (dynamic caches), and its sequence state.

:class:`ExportedModel` is what every loaded graph shares (the manifest checked against the
folder and the graph, one session); :class:`OrtModel` runs optimum's graphs, whose caches
grow per call and stay on the device; :class:`OrtState` is one sequence over it.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quickdraft.manifest import (
    INT8_FOLD_OPTION,
    ONNX_ELEMENT_TYPES,
    ModelFolderError,
    ModelManifest,
    load_manifest,
)
from quickdraft.ort_backend.binding import Binder, python_ortvalue
from quickdraft.ort_backend.device import (
    DEFAULT_ATTENTION,
    Device,
    check_attention,
    create_session,
    helper_options,
    session_options,
)
from quickdraft.ort_backend.slicer import CacheSlicer
from quickdraft.timing import ModelTimes

__all__ = [
    "OrtModel", "OrtState", "ExportedModel", "TokenState", "ModelFolderError", "StateThreadError",
]

# manifest dtype -> the type ONNX Runtime reports for the caches and logits
ORT_TYPES = {"fp32": "tensor(float)", "fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}
_INPUT_IDS, _MASK, _POSITIONS, _LOGITS = "input_ids", "attention_mask", "position_ids", "logits"


def _logits_to_numpy(value) -> np.ndarray:
    """A host OrtValue of logits [1, k, V] (fp32, fp16 or bf16) -> float32 [k, V] (a copy)."""
    if value.element_type() == ONNX_ELEMENT_TYPES["bf16"]:  # no NumPy type: widen the bits
        count = int(np.prod(value.shape()))
        raw = (ctypes.c_uint16 * count).from_address(value.data_ptr())
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(value.shape())[0]
    return np.array(value.numpy()[0], dtype=np.float32)  # copy: ORT owns that buffer


class ExportedModel:
    """What every exported graph shares: its folder and manifest, checked against each
    other, and one ``InferenceSession`` on ``device``.

    Subclasses name the ``kv_cache`` kind they run (``KV_CACHE``), the dtypes they read
    (``DTYPES``) and the error they raise (``ERROR``).
    """

    KV_CACHE = "dynamic"
    DTYPES: tuple[str, ...] = tuple(ORT_TYPES)
    ERROR: type[ModelFolderError] = ModelFolderError
    # ONNX Runtime's memory patterns are planned and kept per input shape: right for fixed
    # step shapes (static caches), a growing store for caches whose length changes every
    # call (benchmarks/memory_growth.py: 3.4x less growth per token without them)
    MEM_PATTERN = False

    def __init__(self, folder: str | os.PathLike, device: Device = Device("cpu"),
                 options=None, cuda_options: dict | None = None,
                 attention: str = DEFAULT_ATTENTION):
        self.folder = Path(folder)
        self.attention = check_attention(attention)  # GroupQueryAttention's CUDA kernel
        self.manifest: ModelManifest = load_manifest(self.folder, error=self.ERROR)
        self.device = device
        self._check_manifest()
        self.options = options if options is not None else session_options()
        self.options.enable_mem_pattern = self.MEM_PATTERN
        if self.manifest.weights == "int8":  # fold the int8 matrices to fp32 at load
            self.options.add_session_config_entry(INT8_FOLD_OPTION, "1")
        path = self._model_path
        self.session = create_session(path, device, self.options, cuda_options,
                                      attention=self.attention)
        _check_graph(self.manifest, self.session, self.folder, self.ERROR)
        self.past_names = self.manifest.past_names()
        self.present_names = self.manifest.present_names()

    def _check_manifest(self) -> None:
        m, folder, error = self.manifest, self.folder, self.ERROR
        if m.kv_cache != self.KV_CACHE:
            raise error(
                f"{folder}: kv_cache is {m.kv_cache!r}; {type(self).__name__} runs "
                f"{self.KV_CACHE!r} exports (quickdraft.ort_backend.load_model picks the "
                "class from the manifest)"
            )
        if m.kv_layout != "bnsh":
            raise error(
                f"{folder}: kv_layout {m.kv_layout!r} is not supported; the backend binds "
                "caches as [batch, kv_heads, seq, head_dim] ('bnsh')"
            )
        if m.dtype not in self.DTYPES:
            raise error(
                f"{folder}: dtype {m.dtype!r} in the manifest is not one "
                f"{type(self).__name__} runs ({', '.join(self.DTYPES)})"
            )
        if m.num_layers < 1 or m.max_cache_length < 1 or m.vocab_size < 1:
            raise error(
                f"{folder}: the manifest needs num_layers, max_cache_length and vocab_size "
                f">= 1 (got {m.num_layers}, {m.max_cache_length}, {m.vocab_size})"
            )
        # every file the manifest names resolves inside the folder (symlinks followed)
        self._model_path = m.check_files(folder, error=error)

    @property
    def model_path(self):
        """The graph file the manifest names (checked inside the folder)."""
        return self._model_path

    # -- LanguageModel -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size


class OrtModel(ExportedModel):
    """One exported decoder graph with a dynamic cache on a CPU or CUDA ``InferenceSession``.

    A :class:`quickdraft.protocols.LanguageModel`: ``vocab_size``, ``max_length`` and
    ``new_state()``. ``folder`` holds ``quickdraft.json``; ``device`` is a resolved
    :class:`~quickdraft.ort_backend.device.Device` (see ``resolve_device``).
    """

    def __init__(self, folder: str | os.PathLike, device: Device = Device("cpu"),
                 options=None, attention: str = DEFAULT_ATTENTION):
        import onnxruntime as ort

        super().__init__(folder, device, options, attention=attention)
        m = self.manifest
        self._elem_type = ONNX_ELEMENT_TYPES[m.dtype]
        kind, dev_id = device.kind, device.device_id
        # device-resident int64 buffers, bound by pointer: ones (mask) and 0..max-1 (positions)
        self._ones = ort.OrtValue.ortvalue_from_numpy(
            np.ones((1, self.max_length), dtype=np.int64), kind, dev_id)
        self._positions = ort.OrtValue.ortvalue_from_numpy(
            np.arange(self.max_length, dtype=np.int64)[None], kind, dev_id)
        self._ones_ptr, self._positions_ptr = self._ones.data_ptr(), self._positions.data_ptr()
        empty_shape = [1, m.num_kv_heads, 0, m.head_dim]
        self._empty = [
            ort.OrtValue.ortvalue_from_shape_and_type(empty_shape, self._elem_type, kind, dev_id)
            for _ in self.past_names
        ]
        self._slicer = CacheSlicer(len(self.past_names), self._elem_type, device,
                                   helper_options())
        self._slicer_lock = threading.Lock()  # the slicer's one binding serves every state

    def __repr__(self) -> str:
        m = self.manifest
        return (f"OrtModel({str(self.folder)!r}, {m.architecture}, {m.num_layers} layers, "
                f"{m.dtype}, {self.device})")

    # -- LanguageModel -------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        return self.manifest.max_cache_length

    def new_state(self) -> OrtState:
        return OrtState(self)

    # -- running the graph ---------------------------------------------------------------

    def empty_cache(self) -> list:
        """Caches of zero length, [1, kv_heads, 0, head_dim] each (shared, never written)."""
        return list(self._empty)

    def binder(self) -> Binder:
        """A binding of this model's session for one caller (each state has its own)."""
        return Binder(self.session, self.device)

    def run(self, b: Binder, tokens: Sequence[int], past: Sequence, past_length: int) -> tuple:
        """One forward call through the caller's binding ``b``: ``tokens`` after
        ``past_length`` cached positions.

        Returns (logits float32 [len(tokens), V] on the host, present OrtValues on the
        device in past order).
        """
        m = self.manifest
        k = len(tokens)
        total = past_length + k
        if total > self.max_length:
            raise ValueError(
                f"sequence of {total} tokens exceeds the model's context of {self.max_length}"
            )
        b.clear_outputs()  # fresh outputs: the last call's presents are this call's past
        b.bind_array(_INPUT_IDS, np.asarray(tokens, dtype=np.int64).reshape(1, k))
        if m.has_attention_mask:
            b.bind_pointer(_MASK, np.int64, [1, total], self._ones_ptr)
        if m.has_position_ids:
            b.bind_pointer(_POSITIONS, np.int64, [1, k], self._positions_ptr + 8 * past_length)
        for name, value in zip(self.past_names, past):
            b.bind_value(name, value)
        b.bind_output(_LOGITS, host=True)
        for name in self.present_names:
            b.bind_output(name)
        b.run()
        outputs = b.outputs()
        return _logits_to_numpy(outputs[0]), outputs[1:]

    def slice_cache(self, cache: Sequence, length: int) -> list:
        """The first ``length`` positions of every cache tensor, cut on the device."""
        if length == 0:
            return self.empty_cache()
        with self._slicer_lock:
            return self._slicer(cache, length)


class StateThreadError(RuntimeError):
    """A sequence state used from a thread other than the one that made it."""


class TokenState:
    """What every decode state over an exported model shares: the ids consumed so far,
    the checks of what is appended or rewound to, its call times, and its thread.

    A state belongs to the thread that made it: its bound buffers (and, on CUDA, its
    captured graphs, which ONNX Runtime keeps per thread) are used by that thread alone;
    a call from another thread raises :class:`StateThreadError`. Make one state per
    sequence, in the thread that decodes it; many states can share one loaded model.
    """

    def __init__(self, model):
        self.model = model
        self._tokens: list[int] = []
        self._thread = threading.get_ident()
        self.times = ModelTimes()  # this state's forward calls and roll-backs

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise StateThreadError(
                f"a {type(self).__name__} was used from a thread other than the one that made "
                "it; its buffers serve one sequence in one thread: make a state (or a "
                "Generator) per thread, all sharing one loaded model"
            )

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def _checked(self, tokens: Sequence[int]) -> list[int]:
        """``tokens`` as ints, refused unless every one is an integer in the vocabulary."""
        out = []
        for t in tokens:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"token ids must be integers, got {t!r} ({type(t).__name__})")
            out.append(int(t))
        vocab = self.model.vocab_size
        if out and (min(out) < 0 or max(out) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab})")
        return out

    def _check_rewind(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"cannot rewind to {length}: state holds {len(self._tokens)} tokens")


class OrtState(TokenState):
    """A :class:`~quickdraft.protocols.DecodeState` over one :class:`OrtModel`: the
    consumed token ids, the KV caches as device OrtValues and its own binding."""

    def __init__(self, model: OrtModel):
        super().__init__(model)
        self._cache = model.empty_cache()
        self._binder = model.binder()

    @property
    def cache(self) -> list:
        """The current present/past OrtValues (key, value per layer)."""
        return [python_ortvalue(v) for v in self._cache]

    def append(self, tokens: Sequence[int]) -> np.ndarray:
        self._check_thread()
        tokens = self._checked(tokens)
        if not tokens:
            return np.zeros((0, self.model.vocab_size), dtype=np.float32)
        t0 = time.perf_counter()
        logits, self._cache = self.model.run(self._binder, tokens, self._cache,
                                             len(self._tokens))
        self.times.record_call(len(tokens), t0)
        self._tokens.extend(tokens)
        return logits  # [len(tokens), V]

    def rewind(self, length: int) -> None:
        self._check_thread()
        self._check_rewind(length)
        if length == len(self._tokens):
            return
        t0 = time.perf_counter()
        self._cache = self.model.slice_cache(self._cache, length)
        del self._tokens[length:]
        self.times.record_rewind(t0)

    def close(self) -> None:
        """Drop the caches (their device memory goes back to ONNX Runtime's arena)."""
        self._check_thread()
        self._cache = self.model.empty_cache()
        self._tokens.clear()


# -- checks --------------------------------------------------------------------------------


def _check_graph(m: ModelManifest, session, folder: Path, error=ModelFolderError) -> None:
    """The manifest must describe the graph the session loaded."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}

    def fail(what: str) -> None:
        raise error(
            f"{folder}: the manifest (quickdraft.json) and {m.model_file} disagree: {what}; "
            "re-export the model"
        )

    if list(inputs) != list(m.input_names):
        fail(f"graph inputs {list(inputs)} != manifest input_names {list(m.input_names)}")
    if list(outputs) != list(m.output_names):
        fail(f"graph outputs {list(outputs)} != manifest output_names {list(m.output_names)}")
    if _INPUT_IDS not in inputs or _LOGITS not in outputs:
        fail(f"the graph needs an {_INPUT_IDS!r} input and a {_LOGITS!r} output")
    if (_MASK in inputs) != m.has_attention_mask:
        fail(f"has_attention_mask is {m.has_attention_mask}")
    if (_POSITIONS in inputs) != m.has_position_ids:
        fail(f"has_position_ids is {m.has_position_ids}")
    past, present = m.past_names(), m.present_names()
    known = {_INPUT_IDS, _MASK, _POSITIONS, *past}
    extra = [name for name in inputs if name not in known]
    if extra:
        fail(f"inputs {extra} are not token ids, mask, positions or the "
             f"{m.num_layers} layers' past keys and values")
    for name in past:
        if name not in inputs:
            fail(f"no input {name!r} for num_layers={m.num_layers}")
    for name in present:
        if name not in outputs:
            fail(f"no output {name!r} for num_layers={m.num_layers}")
    type_name = ORT_TYPES[m.dtype]
    for name in past:
        arg = inputs[name]
        if arg.type != type_name:
            fail(f"{name} is {arg.type}, the manifest says dtype {m.dtype}")
        shape = arg.shape
        if len(shape) != 4:
            fail(f"{name} has rank {len(shape)}, not [batch, kv_heads, seq, head_dim]")
        for axis, value, field in ((1, m.num_kv_heads, "num_kv_heads"),
                                   (3, m.head_dim, "head_dim")):
            if isinstance(shape[axis], int) and shape[axis] != value:
                fail(f"{name} has shape {shape}, the manifest says {field}={value}")
    vocab = outputs[_LOGITS].shape[-1]
    if isinstance(vocab, int) and vocab != m.vocab_size:
        fail(f"logits have {vocab} columns, the manifest says vocab_size={m.vocab_size}")
