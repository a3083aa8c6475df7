"""Autoregressive and speculative generation over any :class:`~quickdraft.protocols.LanguageModel`.

NumPy only. The reference models and the ONNX Runtime models both plug in here; the
acceptance rule itself lives in :mod:`quickdraft.verification`.

One speculative iteration (:func:`speculative_step`) is a pure function of the model
states and its uniforms; :func:`speculative_generate` draws the uniforms from a
``numpy.random.Generator`` and does the bookkeeping. An iteration has two halves: a
:class:`~quickdraft.protocols.Drafter` proposes, a :class:`~quickdraft.protocols.Verifier`
scores the proposal with the target and decides. :func:`host_verify` is the default
verifier; the ONNX Runtime fast path plugs in one that verifies on the device
(:class:`quickdraft.ort_backend.verify_graph.GraphVerifier`) and reuses these loops.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from quickdraft.protocols import (
    BoundedDrafter,
    Candidates,
    ChainPlan,
    ChainState,
    DecodeState,
    Drafter,
    LanguageModel,
    SamplingDrafter,
    Scores,
    TokenDraw,
    Verdict,
    Verifier,
    advance,
    advance_greedy,
    greedy_append,
    lag_behind,
    launch_greedy_chain,
    supports,
)
from quickdraft.sampling import SamplingConfig, adjust_logits, sample_token
from quickdraft.theory import alpha_from_acceptances, beta
from quickdraft.verification import greedy_applies, verify, verify_greedy

__all__ = [
    "GenerationStats",
    "IterationRates",
    "GenerationResult",
    "StepResult",
    "ModelDrafter",
    "HostDraw",
    "host_verify",
    "speculative_step",
    "speculative_generate",
    "speculative_stream",
    "speculative_iterations",
    "SpeculativeIterations",
    "Proposal",
    "propose",
    "step_result",
    "host_decide",
    "wants_greedy",
    "autoregressive_generate",
    "autoregressive_stream",
    "check_pair",
    "check_uniforms",
    "draft_budget",
]


class IterationRates:
    """Rates every generation's statistics derive alike from ``beta_per_position``,
    ``new_tokens`` and ``target_calls`` (the fields of the classes that mix it in)."""

    @property
    def alpha(self) -> float:
        """Empirical alpha: the mean beta over the draft positions the target reached."""
        b = self.beta_per_position
        return float(np.mean(b)) if b else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else float("nan")


@dataclass
class GenerationStats(IterationRates):
    """What happened during one generation."""

    gamma: int = 0  # the most draft tokens proposed in one iteration (0: autoregressive)
    new_tokens: int = 0  # tokens returned (after truncation at max_new_tokens / EOS)
    iterations: int = 0  # speculative iterations (or autoregressive steps)
    target_calls: int = 0  # target forward calls (prefill included)
    draft_calls: int = 0  # draft forward calls (prefill included)
    accepted_per_iteration: list[int] = field(default_factory=list)  # n of each iteration
    drafted_per_iteration: list[int] = field(default_factory=list)  # draft tokens proposed
    # beta at each draft position the target reached
    beta_per_position: list[float] = field(default_factory=list)

    def record(self, step: StepResult, produced: int) -> None:
        """Count one speculative iteration; ``produced``: new tokens so far."""
        self.iterations += 1
        self.gamma = max(self.gamma, step.drafted)
        self.target_calls += 1
        self.draft_calls += step.draft_calls
        self.accepted_per_iteration.append(step.n_accepted)
        self.drafted_per_iteration.append(step.drafted)
        self.beta_per_position.extend(step.betas)
        self.new_tokens = produced

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed draft tokens."""
        proposed = sum(self.drafted_per_iteration)
        return sum(self.accepted_per_iteration) / proposed if proposed else float("nan")

    @property
    def alpha_mle(self) -> float:
        """alpha estimated from the accepted counts alone (i.i.d. assumption)."""
        if not self.accepted_per_iteration:
            return float("nan")
        return alpha_from_acceptances(self.accepted_per_iteration, self.drafted_per_iteration)

    @property
    def tokens_per_iteration(self) -> float:
        """Mean tokens emitted per iteration (compare with Eq. 1)."""
        n = self.accepted_per_iteration
        return (sum(n) + len(n)) / len(n) if n else float("nan")

    def as_dict(self) -> dict:
        return {
            "gamma": self.gamma,
            "new_tokens": self.new_tokens,
            "iterations": self.iterations,
            "target_calls": self.target_calls,
            "draft_calls": self.draft_calls,
            "acceptance_rate": self.acceptance_rate,
            "alpha": self.alpha,
            "tokens_per_iteration": self.tokens_per_iteration,
            "tokens_per_target_call": self.tokens_per_target_call,
            "alpha_mle": self.alpha_mle,
            "accepted_per_iteration": list(self.accepted_per_iteration),
            "drafted_per_iteration": list(self.drafted_per_iteration),
        }


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens (prompt excluded)
    stats: GenerationStats


