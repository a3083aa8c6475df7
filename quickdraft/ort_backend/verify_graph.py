"""Verification on the device: the graph of :mod:`quickdraft.verification.graph` in a session.

:class:`GraphVerifier` is the :class:`quickdraft.protocols.Verifier` that runs it next to
the target's logits (sampling, exact rule; greedy goes to
:func:`quickdraft.generation.host_verify`). Sessions are shared between verifiers; each
:class:`DeviceVerifier` has its own binding and buffers, so each sequence owns one.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from quickdraft.generation import host_decide, host_verify
from quickdraft.ort_backend.device import Device, create_session, helper_options
from quickdraft.ort_backend.uploads import UploadBlock
from quickdraft.protocols import (
    Candidates,
    DecodeState,
    DeviceState,
    Scores,
    Verdict,
    advance,
    rewind_to_common_prefix,
    supports,
)
from quickdraft.sampling import SamplingConfig
from quickdraft.verification import build_sample_graph, build_verify_graph
from quickdraft.verification.graph import LOGITS_TYPES, MIN_TEMPERATURE

if TYPE_CHECKING:
    from onnxruntime import SessionOptions

__all__ = [
    "DeviceLogits",
    "DeviceRows",
    "DeviceSampler",
    "DeviceVerifier",
    "GraphVerifier",
    "advance_device",
    "captures_helpers",
    "shared_sample_session",
    "shared_session",
]

# (device, gamma, vocab, sampling, logits dtype, compute, stand_in, cuda_graph) ->
# InferenceSession, least recently used first; sessions evicted here live on in the
# verifiers that hold them
_SESSIONS: OrderedDict[tuple, object] = OrderedDict()
_SESSIONS_LOCK = threading.Lock()
_SESSIONS_MAX = 64
# a session with CUDA graphs -> its next graph id (ids are per session)
_GRAPH_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# settings -> verifiers and samplers with CUDA graphs that closed sequences handed back,
# so a new sequence replays their captured graphs instead of capturing new ones
_POOL: defaultdict[tuple, list] = defaultdict(list)
_POOL_MAX = 32  # objects kept per key
# CUDA graphs one verifier captures, one per set of bound addresses (a target's logits
# buffer, where q lies); beyond them it runs uncaptured
MAX_GRAPHS = 4


# the graphs' lowest temperature (quickdraft.verification.graph.MIN_TEMPERATURE)
DEVICE_MIN_TEMPERATURE = MIN_TEMPERATURE


def shared_session(gamma: int, vocab: int, sampling: SamplingConfig, *, device: Device,
                   logits_dtype: str = "fp32", compute: str = "float32",
                   stand_in: bool = False, cuda_graph: bool = False):
    """The verification graph's ``InferenceSession`` for these settings (``stand_in``: the
    pipelined verdict's graph; ``cuda_graph``: with CUDA graphs enabled), built once per
    process and shared (ONNX Runtime runs one session from several threads; each caller
    binds its own inputs and outputs, and captures under its own graph ids)."""
    return _shared((device, int(gamma), int(vocab), sampling, logits_dtype, compute,
                    bool(stand_in), bool(cuda_graph)))


def shared_sample_session(vocab: int, sampling: SamplingConfig, *, device: Device,
                          logits_dtype: str = "fp32", compute: str = "float32",
                          cuda_graph: bool = False):
    """The sampling graph's (:func:`~quickdraft.verification.build_sample_graph`) shared
    ``InferenceSession`` for these settings, as :func:`shared_session`."""
    return _shared((device, None, int(vocab), sampling, logits_dtype, compute, False,
                    bool(cuda_graph)))


def _shared(key: tuple):
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
    """The verification graph's session (gamma an int) or the sampling graph's (None)."""
    device, gamma, vocab, sampling, logits_dtype, compute, stand_in, cuda_graph = key
    if gamma is None:
        model, name = build_sample_graph(vocab, sampling, logits_dtype=logits_dtype,
                                         compute=compute), "the sampling graph"
    else:
        model, name = build_verify_graph(gamma, vocab, sampling, logits_dtype=logits_dtype,
                                         compute=compute, stand_in=stand_in), \
            "the verification graph"
    return create_session(model.SerializeToString(), device, options, name=name,
                          cuda_options={"enable_cuda_graph": "1"} if cuda_graph else None)


def _next_graph_id(session) -> int:
    """A CUDA graph id not yet handed out on ``session`` (from 1; 0 is ONNX Runtime's
    default id)."""
    with _SESSIONS_LOCK:
        counter = _GRAPH_IDS.setdefault(session, itertools.count(1))
        return next(counter)


def captures_helpers(model) -> bool:
    """Whether the helper graphs next to ``model`` (verdicts, draws) run as CUDA graphs by
    default: beside a static model loaded with them."""
    return model.manifest.kv_cache == "static" and model.cuda_graph


def _pool_key(kind: str, cuda_graph: bool, options, *settings) -> tuple | None:
    """Where a helper of ``kind`` ("verifier", "sampler") with these settings waits between
    sequences: only one with CUDA graphs on a shared session is kept (None: not pooled)."""
    return (kind, *settings) if cuda_graph and options is None else None


def _take_pooled(key: tuple | None):
    """An object a closed sequence handed back under ``key``, or None."""
    if key is None:
        return None
    with _SESSIONS_LOCK:
        waiting = _POOL.get(key)
        return waiting.pop() if waiting else None


def _hand_back(key: tuple | None, obj) -> None:
    """Keep ``obj`` (its captured CUDA graphs) for the next sequence of ``key``."""
    if key is None:
        return
    with _SESSIONS_LOCK:
        if len(_POOL[key]) < _POOL_MAX:
            _POOL[key].append(obj)


def _graph_run_options(graph_id: int):
    """RunOptions replaying (or capturing) CUDA graph ``graph_id``; -1: run uncaptured."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


