"""The fast path: a decoder with static KV caches on ONNX Runtime (CPU or CUDA).

A static export is a GroupQueryAttention graph from onnxruntime-genai's model builder: one
buffer per layer's keys and values is bound as both past and present and written in place,
the valid length is the number of ones in the mask, so a rollback is a shorter mask and
every step length has a fixed shape (its own binding and, on CUDA, its own CUDA graph).
A state can also *launch* work without waiting for it (``launch_greedy``, ``launch_chain``),
so two models' calls overlap on the device (docs/explanation/pipelined.md).
docs/explanation/fast-path.md says how and why.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import numpy as np

from quickdraft.manifest import GREEDY_OUTPUT, INT8_FOLD_OPTION
from quickdraft.ort_backend.device import DEFAULT_ATTENTION, Device
from quickdraft.ort_backend.model import ExportedModel, ModelFolderError, TokenState

__all__ = ["StaticOrtModel", "StaticDecodeState", "StaticModelError", "Launched"]

_INPUT_IDS, _MASK, _LOGITS = "input_ids", "attention_mask", "logits"
# calls after which ONNX Runtime 1.31 replays a step's captured CUDA graph, one run each
CAPTURE_CALLS = 2
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
# the first CUDA graph id of a lanes session (apart from every cache slot's own ids)
LANES_GRAPH_IDS = 1 << 20
# where a session made from a serialized graph finds the weights' external data
EXTERNAL_FOLDER_OPTION = "session.model_external_initializers_file_folder_path"


class StaticModelError(ModelFolderError):
    """A folder that is not a static-cache export this backend can run."""


class StaticOrtModel(ExportedModel):
    """A loaded static-cache decoder: one ``InferenceSession`` and its settings; a
    ``LanguageModel`` whose states each own their cache buffers.

    Args:
        folder: an exported folder with ``quickdraft.json`` (kv_cache "static").
        device: where to run (``Device("cpu")`` or ``Device("cuda", 0)``).
        cache_length: tokens each state's caches hold (default: the manifest's
            ``max_cache_length``; at most its ``max_length``, the model's context). Memory
            per state: 2 * layers * kv_heads * cache_length * head_dim values.
        graph_steps: step lengths that get their own preallocated binding (and, with
            ``cuda_graph``, their own CUDA graph), e.g. ``(1,)`` for a draft model and
            ``(1, gamma + 1)`` for a target. Other lengths run through a generic binding.
        cuda_graph: capture and replay CUDA graphs for ``graph_steps`` (CUDA only).
        chain_length: the longest greedy chain a state can launch at once
            (:meth:`StaticDecodeState.launch_chain`): that many 1-token steps, each with its
            own binding (and CUDA graph), feeding each other's argmax on the device. 0: none.
        lanes: sequences one call can score together (:meth:`score_lanes`, each state in
            a lane of its own): that many cache slots are made up front and bound to a
            second session of the graph of :func:`~quickdraft.ort_backend.lanes_graph.
            lanes_graph` (which loads the weights again), with a binding (and CUDA graph)
            per step length of ``graph_steps``. The last ``max(graph_steps)`` cache
            positions are then scratch for lanes idle in a call: ``max_length`` is that
            much shorter. 0 or 1: none.
        provider_options: extra CUDA execution provider options (strings), merged over
            ``device_id`` and ``enable_cuda_graph``.
        attention: GroupQueryAttention's CUDA kernel, one of
            :data:`~quickdraft.ort_backend.device.ATTENTION_KERNELS` ("auto": onnxruntime's
            choice), for every session of the model.
        options (onnxruntime.SessionOptions | None): the session's options (default:
            quickdraft's).

    ``new_state()`` makes a sequence state with its own caches and bindings (CUDA graphs
    captured under its own graph ids); a closed state's buffers are kept and handed to the
    next new state, so graphs already captured are replayed, not captured again. A state
    is used from the thread that made it (ONNX Runtime keeps captured graphs per thread).
    """

    KV_CACHE = "static"
    DTYPES = tuple(_NP_DTYPES)
    ERROR = StaticModelError
    MEM_PATTERN = True  # every step length has one shape
    # sampling settings with a sampled-chain session each (each holds the weights again);
    # beyond them a drafter samples with the separate sampling graph
    MAX_SAMPLED_SETTINGS = 4

    def __init__(
        self,
        folder: str | os.PathLike,
        device: Device = Device("cpu"),
        *,
        cache_length: int | None = None,
        graph_steps: Sequence[int] = (1,),
        cuda_graph: bool = False,
        chain_length: int = 0,
        lanes: int = 0,
        provider_options: dict | None = None,
        options=None,
        attention: str = DEFAULT_ATTENTION,
    ):
        if cuda_graph and device.kind != "cuda":
            raise ValueError("cuda_graph needs device cuda (CUDA graphs are a CUDA feature)")
        cuda_options = {"enable_cuda_graph": "1"} if cuda_graph else {}
        cuda_options.update(provider_options or {})
        super().__init__(folder, device, options, cuda_options, attention)
        self._cuda_options = cuda_options
        # (sampling, compute) -> [the model with its draw appended, graph ids handed out]
        self._sampled: dict[tuple, list] = {}
        m = self.manifest
        self.cache_length = (int(cache_length) if cache_length is not None
                             else int(m.max_cache_length))
        if not 1 <= self.cache_length <= m.max_length:
            raise ValueError(
                f"cache_length must be in [1, {m.max_length}] for this export (the model's "
                f"context), got {cache_length}"
            )
        self.cuda_graph = bool(cuda_graph)
        self.graph_steps = tuple(sorted({int(s) for s in graph_steps}))
        if any(s < 1 or s > self.cache_length for s in self.graph_steps):
            raise ValueError(
                f"step lengths must be in [1, {self.cache_length}] (the cache length), got "
                f"{min(self.graph_steps)}..{max(self.graph_steps)}: draft at most "
                f"{self.cache_length - 1} tokens per iteration")
        # the CUDA provider's options in use ({} on the CPU)
        self.provider_options = self.session.get_provider_options().get(
            "CUDAExecutionProvider", {}) if device.kind == "cuda" else {}
        self.np_dtype = _NP_DTYPES[m.dtype]
        self.cache_shape = (1, m.num_kv_heads, self.cache_length, m.head_dim)  # [B, kv, T, hd]
        # the graph's greedy_tokens output (see quickdraft.manifest.GREEDY_OUTPUT)
        self.has_greedy = GREEDY_OUTPUT in m.output_names
        if isinstance(chain_length, bool) or int(chain_length) != chain_length or \
                not 0 <= chain_length < self.cache_length:
            raise ValueError(f"chain_length must be an integer in [0, {self.cache_length}), "
                             f"got {chain_length!r}")
        if chain_length and not self.has_greedy:
            raise StaticModelError(
                f"{self.folder}: a greedy chain needs the graph's {GREEDY_OUTPUT} output; "
                "re-export the model with quickdraft export --kv-cache static")
        self.chain_length = int(chain_length)
        self._lock = threading.Lock()  # guards the pool and the graph ids
        self._free: list[_CacheSlot] = []  # buffers of closed states, to reuse
        self._graph_ids = 0  # CUDA graph ids handed out so far
        self.slots_made = 0  # cache slots allocated (states made without a free slot)
        if isinstance(lanes, bool) or int(lanes) != lanes or lanes < 0:
            raise ValueError(f"lanes must be an integer >= 0, got {lanes!r}")
        self._lanes = _Lanes(self, int(lanes)) if lanes > 1 else None

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
                f"{m.dtype}, {self.device}, cache {self.cache_length}, steps {self.graph_steps}"
                f"{graphs})")

    # -- LanguageModel -------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        if self._lanes is not None:  # the idle lanes' scratch positions
            return self.cache_length - self._lanes.scratch
        return self.cache_length

    def new_state(self, lane: bool = True) -> StaticDecodeState:
        """A new sequence with its own caches: a free lane's first (``lane`` False: never;
        the lanes belong to one thread at a time, the one that takes a lane while none is
        held), else a closed state's buffers whose CUDA graphs this thread captured (or a
        finished thread did: captured again here), else new ones (captured here)."""
        me = threading.current_thread()
        with self._lock:
            lanes = self._lanes
            if lane and lanes is not None and lanes.thread is not me and \
                    sum(s.lane is not None for s in self._free) == lanes.count:
                lanes.take(me)  # on CUDA: every lane's graphs captured on this thread
            usable = [i for i, s in enumerate(self._free)
                      if s.thread is None or s.thread is me
                      or (s.lane is None and not s.thread.is_alive())]
            lanes_free = [i for i in usable if self._free[i].lane is not None]
            plain = [i for i in usable if self._free[i].lane is None]
            pick = lanes_free[-1] if lane and lanes_free else plain[-1] if plain else None
            slot = self._free.pop(pick) if pick is not None else None
        if slot is None:
            slot = self._new_slot()
        elif slot.thread is not None and slot.thread is not me:  # its thread has finished
            slot._capture()
        return StaticDecodeState(self, slot)

    def _new_slot(self, lane: int | None = None, *, capture: bool = True) -> _CacheSlot:
        with self._lock:
            first = self._graph_ids + 1
            self._graph_ids += len(self.graph_steps) + self.chain_length
            self.slots_made += 1
        return _CacheSlot(self, first, lane, capture=capture)

    # -- lanes: LaneModel ------------------------------------------------------------------

    @property
    def lanes(self) -> int:
        """Sequences one :meth:`score_lanes` call takes (0: none)."""
        return 0 if self._lanes is None else self._lanes.count

    @property
    def lane_tokens(self) -> int:
        """The most tokens one lane takes per call (0: no lanes)."""
        return 0 if self._lanes is None else self._lanes.max_step

    def in_lane(self, state) -> bool:
        """Whether ``state`` holds a lane (states made on the lanes' thread get them
        first)."""
        return isinstance(state, StaticDecodeState) and state.model is self and \
            state.lane is not None

    def score_lanes(self, states: Sequence[StaticDecodeState],
                    tokens: Sequence[Sequence[int]], greedy: Sequence[bool]) -> list:
        """Append ``tokens[i]`` to ``states[i]`` (each in its own lane) in one run of the
        lanes session; return each one's :class:`~quickdraft.protocols.Scores`: its greedy
        ids [k_i] on the host where ``greedy[i]``, else its logits rows [k_i, V] where they
        lie (:class:`~quickdraft.ort_backend.verify_graph.DeviceLogits`). Shorter lists
        are padded to the step length used; the padding is written past each sequence's
        end (overwritten later, as after a rewind) and its rows are not returned."""
        if self._lanes is None:
            raise ValueError("this model has no lanes: load it with lanes >= 2")
        self._check_lanes_thread()
        if not (len(states) == len(tokens) == len(greedy)) or not states:
            raise ValueError("score_lanes needs one token list and one greedy flag per state")
        entries = []
        for state, toks in zip(states, tokens):
            if not self.in_lane(state):
                raise ValueError("score_lanes takes states of this model that hold a lane "
                                 "(StaticOrtModel.new_state hands lanes out first)")
            entries.append(state._lane_entry(toks))  # (slot, tokens, past length)
        if len({slot.lane for slot, _, _ in entries}) != len(entries):
            raise ValueError("two of the states share a lane")
        t0 = time.perf_counter()
        result = self._lanes.run(entries, greedy)
        for state, (_, toks, _) in zip(states, entries):
            state._consumed(toks, t0)
        return result

    @property
    def lane_chain_length(self) -> int:
        """The longest greedy chain :meth:`chain_lanes` runs (0: none: no lanes, no chains
        or no greedy_tokens output)."""
        return 0 if self._lanes is None or self._lanes.chain is None else \
            self._lanes.chain.length

    def chain_lanes(self, states: Sequence[StaticDecodeState], tokens: Sequence[int],
                    lengths: Sequence[int]) -> list[np.ndarray]:
        """Greedy chains of several states (each in its own lane) in one chain of the lanes
        session: from ``tokens[i]``, ``lengths[i]`` steps each feeding its argmax to the
        next, all on the device, one wait. Every lane runs ``max(lengths)`` steps (a lane
        wanting fewer writes its extra steps past its end, as after a rewind). Returns each
        state's tokens [lengths[i]]; each state then holds its token and all of them but the
        last, as after :meth:`StaticDecodeState.launch_chain`."""
        if self.lane_chain_length == 0:
            raise ValueError("this model runs no chains in lanes: load it with lanes >= 2 "
                             "and chain_length >= 1 (a graph with greedy_tokens)")
        self._check_lanes_thread()
        if not (len(states) == len(tokens) == len(lengths)) or not states:
            raise ValueError("chain_lanes needs one token and one length per state")
        if any(isinstance(n, bool) or int(n) != n or not 1 <= n <= self.lane_chain_length
               for n in lengths):
            raise ValueError(f"chain lengths must be integers in [1, "
                             f"{self.lane_chain_length}], got {list(lengths)}")
        longest = int(max(lengths))
        entries = []
        for state, token, n in zip(states, tokens, lengths):
            if not self.in_lane(state):
                raise ValueError("chain_lanes takes states of this model that hold a lane "
                                 "(StaticOrtModel.new_state hands lanes out first)")
            slot, (first,), past = state._lane_entry([token])
            # its own steps; the extra ones (up to longest) fall in the scratch positions
            slot.check_lane_room(past + int(n))
            entries.append((slot, first, past))
        if len({slot.lane for slot, _, _ in entries}) != len(entries):
            raise ValueError("two of the states share a lane")
        t0 = time.perf_counter()
        ids = self._lanes.chain.run(entries, longest)  # [longest, lanes]
        out = []
        for state, (slot, first, _), n in zip(states, entries, lengths):
            mine = state._check_valid(np.array(ids[: int(n), slot.lane]))  # [n]
            state._consumed([first] + mine[:-1].tolist(), t0, calls=int(n))
            out.append(mine)
        return out

    def _check_lanes_thread(self) -> None:
        if self._lanes.thread is not threading.current_thread():
            raise RuntimeError("the lanes belong to the thread whose states hold them (ONNX "
                               "Runtime keeps CUDA graphs per thread): make the states and "
                               "score them on one thread")

    def prepare_sampled(self, sampling, compute: str = "float32") -> bool:
        """Build the sampled-chain session for these settings now (its first use would);
        False when :attr:`MAX_SAMPLED_SETTINGS` other settings already have one, or the
        model has no chains."""
        if not self.chain_length:
            return False
        with self._lock:
            if (sampling, compute) not in self._sampled and \
                    len(self._sampled) >= self.MAX_SAMPLED_SETTINGS:
                return False
        self._sampled_session(sampling, compute, 0)
        return True

    def _sampled_session(self, sampling, compute: str, steps: int):
        """The session of this model with its draw appended for ``sampling`` (built once;
        it loads the weights again) and the first of ``steps`` new graph ids in it."""
        key = (sampling, compute)
        with self._lock:
            entry = self._sampled.get(key)
            if entry is None:
                import onnx

                from quickdraft.ort_backend.device import create_session
                from quickdraft.verification.graph import append_sample_graph

                proto = append_sample_graph(onnx.load(str(self._model_path)), self.vocab_size,
                                            sampling, logits_dtype=self.manifest.dtype,
                                            compute=compute)
                entry = self._sampled[key] = [create_session(
                    proto.SerializeToString(), self.device, self.options, self._cuda_options,
                    name=f"{self.folder} with its draw appended", attention=self.attention), 0]
            entry[1] += steps
            return entry[0], entry[1] - steps + 1

    def _release(self, slot: _CacheSlot) -> None:
        slot.end = 0  # nothing in it is valid any more
        with self._lock:
            self._free.append(slot)

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache buffers of one state hold."""
        count = 2 * self.manifest.num_layers * int(np.prod(self.cache_shape))
        return count * np.dtype(self.np_dtype).itemsize