@dataclass
class StepResult:
    """One speculative iteration."""

    tokens: list[int]  # accepted draft tokens followed by the recovered or bonus token
    n_accepted: int  # n in 0..gamma
    betas: list[float]  # beta at draft positions 0..min(n, gamma - 1)
    draft_calls: int  # draft forward calls spent proposing
    drafted: int  # draft tokens proposed (n_accepted <= drafted)


class ModelDrafter:
    """A :class:`~quickdraft.protocols.Drafter` that samples ``gamma`` tokens from a draft
    model q (fewer when the loop's cap is lower).

    ``stop_below`` > 0 stops a sampled draft early, after a token the draft itself gave a
    probability below it (its confidence dropped: the next tokens would likely be
    rejected); a rule on the draft's own draws, so the output law is unchanged. ``state``:
    a state of ``model`` to draft in, shared with other drafters (default: a new one).
    """

    def __init__(self, model: LanguageModel, sampling: SamplingConfig = SamplingConfig(),
                 gamma: int = 4, *, stop_below: float = 0.0, state: DecodeState | None = None):
        if int(gamma) != gamma or gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {gamma!r}")
        if not 0.0 <= stop_below < 1.0:
            raise ValueError(f"stop_below must be in [0, 1), got {stop_below!r}")
        self.stop_below = float(stop_below)
        self.model = model
        self._sampling = sampling
        self.gamma = int(gamma)
        # a state of ``model`` shared with other drafters of it (each syncs it to its ids),
        # so switching between them does not replay the sequence into a second cache
        self.state: DecodeState = model.new_state() if state is None else state

    @property
    def sampling(self) -> SamplingConfig:
        return self._sampling

    @property
    def max_tokens(self) -> int:
        return self.gamma

    @property
    def states(self) -> list[DecodeState]:
        return [self.state]

    @property
    def max_length(self) -> int | None:
        return self.model.max_length

    def get_candidates(self, ids: Sequence[int], max_tokens: int,
                       uniforms: np.ndarray) -> Candidates:
        gamma = min(self.gamma, int(max_tokens))
        if gamma < 1:
            return Candidates(np.zeros(0, dtype=np.int64), None, vocab_size=self.model.vocab_size,
                              checked=True)
        if self.sampling.greedy:
            return self._greedy_candidates(ids, gamma, uniforms)
        logits = advance(self.state, ids)[-1]  # [V]
        tokens = np.empty(gamma, dtype=np.int64)  # [gamma]
        rows = []  # q rows, each [V]
        for i in range(gamma):
            q = adjust_logits(logits, self.sampling)  # [V]
            tokens[i] = sample_token(q, float(uniforms[i]))
            rows.append(q)
            if q[tokens[i]] < self.stop_below:  # the draft doubts its own token: stop here
                break
            if i + 1 < gamma:
                logits = self.state.append([int(tokens[i])])[-1]  # [V]
        k = len(rows)
        return Candidates(tokens[:k], np.stack(rows), model_calls=k, checked=True)

    def plan_chain(self, ids: Sequence[int], max_tokens: int) -> ChainPlan | None:
        """:class:`~quickdraft.protocols.ChainPlanner`: the greedy proposal after ``ids``
        as one chain of this drafter's state (None when sampling, when the state runs no
        chain that long, or when there is nothing to draft)."""
        gamma = min(self.gamma, int(max_tokens))
        if gamma < 1 or not self.sampling.greedy or not self._chains(gamma):
            return None
        lag = lag_behind(self.state, ids)
        return ChainPlan(self.state, lag[:-1], lag[-1], gamma)

    def _chains(self, gamma: int) -> bool:
        """Whether this drafter's state drafts ``gamma`` greedy tokens as one chain."""
        return supports(self.state, ChainState) and self.state.max_chain >= gamma

    def from_chain(self, plan: ChainPlan) -> Candidates:
        if plan.tokens is None or len(plan.tokens) != plan.length:
            raise ValueError("from_chain needs a plan that was run (its tokens filled)")
        return Candidates(np.asarray(plan.tokens, dtype=np.int64), None,
                          model_calls=plan.length, checked=True,
                          vocab_size=self.model.vocab_size)

    def _greedy_candidates(self, ids: Sequence[int], gamma: int,
                           uniforms: np.ndarray) -> Candidates:
        """Temperature 0: each token is the argmax (what sample_token draws from the one-hot
        row whatever the uniform), so only argmax ids are needed (``greedy_append``: on the
        device for a model that computes them there; a :class:`ChainState` runs all gamma
        steps in one launch) and q stays one-hot on the tokens."""
        check_uniforms(uniforms[:gamma])  # unused, but must still be uniforms
        if self._chains(gamma):
            tokens = launch_greedy_chain(self.state, ids, gamma).wait()  # [gamma], one wait
            return Candidates(np.asarray(tokens, dtype=np.int64), None, model_calls=gamma,
                              checked=True, vocab_size=self.model.vocab_size)
        tokens = np.empty(gamma, dtype=np.int64)  # [gamma]
        tokens[0] = advance_greedy(self.state, ids)[-1]
        for i in range(1, gamma):
            tokens[i] = greedy_append(self.state, [int(tokens[i - 1])])[-1]
        return Candidates(tokens, None, model_calls=gamma, checked=True,
                          vocab_size=self.model.vocab_size)

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        """Fixed gamma: nothing to learn. Rejected tokens are rewound lazily."""