class CapturedGraphs:
    """One verifier's CUDA graphs on ``session``: a graph replays the addresses it was
    captured with, so each set of bound addresses gets a graph id of its own (ids unique
    on the session), up to ``limit``; further sets run uncaptured (id -1)."""

    def __init__(self, session, limit: int = MAX_GRAPHS):
        self.session, self.limit = session, int(limit)
        self._options: dict[tuple, object] = {}  # addresses -> RunOptions of their graph
        self._uncaptured = _graph_run_options(-1)

    def __len__(self) -> int:
        return len(self._options)

    def options(self, addresses: dict) -> object:
        """The RunOptions for a run with inputs bound at ``addresses`` (name -> a hashable
        address)."""
        key = tuple(sorted(addresses.items()))
        options = self._options.get(key)
        if options is None:
            if len(self._options) >= self.limit:
                return self._uncaptured
            options = self._options[key] = _graph_run_options(_next_graph_id(self.session))
        return options


class _CapturedHelper:
    """What the helpers with CUDA graphs share: their graphs (``_graphs``, None without)
    and the pool (``_pool_key``) their ``take`` draws from."""

    _graphs: CapturedGraphs | None
    _pool_key: tuple | None

    def close(self) -> None:
        """Hand this helper, with its CUDA graphs, to the next ``take`` of its settings (the
        caller uses it no more); one without graphs is dropped."""
        _hand_back(self._pool_key, self)

    @property
    def graphs(self) -> int:
        """CUDA graphs this helper has had captured (or is warming up) so far."""
        return len(self._graphs) if self._graphs is not None else 0


class DeviceRows:
    """``count`` rows of a q buffer on the device (a :class:`DeviceSampler`'s or a sampled
    chain's), from row ``start``, where they lie: a verifier on the same device binds them
    without a copy; ``numpy()`` copies them to the host [count, V]. Valid until the buffer
    is written again."""

    def __init__(self, value, count: int, vocab: int, dtype, device: Device, start: int = 0):
        self.value, self.count, self.vocab = value, int(count), int(vocab)
        self.dtype, self.device, self.start = np.dtype(dtype), device, int(start)

    @property
    def data_ptr(self) -> int:
        return self.value.data_ptr() + self.start * self.vocab * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        return np.array(self.value.numpy()[self.start : self.start + self.count])  # [count, V]

    def slice(self, start: int, count: int) -> DeviceRows:
        """Rows ``start .. start + count`` of these rows."""
        if not (0 <= start and 0 <= count and start + count <= self.count):
            raise ValueError(f"rows {start}..{start + count} are not among {self.count} rows")
        return DeviceRows(self.value, count, self.vocab, self.dtype, self.device,
                          self.start + start)

    def __array__(self, dtype=None, copy=None):
        rows = self.numpy()
        return rows if dtype is None else rows.astype(dtype)