def _run_options(graph_id: int | None, *, no_sync: bool = False):
    """RunOptions carrying ``gpu_graph_id`` (and, with ``no_sync``, returning before the
    device is done), or None with neither: a RunOptions without a graph id makes ONNX
    Runtime's Python ``run_with_iobinding`` look it up through a raised and caught
    exception on every call (tens of microseconds)."""
    if graph_id is None and not no_sync:
        return None
    import onnxruntime as ort

    options = ort.RunOptions()
    if graph_id is not None:
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
    if no_sync:
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return options


class _CacheSlot:
    """One sequence's device memory and bindings: per-layer cache buffers [1, kv_heads,
    max_length, head_dim] bound as past AND present (written in place), the mask
    [1, max_length], and a binding per step length with its own graph id."""

    def __init__(self, model: StaticOrtModel, first_graph_id: int, lane: int | None = None,
                 *, capture: bool = True):
        import onnxruntime as ort

        kind, dev = model.device.kind, model.device.device_id
        self.model = model
        self.lane = lane  # the lane of the model's lanes session its caches are bound to
        # on the CPU an OrtValue made from a NumPy array uses that array's memory
        self.cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros(model.cache_shape, model.np_dtype),
                                                       kind, dev)
                      for _ in model.past_names]
        self.mask_host = np.zeros((1, model.cache_length), dtype=np.int64)  # [1, T]
        self.mask = ort.OrtValue.ortvalue_from_numpy(self.mask_host, kind, dev)
        self.on_device = kind != "cpu"  # host arrays must be copied into device buffers
        self.steps = {s: _StepBinding(self, s, first_graph_id + i)
                      for i, s in enumerate(model.graph_steps)}
        self.generic = model.session.io_binding()
        self.generic_options = _run_options(-1 if model.cuda_graph else None)
        self.generic_greedy = None  # the greedy_tokens OrtValue of the last generic run
        self.chain = (_Chain(self, model.chain_length, first_graph_id + len(self.steps))
                      if model.chain_length else None)
        # (sampling, compute, bank) -> its chain: each bank has its own q rows
        self.sampled_chains: dict[tuple, _Chain] = {}
        self.calls = {"captured_steps": 0, "generic_steps": 0, "uploads_skipped": 0}
        # the thread (a threading.Thread) that captured its CUDA graphs, or that holds its
        # lane: ONNX Runtime keeps graphs per thread, and one used from another thread is
        # captured again on a real call, which runs a 1-token greedy step more than once
        # (None: a plain slot without graphs, any thread)
        self.thread: threading.Thread | None = None
        # the end of the last write: no valid position lies past it (a lane idle in a lanes
        # call writes its scratch there, attending to no more than it must)
        self.end = 0
        if model.cuda_graph and capture:
            self._capture()

    def _capture(self) -> None:
        """Capture every fixed-length step's CUDA graph now, on token 0 at position 0.

        ONNX Runtime runs a graph more than once in the calls that capture it; a 1-token
        greedy step, whose argmax overwrites its own input, would then advance by extra
        tokens. Captured here, no sequence sees those calls (positions written here are
        rewritten by the state's prefill)."""
        for k, step in self.steps.items():
            for _ in range(CAPTURE_CALLS):
                self.run([0] * k, 0)
            step.forget_device_ids()
        if self.chain is not None:
            self.chain.capture()
        self.calls = {"captured_steps": 0, "generic_steps": 0, "uploads_skipped": 0}
        self.thread = threading.current_thread()
        self.end = 0

    def sampled_chain(self, sampling, compute: str, bank: int = 0, at: int = 0) -> _Chain:
        """This slot's sampled chain for ``sampling`` in row bank ``bank`` (made, and
        captured, on first use, at position ``at``: where the launch that asks for it
        writes next, so no valid position is touched)."""
        key = (sampling, compute, bank)
        chain = self.sampled_chains.get(key)
        if chain is None:
            m = self.model
            session, first = m._sampled_session(sampling, compute, m.chain_length)
            if m.cuda_graph and at + m.chain_length > m.cache_length:
                raise ValueError(
                    f"a sampled chain's CUDA graphs are captured past the sequence's end, and "
                    f"{m.cache_length - at} positions are left of the {m.chain_length} they "
                    "write: prepare the chains (prepare_sampled_chain) while the state is "
                    "short, as DeviceModelDrafter does")
            chain = _Chain(self, m.chain_length, first, session=session, compute=compute)
            if m.cuda_graph:
                chain.capture(at)
            self.sampled_chains[key] = chain
        return chain

    def bind_common(self, io) -> None:
        io.bind_ortvalue_input(_MASK, self.mask)
        self.bind_caches(io)

    def bind_caches(self, io) -> None:
        """Each layer's cache buffer as its past and its present (written in place)."""
        m = self.model
        for past, present, value in zip(m.past_names, m.present_names, self.cache):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)

    def check_lane_room(self, total: int) -> None:
        """Refuse a lane's sequence of ``total`` tokens that would reach the last positions,
        the lanes calls' scratch."""
        m = self.model
        if self.lane is not None and total > m.max_length:
            raise ValueError(
                f"sequence of {total} tokens exceeds the {m.max_length} a lane may hold (the "
                f"last {m.cache_length - m.max_length} positions of a lane's cache are "
                "scratch for lanes calls); shorten the sequence, or load with fewer lanes' "
                "steps (a lower max_gamma), lanes=0, or for a draft draft_lanes=False "
                "(quickdraft serve --no-draft-lanes)")

    def run(self, tokens: list[int], past_length: int, *, launch: bool = False):
        """Write ``tokens`` at positions ``past_length ..`` of the caches; return the logits
        OrtValue [1, len(tokens), V] on the device (a fixed-length step's own buffer,
        overwritten by its next call). ``launch``: a fixed-length step returns before the
        device is done (wait with its ``synchronize``); other lengths always wait."""
        m = self.model
        k = len(tokens)
        total = past_length + k
        if total > m.cache_length:
            raise ValueError(
                f"sequence of {total} tokens exceeds the static cache of {m.cache_length} "
                "tokens; export with a larger --max-length or load with a larger cache_length"
            )
        self.check_lane_room(total)
        self.end = total
        step = self.steps.get(k)
        mask = self.mask_host if step is None else step.mask()  # [1, T]
        mask[0, :total] = 1
        mask[0, total:] = 0
        if mask is self.mask_host and self.on_device:  # on the CPU: the bound array itself
            self.mask.update_inplace(mask)  # the slot's: generic and chained steps read it
        if step is not None:
            self.calls["captured_steps"] += 1
            return step.run(tokens, launch=launch)
        self.calls["generic_steps"] += 1
        import onnxruntime as ort

        io = self.generic
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        kind, dev = m.device.kind, m.device.device_id
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, k)  # [1, k]
        io.bind_ortvalue_input(_INPUT_IDS, ort.OrtValue.ortvalue_from_numpy(ids, kind, dev))
        self.bind_common(io)
        io.bind_output(_LOGITS, kind, dev)
        if m.has_greedy:
            io.bind_output(GREEDY_OUTPUT, kind, dev)
        m.session.run_with_iobinding(io, self.generic_options)
        outputs = io.get_outputs()  # presents (the cache buffers), logits, greedy tokens
        self.generic_greedy = outputs[-1] if m.has_greedy else None
        return outputs[-2] if m.has_greedy else outputs[-1]

    def run_greedy(self, tokens: list[int], past_length: int) -> np.ndarray:
        """As :meth:`run`, returning the graph's greedy token after each of ``tokens`` [k]
        int64 on the host (k integers copied from the device)."""
        self.run(tokens, past_length)
        step = self.steps.get(len(tokens))
        if step is not None:
            return step.read_greedy()
        return np.array(self.generic_greedy.numpy()[0])  # [k]