def check_pair(target: LanguageModel, draft: LanguageModel) -> None:
    """Refuse a draft whose vocabulary differs from the target's."""
    if target.vocab_size != draft.vocab_size:
        raise ValueError(
            f"draft vocabulary ({draft.vocab_size}) differs from the target's "
            f"({target.vocab_size}); speculative decoding needs one shared tokenizer"
        )


def draft_budget(remaining: int, limit: int | None = None) -> int:
    """The most draft tokens worth proposing when ``remaining`` output tokens are still
    wanted: an iteration emits at most n + 1 tokens, so at most remaining - 1, and at most
    ``limit`` (a compiled maximum; None: no limit). 0 makes the iteration one target step."""
    cap = max(0, remaining - 1)
    return cap if limit is None else min(cap, int(limit))


EosIds = int | Collection[int] | None  # one end-of-sequence id, several, or none


def _eos_set(eos_id: EosIds) -> frozenset[int]:
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, (int, np.integer)):
        return frozenset([int(eos_id)])
    return frozenset(int(e) for e in eos_id)


def _truncate_at_eos(out: list[int], eos: frozenset[int]) -> list[int]:
    """``out`` up to and including its first end-of-sequence token."""
    for i, token in enumerate(out):
        if token in eos:
            return out[: i + 1]
    return out


def _check_request(model: LanguageModel, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. a BOS token)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    limit = model.max_length
    if limit is not None and len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the model's context of {limit} tokens; shorten the prompt or lower max_new_tokens"
        )


def wants_greedy(candidates: Candidates, sampling: SamplingConfig) -> bool:
    """Whether a proposal is decided on the target's argmax ids alone (greedy sampling,
    checked candidates), not on its logits rows."""
    return greedy_applies(sampling.greedy, candidates.checked)


