"""Drafting strategies: each a :class:`~quickdraft.protocols.Drafter` that owns its proposal.

NumPy only. Any proposal rule that looks only at the sequence so far and at the drafter's
own draws keeps the output law the target's (docs/explanation/exactness.md), so each of
these is exact: prompt lookup (:class:`NgramDrafter`), a model drafter behind it
(:class:`FallbackDrafter`), gamma chosen per iteration (:class:`AdaptiveGammaDrafter`,
:class:`HeuristicGammaDrafter`), a draft decoded speculatively by a smaller one
(:class:`HierarchicalDrafter`) and a bandit over several drafters (:class:`BanditDrafter`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from quickdraft.generation import ModelDrafter
from quickdraft.protocols import (
    BoundedDrafter,
    Candidates,
    DecodeState,
    Drafter,
    LanguageModel,
    SamplingDrafter,
    StatefulDrafter,
    advance,
    advance_greedy,
    supports,
)
from quickdraft.sampling import SamplingConfig, adjust_logits
from quickdraft.theory import best_gamma, walltime_improvement
from quickdraft.verification import verify, verify_greedy

__all__ = [
    "DRAFTERS",
    "NgramDrafter",
    "FallbackDrafter",
    "AdaptiveGammaDrafter",
    "HeuristicGammaDrafter",
    "HierarchicalDrafter",
    "BanditDrafter",
]


# drafting strategies by name (quickdraft.ort_backend.Pair.drafter, --drafter): the draft
# model; n-gram lookup; lookup with the model behind it (a bandit over every drafter when a
# draft of the draft exists); the draft decoded speculatively by the draft of the draft (or
# lookup); a bandit over all of them
DRAFTERS = ("model", "ngram", "auto", "hierarchical", "bandit")


def _bound(drafter: Drafter) -> int | None:
    bound = drafter.max_tokens if supports(drafter, BoundedDrafter) else None
    return None if bound is None else int(bound)


def _states(drafters: Sequence[Drafter]) -> list[DecodeState]:
    out: list[DecodeState] = []
    for d in drafters:
        if supports(d, StatefulDrafter):
            out.extend(s for s in d.states if all(s is not o for o in out))
    return out


def _max_length(drafters: Sequence[Drafter]) -> int | None:
    limits = [d.max_length for d in drafters if supports(d, StatefulDrafter)]
    known = [x for x in limits if x is not None]
    return min(known) if known else None


def _sampling(drafters: Sequence[Drafter]) -> SamplingConfig | None:
    """The sampling settings of the drafters that have one (they must agree)."""
    found = {d.sampling for d in drafters if supports(d, SamplingDrafter)} - {None}
    if len(found) > 1:
        raise ValueError(f"the drafters shape q with different settings: {sorted(map(str, found))}")
    return next(iter(found), None)


class NgramDrafter:
    """Prompt lookup: propose the continuation of the latest earlier occurrence of the last
    n tokens (n from ``max_ngram`` down to ``min_ngram``) in the prompt and output. No
    model; q is one-hot on the proposal.

    The n-grams are indexed as the sequence grows (a rewind or a new sequence rebuilds the
    index), so a lookup costs O(n), not a scan of the sequence.
    """

    def __init__(self, vocab_size: int, *, max_tokens: int = 8, max_ngram: int = 3,
                 min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if int(max_tokens) != max_tokens or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        self.vocab_size = int(vocab_size)
        self._max_tokens = int(max_tokens)
        self.sizes = range(max_ngram, min_ngram - 1, -1)  # longest match first
        self._seen: list[int] = []  # the sequence the index covers
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def _sync(self, ids: Sequence[int]) -> None:
        """Index every n-gram of ``ids`` that has a continuation: key -> its end (exclusive),
        the latest occurrence winning."""
        ids = ids if isinstance(ids, list) else list(ids)
        start = len(self._seen)
        if len(ids) < start or ids[:start] != self._seen:  # rewound or a new sequence
            self._index = {n: {} for n in self.sizes}
            start = 0
        for n, index in self._index.items():
            for end in range(max(start, n), len(ids)):  # ids[end] continues ids[end - n:end]
                index[tuple(ids[end - n:end])] = end
        self._seen = list(ids)

    def lookup(self, ids: Sequence[int], k: int) -> list[int]:
        """The continuation (at most k tokens) of the longest n-gram match; [] if none."""
        self._sync(ids)
        length = len(self._seen)
        for n in self.sizes:
            if n > length:
                continue
            end = self._index[n].get(tuple(self._seen[length - n:]))
            if end is not None:
                return self._seen[end:end + k]
        return []

    def get_candidates(self, ids: Sequence[int], max_tokens: int,
                       uniforms: np.ndarray) -> Candidates:
        k = min(self._max_tokens, int(max_tokens))
        tokens = np.asarray(self.lookup(ids, k) if k > 0 else [], dtype=np.int64)  # [k']
        return Candidates(tokens, None, model_calls=0, checked=True, vocab_size=self.vocab_size)

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        """Nothing to learn: the index catches up with ``ids`` on the next lookup."""


class _Composite:
    """What a drafter made of drafters declares from its parts."""

    parts: tuple[Drafter, ...] = ()

    @property
    def states(self) -> list[DecodeState]:
        return _states(self.parts)

    @property
    def max_length(self) -> int | None:
        return _max_length(self.parts)

    @property
    def sampling(self) -> SamplingConfig | None:
        return _sampling(self.parts)

    @property
    def max_tokens(self) -> int | None:
        """The largest of the parts' bounds; None when none of them has one."""
        bounds = [b for b in map(_bound, self.parts) if b is not None]
        return max(bounds) if bounds else None

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        for d in self.parts:
            d.update_candidate_strategy(ids, n_accepted)