class _Lanes:
    """A model's lanes: ``count`` cache slots bound, lane b to inputs and outputs
    ``lane_name(..., b)``, to one session of :func:`lanes_graph`, with a binding (and graph
    id) per step length. A call writes every lane's row of input_ids [count, k] and of the
    mask [count, T]: a lane in the call its tokens (padded to k) after its past; an idle
    lane k scratch positions past its last write (``_CacheSlot.end``, no later than T - k:
    the model's ``max_length`` keeps them free), so it attends to no more than it holds."""

    def __init__(self, model: StaticOrtModel, count: int):
        import onnx

        from quickdraft.ort_backend.device import create_session, session_options
        from quickdraft.ort_backend.lanes_graph import lanes_graph

        self.model, self.count = model, count
        self.max_step = max(model.graph_steps)  # the most tokens a lane takes per call
        # a greedy chain of the lanes session (a model with chains and greedy_tokens)
        chain = model.chain_length if model.has_greedy else 0
        self.scratch = max(self.max_step, chain)  # positions an idle lane may write
        if self.scratch >= model.cache_length:
            raise ValueError(f"lanes need a cache longer than the longest step "
                             f"({self.scratch}): load with a larger cache_length")
        # captured by take(), on the thread that uses them
        self.slots = [model._new_slot(lane=b, capture=False) for b in range(count)]
        self.thread: threading.Thread | None = None  # the thread the lanes belong to
        proto = lanes_graph(onnx.load(str(model.model_path), load_external_data=False),
                            count, model.past_names, model.present_names)
        options, own = session_options(), model.options  # the model's settings that matter
        options.intra_op_num_threads = own.intra_op_num_threads
        options.inter_op_num_threads = own.inter_op_num_threads
        options.execution_mode = own.execution_mode
        options.graph_optimization_level = own.graph_optimization_level
        options.enable_mem_pattern = own.enable_mem_pattern
        if model.manifest.weights == "int8":  # as the model's own session
            options.add_session_config_entry(INT8_FOLD_OPTION, "1")
        options.add_session_config_entry(EXTERNAL_FOLDER_OPTION, str(model.model_path.parent))
        self.session = create_session(proto.SerializeToString(), model.device, options,
                                      model._cuda_options,
                                      name=f"{model.folder} in {count} lanes",
                                      attention=model.attention)
        self._positions = np.arange(model.cache_length)  # [T]
        self.steps = {k: _LaneStep(self, k, LANES_GRAPH_IDS + i)
                      for i, k in enumerate(model.graph_steps)}
        self.chain = (_LaneChain(self, chain, LANES_GRAPH_IDS + len(self.steps))
                      if chain else None)
        model._free.extend(reversed(self.slots))  # handed out first, lane 0 first

    def take(self, thread: threading.Thread) -> None:
        """The lanes belong to ``thread`` (the caller's) from now on; on CUDA every lane's
        graphs and the lanes session's are captured here, while no lane holds a sequence
        (every lane idle: only scratch positions are written)."""
        if self.model.cuda_graph:
            for slot in self.slots:
                slot._capture()
            for step in self.steps.values():
                for _ in range(CAPTURE_CALLS):
                    step.run()
            if self.chain is not None:
                self.chain.capture()
        self.thread = thread
        for slot in self.slots:
            slot.thread = thread

    def run(self, entries: list[tuple[_CacheSlot, list[int], int]],
            greedy: Sequence[bool]) -> list:
        from quickdraft.protocols import Scores

        longest = max(len(toks) for _, toks, _ in entries)
        k = min((s for s in self.steps if s >= longest), default=None)
        if k is None:
            raise ValueError(f"a lane takes at most {self.max_step} tokens per call, got "
                             f"{longest}")
        step = self.steps[k]
        ends = _idle_starts(self.slots, k) + k  # [lanes] idle lanes' scratch
        ids = step.inputs["ids"]  # [lanes, k]
        ids[:] = 0
        for slot, toks, past in entries:
            b = slot.lane
            ids[b, : len(toks)] = toks
            ends[b] = slot.end = past + k
        step.inputs["mask"][:] = self._positions[None, :] < ends[:, None]  # [lanes, T]
        step.inputs.upload()
        step.run()
        out: list = [None] * len(entries)
        ids = step.greedy.numpy() if any(greedy) and step.greedy is not None else None
        V = self.model.vocab_size
        for i, ((slot, toks, _), g) in enumerate(zip(entries, greedy)):
            if not g:
                out[i] = Scores(logits=step.rows(slot.lane, len(toks)))  # [k_i, V]
                continue
            if ids is not None:
                mine = np.array(ids[slot.lane, : len(toks)])  # [k_i]
            else:  # a graph without greedy_tokens: this lane's rows on the host
                from quickdraft.sampling import greedy_tokens

                mine = greedy_tokens(step.rows(slot.lane, len(toks)).numpy())  # [k_i]
            out[i] = (Scores(greedy=mine) if mine.max() < V else
                      Scores(error="logits contain NaN or an infinity; the model produced "
                             "invalid scores for this sequence (with fp16 weights this is "
                             "usually an overflow: export it in fp32)"))
        return out