def host_verify(
    target: DecodeState,
    scored: Sequence[int],
    candidates: Candidates,
    sampling: SamplingConfig,
    accept_uniforms: np.ndarray,
    sample_uniform: float,
    *,
    lenience: float = 1.0,
) -> Verdict:
    """The reference :class:`~quickdraft.protocols.Verifier`: the target's logits come to
    the host, :func:`~quickdraft.sampling.adjust_logits` shapes them into p and
    :func:`quickdraft.verification.verify` decides (greedy, with checked candidates: only
    the target's argmax ids come to the host, :func:`~quickdraft.protocols.advance_greedy`).
    Scoring and deciding are apart (:func:`host_decide`), so a target call made elsewhere
    (several sequences in one call) is decided the same way.

    Candidates marked ``checked`` (q rows from ``adjust_logits``, tokens drawn from them)
    skip verify's input checks. Greedy sampling with such candidates decides with
    :func:`quickdraft.verification.verify_greedy` on the target's argmax tokens, which is
    what ``verify`` returns on the one-hot rows (tests/test_verification.py proves it).
    """
    _check_decision(candidates, lenience, accept_uniforms, sample_uniform)  # before scoring
    k = len(candidates.tokens) + 1
    if wants_greedy(candidates, sampling):
        scores = Scores(greedy=advance_greedy(target, scored, k))  # [>= gamma + 1]
    else:
        scores = Scores(logits=advance(target, scored, min_new=k))  # [>= gamma + 1, V]
    return _decide(scores, candidates, sampling, accept_uniforms, sample_uniform, lenience)


def host_decide(
    scores: Scores,
    candidates: Candidates,
    sampling: SamplingConfig,
    accept_uniforms: np.ndarray,
    sample_uniform: float,
    *,
    lenience: float = 1.0,
) -> Verdict:
    """:func:`host_verify`'s decision on a target call's :class:`~quickdraft.protocols.Scores`
    (their last gamma + 1 rows): greedy ids where :func:`wants_greedy`, else logits rows
    (on the host, or anything ``numpy.asarray`` copies there)."""
    _check_decision(candidates, lenience, accept_uniforms, sample_uniform)
    return _decide(scores, candidates, sampling, accept_uniforms, sample_uniform, lenience)


def _decide(scores: Scores, candidates: Candidates, sampling: SamplingConfig,
            accept_uniforms: np.ndarray, sample_uniform: float, lenience: float) -> Verdict:
    """:func:`host_decide` after its checks."""
    x = candidates.tokens  # [gamma]
    gamma = len(x)
    if candidates.checked:
        if wants_greedy(candidates, sampling):
            # p is one-hot on the target's argmax tokens: only those are needed
            choices = np.asarray(scores.greedy)[-(gamma + 1):]  # [gamma + 1]
            n, token = verify_greedy(choices, x)
            reached = min(n + 1, gamma)
            # beta_i = sum_x min(p_i(x), q_i(x)) = q_i(choice_i) on one-hot p_i
            return Verdict(n, token, candidates.q_at(choices[:reached]).tolist())
    logits = np.asarray(scores.logits)[-(gamma + 1):]  # [gamma + 1, V]
    q = candidates.probs  # [gamma, V]
    p = adjust_logits(logits, sampling)  # [gamma + 1, V]
    n, token = verify(p, q, x, accept_uniforms, sample_uniform, lenience=lenience,
                      validate=not candidates.checked)
    reached = min(n + 1, gamma)
    betas = beta(p[:reached], q[:reached]).tolist()  # [reached]
    return Verdict(n, token, betas)


def _check_decision(candidates: Candidates, lenience: float, accept_uniforms: np.ndarray,
                    sample_uniform: float) -> None:
    """The checks a decision makes before it touches anything (checked candidates skip
    verify's own, so their uniforms are checked here)."""
    if not 0.0 < lenience <= 1.0:
        raise ValueError(f"lenience must be in (0, 1], got {lenience}; 1 is exact sampling")
    if candidates.checked:
        check_uniforms(accept_uniforms, sample_uniform)


def check_uniforms(uniforms: np.ndarray, *more: float) -> None:
    """Refuse uniforms outside [0, 1) (the checks verify and sample_token make)."""
    u = np.asarray(uniforms)
    if u.size and not (u.min() >= 0.0 and u.max() < 1.0):
        raise ValueError(f"uniforms must be in [0, 1), got {u.tolist()}")
    for v in more:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"uniform must be in [0, 1), got {v}")


@dataclass(frozen=True)
class Proposal:
    """The first half of an iteration: the drafter's candidates and the uniforms that will
    decide them."""

    scored: list[int]  # the sequence so far, then the candidates: what the target scores
    candidates: Candidates
    accept_uniforms: np.ndarray  # [k] for the k candidates
    sample_uniform: float