class DeviceLogits:
    """``rows`` logits rows [rows, V] of one sequence inside a larger device buffer (a lane
    of a call that scored several sequences), starting at row ``start`` of ``value``'s
    flattened [*, V] rows: the verification graph binds them in place; ``numpy()`` reads
    them through ``host``, a shared host copy of the whole buffer made on first use. Valid
    until the next call that writes the buffer (the next lanes call of that step length)."""

    def __init__(self, value, start: int, rows: int, vocab: int, dtype, device: Device,
                 host):
        self.value, self.start, self.rows, self.vocab = value, int(start), int(rows), int(vocab)
        self.dtype, self.device, self._host = np.dtype(dtype), device, host

    @property
    def data_ptr(self) -> int:
        return self.value.data_ptr() + self.start * self.vocab * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        flat = self._host().reshape(-1, self.vocab)  # [*, V]
        return flat[self.start : self.start + self.rows]  # [rows, V]

    def __array__(self, dtype=None, copy=None):
        rows = self.numpy()
        return rows if dtype is None else rows.astype(dtype)


class DeviceSampler(_CapturedHelper):
    """Samples draft tokens on the device (:func:`shared_sample_session`): each call takes
    a model's logits where they lie (an OrtValue [1, S, V]) and a uniform, returns the token
    and writes the q row it was drawn from into row ``row`` of this sampler's buffer
    [rows, V], so only the token crosses to the host and the verification graph reads q in
    place. One caller at a time; ``rows`` is the longest proposal.

    ``cuda_graph`` (CUDA only): the sampling graph is captured and replayed, a graph per
    logits buffer and row (:class:`CapturedGraphs`, up to ``2 * rows``); the token then
    comes back from a device buffer. :meth:`take` and :meth:`close` keep such samplers
    for the next sequence of the same settings.
    """

    def __init__(self, vocab: int, sampling: SamplingConfig, rows: int, *, device: Device,
                 logits_dtype: str = "fp32", compute: str = "float32",
                 cuda_graph: bool = False):
        import onnxruntime as ort

        if cuda_graph and device.kind != "cuda":
            raise ValueError("cuda_graph needs device cuda (CUDA graphs are a CUDA feature)")
        self.vocab, self.rows, self.device = int(vocab), int(rows), device
        self.dtype = np.dtype(compute)
        self.cuda_graph = bool(cuda_graph)
        self._pool_key = _pool_key("sampler", self.cuda_graph, None, device, self.vocab,
                                   sampling, self.rows, logits_dtype, compute)
        self.session = shared_sample_session(vocab, sampling, device=device,
                                             logits_dtype=logits_dtype, compute=compute,
                                             cuda_graph=self.cuda_graph)
        self.binding = self.session.io_binding()
        self.probs = ort.OrtValue.ortvalue_from_shape_and_type(
            (self.rows, self.vocab), self.dtype.type, device.kind, device.device_id)  # [rows, V]
        self._uniform_host = np.zeros(1, self.dtype)  # [1]
        self._uniform = ort.OrtValue.ortvalue_from_numpy(self._uniform_host, device.kind,
                                                         device.device_id)
        self._token_host = np.zeros(1, np.int64)  # [1]
        self.binding.bind_ortvalue_input("uniform", self._uniform)
        self._token = (ort.OrtValue.ortvalue_from_shape_and_type(
            (1,), np.int64, device.kind, device.device_id) if self.cuda_graph
            else ort.OrtValue.ortvalue_from_numpy(self._token_host))
        self.binding.bind_ortvalue_output("token", self._token)
        self._row_bytes = self.vocab * self.dtype.itemsize
        self._graphs = (CapturedGraphs(self.session, limit=max(MAX_GRAPHS, 2 * self.rows))
                        if self.cuda_graph else None)

    @classmethod
    def take(cls, vocab: int, sampling: SamplingConfig, rows: int, *, device: Device,
             logits_dtype: str = "fp32", compute: str = "float32",
             cuda_graph: bool = False) -> DeviceSampler:
        """A sampler of these settings: one a closed sequence handed back (with its captured
        graphs) where there is one, else a new one."""
        key = _pool_key("sampler", cuda_graph, None, device, int(vocab), sampling, int(rows),
                        logits_dtype, compute)
        return _take_pooled(key) or cls(vocab, sampling, rows, device=device,
                                        logits_dtype=logits_dtype, compute=compute,
                                        cuda_graph=cuda_graph)

    def sample(self, logits, uniform: float, row: int) -> int:
        """The token drawn with ``uniform`` from q = adjust_logits(last row of ``logits``)
        (an OrtValue on this device); q goes to row ``row`` of :attr:`probs`."""
        if not 0 <= row < self.rows:
            raise ValueError(f"row must be in [0, {self.rows}), got {row}")
        self._uniform_host[0] = uniform
        if self.device.kind != "cpu":  # on the CPU the bound buffer is the host array
            self._uniform.update_inplace(self._uniform_host)
        self.binding.bind_ortvalue_input("logits", logits)
        self.binding.bind_output("probs", self.device.kind, self.device.device_id,
                                 self.dtype.type, [1, self.vocab],
                                 self.probs.data_ptr() + row * self._row_bytes)
        if not self.cuda_graph:
            self.session.run_with_iobinding(self.binding)
            return int(self._token_host[0])
        where = {"logits": (logits.data_ptr(), logits.shape()[1]), "row": row}
        self.session.run_with_iobinding(self.binding, self._graphs.options(where))
        return int(self._token.numpy()[0])

    def rows_view(self, count: int) -> DeviceRows:
        """The first ``count`` q rows written."""
        return DeviceRows(self.probs, count, self.vocab, self.dtype, self.device)