class _LaneStep:
    """One step length of the lanes session: input_ids [lanes, k] and mask [lanes, T] in one
    upload block, logits [lanes, k, V] and greedy tokens [lanes, k] buffers, and a binding
    of every lane's caches."""

    def __init__(self, lanes: _Lanes, k: int, graph_id: int):
        import onnxruntime as ort

        from quickdraft.ort_backend.lanes_graph import lane_name
        from quickdraft.ort_backend.uploads import UploadBlock

        model = lanes.model
        kind, dev = model.device.kind, model.device.device_id
        self.lanes, self.k = lanes, k
        n = lanes.count
        self.inputs = UploadBlock({"ids": ((n, k), np.int64),  # [lanes, k]
                                   "mask": ((n, model.cache_length), np.int64)},  # [lanes, T]
                                  model.device)
        V = model.manifest.vocab_size
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type(
            (lanes.count, k, V), model.np_dtype, kind, dev)  # [lanes, k, V]
        self.greedy = ort.OrtValue.ortvalue_from_shape_and_type(
            (lanes.count, k), np.int64, kind, dev) if model.has_greedy else None
        b = self.binding = lanes.session.io_binding()
        self.inputs.bind(b, _INPUT_IDS, "ids")
        self.inputs.bind(b, _MASK, "mask")
        for lane, slot in enumerate(lanes.slots):
            for past, present, value in zip(model.past_names, model.present_names, slot.cache):
                b.bind_ortvalue_input(lane_name(past, lane), value)
                b.bind_ortvalue_output(lane_name(present, lane), value)
        b.bind_ortvalue_output(_LOGITS, self.logits)
        if self.greedy is not None:
            b.bind_ortvalue_output(GREEDY_OUTPUT, self.greedy)
        self.options = _run_options(graph_id if model.cuda_graph else None)
        self._host: np.ndarray | None = None  # the logits on the host, once read this run

    def run(self) -> None:
        self.lanes.session.run_with_iobinding(self.binding, self.options)
        self._host = None

    def host_logits(self) -> np.ndarray:
        if self._host is None:
            self._host = self.logits.numpy()  # [lanes, k, V]
        return self._host

    def rows(self, lane: int, count: int):
        """Lane ``lane``'s first ``count`` logits rows, where they lie."""
        from quickdraft.ort_backend.verify_graph import DeviceLogits

        return DeviceLogits(self.logits, lane * self.k, count, self.lanes.model.vocab_size,
                            self.lanes.model.np_dtype, self.lanes.model.device,
                            self.host_logits)