def propose(drafter: Drafter, ids: Sequence[int], draft_uniforms: np.ndarray,
            accept_uniforms: np.ndarray, sample_uniform: float) -> Proposal:
    """The drafter proposes k <= len(draft_uniforms) tokens after ``ids``."""
    cand = drafter.get_candidates(ids, len(draft_uniforms), draft_uniforms)
    k = len(cand.tokens)
    if k > len(draft_uniforms):
        raise ValueError(f"the drafter proposed {k} tokens, more than the {len(draft_uniforms)} "
                         "it was allowed (get_candidates must respect max_tokens)")
    return Proposal(list(ids) + cand.tokens.tolist(), cand, accept_uniforms[:k],
                    float(sample_uniform))


def step_result(proposal: Proposal, verdict: Verdict) -> StepResult:
    """The iteration a verdict on ``proposal`` makes: accepted tokens, then the recovered
    or bonus one."""
    n, token, betas = verdict
    cand = proposal.candidates
    return StepResult(cand.tokens[:n].tolist() + [token], n, list(betas), cand.model_calls,
                      len(cand.tokens))


def speculative_step(
    target: DecodeState,
    drafter: Drafter,
    ids: Sequence[int],
    sampling: SamplingConfig,
    draft_uniforms: np.ndarray,
    accept_uniforms: np.ndarray,
    sample_uniform: float,
    *,
    lenience: float = 1.0,
    verifier: Verifier | None = None,
) -> StepResult:
    """One iteration of Algorithm 1: the drafter proposes n_draft <= len(draft_uniforms)
    tokens, the target scores them in one call, the verifier decides. Pure given the states
    and the uniforms (draft [m], accept [m] of which the first n_draft are used, sample).

    ``verifier`` scores and decides (default :func:`host_verify`)."""
    p = propose(drafter, ids, draft_uniforms, accept_uniforms, sample_uniform)
    verify_with = host_verify if verifier is None else verifier
    return step_result(p, verify_with(target, p.scored, p.candidates, sampling,
                                      p.accept_uniforms, p.sample_uniform, lenience=lenience))


def _drafter_for(draft: LanguageModel | None, drafter: Drafter | None, gamma: int | None,
                 target: LanguageModel, sampling: SamplingConfig) -> Drafter:
    """The drafter of a generation: ``drafter`` as given, or a :class:`ModelDrafter` over the
    ``draft`` model proposing ``gamma`` tokens."""
    if drafter is not None:
        if draft is not None or gamma is not None:
            raise ValueError("give a drafter, or a draft model and gamma, not both: a drafter "
                             "decides its own proposal length")
        if supports(drafter, SamplingDrafter) and drafter.sampling not in (None, sampling):
            raise ValueError(
                f"the drafter shapes q with {drafter.sampling} but the target is sampled with "
                f"{sampling}; speculative sampling needs the same settings on both")
        return drafter
    if draft is None:
        raise ValueError("give a draft model (with gamma) or a drafter")
    if gamma is None:
        raise ValueError("gamma is needed with a draft model: how many tokens it proposes")
    check_pair(target, draft)
    return ModelDrafter(draft, sampling, gamma)


def _draft_limit(drafter: Drafter, max_draft: int | None) -> int:
    """The most draft tokens an iteration may ask for: the drafter's own bound and the
    runtime's compiled maximum, whichever is lower (one of them must be known)."""
    bounds = [int(max_draft)] if max_draft is not None else []
    own = drafter.max_tokens if supports(drafter, BoundedDrafter) else None
    if own is not None:
        bounds.append(int(own))
    if not bounds:
        raise ValueError("the drafter declares no max_tokens: pass max_draft, the most draft "
                         "tokens one iteration may propose")
    return min(bounds)