class FallbackDrafter(_Composite):
    """``first``'s proposal when it has one (e.g. n-gram lookup), else ``then``'s (e.g. the
    draft model): ``--drafter auto``."""

    def __init__(self, first: Drafter, then: Drafter):
        self.first, self.then = first, then
        self.parts = (first, then)
        self.used: dict[str, int] = {"first": 0, "then": 0}  # iterations each one proposed
        self._proposer: Drafter | None = None  # the part that proposed this iteration

    def get_candidates(self, ids: Sequence[int], max_tokens: int,
                       uniforms: np.ndarray) -> Candidates:
        cand = self.first.get_candidates(ids, max_tokens, uniforms)
        if len(cand.tokens):
            self.used["first"] += 1
            self._proposer = self.first
            return cand
        self.used["then"] += 1
        self._proposer = self.then
        # ``first`` drew nothing (a lookup is deterministic): the uniforms are still unused
        return self.then.get_candidates(ids, max_tokens, uniforms)

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        """Only the part that proposed learns from the verdict (its statistics are of its
        own proposals)."""
        if self._proposer is not None:
            self._proposer.update_candidate_strategy(ids, n_accepted)


class _GammaSchedule(_Composite):
    """A drafter whose length this object chooses each iteration, then asks ``base`` (which
    honours max_tokens) for that many tokens."""

    def __init__(self, base: Drafter, max_gamma: int):
        if int(max_gamma) != max_gamma or max_gamma < 1:
            raise ValueError(f"max_gamma must be an integer >= 1, got {max_gamma!r}")
        self.base = base
        self.parts = (base,)
        self.max_gamma = int(max_gamma)
        self.chosen: list[int] = []  # gamma chosen per iteration

    @property
    def max_tokens(self) -> int:
        bound = _bound(self.base)
        return self.max_gamma if bound is None else min(self.max_gamma, bound)

    def choose(self) -> int:
        raise NotImplementedError

    def get_candidates(self, ids: Sequence[int], max_tokens: int,
                       uniforms: np.ndarray) -> Candidates:
        gamma = min(self.choose(), int(max_tokens))
        self.chosen.append(gamma)
        return self.base.get_candidates(ids, gamma, uniforms)


class AdaptiveGammaDrafter(_GammaSchedule):
    """gamma per iteration by Theorem 3.8 from running estimates of alpha and c.

    alpha: the acceptance counts of the last iterations, discounted by ``decay`` per
    iteration (so the estimate follows a change within a generation), with a Beta prior
    of mean ``prior_alpha`` and weight ``prior_weight`` (iterations that drafted nothing
    leave it as it is). c: ``cost_ratio`` until measured
    costs arrive through :meth:`observe_cost` (the ONNX Runtime generator reports its
    measured c after every iteration). When alpha <= c no gamma helps (Corollary 3.9) and
    the iteration is one target step; every ``probe_every`` such iterations it drafts one
    token to keep measuring alpha.
    """

    def __init__(self, base: Drafter, *, max_gamma: int = 8, cost_ratio: float = 0.1,
                 decay: float = 0.9, prior_alpha: float = 0.6, prior_weight: float = 2.0,
                 probe_every: int = 8):
        super().__init__(base, max_gamma)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if not 0.0 <= cost_ratio < math.inf:
            raise ValueError(f"cost_ratio must be a finite number >= 0, got {cost_ratio}")
        self.c = float(cost_ratio)
        self.decay = float(decay)
        self.prior = (prior_alpha * prior_weight, (1.0 - prior_alpha) * prior_weight)
        self.successes = 0.0  # discounted accepted draft tokens
        self.failures = 0.0  # discounted rejections
        self.probe_every = int(probe_every)
        self._idle = 0  # iterations in a row without drafting

    @property
    def alpha(self) -> float:
        """The current estimate of alpha (posterior mean)."""
        a, b = self.prior
        return (self.successes + a) / (self.successes + self.failures + a + b)

    def observe_cost(self, c: float) -> None:
        if math.isfinite(c) and c >= 0:
            self.c = float(c)

    def choose(self) -> int:
        alpha, c = min(self.alpha, 1.0 - 1e-9), self.c
        gamma = best_gamma(alpha, c, self.max_tokens)
        if walltime_improvement(alpha, gamma, c) <= 1.0:
            self._idle += 1
            return 1 if self._idle % self.probe_every == 0 else 0
        self._idle = 0
        return gamma

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        drafted = self.chosen[-1] if self.chosen else 0
        if drafted:  # an iteration without a draft tells nothing about alpha
            self.successes = self.decay * self.successes + n_accepted
            self.failures = self.decay * self.failures + (1 if n_accepted < drafted else 0)
        super().update_candidate_strategy(ids, n_accepted)