class DeviceVerifier(_CapturedHelper):
    """Runs the verification graph on a device; ``verifier(...) -> (n, next_token)``.

    The target logits may be a NumPy array ([S, V] or [1, S, V]) or an OrtValue
    [1, S, V] on the same device (the static model's ``append_device`` output), bound
    without a copy. The session is :func:`shared_session`'s (or a private one when
    ``options`` are given); the binding and the buffers are this verifier's: a call writes
    the draft's tokens, q and uniforms into host arrays, copies them into their device
    buffers (on the CPU they are the same memory) and rebinds only a new target; n, the next
    token and beta [gamma] come back in host buffers. One caller at a time per verifier.

    ``stand_in``: the pipelined verdict's graph (``build_verify_graph(stand_in=True)``):
    gamma candidates, the last one's q row given apart (``run``'s ``stand_in_probs``).

    ``cuda_graph`` (CUDA only): the graph is captured as a CUDA graph and replayed, one
    launch instead of one per node. Every input and output is then bound on the device
    (host logits are copied into a buffer of this verifier's) and a graph is captured per
    set of bound addresses (:class:`CapturedGraphs`); ``graphs`` counts them.
    """

    def __init__(self, gamma: int, vocab: int, sampling: SamplingConfig = SamplingConfig(), *,
                 device: Device = Device("cpu"), logits_dtype: str = "fp32",
                 compute: str = "float32", options=None, stand_in: bool = False,
                 cuda_graph: bool = False):
        import onnxruntime as ort

        if cuda_graph and device.kind != "cuda":
            raise ValueError("cuda_graph needs device cuda (CUDA graphs are a CUDA feature)")
        self.gamma, self.vocab, self.sampling = int(gamma), int(vocab), sampling
        self.device, self.stand_in = device, bool(stand_in)
        self.cuda_graph = bool(cuda_graph)
        self.compute = np.dtype(compute).type
        key = (device, self.gamma, self.vocab, sampling, logits_dtype, compute, self.stand_in,
               self.cuda_graph)
        self._pool_key = _pool_key("verifier", self.cuda_graph, options, *key[:-1])
        self.session = (shared_session(*key[1:4], device=device, logits_dtype=logits_dtype,
                                       compute=compute, stand_in=self.stand_in,
                                       cuda_graph=self.cuda_graph)
                        if options is None else _new_session(key, options))
        self.logits_np = LOGITS_TYPES[logits_dtype][0]  # known: the graph was built
        self.binding = self.session.io_binding()
        g = self.gamma
        # q rows per input: the proposal's, and the stand-in's apart
        self._q_rows = {"draft_probs": g - 1, "stand_in_probs": 1} if self.stand_in else \
            {"draft_probs": g}
        self._q_rows = {name: rows for name, rows in self._q_rows.items() if rows}
        # the small inputs in one upload block (one copy per call), bound once
        self._small = UploadBlock({"draft_tokens": ((g,), np.int64),  # [gamma]
                                   "accept_uniforms": ((g,), self.compute),  # [gamma]
                                   "sample_uniform": ((1,), self.compute)},  # [1]
                                  device)
        for name in ("draft_tokens", "accept_uniforms", "sample_uniform"):
            self._small.bind(self.binding, name, name)
        # host arrays of the q inputs [rows, V]
        self._inputs = {name: np.zeros((rows, self.vocab), self.compute)
                        for name, rows in self._q_rows.items()}
        self._outputs = {
            "n": np.zeros(1, np.int64),  # [1]
            "next_token": np.zeros(1, np.int64),  # [1]
            "beta": np.zeros(g, self.compute),  # [gamma]
        }
        # q inputs live on the graph's device too, bound once: binding a host value to a
        # CUDA session copies it at bind time, so later writes would not be seen. A call
        # writes the host array and copies it into its device buffer (on the CPU the
        # OrtValue is the host array's memory: nothing to copy).
        self._on_device = device.kind != "cpu"
        self._in_values = {}
        for name, arr in self._inputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr, device.kind, device.device_id)
            self._in_values[name] = value
            self.binding.bind_ortvalue_input(name, value)
        # the outputs' OrtValues, written by every run: host buffers, or with CUDA graphs
        # device buffers read back after the run
        self._out_values = {}
        for name, arr in self._outputs.items():
            value = (ort.OrtValue.ortvalue_from_shape_and_type(arr.shape, arr.dtype,
                                                               device.kind, device.device_id)
                     if self.cuda_graph else ort.OrtValue.ortvalue_from_numpy(arr))
            self._out_values[name] = value
            self.binding.bind_ortvalue_output(name, value)
        self._bound_target = None  # the OrtValue bound as the target, if one is
        self._rebound: set[str] = set()  # q inputs bound to rows where they lie
        # with CUDA graphs: where the target's logits and q are bound (name -> address,
        # rows), and a graph per set of them
        self._addresses: dict[str, tuple[int, int]] = {}
        self._graphs = CapturedGraphs(self.session) if self.cuda_graph else None
        self._host_targets: dict[int, object] = {}  # rows -> a device buffer [1, rows, V]

    @classmethod
    def take(cls, gamma: int, vocab: int, sampling: SamplingConfig = SamplingConfig(), *,
             device: Device = Device("cpu"), logits_dtype: str = "fp32",
             compute: str = "float32", options=None, stand_in: bool = False,
             cuda_graph: bool = False) -> DeviceVerifier:
        """A verifier of these settings: one a closed sequence handed back (with its
        captured graphs) where there is one, else a new one."""
        key = _pool_key("verifier", cuda_graph, options, device, int(gamma), int(vocab),
                        sampling, logits_dtype, compute, bool(stand_in))
        return _take_pooled(key) or cls(gamma, vocab, sampling, device=device,
                                        logits_dtype=logits_dtype, compute=compute,
                                        options=options, stand_in=stand_in,
                                        cuda_graph=cuda_graph)

    def run(self, target, draft_probs, draft_tokens, accept_uniforms,
            sample_uniform, stand_in_probs=None) -> tuple[int, int, np.ndarray]:
        """(n, next_token, beta [gamma]) for one iteration (``stand_in_probs``: the last
        candidate's q row [1, V], for a ``stand_in`` verifier; ``draft_probs`` then holds the
        other gamma - 1 rows, None for none)."""
        g = self.gamma
        if self.stand_in == (stand_in_probs is None):
            raise ValueError("a stand-in verifier takes stand_in_probs, another does not")
        self._bind_target(target)
        inputs, out = self._inputs, self._outputs
        given = {"draft_probs": draft_probs, "stand_in_probs": stand_in_probs}
        in_place = {name for name in self._q_rows if self._bind_rows(name, given[name])}
        for name in self._q_rows.keys() - in_place:
            inputs[name][...] = np.reshape(np.asarray(given[name]), inputs[name].shape)
        small = self._small
        small["draft_tokens"][...] = np.reshape(draft_tokens, g)
        small["accept_uniforms"][...] = np.reshape(accept_uniforms, g)
        small["sample_uniform"][0] = sample_uniform
        small.upload()
        if self._on_device:
            for name, value in self._in_values.items():
                if name not in in_place:
                    value.update_inplace(inputs[name])
        if not self.cuda_graph:
            self.session.run_with_iobinding(self.binding)
            return int(out["n"][0]), int(out["next_token"][0]), out["beta"].copy()
        self.session.run_with_iobinding(self.binding, self._graphs.options(self._addresses))
        values = self._out_values
        return (int(values["n"].numpy()[0]), int(values["next_token"].numpy()[0]),
                values["beta"].numpy())

    def _bind_rows(self, name: str, rows) -> bool:
        """Bind the q input ``name`` where the rows lie (DeviceRows on this device, of this
        type and count): True; else this verifier's own buffer, filled from the host."""
        count = self._q_rows[name]
        direct = (isinstance(rows, DeviceRows) and rows.device == self.device
                  and rows.dtype == np.dtype(self.compute)
                  and rows.count == count and rows.vocab == self.vocab)
        if direct:
            self.binding.bind_input(name, self.device.kind, self.device.device_id,
                                    rows.dtype.type, [count, self.vocab], rows.data_ptr)
            self._rebound.add(name)
            self._addresses[name] = (rows.data_ptr, count)
        elif name in self._rebound:
            self.binding.bind_ortvalue_input(name, self._in_values[name])
            self._rebound.discard(name)
            self._addresses.pop(name, None)
        return direct

    def _bind_target(self, target) -> None:
        """Bind the target's logits: a device OrtValue as is (rebound only when it is a new
        one), host arrays through a copy."""
        import onnxruntime as ort

        if isinstance(target, DeviceLogits) and target.device == self.device and \
                target.dtype == np.dtype(self.logits_np):
            self.binding.bind_input("target_logits", self.device.kind, self.device.device_id,
                                    target.dtype.type, [1, target.rows, self.vocab],
                                    target.data_ptr)
            self._bound_target = None
            self._addresses["target_logits"] = (target.data_ptr, target.rows)
            return
        if isinstance(target, ort.OrtValue) and \
                (not self.cuda_graph or target.device_name().lower() == self.device.kind):
            if target is not self._bound_target:
                self.binding.bind_ortvalue_input("target_logits", target)
                self._bound_target = target
            self._addresses["target_logits"] = (target.data_ptr(), target.shape()[1])
            return
        arr = np.asarray(target.numpy() if isinstance(target, ort.OrtValue) else target)
        arr = np.ascontiguousarray(arr.reshape(1, -1, self.vocab).astype(  # [1, S, V]
            self.logits_np, copy=False))
        self._bound_target = None
        if not self.cuda_graph:
            self.binding.bind_cpu_input("target_logits", arr)
            return
        # a captured graph reads from fixed addresses: the rows go into a buffer of ours
        rows = arr.shape[1]
        value = self._host_targets.get(rows)
        if value is None:
            value = self._host_targets[rows] = ort.OrtValue.ortvalue_from_numpy(
                arr, self.device.kind, self.device.device_id)
        else:
            value.update_inplace(arr)
        self.binding.bind_ortvalue_input("target_logits", value)
        self._addresses["target_logits"] = (value.data_ptr(), rows)

    def __call__(self, target, draft_probs, draft_tokens, accept_uniforms,
                 sample_uniform) -> tuple[int, int]:
        n, token, _ = self.run(target, draft_probs, draft_tokens, accept_uniforms,
                               sample_uniform)
        return n, token