def speculative_iterations(
    target: LanguageModel,
    draft: LanguageModel | None,
    prompt_ids: Sequence[int],
    *,
    gamma: int | None = None,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    rng: np.random.Generator,
    eos_id: EosIds = None,
    drafter: Drafter | None = None,
    lenience: float = 1.0,
    stats: GenerationStats | None = None,
    state: DecodeState | None = None,
    verifier: Verifier | None = None,
    max_draft: int | None = None,
) -> SpeculativeIterations:
    """The iterations of a speculative generation, checked and ready to run
    (:class:`SpeculativeIterations`; :func:`speculative_stream` runs them).

    Pass a draft model and ``gamma`` (a :class:`ModelDrafter`), or any ``drafter``, which
    decides each proposal's length; the loop caps it at the remaining budget and at
    ``max_draft`` (a compiled maximum). ``verifier`` scores and decides each proposal
    (default :func:`host_verify`). ``stats`` (if given) is filled in as generation proceeds.
    ``eos_id`` may be one id or several. ``state`` is a target state to continue from (for
    example one already prefilled with ``prompt_ids[:-1]``); it must hold fewer tokens
    than ``prompt_ids``, because the first target call needs the last prompt token's logits.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (np.random.default_rng(seed))")
    if gamma is not None and (int(gamma) != gamma or gamma < 1):
        raise ValueError(f"gamma must be an integer >= 1, got {gamma}")
    if max_draft is not None and (int(max_draft) != max_draft or max_draft < 1):
        raise ValueError(f"max_draft must be an integer >= 1 or None, got {max_draft}")
    _check_request(target, prompt_ids, max_new_tokens)
    drafter = _drafter_for(draft, drafter, gamma, target, sampling)
    limit = _draft_limit(drafter, max_draft)
    if state is None:
        state = target.new_state()
    elif len(state.tokens) >= len(prompt_ids):
        raise ValueError(
            f"the target state holds {len(state.tokens)} tokens; to continue a prompt of "
            f"{len(prompt_ids)} it may hold at most {len(prompt_ids) - 1} (rewind it first)"
        )
    return SpeculativeIterations(
        state, drafter, prompt_ids, max_new_tokens=max_new_tokens, limit=limit,
        sampling=sampling, rng=rng, eos=_eos_set(eos_id), lenience=lenience,
        verifier=host_verify if verifier is None else verifier,
        stats=stats if stats is not None else GenerationStats())


class SpeculativeIterations:
    """The loop of a speculative generation with its halves apart: :meth:`propose`, then
    :meth:`commit` of a verdict on it, from this loop's verifier (:meth:`step`) or from a
    call that scored several sequences at once. Made by :func:`speculative_iterations`."""

    def __init__(self, state: DecodeState, drafter: Drafter, prompt_ids: Sequence[int], *,
                 max_new_tokens: int, limit: int, sampling: SamplingConfig,
                 rng: np.random.Generator, eos: frozenset[int], lenience: float,
                 verifier: Verifier, stats: GenerationStats):
        self.state, self.drafter, self.verifier = state, drafter, verifier
        self.sampling, self.lenience, self.rng, self.eos = sampling, lenience, rng, eos
        self.max_new_tokens, self.limit, self.stats = max_new_tokens, limit, stats
        self.ids = list(prompt_ids)
        self.produced = 0
        self._ended = False  # EOS came

    @property
    def done(self) -> bool:
        return self._ended or self.produced >= self.max_new_tokens

    def budget(self) -> int:
        """The most draft tokens the next iteration may propose."""
        return draft_budget(self.max_new_tokens - self.produced, self.limit)

    def propose(self, drafter: Drafter | None = None) -> Proposal:
        """The drafter's proposal (``drafter``: one standing in for this loop's, e.g. with a
        proposal made elsewhere) with this iteration's uniforms."""
        m = self.budget()
        u = self.rng.random(2 * m + 1)  # [2 m + 1] draft, accept and sample uniforms
        return propose(drafter or self.drafter, self.ids, u[:m], u[m : 2 * m],
                       float(u[2 * m]))

    def commit(self, proposal: Proposal, verdict: Verdict) -> list[int]:
        """Take the verdict on :meth:`propose`'s last proposal; return the new tokens."""
        step = step_result(proposal, verdict)
        out = _truncate_at_eos(step.tokens[: self.max_new_tokens - self.produced], self.eos)
        self.ids.extend(out)
        self.produced += len(out)
        self.stats.record(step, self.produced)
        self.drafter.update_candidate_strategy(self.ids, step.n_accepted)
        self._ended = out[-1] in self.eos
        return out

    def __iter__(self) -> Iterator[list[int]]:
        while not self.done:
            yield self.step()

    def step(self) -> list[int]:
        """One whole iteration, verified by this loop's verifier."""
        p = self.propose()
        return self.commit(p, self.verifier(self.state, p.scored, p.candidates, self.sampling,
                                            p.accept_uniforms, p.sample_uniform,
                                            lenience=self.lenience))


