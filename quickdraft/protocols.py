"""The small protocols every model, drafter and runtime in quickdraft speaks.

A model (:class:`LanguageModel`) makes sequence states (:class:`DecodeState`): ``append``
tokens, getting the logits after each, and ``rewind`` after a rejection. Optional
capabilities are small protocols of their own (:class:`GreedyState`, :class:`DeviceState`,
:class:`MeasuredState`, :class:`ClosableState`; :class:`StatefulDrafter`,
:class:`SamplingDrafter`), checked with ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from quickdraft.sampling import SamplingConfig
    from quickdraft.timing import ModelTimes

__all__ = [
    "DecodeState",
    "LanguageModel",
    "Candidates",
    "RowsOnDevice",
    "TokenDraw",
    "Drafter",
    "BoundedDrafter",
    "StatefulDrafter",
    "SamplingDrafter",
    "CostAwareDrafter",
    "GreedyState",
    "Awaitable",
    "ChainState",
    "SampledLaunch",
    "SampledChainState",
    "DeviceState",
    "MeasuredState",
    "ClosableState",
    "Verdict",
    "Verifier",
    "Scores",
    "Decider",
    "LaneModel",
    "ChainPlan",
    "ChainPlanner",
    "LaneChainModel",
    "supports",
    "advance",
    "advance_greedy",
    "greedy_append",
    "launch_greedy_chain",
    "catch_up",
    "lag_behind",
    "fill",
    "rewind_to_common_prefix",
]


@runtime_checkable
class DecodeState(Protocol):
    """An incremental (KV-cache style) view of a model over one growing sequence."""

    @property
    def tokens(self) -> list[int]:
        """The token ids consumed so far (a copy)."""
        ...

    def append(self, tokens: Sequence[int]) -> np.ndarray:
        """Consume ``tokens``; return logits [len(tokens), V], row t predicting token t + 1."""
        ...

    def rewind(self, length: int) -> None:
        """Forget everything after the first ``length`` consumed tokens."""
        ...


@runtime_checkable
class LanguageModel(Protocol):
    """Anything that gives next-token logits for a prefix, incrementally."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_length(self) -> int | None:
        """The longest sequence the model accepts (None: unbounded)."""
        ...

    def new_state(self) -> DecodeState: ...


class TokenDraw(Protocol):
    """Draws a sampled sequence's next token from a model state with a given uniform
    (temperature > 0): ``first`` brings the state to ``ids`` (keeping any prefix it holds)
    and draws after them, ``next`` appends ``token`` and draws after it. The default draws
    on the host (:class:`quickdraft.generation.HostDraw`)."""

    def first(self, state: DecodeState, ids: Sequence[int], u: float) -> int: ...

    def next(self, state: DecodeState, token: int, u: float) -> int: ...


class RowsOnDevice(Protocol):
    """q rows [gamma, V] that lie on a device (a sampler's buffer): a verifier there binds
    them in place; ``numpy()`` copies them to the host."""

    def numpy(self) -> np.ndarray: ...