def advance_device(state, ids: Sequence[int], min_new: int):
    """:func:`quickdraft.protocols.advance` returning the logits as the state has them:
    a device OrtValue [1, k, V] from a static state (no copy), else host rows [k, V]; at
    least the last ``min_new`` tokens are (re-)appended."""
    if not supports(state, DeviceState):
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
        cuda_graph: run the verifiers as CUDA graphs (CUDA only). Their captured graphs
            outlive this object: :meth:`close` hands the verifiers to the next
            GraphVerifier of the same settings. Where ONNX Runtime refuses to capture the
            graph, the verifiers run without (``cuda_graph_refused`` says why).
    """

    def __init__(self, vocab: int, *, device: Device = Device("cpu"),
                 logits_dtype: str = "fp32", compute: str = "float32",
                 options: SessionOptions | None = None, cuda_graph: bool = False):
        if cuda_graph and device.kind != "cuda":
            raise ValueError("cuda_graph needs device cuda (CUDA graphs are a CUDA feature)")
        self.vocab, self.device = int(vocab), device
        self.logits_dtype, self.compute, self.options = logits_dtype, compute, options
        self.cuda_graph = bool(cuda_graph)
        self.cuda_graph_refused: str | None = None  # why ONNX Runtime would not capture
        self._verifiers: dict[tuple[int, SamplingConfig, bool], DeviceVerifier] = {}

    @classmethod
    def for_model(cls, model, *, compute: str = "float32", options=None,
                  cuda_graph: bool | None = None) -> GraphVerifier:
        """The verifier for ``model``'s logits (a StaticOrtModel's on its device, an
        OrtModel's float32 host logits); ``cuda_graph`` None: as the model runs (a static
        model loaded with CUDA graphs)."""
        static = model.manifest.kv_cache == "static"
        if cuda_graph is None:
            cuda_graph = captures_helpers(model)
        return cls(model.vocab_size, device=model.device, compute=compute, options=options,
                   logits_dtype=model.manifest.dtype if static else "fp32",
                   cuda_graph=cuda_graph)

    def get(self, gamma: int, sampling: SamplingConfig, *,
            stand_in: bool = False) -> DeviceVerifier:
        """The DeviceVerifier for ``gamma`` draft tokens (sampling: temperature > 0;
        ``stand_in``: the pipelined verdict's, gamma candidates with the stand-in last)."""
        key = (int(gamma), sampling, bool(stand_in))
        if key not in self._verifiers:
            self._verifiers[key] = self._take(key)
        return self._verifiers[key]

    def _take(self, key: tuple) -> DeviceVerifier:
        gamma, sampling, stand_in = key

        def make(cuda_graph: bool) -> DeviceVerifier:
            return DeviceVerifier.take(gamma, self.vocab, sampling, device=self.device,
                                       logits_dtype=self.logits_dtype, compute=self.compute,
                                       options=self.options, stand_in=stand_in,
                                       cuda_graph=cuda_graph)

        if self.cuda_graph and not self.cuda_graph_refused:
            try:
                return make(True)
            except RuntimeError as e:  # ORT refuses graphs with nodes off the device
                self.cuda_graph_refused = str(e)
        return make(False)

    def close(self) -> None:
        """Hand the verifiers with CUDA graphs to the next GraphVerifier of these settings
        (idempotent); the others are dropped."""
        for verifier in self._verifiers.values():
            verifier.close()
        self._verifiers.clear()

    def prepare(self, gamma: int, sampling: SamplingConfig, *, stand_in: bool = False) -> None:
        """Make the verifiers for every draft length 1..gamma now (outside timed code);
        nothing for greedy sampling, which is verified on the host. ``stand_in``: the
        pipelined verdict's, for 1..gamma + 1 candidates."""
        if sampling.greedy:
            return
        for g in range(1, int(gamma) + 1 + int(stand_in)):
            self.get(g, sampling, stand_in=stand_in)

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
        _check_exact(lenience)
        logits = advance_device(target, scored, gamma + 1)  # [1, k, V] or [k, V], k >= g + 1
        return self.decide(Scores(logits=logits), candidates, sampling, accept_uniforms,
                           sample_uniform, lenience=lenience)

    def decide(self, scores: Scores, candidates: Candidates, sampling: SamplingConfig,
               accept_uniforms: np.ndarray, sample_uniform: float, *,
               lenience: float = 1.0) -> Verdict:
        """The :class:`~quickdraft.protocols.Decider` half: the verdict on a target call
        made elsewhere (its logits as an OrtValue, :class:`DeviceLogits` or host rows;
        greedy: :func:`~quickdraft.generation.host_decide` on its ids)."""
        gamma = len(candidates.tokens)
        if sampling.greedy or gamma == 0:
            return host_decide(scores, candidates, sampling, accept_uniforms, sample_uniform,
                               lenience=lenience)
        _check_exact(lenience)
        rows = (candidates.rows_on_device if candidates.rows_on_device is not None
                else candidates.probs)  # [gamma, V], in place where a sampler left them
        n, token, beta = self.get(gamma, sampling).run(
            scores.logits, rows, candidates.tokens, accept_uniforms, sample_uniform)
        _check_verdict(n, token, beta, gamma, self.vocab, sampling, bonus=True)
        reached = min(n + 1, gamma)
        return Verdict(n, token, beta[:reached].astype(float).tolist())

    def decide_without_bonus(self, logits, proposal_rows, stand_in_rows, candidates,
                             sampling: SamplingConfig, accept_uniforms: np.ndarray,
                             sample_uniform: float) -> tuple[int, int | None, list[float]]:
        """The pipelined verdict (:func:`quickdraft.pipelined.verify_without_bonus`) on the
        device: candidates [m] (the proposal and the stand-in, last), the target's logits
        of their m positions (the last m rows of ``logits``), q as the proposal's rows
        [m - 1, V] (None when m is 1) and the stand-in's [1, V], each where it lies.
        -> (n, recovered or None when all m are kept, beta at the candidates reached)."""
        m = len(candidates)
        n, token, beta = self.get(m, sampling, stand_in=True).run(
            logits, proposal_rows, candidates, accept_uniforms, sample_uniform,
            stand_in_probs=stand_in_rows)
        _check_verdict(n, token, beta, m, self.vocab, sampling, bonus=False)
        reached = min(n + 1, m)
        return n, (None if n == m else token), beta[:reached].astype(float).tolist()


def _check_verdict(n: int, token: int, beta: np.ndarray, m: int, vocab: int,
                   sampling: SamplingConfig, *, bonus: bool) -> None:
    """Refuse a verdict on a distribution that was not finite: the host path refuses such
    rows in adjust_logits, the graph has no raise. Without a ``bonus``, the token of a
    verdict that kept all ``m`` candidates is not read."""
    token_read = bonus or n < m
    if not (0 <= n <= m and (not token_read or 0 <= token < vocab)
            and np.isfinite(beta).all()):
        raise ValueError(
            f"the target's distribution at temperature {sampling.temperature:g} is not "
            "finite (the logits overflow when divided by it, or the model produced NaN): "
            "use a larger temperature, or 0 for greedy decoding")


def _check_exact(lenience: float) -> None:
    if lenience != 1.0:
        raise ValueError(
            f"the verification graph applies the exact rule (lenience 1), not {lenience}; "
            "verify on the host (quickdraft.generation.host_verify) for the lossy rule")