def _idle_starts(slots: Sequence[_CacheSlot], k: int) -> np.ndarray:
    """Where each lane writes ``k`` scratch positions when idle in a call: just past its
    last write, and never past the cache's end [lanes]."""
    T = slots[0].model.cache_length
    return np.array([min(slot.end, T - k) for slot in slots])


class _LaneChain:
    """``length`` 1-token steps of the lanes session that feed each other on the device:
    step 0 reads every lane's first id from the upload block, step j > 0 reads row j - 1 of
    ids [length, lanes], and step j writes the lanes' argmax ids to row j, with its own
    mask [lanes, T], binding and graph id; one logits buffer serves them all. So the greedy
    chains of every lane run as one chain, launched after one upload and read back in one
    copy. A lane idle in a chain writes scratch positions past its last write (at most
    T - length: the model's ``max_length`` keeps them free)."""

    def __init__(self, lanes: _Lanes, length: int, first_graph_id: int):
        import onnxruntime as ort

        from quickdraft.ort_backend.lanes_graph import lane_name
        from quickdraft.ort_backend.uploads import UploadBlock

        model = lanes.model
        kind, dev = model.device.kind, model.device.device_id
        n, T, V = lanes.count, model.cache_length, model.manifest.vocab_size
        self.lanes, self.length = lanes, length
        self.inputs = UploadBlock({"tokens": ((n, 1), np.int64),  # [lanes, 1]
                                   "masks": ((length, n, T), np.int64)},  # [length, lanes, T]
                                  model.device)
        self.ids = ort.OrtValue.ortvalue_from_shape_and_type(
            (length, n), np.int64, kind, dev)  # [length, lanes] the ids the steps write
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type(
            (n, 1, V), model.np_dtype, kind, dev)  # [lanes, 1, V]
        ids_at, item = self.ids.data_ptr(), 8  # int64
        self.bindings, self.options = [], []
        for j in range(length):
            b = lanes.session.io_binding()
            if j == 0:
                self.inputs.bind(b, _INPUT_IDS, "tokens")
            else:
                b.bind_input(_INPUT_IDS, kind, dev, np.int64, [n, 1],
                             ids_at + (j - 1) * n * item)
            self.inputs.bind(b, _MASK, "masks", (n, T), index=j * n * T)
            for lane, slot in enumerate(lanes.slots):
                for past, present, value in zip(model.past_names, model.present_names,
                                                slot.cache):
                    b.bind_ortvalue_input(lane_name(past, lane), value)
                    b.bind_ortvalue_output(lane_name(present, lane), value)
            b.bind_ortvalue_output(_LOGITS, self.logits)
            b.bind_output(GREEDY_OUTPUT, kind, dev, np.int64, [n, 1], ids_at + j * n * item)
            self.bindings.append(b)
            self.options.append(_run_options(first_graph_id + j if model.cuda_graph else None,
                                             no_sync=kind != "cpu"))
        self._positions = np.arange(T)  # [T]

    def capture(self) -> None:
        """Capture every step's CUDA graph with every lane idle (scratch writes only)."""
        for _ in range(CAPTURE_CALLS):
            self.run([], self.length)

    def run(self, entries: list[tuple[_CacheSlot, int, int]], length: int) -> np.ndarray:
        """``length`` steps; ``entries``: (slot, first token, past length) of the lanes in
        the chain. -> the ids [length, lanes] each step wrote (idle lanes' are scratch)."""
        base = _idle_starts(self.lanes.slots, length)  # [lanes]
        tokens = self.inputs["tokens"]  # [lanes, 1]
        tokens[:] = 0
        for slot, token, past in entries:
            base[slot.lane] = past
            tokens[slot.lane, 0] = token
        ends = base[None, :] + 1 + np.arange(length)[:, None]  # [length, lanes] valid lengths
        self.inputs["masks"][:length] = self._positions[None, None, :] < ends[:, :, None]
        self.inputs.upload()
        for b, options in zip(self.bindings[:length], self.options[:length]):
            self.lanes.session.run_with_iobinding(b, options)
        self.bindings[length - 1].synchronize_outputs()
        for slot, _, past in entries:
            slot.end = past + length
        return np.array(self.ids.numpy()[:length])  # [length, lanes]