class Candidates:
    """What a drafter proposes for one speculative iteration.

    Args:
        tokens: [gamma] int64 proposed token ids.
        probs: [gamma, V] q at each proposed position (after sampling adjustments), or
            None for one-hot rows on ``tokens`` (greedy drafting), which are then built
            only if someone reads :attr:`probs`; :meth:`q_at` reads them without building.
        model_calls: draft forward calls spent on this proposal.
        checked: the rows are those of :func:`quickdraft.sampling.adjust_logits` and each
            token was drawn from its row (so q_i(x_i) > 0): verifiers may skip their input
            checks.
        vocab_size: V, needed when ``probs`` is None.
        rows_on_device: instead of ``probs``, q rows where a device sampler wrote them
            (:class:`RowsOnDevice`, e.g.
            :class:`quickdraft.ort_backend.verify_graph.DeviceRows`): a verifier on that
            device reads them in place, others read :attr:`probs`, a host copy.
    """

    def __init__(self, tokens: np.ndarray, probs: np.ndarray | None = None,
                 model_calls: int = 0, checked: bool = False, *,
                 vocab_size: int | None = None, rows_on_device: RowsOnDevice | None = None):
        if probs is None and vocab_size is None:
            raise ValueError("candidates without probs (one-hot or on a device) need "
                             "vocab_size")
        if probs is not None and rows_on_device is not None:
            raise ValueError("give q rows as probs or rows_on_device, not both")
        self.tokens = tokens  # [gamma] int64
        self.model_calls = model_calls
        self.checked = checked
        self.vocab_size = int(vocab_size if probs is None else np.shape(probs)[-1])
        self.rows_on_device = rows_on_device
        self.one_hot = probs is None and rows_on_device is None  # q_i one-hot on tokens_i
        self._probs = probs  # [gamma, V] or None until built

    @property
    def probs(self) -> np.ndarray:
        """q rows [gamma, V] float (one-hot rows are built, rows on a device copied, on
        first read)."""
        if self._probs is None:
            if self.rows_on_device is not None:
                self._probs = self.rows_on_device.numpy()  # [gamma, V]
                return self._probs
            gamma = len(self.tokens)
            rows = np.zeros((gamma, self.vocab_size))  # [gamma, V]
            rows[np.arange(gamma), self.tokens] = 1.0
            self._probs = rows
        return self._probs

    @property
    def has_rows(self) -> bool:
        """Whether the [gamma, V] rows exist (given, or built by a read of :attr:`probs`)."""
        return self._probs is not None

    def q_at(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """q_i(y_i) for i = 0 .. k - 1: tokens y [k] (k <= gamma) -> [k] float64."""
        y = np.asarray(tokens, dtype=np.int64)  # [k]
        k = len(y)
        if self.one_hot:
            return (np.asarray(self.tokens[:k]) == y).astype(np.float64)  # [k]
        return np.asarray(self.probs[np.arange(k), y], dtype=np.float64)  # [k]

    def __repr__(self) -> str:
        rows = ("one-hot" if self.one_hot else "probs" if self.rows_on_device is None
                else "rows on a device")
        return (f"Candidates(tokens={np.asarray(self.tokens).tolist()}, {rows}, "
                f"model_calls={self.model_calls}, checked={self.checked})")


class Drafter(Protocol):
    """Proposes draft tokens and decides how many; told afterwards how many were accepted.

    After Hugging Face's candidate generators: ``get_candidates`` and
    ``update_candidate_strategy``. The drafter owns its proposal length (fixed, adaptive
    or whatever its rule is); the loop only caps it.
    """

    def get_candidates(
        self, ids: Sequence[int], max_tokens: int, uniforms: np.ndarray
    ) -> Candidates:
        """Propose at most ``max_tokens`` tokens continuing ``ids``; ``uniforms`` [max_tokens]
        in [0, 1), one per token it may draw (by inverse CDF). Zero tokens is allowed: the
        iteration is then one target step."""
        ...

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        """Learn from the last iteration (``ids`` now includes its output)."""
        ...


@runtime_checkable
class BoundedDrafter(Protocol):
    """A drafter that never proposes more than ``max_tokens`` tokens per iteration. The
    loop draws that many draft uniforms per iteration (and no more), so a seeded run is
    the same whatever larger cap a runtime compiled for. None: no bound of its own (a
    drafter made of unbounded drafters); the runtime's ``max_draft`` decides."""

    @property
    def max_tokens(self) -> int | None: ...


@runtime_checkable
class StatefulDrafter(Protocol):
    """A drafter that drives model states (a draft model's KV cache, or several): the
    generator prefills them with the prompt, rewinds them with the sequence, reads their
    call times and closes them."""

    @property
    def states(self) -> Sequence[DecodeState]: ...

    @property
    def max_length(self) -> int | None:
        """The longest sequence its models accept (None: unbounded)."""
        ...


@runtime_checkable
class SamplingDrafter(Protocol):
    """A drafter whose q is shaped by sampling settings, which must be the target's (None:
    none of its parts has any)."""

    @property
    def sampling(self) -> SamplingConfig | None: ...


@runtime_checkable
class CostAwareDrafter(Protocol):
    """A drafter that uses the measured cost ratio c (a draft call over a target call)."""

    def observe_cost(self, c: float) -> None:
        """The c measured so far in this generation, after each iteration."""
        ...


@runtime_checkable
class GreedyState(Protocol):
    """A state that computes the argmax next to its logits (on its device)."""

    def append_greedy(self, tokens: Sequence[int]) -> np.ndarray:
        """Consume ``tokens``; return the greedy token after each [len(tokens)] int64."""
        ...


@runtime_checkable
class Awaitable(Protocol):
    """Work launched on a device; ``wait()`` blocks until it is done and returns its result."""

    def wait(self) -> np.ndarray: ...


@runtime_checkable
class ChainState(DecodeState, GreedyState, Protocol):
    """A :class:`GreedyState` that runs several greedy steps in one launch, each step's
    argmax the next one's input, all on its device (one wait for all of them)."""

    @property
    def max_chain(self) -> int:
        """The longest chain it can launch (0: none)."""
        ...

    def launch_chain(self, token: int, length: int) -> Awaitable:
        """Enqueue ``length`` greedy steps from ``token``; ``wait()`` gives their tokens
        [length], and the state then holds ``token`` and all of them but the last."""
        ...


class SampledLaunch(Protocol):
    """A launched sampled chain: ``wait()`` gives its tokens, ``rows`` the q rows they were
    drawn from, where they lie."""

    rows: RowsOnDevice

    def wait(self) -> np.ndarray: ...


@runtime_checkable
class SampledChainState(DecodeState, Protocol):
    """A state that drafts several sampled tokens in one launch: each step draws its token
    from q (the sampling adjustments of its logits) with a given uniform, on its device,
    and feeds it to the next step."""

    @property
    def max_chain(self) -> int:
        """The longest chain it can launch (0: none)."""
        ...

    def prepare_sampled_chain(self, sampling: SamplingConfig, compute: str = "float32") -> bool:
        """Make chains for these settings ready; False when the state cannot run them."""
        ...

    def launch_sampled_chain(self, token: int, uniforms: np.ndarray, sampling: SamplingConfig,
                             compute: str = "float32", bank: int = 0) -> SampledLaunch:
        """Enqueue ``len(uniforms)`` steps from ``token``, step j drawing with
        ``uniforms[j]``; the state then holds ``token`` and every drawn token but the last.
        ``bank`` (0 or 1): the rows buffer the q rows go to; a chain overwrites only the
        rows of its own bank, so a proposal's rows stay readable while the next chain runs
        in the other one."""
        ...


@runtime_checkable
class DeviceState(Protocol):
    """A state that can leave its logits on its device."""

    def append_device(self, tokens: Sequence[int]):
        """Consume ``tokens``; return the logits [1, len(tokens), V] as a device value."""
        ...


@runtime_checkable
class MeasuredState(Protocol):
    """A state that times and counts its own model calls."""

    @property
    def times(self) -> ModelTimes: ...


@runtime_checkable
class ClosableState(Protocol):
    """A state holding resources (cache buffers) to give back when its sequence ends."""

    def close(self) -> None: ...


class Verdict(NamedTuple):
    """What a :class:`Verifier` decided for one speculative iteration."""

    n_accepted: int  # n in 0..gamma: draft tokens accepted
    next_token: int  # the recovered token (n < gamma) or the bonus token (n == gamma)
    betas: list[float]  # beta at draft positions 0..min(n, gamma - 1), the ones reached


class Scores(NamedTuple):
    """What one target call gave a proposal, for its verifier to decide on: the greedy ids
    after each appended token [k] int64 (greedy decisions), or the logits rows [k, V] (a
    host array, or rows on the device that ``numpy.asarray`` copies to the host); or, in
    ``error``, why this sequence's rows cannot be decided on (the others of the call can)."""

    greedy: np.ndarray | None = None
    logits: object | None = None
    error: str | None = None


class Verifier(Protocol):
    """The second half of a speculative iteration: score the proposal, then decide.

    Brings ``target`` to ``scored`` (the sequence so far followed by the gamma candidate
    tokens) in one target call that (re-)appends at least the last gamma + 1 tokens, shapes
    the target's logits with ``sampling`` exactly as the candidates' q were shaped, and
    applies the acceptance rule with the given uniforms. Where the logits go (to the host,
    or nowhere: verification next to them on the device) is the verifier's business;
    :func:`quickdraft.generation.host_verify` is the reference one.
    """

    def __call__(
        self,
        target: DecodeState,
        scored: Sequence[int],
        candidates: Candidates,
        sampling: SamplingConfig,
        accept_uniforms: np.ndarray,
        sample_uniform: float,
        *,
        lenience: float = 1.0,
    ) -> Verdict:
        """accept_uniforms [gamma] and sample_uniform in [0, 1) -> the :class:`Verdict`."""
        ...


class Decider(Protocol):
    """A verifier's decision alone, on a target call made elsewhere (one call for several
    sequences: :class:`LaneModel`): the :class:`Verdict` a :class:`Verifier` would give on
    the same scores."""

    def __call__(
        self,
        scores: Scores,
        candidates: Candidates,
        sampling: SamplingConfig,
        accept_uniforms: np.ndarray,
        sample_uniform: float,
        *,
        lenience: float = 1.0,
    ) -> Verdict: ...


@runtime_checkable
class LaneModel(Protocol):
    """A model that scores several sequences in one call, each state in a lane of its own
    (its caches bound to that lane)."""

    @property
    def lane_tokens(self) -> int:
        """The most tokens one lane takes per call (0: no lanes)."""
        ...

    def in_lane(self, state: DecodeState) -> bool:
        """Whether ``state`` holds a lane of this model."""
        ...

    def new_state(self, lane: bool = True) -> DecodeState:
        """A new state, in a free lane when ``lane`` and one is free."""
        ...

    def score_lanes(self, states: Sequence[DecodeState], tokens: Sequence[Sequence[int]],
                    greedy: Sequence[bool]) -> list[Scores]:
        """Append ``tokens[i]`` to ``states[i]`` (distinct lanes) in one call; give each its
        :class:`Scores`: greedy ids where ``greedy[i]``, else its logits rows."""
        ...


@runtime_checkable
class LaneChainModel(LaneModel, Protocol):
    """A model whose lanes also run greedy chains: several states' chains as one."""

    @property
    def lanes(self) -> int:
        """Lanes every call runs (busy or idle)."""
        ...

    @property
    def lane_chain_length(self) -> int:
        """The longest chain one call runs (0: none)."""
        ...

    def chain_lanes(self, states: Sequence[DecodeState], tokens: Sequence[int],
                    lengths: Sequence[int]) -> list[np.ndarray]:
        """From ``tokens[i]``, ``lengths[i]`` greedy steps of ``states[i]`` (distinct lanes),
        each step's argmax the next one's input, in one call; each state's tokens."""
        ...


class ChainPlan:
    """A greedy proposal as one chain that someone else may run (with other sequences'
    chains, :meth:`LaneChainModel.chain_lanes`): the ``state`` appends ``lag`` first (what
    it lacks of the sequence but the last token), then chains ``length`` steps from
    ``token``. ``tokens`` holds the chain's output once run (None until then)."""

    def __init__(self, state: DecodeState, lag: list[int], token: int, length: int):
        self.state, self.lag, self.token, self.length = state, lag, int(token), int(length)
        self.tokens: np.ndarray | None = None  # [length], filled by whoever runs it


@runtime_checkable
class ChainPlanner(Protocol):
    """A drafter whose next proposal can be a :class:`ChainPlan` run elsewhere."""

    def plan_chain(self, ids: Sequence[int], max_tokens: int) -> ChainPlan | None:
        """The proposal after ``ids`` (at most ``max_tokens``) as a chain, its state rewound
        to what it shares with ``ids``; None when the proposal is not one greedy chain."""
        ...

    def from_chain(self, plan: ChainPlan) -> Candidates:
        """The candidates of a plan that was run (``plan.tokens`` filled)."""
        ...


_SUPPORTS: dict[tuple[type, type], bool] = {}


def supports(obj, capability: type) -> bool:
    """``isinstance(obj, capability)`` for a capability protocol, decided once per type (the
    decode loop asks on every call)."""
    key = (type(obj), capability)
    known = _SUPPORTS.get(key)
    if known is None:
        known = _SUPPORTS[key] = isinstance(obj, capability)
    return known


def rewind_to_common_prefix(state: DecodeState, ids: Sequence[int], min_new: int = 1) -> int:
    """Rewind ``state`` to the longest prefix it shares with ``ids``, leaving at least the
    last ``min_new`` tokens of ``ids`` to append; return that prefix's length."""
    if len(ids) == 0:
        raise ValueError("cannot advance a model to an empty sequence: the prompt is empty")
    if not 1 <= min_new <= len(ids):
        raise ValueError(f"min_new must be in [1, {len(ids)}], got {min_new}")
    have = state.tokens
    have = have if isinstance(have, list) else list(have)
    limit = min(len(have), len(ids) - min_new)
    common = _common_prefix(have, ids if isinstance(ids, list) else list(ids), limit)
    if common < len(have):
        state.rewind(common)
    return common


def _common_prefix(a: list, b: list, limit: int) -> int:
    """Length of the longest common prefix of a and b, at most ``limit``: list slices are
    compared (in C), by bisection when the first ``limit`` items differ somewhere."""
    if a[:limit] == b[:limit]:
        return limit
    lo, hi = 0, limit  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def advance(state: DecodeState, ids: Sequence[int], min_new: int = 1) -> np.ndarray:
    """Bring ``state`` to exactly ``ids`` and return the logits of the tokens it appended.

    Keeps the longest common prefix already consumed, but always re-appends at least the
    last ``min_new`` tokens (the caller needs their logits), rewinds past any divergence
    and appends the rest. Returns logits [k, V] for the k >= min_new appended tokens; row -1
    predicts the token after ``ids``.
    """
    common = rewind_to_common_prefix(state, ids, min_new)
    return state.append(list(ids[common:]))


def greedy_append(state: DecodeState, tokens: Sequence[int]) -> np.ndarray:
    """Append ``tokens`` and return the greedy token after each [len(tokens)] int64: the
    argmax of each logits row (the first on ties), as
    :func:`quickdraft.sampling.greedy_tokens` picks it. A :class:`GreedyState` answers
    itself (on its device); any other state's logits come to the host."""
    if supports(state, GreedyState):
        return state.append_greedy(tokens)
    from quickdraft.sampling import greedy_tokens

    return greedy_tokens(state.append(tokens))


def lag_behind(state: DecodeState, ids: Sequence[int]) -> list[int]:
    """Rewind ``state`` to the prefix it shares with ``ids`` (leaving at least the last
    token) and return the tokens of ``ids`` it lacks, the last one included."""
    common = rewind_to_common_prefix(state, ids, 1)
    return list(ids[common:])


def fill(state: DecodeState, tokens: Sequence[int]) -> None:
    """Append ``tokens`` for their caches alone: the cheapest call that fills them."""
    (state.append_greedy if supports(state, GreedyState) else state.append)(list(tokens))


def catch_up(state: DecodeState, ids: Sequence[int]) -> int:
    """Bring ``state`` to ``ids[:-1]`` (keeping the prefix it shares, one call for what it
    lacks, normally nothing) and return ``ids[-1]``: the token a chain starts from."""
    lag = lag_behind(state, ids)
    if len(lag) > 1:
        fill(state, lag[:-1])
    return lag[-1]


def launch_greedy_chain(state: ChainState, ids: Sequence[int], length: int) -> Awaitable:
    """Enqueue ``length`` greedy steps after ``ids`` (:func:`catch_up`, then one chain)."""
    return state.launch_chain(catch_up(state, ids), length)


def advance_greedy(state: DecodeState, ids: Sequence[int], min_new: int = 1) -> np.ndarray:
    """:func:`advance` returning the greedy token after each appended token [k] int64 (k >=
    ``min_new``) in place of the logits rows; the last one follows ``ids``."""
    common = rewind_to_common_prefix(state, ids, min_new)
    return greedy_append(state, list(ids[common:]))