class HeuristicGammaDrafter(_GammaSchedule):
    """Hugging Face's ``num_assistant_tokens`` schedule: start at ``start``; +2 after an
    iteration that accepted every draft token, -1 (at least 1) otherwise."""

    def __init__(self, base: Drafter, *, start: int = 5, max_gamma: int = 16):
        super().__init__(base, max_gamma)
        self.gamma = min(int(start), self.max_gamma)

    def choose(self) -> int:
        return self.gamma

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        drafted = self.chosen[-1] if self.chosen else 0
        if drafted and n_accepted == drafted:
            self.gamma = min(self.gamma + 2, self.max_tokens)
        else:
            self.gamma = max(1, self.gamma - 1)
        super().update_candidate_strategy(ids, n_accepted)


class HierarchicalDrafter(ModelDrafter):
    """Propose ``gamma`` tokens of the draft model q, decoded speculatively by ``inner`` (a
    smaller draft model, or n-gram lookup): exact at both levels.

    The inner level is Algorithm 1 with q as its target, so the proposal follows q exactly
    and the q rows it returns are q's own; the outer verification then sees an ordinary q
    proposal. The inner level draws its uniforms from ``rng`` (independent of the outer
    acceptance uniforms), so pass a seeded ``numpy.random.Generator`` for repeatable runs.
    """

    def __init__(self, model: LanguageModel, inner: Drafter, sampling: SamplingConfig,
                 gamma: int, rng: np.random.Generator, *, inner_gamma: int | None = None,
                 state: DecodeState | None = None):
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator (np.random.default_rng(seed))")
        super().__init__(model, sampling, gamma, state=state)
        self.inner = inner
        self.rng = rng
        self.inner_gamma = int(inner_gamma or _bound(inner) or 4)
        self.inner_accepted: list[int] = []  # inner n per inner iteration
        self.inner_drafted: list[int] = []

    @property
    def states(self) -> list[DecodeState]:
        return [self.state, *_states([self.inner])]

    @property
    def max_length(self) -> int | None:
        limits = [x for x in (self.model.max_length, _max_length([self.inner])) if x is not None]
        return min(limits) if limits else None

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        self.inner.update_candidate_strategy(ids, n_accepted)

    def get_candidates(self, ids: Sequence[int], max_tokens: int,
                       uniforms: np.ndarray) -> Candidates:
        gamma = min(self.gamma, int(max_tokens))
        if gamma < 1:
            return Candidates(np.zeros(0, dtype=np.int64), None, checked=True,
                              vocab_size=self.model.vocab_size)
        greedy = self._sampling.greedy
        tokens: list[int] = []
        rows: list[np.ndarray] = []  # q rows, each [V] (sampling only)
        calls = 0
        while len(tokens) < gamma:
            prefix = list(ids) + tokens
            m = min(self.inner_gamma, gamma - len(tokens) - 1)  # the last token is q's own
            u = self.rng.random(2 * m + 1)  # [2 m + 1] inner draft, accept, sample
            cand = self.inner.get_candidates(prefix, m, u[:m])
            k = len(cand.tokens)
            calls += cand.model_calls + 1
            scored = prefix + cand.tokens.tolist()
            if greedy:  # q one-hot on its argmax ids
                choices = advance_greedy(self.state, scored, k + 1)[-(k + 1):]  # [k + 1]
                n, nxt = verify_greedy(choices, cand.tokens)
            else:
                logits = advance(self.state, scored, min_new=k + 1)[-(k + 1):]  # [k + 1, V]
                q = adjust_logits(logits, self._sampling)  # [k + 1, V]
                n, nxt = verify(q, cand.probs, cand.tokens, u[m:m + k], float(u[2 * m]),
                                validate=not cand.checked)
                rows.extend(q[: n + 1])
            tokens += cand.tokens[:n].tolist() + [int(nxt)]
            self.inner_accepted.append(n)
            self.inner_drafted.append(k)
        tokens = tokens[:gamma]
        x = np.asarray(tokens, dtype=np.int64)  # [gamma]
        if greedy:
            return Candidates(x, None, model_calls=calls, checked=True,
                              vocab_size=self.model.vocab_size)
        return Candidates(x, np.stack(rows[:gamma]), model_calls=calls, checked=True)