class _StepBinding:
    """A fixed-length step: its own input_ids, logits (and greedy tokens) buffers, binding
    and graph id.

    A 1-token step of a graph with ``greedy_tokens`` writes that output over its own
    ``input_ids`` buffer (the id is read by the embedding before the argmax is written), so
    in a greedy chain (draft tokens, autoregressive decoding) the next call's input is
    already on the device: its upload is skipped when the host knows the buffer holds it,
    and the call uploads only the slot's mask. Any other step has its ids and a mask of its
    own in one upload block (``inputs``): one copy per call.
    """

    def __init__(self, slot: _CacheSlot, length: int, graph_id: int):
        import onnxruntime as ort

        from quickdraft.ort_backend.uploads import UploadBlock

        model = slot.model
        kind, dev = model.device.kind, model.device.device_id
        self.slot = slot
        self.length = length
        self.graph_id = graph_id
        shape = (1, length, model.manifest.vocab_size)  # [1, length, V]
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type(shape, model.np_dtype, kind, dev)
        self.session = model.session
        self.binding = model.session.io_binding()
        self.chained = model.has_greedy and length == 1  # greedy output over input_ids
        # chained: the ids buffer [1, 1] and the slot's mask; else one block of both
        self.inputs: UploadBlock | None = None
        if self.chained:
            self.ids_host = np.zeros((1, length), dtype=np.int64)  # [1, length]
            self.ids = ort.OrtValue.ortvalue_from_numpy(self.ids_host, kind, dev)
            self.binding.bind_ortvalue_input(_INPUT_IDS, self.ids)
            self.binding.bind_ortvalue_input(_MASK, slot.mask)
        else:
            self.inputs = UploadBlock({"ids": ((1, length), np.int64),  # [1, length]
                                       "mask": ((1, model.cache_length), np.int64)},  # [1, T]
                                      model.device)
            self.inputs.bind(self.binding, _INPUT_IDS, "ids")
            self.inputs.bind(self.binding, _MASK, "mask")
        slot.bind_caches(self.binding)
        self.binding.bind_ortvalue_output(_LOGITS, self.logits)
        self.greedy = None  # the greedy_tokens buffer [1, length] int64
        if model.has_greedy:
            self.greedy = self.ids if self.chained else ort.OrtValue.ortvalue_from_shape_and_type(
                (1, length), np.int64, kind, dev)
            self.binding.bind_ortvalue_output(GREEDY_OUTPUT, self.greedy)
        graph = graph_id if model.cuda_graph else None
        self.options = _run_options(graph)
        self.launch_options = _run_options(graph, no_sync=slot.on_device)
        self.runs = 0
        self._on_device: list[int] | None = None  # a chained step's device id, if known

    def mask(self) -> np.ndarray:
        """The host mask [1, T] this step reads: its own, or the slot's (a chained step)."""
        return self.slot.mask_host if self.inputs is None else self.inputs["mask"]

    def run(self, tokens: list[int], *, launch: bool = False):
        """Run on ``tokens`` with the mask already written to :meth:`mask` (uploaded for a
        chained step, which reads the slot's)."""
        if self.inputs is not None:
            self.inputs["ids"][0, :] = tokens
            self.inputs.upload()  # the ids and the mask, same device addresses
        elif not self.slot.on_device:  # on the CPU the bound buffer is ids_host itself
            self.ids_host[0, :] = tokens
        elif tokens == self._on_device:  # a greedy chain: the last argmax is the input
            self.slot.calls["uploads_skipped"] += 1
        else:
            self.ids_host[0, :] = tokens
            self.ids.update_inplace(self.ids_host)  # same device address: what graphs replay
        self.session.run_with_iobinding(self.binding,
                                        self.launch_options if launch else self.options)
        self.runs += 1
        self._on_device = None  # a chained step overwrote its input with the argmax
        return self.logits

    def synchronize(self) -> None:
        """Wait until the device has finished this step's outputs."""
        self.binding.synchronize_outputs()

    def forget_device_ids(self) -> None:
        """The next run uploads its ids (the device buffer's content is not known)."""
        self._on_device = None

    def read_greedy(self) -> np.ndarray:
        """The greedy tokens of the last run, [length] int64 on the host (a copy)."""
        out = np.array(self.greedy.numpy()[0])  # [length]
        if self.chained:
            self._on_device = out.tolist()
        return out


