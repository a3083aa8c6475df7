"""Verification on the device: the graph of :mod:`quickdraft.verification.graph` in a session.

:class:`GraphVerifier` is the :class:`quickdraft.protocols.Verifier` that runs it next to
the target's logits (sampling, exact rule; greedy goes to
:func:`quickdraft.generation.host_verify`). Sessions are shared between verifiers; each
:class:`DeviceVerifier` has its own binding and buffers, so each sequence owns one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from quickdraft.generation import host_verify
from quickdraft.ort_backend.device import Device, create_session, helper_options
from quickdraft.protocols import (
    Candidates,
    DecodeState,
    Verdict,
    advance,
    rewind_to_common_prefix,
)
from quickdraft.sampling import SamplingConfig
from quickdraft.verification import build_verify_graph
from quickdraft.verification.graph import LOGITS_TYPES

if TYPE_CHECKING:
    from onnxruntime import SessionOptions

__all__ = [
    "DeviceVerifier",
    "GraphVerifier",
    "advance_device",
    "shared_session",
]

# (device, gamma, vocab, sampling, logits dtype, compute) -> InferenceSession, least
# recently used first; sessions evicted here live on in the verifiers that hold them
_SESSIONS: OrderedDict[tuple, object] = OrderedDict()
_SESSIONS_LOCK = threading.Lock()
_SESSIONS_MAX = 64


# the graph divides float32 logits by T: below this, logits of a few thousand overflow
DEVICE_MIN_TEMPERATURE = 1e-30


def shared_session(gamma: int, vocab: int, sampling: SamplingConfig, *, device: Device,
                   logits_dtype: str = "fp32", compute: str = "float32"):
    """The verification graph's ``InferenceSession`` for these settings, built once per
    process and shared (ONNX Runtime runs one session from several threads; each caller
    binds its own inputs and outputs)."""
    key = (device, int(gamma), int(vocab), sampling, logits_dtype, compute)
    with _SESSIONS_LOCK:  # held while building: each key is built once
        session = _SESSIONS.get(key)
        if session is None:
            session = _new_session(key, helper_options())
            _SESSIONS[key] = session
            if len(_SESSIONS) > _SESSIONS_MAX:
                _SESSIONS.popitem(last=False)
        else:
            _SESSIONS.move_to_end(key)
        return session


def _new_session(key: tuple, options):
    device, gamma, vocab, sampling, logits_dtype, compute = key
    model = build_verify_graph(gamma, vocab, sampling, logits_dtype=logits_dtype,
                               compute=compute)
    return create_session(model.SerializeToString(), device, options,
                          name="the verification graph")


class DeviceVerifier:
    """Runs the verification graph on a device; ``verifier(...) -> (n, next_token)``.

    The target logits may be a NumPy array ([S, V] or [1, S, V]) or an OrtValue
    [1, S, V] on the same device (the static model's ``append_device`` output), bound
    without a copy. The session is :func:`shared_session`'s (or a private one when
    ``options`` are given); the binding and the buffers are this verifier's: a call writes
    the draft's tokens, q and uniforms into host arrays, copies them into their device
    buffers (on the CPU they are the same memory) and rebinds only a new target; n, the next
    token and beta [gamma] come back in host buffers. One caller at a time per verifier.
    """

    def __init__(self, gamma: int, vocab: int, sampling: SamplingConfig = SamplingConfig(), *,
                 device: Device = Device("cpu"), logits_dtype: str = "fp32",
                 compute: str = "float32", options=None):
        import onnxruntime as ort

        self.gamma, self.vocab, self.sampling = int(gamma), int(vocab), sampling
        self.device = device
        self.compute = np.dtype(compute).type
        key = (device, self.gamma, self.vocab, sampling, logits_dtype, compute)
        self.session = (shared_session(*key[1:4], device=device, logits_dtype=logits_dtype,
                                       compute=compute)
                        if options is None else _new_session(key, options))
        self.logits_np = LOGITS_TYPES[logits_dtype][0]  # known: the graph was built
        self.binding = self.session.io_binding()
        g = self.gamma
        self._inputs = {  # host arrays of the inputs
            "draft_probs": np.zeros((g, self.vocab), self.compute),  # [gamma, V]
            "draft_tokens": np.zeros(g, np.int64),  # [gamma]
            "accept_uniforms": np.zeros(g, self.compute),  # [gamma]
            "sample_uniform": np.zeros(1, self.compute),  # [1]
        }
        self._outputs = {
            "n": np.zeros(1, np.int64),  # [1]
            "next_token": np.zeros(1, np.int64),  # [1]
            "beta": np.zeros(g, self.compute),  # [gamma]
        }
        # Inputs live on the graph's device, bound once: binding a host value to a CUDA
        # session copies it at bind time, so later writes would not be seen. A call writes
        # the host array and copies it into its device buffer (on the CPU the OrtValue is
        # the host array's memory: nothing to copy).
        self._on_device = device.kind != "cpu"
        self._in_values = {}
        for name, arr in self._inputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr, device.kind, device.device_id)
            self._in_values[name] = value
            self.binding.bind_ortvalue_input(name, value)
        self._out_values = []  # host OrtValues of the outputs (written by every run)
        for name, arr in self._outputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr)
            self._out_values.append(value)
            self.binding.bind_ortvalue_output(name, value)
        self._bound_target = None  # the OrtValue bound as the target, if one is

    def run(self, target, draft_probs, draft_tokens, accept_uniforms,
            sample_uniform) -> tuple[int, int, np.ndarray]:
        """(n, next_token, beta [gamma]) for one iteration."""
        g = self.gamma
        self._bind_target(target)
        inputs, out = self._inputs, self._outputs
        inputs["draft_tokens"][...] = np.reshape(draft_tokens, g)
        inputs["draft_probs"][...] = np.reshape(draft_probs, (g, self.vocab))
        inputs["accept_uniforms"][...] = np.reshape(accept_uniforms, g)
        inputs["sample_uniform"][0] = sample_uniform
        if self._on_device:
            for name, value in self._in_values.items():
                value.update_inplace(inputs[name])
        self.session.run_with_iobinding(self.binding)
        return int(out["n"][0]), int(out["next_token"][0]), out["beta"].copy()

    def _bind_target(self, target) -> None:
        """Bind the target's logits: a device OrtValue as is (rebound only when it is a new
        one), host arrays through a copy."""
        import onnxruntime as ort

        if isinstance(target, ort.OrtValue):
            if target is not self._bound_target:
                self.binding.bind_ortvalue_input("target_logits", target)
                self._bound_target = target
            return
        arr = np.asarray(target).reshape(1, -1, self.vocab)  # [1, S, V]
        self.binding.bind_cpu_input(
            "target_logits", np.ascontiguousarray(arr.astype(self.logits_np, copy=False)))
        self._bound_target = None

    def __call__(self, target, draft_probs, draft_tokens, accept_uniforms,
                 sample_uniform) -> tuple[int, int]:
        n, token, _ = self.run(target, draft_probs, draft_tokens, accept_uniforms,
                               sample_uniform)
        return n, token


def advance_device(state, ids: Sequence[int], min_new: int):
    """:func:`quickdraft.protocols.advance` returning the logits as the state has them:
    a device OrtValue [1, k, V] from a static state (no copy), else host rows [k, V]; at
    least the last ``min_new`` tokens are (re-)appended."""
    if not hasattr(state, "append_device"):
        return advance(state, ids, min_new)
    common = rewind_to_common_prefix(state, ids, min_new)
    return state.append_device(list(ids[common:]))


class GraphVerifier:
    """A :class:`quickdraft.protocols.Verifier` that decides with the verification graph.

    The target's logits stay where the target wrote them when its state can hand them over
    on the device (``append_device``: static models); other states give host logits. One
    :class:`DeviceVerifier` per (gamma, sampling) is made on first use (or ahead of time
    with :meth:`prepare`) and kept; their sessions are shared with every other verifier of
    the same settings, so one GraphVerifier per sequence costs a binding, not a session.

    Args:
        vocab: the vocabulary size.
        device: where the graph runs (the target's device).
        logits_dtype: the type of the logits the target's state returns ("fp32" for host
            logits of any model, the model's dtype for device logits).
        compute: "float32" or "float64", the graph's arithmetic.
        options: session options for private sessions (None: the shared ones).
    """

    def __init__(self, vocab: int, *, device: Device = Device("cpu"),
                 logits_dtype: str = "fp32", compute: str = "float32",
                 options: SessionOptions | None = None):
        self.vocab, self.device = int(vocab), device
        self.logits_dtype, self.compute, self.options = logits_dtype, compute, options
        self._verifiers: dict[tuple[int, SamplingConfig], DeviceVerifier] = {}

    @classmethod
    def for_model(cls, model, *, compute: str = "float32", options=None) -> GraphVerifier:
        """The verifier for ``model``'s logits (a StaticOrtModel's on its device, an
        OrtModel's float32 host logits)."""
        static = model.manifest.kv_cache == "static"
        return cls(model.vocab_size, device=model.device, compute=compute, options=options,
                   logits_dtype=model.manifest.dtype if static else "fp32")

    def get(self, gamma: int, sampling: SamplingConfig) -> DeviceVerifier:
        """The DeviceVerifier for ``gamma`` draft tokens (sampling: temperature > 0)."""
        key = (int(gamma), sampling)
        if key not in self._verifiers:
            self._verifiers[key] = DeviceVerifier(
                gamma, self.vocab, sampling, device=self.device, logits_dtype=self.logits_dtype,
                compute=self.compute, options=self.options)
        return self._verifiers[key]

    def prepare(self, gamma: int, sampling: SamplingConfig) -> None:
        """Make the verifiers for every draft length 1..gamma now (outside timed code);
        nothing for greedy sampling, which is verified on the host."""
        if sampling.greedy:
            return
        for g in range(1, int(gamma) + 1):
            self.get(g, sampling)

    def __call__(self, target: DecodeState, scored: Sequence[int], candidates: Candidates,
                 sampling: SamplingConfig, accept_uniforms: np.ndarray, sample_uniform: float,
                 *, lenience: float = 1.0) -> Verdict:
        gamma = len(candidates.tokens)
        if sampling.greedy or gamma == 0:
            # Greedy is decided once, by host_verify: where greedy_applies (checked
            # candidates) with verify_greedy on the target's argmax ids (advance_greedy: a
            # static model computes them in its own graph); otherwise on one-hot rows.
            return host_verify(target, scored, candidates, sampling, accept_uniforms,
                               sample_uniform, lenience=lenience)
        if lenience != 1.0:
            raise ValueError(
                f"the verification graph applies the exact rule (lenience 1), not {lenience}; "
                "verify on the host (quickdraft.generation.host_verify) for the lossy rule"
            )
        logits = advance_device(target, scored, gamma + 1)  # [1, k, V] or [k, V], k >= g + 1
        n, token, beta = self.get(gamma, sampling).run(
            logits, candidates.probs, candidates.tokens, accept_uniforms, sample_uniform)
        if not (0 <= token < self.vocab and 0 <= n <= gamma and np.isfinite(beta).all()):
            # the host path refuses such rows in adjust_logits; the graph has no raise
            raise ValueError(
                f"the target's distribution at temperature {sampling.temperature:g} is not "
                "finite (the logits overflow when divided by it, or the model produced NaN): "
                "use a larger temperature, or 0 for greedy decoding")
        reached = min(n + 1, gamma)
        return Verdict(n, token, beta[:reached].astype(float).tolist())