class BanditStats:
    """The discounted plays and rewards of a bandit's arms. Sequences over one loaded pair
    may share one (``Pair.drafter`` does), so each new sequence starts from what the earlier
    ones measured instead of exploring every arm again; updates take a lock."""

    def __init__(self, arms: Iterable[str]):
        self.arms = tuple(arms)
        self.counts = {name: 0.0 for name in self.arms}  # discounted plays
        self.rewards = {name: 0.0 for name in self.arms}  # discounted reward sums
        self._lock = threading.Lock()

    def __deepcopy__(self, memo) -> BanditStats:
        copied = BanditStats(self.arms)
        copied.counts, copied.rewards = self.snapshot()
        return copied

    def snapshot(self) -> tuple[dict[str, float], dict[str, float]]:
        """(counts, rewards) as of now."""
        with self._lock:
            return dict(self.counts), dict(self.rewards)

    def record(self, played: str, reward: float, discount: float) -> None:
        """Discount every arm, then add one play of ``played`` earning ``reward``."""
        with self._lock:
            for a in self.arms:
                self.counts[a] *= discount
                self.rewards[a] *= discount
            self.counts[played] += 1.0
            self.rewards[played] += reward


class BanditDrafter(_Composite):
    """An online choice among drafters: discounted UCB on measured tokens per second.

    Each iteration plays one arm; its reward is the iteration's output tokens over its
    wall time (from this drafter's proposal to the next update: drafting, verification and
    bookkeeping), or over ``cost_model(arm, candidates)`` seconds when one is given (a
    deterministic stand-in for tests and simulations). Rewards and counts decay by
    ``discount`` per iteration, so the choice follows a workload that changes. ``stats``:
    a :class:`BanditStats` over the same arm names shared with other sequences' bandits
    (default: this bandit's own). Exact whatever it picks: the choice depends on the past
    only (of this sequence and of the others sharing ``stats``), not on this iteration's
    draws.
    """

    def __init__(self, arms: Mapping[str, Drafter], *, discount: float = 0.97,
                 explore: float = 0.5,
                 cost_model: Callable[[str, Candidates], float] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 stats: BanditStats | None = None):
        if not arms:
            raise ValueError("give at least one drafter")
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        self.arms = dict(arms)
        self.parts = tuple(self.arms.values())
        _sampling(self.parts)  # the model drafters must agree
        self.discount, self.explore = float(discount), float(explore)
        self.cost_model, self.clock = cost_model, clock
        if stats is not None and set(stats.arms) != set(self.arms):
            raise ValueError(f"the shared bandit statistics are over arms {sorted(stats.arms)}, "
                             f"not {sorted(self.arms)}")
        self.stats = stats if stats is not None else BanditStats(self.arms)
        self.plays: list[str] = []  # the arm of each iteration
        self._started = 0.0
        self._cost = None  # cost_model's seconds for the current iteration

    def choose(self) -> str:
        counts, rewards = self.stats.snapshot()
        unplayed = [name for name in self.arms if counts[name] == 0]
        if unplayed:
            return unplayed[0]
        means = {a: rewards[a] / counts[a] for a in self.arms}
        scale = max(means.values()) or 1.0
        total = sum(counts.values())
        return max(self.arms, key=lambda a: means[a] / scale
                   + self.explore * math.sqrt(math.log(max(total, 1.0)) / counts[a]))

    def get_candidates(self, ids: Sequence[int], max_tokens: int,
                       uniforms: np.ndarray) -> Candidates:
        name = self.choose()
        self.plays.append(name)
        self._started = self.clock()
        cand = self.arms[name].get_candidates(ids, max_tokens, uniforms)
        self._cost = None if self.cost_model is None else float(self.cost_model(name, cand))
        return cand

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        seconds = self._cost if self._cost is not None else self.clock() - self._started
        reward = (n_accepted + 1) / max(seconds, 1e-9)  # tokens per second
        played = self.plays[-1]
        self.stats.record(played, reward, self.discount)
        self.arms[played].update_candidate_strategy(ids, n_accepted)  # its own verdict only