class _Chain:
    """``length`` 1-token steps that feed each other on the device.

    Step 0 reads the first id from the chain's upload block, step j > 0 reads ``ids[j - 1]``
    and step j writes the next id to ``ids[j]``, with its own mask row, binding and graph
    id; one logits buffer serves them all (they run one after the other on one stream).
    So a chain of up to ``length`` draft tokens is enqueued at once after one upload (the
    first id, every step's mask and a sampled chain's uniforms), with no host round trip
    between its steps, and read back in one copy.

    Greedy (``sampled`` None): the next id is the graph's argmax. Sampled: ``session`` is
    the model with its draw appended (:func:`~quickdraft.verification.append_sample_graph`),
    step j draws with ``uniforms[j]`` and writes the q row it drew from to ``rows[j]``.
    """

    def __init__(self, slot: _CacheSlot, length: int, first_graph_id: int, *,
                 session=None, compute: str | None = None):
        import onnxruntime as ort

        from quickdraft.ort_backend.uploads import UploadBlock
        from quickdraft.verification.graph import SAMPLE_UNIFORM, SAMPLED_PROBS, SAMPLED_TOKEN

        model = slot.model
        kind, dev = model.device.kind, model.device.device_id
        T, V = model.cache_length, model.manifest.vocab_size
        self.slot = slot
        self.length = length
        self.sampled = compute is not None
        fields = {"token": ((1, 1), np.int64), "masks": ((length, T), np.int64)}
        if self.sampled:
            dtype = np.dtype(compute)
            fields["uniforms"] = ((length,), dtype)
        self.inputs = UploadBlock(fields, model.device)
        self.ids = ort.OrtValue.ortvalue_from_shape_and_type(
            (1, length), np.int64, kind, dev)  # [1, length] the ids the steps write
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type(
            (1, 1, V), model.np_dtype, kind, dev)  # [1, 1, V]
        self.session = session if session is not None else model.session
        if self.sampled:
            self.rows = ort.OrtValue.ortvalue_from_shape_and_type(
                (length, V), dtype.type, kind, dev)  # [length, V] q rows
            self.argmax = ort.OrtValue.ortvalue_from_shape_and_type(
                (1, 1), np.int64, kind, dev)  # [1, 1] the graph's greedy output, unread
        self.bindings, self.options = [], []
        ids_at, item = self.ids.data_ptr(), 8  # int64
        for j in range(length):
            b = self.session.io_binding()
            if j == 0:
                self.inputs.bind(b, _INPUT_IDS, "token")
            else:
                b.bind_input(_INPUT_IDS, kind, dev, np.int64, [1, 1], ids_at + (j - 1) * item)
            self.inputs.bind(b, _MASK, "masks", (1, T), index=j * T)
            slot.bind_caches(b)
            b.bind_ortvalue_output(_LOGITS, self.logits)
            next_id = ids_at + j * item
            if self.sampled:
                self.inputs.bind(b, SAMPLE_UNIFORM, "uniforms", (1,), index=j)
                b.bind_ortvalue_output(GREEDY_OUTPUT, self.argmax)
                b.bind_output(SAMPLED_TOKEN, kind, dev, np.int64, [1], next_id)
                b.bind_output(SAMPLED_PROBS, kind, dev, dtype.type, [1, V],
                              self.rows.data_ptr() + j * V * dtype.itemsize)
            else:
                b.bind_output(GREEDY_OUTPUT, kind, dev, np.int64, [1, 1], next_id)
            self.bindings.append(b)
            self.options.append(_run_options(first_graph_id + j if model.cuda_graph else None,
                                             no_sync=slot.on_device))
        self._positions = np.arange(T)  # [T]

    def capture(self, at: int | None = None) -> None:
        """Capture every step's CUDA graph (ONNX Runtime runs a graph more than once in the
        calls that capture it), at position ``at`` (None: the last positions of the cache,
        for a slot holding nothing yet): past the slot's valid positions, which the
        state's own writes replace."""
        T = self.slot.model.cache_length
        past = T - self.length if at is None else at
        uniforms = np.full(self.length, 0.5) if self.sampled else None
        counted = self.slot.calls["captured_steps"]
        for _ in range(CAPTURE_CALLS):
            self.launch(0, past, self.length, uniforms)
            self.wait(self.length)
        self.slot.calls["captured_steps"] = counted  # not the sequence's steps

    def launch(self, token: int, past_length: int, length: int,
               uniforms: np.ndarray | None = None) -> None:
        """Enqueue ``length`` steps from ``token`` at position ``past_length`` (sampled:
        step j draws with ``uniforms[j]``)."""
        if past_length + length > self.slot.model.cache_length:
            raise ValueError(
                f"sequence of {past_length + length} tokens exceeds the static cache of "
                f"{self.slot.model.cache_length} tokens; export with a larger --max-length")
        inputs = self.inputs
        ends = past_length + 1 + np.arange(length)[:, None]  # [length, 1] valid lengths
        inputs["masks"][:length] = self._positions[None, :] < ends  # [length, T]
        inputs["token"][0, 0] = token
        if self.sampled:
            inputs["uniforms"][:length] = uniforms[:length]
        inputs.upload()  # one copy: what every step reads
        for b, options in zip(self.bindings[:length], self.options[:length]):
            self.session.run_with_iobinding(b, options)
        self.slot.calls["captured_steps"] += length
        self.slot.end = past_length + length

    def wait(self, length: int) -> np.ndarray:
        """The chain's ``length`` tokens [length] int64, once the device is done."""
        self.bindings[length - 1].synchronize_outputs()
        return np.array(self.ids.numpy()[0, :length])  # [length]