def speculative_stream(target: LanguageModel, draft: LanguageModel | None,
                       prompt_ids: Sequence[int], **options) -> Iterator[list[int]]:
    """Yield the new tokens of each iteration as soon as they are verified; the options
    are :func:`speculative_iterations`' (``rng`` and ``max_new_tokens`` among them)."""
    yield from speculative_iterations(target, draft, prompt_ids, **options)


def speculative_generate(
    target: LanguageModel,
    draft: LanguageModel | None,
    prompt_ids: Sequence[int],
    *,
    gamma: int | None = None,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    rng: np.random.Generator,
    eos_id: EosIds = None,
    drafter: Drafter | None = None,
    lenience: float = 1.0,
    verifier: Verifier | None = None,
    max_draft: int | None = None,
) -> GenerationResult:
    """Speculative sampling (Algorithm 1): the output follows the target's distribution.

    Returns the new tokens and :class:`GenerationStats` (accepted per iteration, beta per
    position, target and draft calls). ``lenience < 1`` is the lossy rule of appendix A.5.
    The other arguments are :func:`speculative_stream`'s.
    """
    stats = GenerationStats()
    tokens: list[int] = []
    for piece in speculative_stream(
        target, draft, prompt_ids, gamma=gamma, max_new_tokens=max_new_tokens,
        sampling=sampling, rng=rng, eos_id=eos_id, drafter=drafter, lenience=lenience,
        stats=stats, verifier=verifier, max_draft=max_draft,
    ):
        tokens.extend(piece)
    return GenerationResult(tokens, stats)


def autoregressive_stream(
    model: LanguageModel,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    rng: np.random.Generator,
    eos_id: EosIds = None,
    stats: GenerationStats | None = None,
    state: DecodeState | None = None,
    draw: TokenDraw | None = None,
) -> Iterator[list[int]]:
    """The baseline, one token at a time: yields ``[token]`` after each model call.

    ``state`` is a model state to continue from (any prefix of ``prompt_ids`` it holds is
    reused); ``stats`` (if given) is filled in as generation proceeds. ``draw`` samples the
    tokens at temperature > 0 (default :class:`HostDraw`: the logits row on the host).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (np.random.default_rng(seed))")
    _check_request(model, prompt_ids, max_new_tokens)
    eos = _eos_set(eos_id)
    state = model.new_state() if state is None else state
    stats = stats if stats is not None else GenerationStats()
    # greedy: the argmax, what sample_token draws from the one-hot row for any u; only the
    # argmax ids are needed (greedy_append: on the device for a model that computes them)
    greedy = sampling.greedy
    draw = HostDraw(sampling) if draw is None and not greedy else draw
    u = float(rng.random())  # one uniform per token, drawn when greedy too: one stream
    token = (int(advance_greedy(state, list(prompt_ids))[-1]) if greedy
             else draw.first(state, prompt_ids, u))
    stats.target_calls += 1
    produced = 0
    while True:
        produced += 1
        stats.iterations += 1
        stats.new_tokens = produced
        yield [token]
        if produced >= max_new_tokens or token in eos:
            break
        u = float(rng.random())
        token = (int(greedy_append(state, [token])[-1]) if greedy
                 else draw.next(state, token, u))
        stats.target_calls += 1


class HostDraw:
    """:class:`~quickdraft.protocols.TokenDraw` on the host: the state's logits row,
    ``adjust_logits``, then the inverse-CDF draw (``sample_token``)."""

    def __init__(self, sampling: SamplingConfig):
        self.sampling = sampling

    def first(self, state: DecodeState, ids: Sequence[int], u: float) -> int:
        return sample_token(adjust_logits(advance(state, list(ids))[-1], self.sampling), u)

    def next(self, state: DecodeState, token: int, u: float) -> int:
        return sample_token(adjust_logits(state.append([token])[-1], self.sampling), u)


def autoregressive_generate(
    model: LanguageModel,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    rng: np.random.Generator,
    eos_id: EosIds = None,
) -> GenerationResult:
    """The baseline: one model call per token, each token drawn by inverse CDF."""
    stats = GenerationStats()
    tokens: list[int] = []
    for piece in autoregressive_stream(model, prompt_ids, max_new_tokens=max_new_tokens,
                                       sampling=sampling, rng=rng, eos_id=eos_id, stats=stats):
        tokens.extend(piece)
    return GenerationResult(tokens, stats)