class Launched:
    """What work enqueued without waiting for it gives: greedy tokens
    (:meth:`StaticDecodeState.launch_greedy`, :meth:`~StaticDecodeState.launch_chain`) or
    logits on the device (:meth:`~StaticDecodeState.launch_device`). ``wait()`` blocks
    until the device is done and returns them (the same again on later calls). On the CPU
    the work is already done when it is launched."""

    def __init__(self, finish):
        self._finish = finish
        self._tokens: np.ndarray | None = None
        self.chain = None  # the chain it launched, if any
        self.rows = None  # a sampled chain's q rows on the device (RowsOnDevice)

    def wait(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = self._finish()
        return self._tokens


class StaticDecodeState(TokenState):
    """A :class:`~quickdraft.protocols.DecodeState` over a :class:`StaticOrtModel`, with its
    own cache slot; also a ``GreedyState``, ``ChainState``, ``SampledChainState``,
    ``DeviceState``, ``MeasuredState`` and ``ClosableState``.

    ``rewind`` only shortens the valid length: positions past it are overwritten by the
    next ``append``. ``close`` hands the slot back to the model.
    """

    def __init__(self, model: StaticOrtModel, slot: _CacheSlot):
        super().__init__(model)
        self._slot: _CacheSlot | None = slot
        self._pending: Launched | None = None  # work launched and not waited for

    @property
    def lane(self) -> int | None:
        """The lane of its model's lanes session this state's caches are bound to (None:
        none, it is scored alone)."""
        return None if self._slot is None else self._slot.lane

    def _lane_entry(self, tokens: Sequence[int]) -> tuple[_CacheSlot, list[int], int]:
        """What a lanes call needs of this state: its slot, the checked tokens, where they
        go."""
        slot = self._live()
        tokens = self._checked(tokens)
        if not tokens:
            raise ValueError("a lane needs at least one token to score")
        past = len(self._tokens)
        slot.check_lane_room(past + len(tokens))
        return slot, tokens, past

    def _consumed(self, tokens: list[int], t0: float, calls: int = 1) -> None:
        """A lanes call appended ``tokens`` (started at ``t0``; ``calls`` steps of it)."""
        self.times.record_call(len(tokens), t0, calls=calls)
        self._tokens.extend(tokens)

    @property
    def calls(self) -> dict:
        """Step counts of this state's slot: captured (fixed-length) and generic steps, and
        greedy-chain uploads skipped."""
        return dict(self._live().calls)

    def _live(self) -> _CacheSlot:
        self._check_thread()
        if self._slot is None:
            raise RuntimeError("this decode state is closed: make a new one with new_state()")
        if self._pending is not None:
            raise RuntimeError("this state has launched work not waited for: call wait() on "
                               "what launch_greedy / launch_chain returned first")
        return self._slot

    def _check_valid(self, choices: np.ndarray) -> np.ndarray:
        if choices.max() >= self.model.vocab_size:
            raise ValueError(
                "logits contain NaN or an infinity; the model produced invalid scores (with "
                "fp16 weights this is usually an overflow: export it in fp32, on the CPU "
                "with --kv-cache static or anywhere with the default dynamic cache)"
            )
        return choices

    def launch_greedy(self, tokens: Sequence[int]) -> Launched:
        """:meth:`append_greedy` without waiting: the call is enqueued on the device and
        this returns; the greedy tokens [len(tokens)] come from ``wait()``. Until then the
        state accepts no other call. A length without a fixed-length step runs to the
        end before this returns."""
        slot = self._live()
        tokens = self._checked(tokens)
        if not tokens or not self.model.has_greedy:
            raise ValueError("launch_greedy needs tokens and a graph with greedy_tokens")
        t0 = time.perf_counter()
        slot.run(tokens, len(self._tokens), launch=True)
        self._tokens.extend(tokens)
        step = slot.steps.get(len(tokens))

        def finish() -> np.ndarray:
            self._check_thread()
            self._pending = None
            if step is not None:
                step.synchronize()
                choices = step.read_greedy()  # [k]
            else:
                choices = np.array(slot.generic_greedy.numpy()[0])  # [k]
            self.times.record_call(len(tokens), t0)
            return self._check_valid(choices)

        self._pending = Launched(finish)
        return self._pending

    def launch_device(self, tokens: Sequence[int]) -> Launched:
        """:meth:`append_device` without waiting: the call is enqueued on the device and
        this returns; ``wait()`` gives the logits OrtValue [1, len(tokens), V] on the device
        (the step's own buffer, valid until its next call). Until then the state accepts no
        other call. A length without a fixed-length step runs to the end first."""
        slot = self._live()
        tokens = self._checked(tokens)
        if not tokens:
            raise ValueError("launch_device needs at least one token")
        t0 = time.perf_counter()
        value = slot.run(tokens, len(self._tokens), launch=True)
        self._tokens.extend(tokens)
        step = slot.steps.get(len(tokens))

        def finish():
            self._check_thread()
            self._pending = None
            if step is not None:
                step.synchronize()
            self.times.record_call(len(tokens), t0)
            return value

        self._pending = Launched(finish)
        return self._pending

    @property
    def max_chain(self) -> int:
        """The longest chain :meth:`launch_chain` takes: the model's ``chain_length``."""
        return self.model.chain_length

    def prepare_sampled_chain(self, sampling, compute: str = "float32") -> bool:
        """Whether :meth:`launch_sampled_chain` can run these settings (its session is
        built now: :meth:`StaticOrtModel.prepare_sampled`); for a state holding nothing yet
        both row banks' chains are made (and captured) now too."""
        ready = self.model.prepare_sampled(sampling, compute)
        if ready and not self._tokens:
            slot = self._live()
            for bank in (0, 1):
                slot.sampled_chain(sampling, compute, bank, at=0)
        return ready

    def launch_sampled_chain(self, token: int, uniforms: np.ndarray, sampling,
                             compute: str = "float32", bank: int = 0) -> Launched:
        """:meth:`launch_chain` with each step's token drawn, not its argmax: step j draws
        with ``uniforms[j]`` from q = ``adjust_logits`` of its logits (the sampling graph's
        steps, inside the model's run), one step per uniform. ``wait()`` returns the tokens;
        the returned object's ``rows`` are the q rows they were drawn from, on the device
        (valid until this state's next sampled chain in the same ``bank``, 0 or 1)."""
        from quickdraft.ort_backend.verify_graph import DeviceRows

        if bank not in (0, 1):
            raise ValueError(f"bank must be 0 or 1, got {bank!r}")
        uniforms = np.asarray(uniforms)
        at = len(self._tokens)  # where the chain writes: a new chain is captured there
        launched = self._launch(lambda slot: slot.sampled_chain(sampling, compute, bank, at),
                                token, len(uniforms), uniforms)
        launched.rows = DeviceRows(launched.chain.rows, len(uniforms), self.model.vocab_size,
                                   np.dtype(compute), self.model.device)
        return launched

    def launch_chain(self, token: int, length: int) -> Launched:
        """Enqueue ``length`` greedy steps from ``token``, each step's argmax the next one's
        input, all on the device (the model's ``chain_length`` steps at most); ``wait()``
        returns the ``length`` tokens [length] int64 and the state then holds ``token`` and
        all of them but the last (which, as after :meth:`append_greedy`, is not consumed)."""
        return self._launch(lambda slot: slot.chain, token, length)

    def _launch(self, chain_of, token: int, length: int, uniforms=None) -> Launched:
        """Launch ``length`` steps of the chain ``chain_of(slot)`` from ``token``."""
        slot = self._live()
        (token,) = self._checked([token])
        if not 1 <= length <= self.model.chain_length:
            raise ValueError(
                f"a chain of {length} steps needs a model loaded with chain_length >= "
                f"{length} (this one: {self.model.chain_length})")
        chain = chain_of(slot)
        t0 = time.perf_counter()
        chain.launch(token, len(self._tokens), length, uniforms)
        self._tokens.append(token)

        def finish() -> np.ndarray:
            self._check_thread()
            self._pending = None
            tokens = self._check_valid(chain.wait(length))  # [length]
            self._tokens.extend(tokens[:-1].tolist())
            self.times.record_call(length, t0, calls=length)
            return tokens

        self._pending = Launched(finish)
        self._pending.chain = chain
        return self._pending

    def append_device(self, tokens: Sequence[int]):
        """Consume ``tokens``; return the logits OrtValue [1, len(tokens), V] on the device."""
        slot = self._live()
        tokens = self._checked(tokens)
        if not tokens:
            raise ValueError("append_device needs at least one token")
        t0 = time.perf_counter()
        value = slot.run(tokens, len(self._tokens))
        self.times.record_call(len(tokens), t0)
        self._tokens.extend(tokens)
        return value

    def append(self, tokens: Sequence[int]) -> np.ndarray:
        """Consume ``tokens``; return logits [len(tokens), V] on the host (a copy)."""
        if len(tokens) == 0:
            self._live()
            return np.zeros((0, self.model.vocab_size), dtype=self.model.np_dtype)
        t0 = time.perf_counter()
        slot = self._live()
        tokens = self._checked(tokens)
        logits = np.array(slot.run(tokens, len(self._tokens)).numpy()[0])  # [k, V]
        self.times.record_call(len(tokens), t0)
        self._tokens.extend(tokens)
        return logits

    def append_greedy(self, tokens: Sequence[int]) -> np.ndarray:
        """Consume ``tokens``; return the greedy token after each of them [len(tokens)]
        int64: the argmax of each row's logits (the first on ties), computed on the device
        by the graph's ``greedy_tokens`` output, so only the token ids reach the host
        (``quickdraft.sampling.greedy_tokens`` of :meth:`append`'s logits for a graph
        without it). Refuses a row with a NaN or an infinity anywhere in it (stricter than
        ``greedy_tokens``, which looks at the row's maximum: raw model logits are finite)."""
        slot = self._live()
        tokens = self._checked(tokens)
        if not tokens:
            return np.zeros(0, dtype=np.int64)
        if not self.model.has_greedy:
            from quickdraft.sampling import greedy_tokens

            return greedy_tokens(self.append(tokens))
        t0 = time.perf_counter()
        choices = slot.run_greedy(tokens, len(self._tokens))  # [k]
        self.times.record_call(len(tokens), t0)
        self._tokens.extend(tokens)
        return self._check_valid(choices)

    def rewind(self, length: int) -> None:
        self._live()
        self._check_rewind(length)
        if length < len(self._tokens):
            t0 = time.perf_counter()
            del self._tokens[length:]
            self.times.record_rewind(t0)

    def close(self) -> None:
        """Give the cache slot back to the model (for its next state); idempotent."""
        if self._slot is not None:
            self._check_thread()
            try:
                if self._pending is not None:  # the device may still write into the slot
                    self._pending.wait()
            finally:
                slot, self._slot, self._pending = self._slot, None, None
                self._tokens.clear()
                self.model._release(slot)
