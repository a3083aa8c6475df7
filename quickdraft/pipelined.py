"""Pipelined speculative decoding (PEARL's post-verify, Liu et al. 2024): while the target
verifies one proposal, the draft already drafts the next, assuming every token is kept.

NumPy only and sequential: the reference for the law and for the accounting of which draft
calls a device could overlap with a target call (docs/explanation/pipelined.md).

One iteration, with ``x_1..x_k`` the proposal and ``y_1..y_L`` its continuation::

    target: p_1..p_{k+1} = p(. | ids, x_<i)                  } one target call, and in
    draft:  y_j ~ q(. | ids, x, y_<j), j = 1..L (all x kept?)  } its shadow the draft
    verdict: Algorithm 1 on x_1..x_k and the stand-in y_1 (against p_{k+1}), no bonus
      a rejection:      x_<n + the recovered token; y is discarded, the next proposal is drafted
      all k + 1 kept:   x + y_1; y_2..y_L is the next proposal, already drafted

So every position an iteration emits has a draft candidate (the stand-in takes the bonus's
place), and each candidate meets ``verify``'s accept / recover rule with fresh uniforms: the
output follows the target exactly. L = gamma + 1 (budget permitting): one stand-in and a
full proposal of gamma tokens, so every iteration checks gamma + 1 candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from quickdraft.generation import (
    EosIds,
    IterationRates,
    ModelDrafter,
    _check_request,
    _eos_set,
    _truncate_at_eos,
    check_pair,
)
from quickdraft.protocols import Candidates, DecodeState, Drafter, LanguageModel, advance
from quickdraft.sampling import SamplingConfig, adjust_logits
from quickdraft.theory import beta, shadow_break_even
from quickdraft.verification import verify, verify_greedy

__all__ = [
    "ShadowRule",
    "PipelinedStats",
    "PipelinedResult",
    "PipelinedStep",
    "pipeline_lengths",
    "target_probs",
    "verify_without_bonus",
    "verify_greedy_without_bonus",
    "greedy_betas",
    "pipelined_step",
    "pipelined_generate",
]


@dataclass
class PipelinedStats(IterationRates):
    """What happened during one pipelined generation.

    A continuation is kept (all its tokens) when every candidate, its stand-in included, was
    accepted; otherwise all of it is discarded.
    """

    gamma: int = 0
    new_tokens: int = 0
    iterations: int = 0
    target_calls: int = 0
    open_draft_calls: int = 0  # draft calls the target waited for (proposals drafted afresh)
    shadow_draft_calls: int = 0  # draft calls made while the target verified (continuations)
    pre_drafted_kept: int = 0  # continuation tokens kept: stand-in and next proposal
    pre_drafted_discarded: int = 0  # continuation tokens thrown away by a rejection
    warm_iterations: int = 0  # iterations whose proposal was pre-drafted (no draft wait)
    shadow_iterations: int = 0  # iterations that drafted a continuation (L > 0)
    accepted_per_iteration: list[int] = field(default_factory=list)  # candidates kept
    checked_per_iteration: list[int] = field(default_factory=list)  # candidates, k + 1
    beta_per_position: list[float] = field(default_factory=list)  # at positions reached

    def record(self, step: PipelinedStep, produced: int) -> None:
        """Count one iteration; ``produced``: new tokens so far."""
        self.iterations += 1
        self.target_calls += 1
        self.open_draft_calls += step.open_calls
        self.shadow_draft_calls += step.shadow_calls
        if step.pending is not None:
            self.pre_drafted_kept += step.pre_drafted
        else:
            self.pre_drafted_discarded += step.pre_drafted
        self.warm_iterations += step.warm
        self.shadow_iterations += step.pre_drafted > 0
        self.accepted_per_iteration.append(step.n_accepted)
        self.checked_per_iteration.append(step.checked)
        self.beta_per_position.extend(step.betas)
        self.new_tokens = produced

    @property
    def draft_calls(self) -> int:
        return self.open_draft_calls + self.shadow_draft_calls

    @property
    def drafted_per_iteration(self) -> list[int]:
        """Candidates checked per iteration: the proposal and the stand-in."""
        return self.checked_per_iteration

    @property
    def tokens_per_iteration(self) -> float:
        return self.new_tokens / self.iterations if self.iterations else float("nan")

    @property
    def shadow_rate(self) -> float:
        """s, the share of iterations that drafted a continuation
        (:func:`quickdraft.theory.pipelined_walltime_improvement`'s ``shadow_rate``)."""
        return self.shadow_iterations / self.iterations if self.iterations else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted candidates over checked candidates (stand-ins included)."""
        checked = sum(self.checked_per_iteration)
        return sum(self.accepted_per_iteration) / checked if checked else float("nan")

    def as_dict(self) -> dict:
        return {
            "gamma": self.gamma,
            "new_tokens": self.new_tokens,
            "iterations": self.iterations,
            "target_calls": self.target_calls,
            "draft_calls": self.draft_calls,
            "open_draft_calls": self.open_draft_calls,
            "shadow_draft_calls": self.shadow_draft_calls,
            "pre_drafted_kept": self.pre_drafted_kept,
            "pre_drafted_discarded": self.pre_drafted_discarded,
            "warm_iterations": self.warm_iterations,
            "shadow_iterations": self.shadow_iterations,
            "shadow_rate": self.shadow_rate,
            "acceptance_rate": self.acceptance_rate,
            "alpha": self.alpha,
            "tokens_per_iteration": self.tokens_per_iteration,
            "tokens_per_target_call": self.tokens_per_target_call,
        }


@dataclass
class PipelinedResult:
    tokens: list[int]  # the new tokens (prompt excluded)
    stats: PipelinedStats


@dataclass
class PipelinedStep:
    """One pipelined iteration."""

    tokens: list[int]  # x_<n + [recovered], or x + [y_1] when all k + 1 were kept (no
    # continuation: x_<n + [recovered or bonus])
    n_accepted: int  # candidates kept, 0..k + 1 (candidate k + 1 is the stand-in y_1)
    checked: int  # candidates: k + 1 (no continuation: k)
    betas: list[float]  # beta at the candidates reached, min(n + 1, checked) of them
    pending: Candidates | None  # y_2..y_L, the next proposal; None: it is drafted afresh
    warm: bool  # the proposal was pre-drafted in the last iteration's shadow
    open_calls: int  # draft calls for the proposal, made while the target waited
    shadow_calls: int  # draft calls for the continuation, made while the target verified
    pre_drafted: int  # L, the continuation's tokens


@dataclass(frozen=True)
class ShadowRule:
    """Whether an iteration drafts a continuation in the target's shadow, decided from
    earlier iterations only (so the output law stays the target's): while the running rate
    at which iterations kept all their candidates is at least ``min_keep_rate``. A
    continuation is used only when everything is kept; when that is rare, drafting it costs
    the target's call more than it saves. An iteration without one is Algorithm 1's: its
    proposal, and the bonus drawn from p_{k+1}."""

    min_keep_rate: float = 0.0  # 0: every iteration has a continuation (plain pipelining)
    memory: float = 0.8  # the past's weight in the running rate, in [0, 1)
    start: float = 1.0  # the running rate before the first iteration

    def __post_init__(self):
        if not 0.0 <= self.min_keep_rate <= 1.0:
            raise ValueError(f"min_keep_rate must be in [0, 1], got {self.min_keep_rate}")
        if not 0.0 <= self.memory < 1.0:
            raise ValueError(f"memory must be in [0, 1), got {self.memory}")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"start must be in [0, 1], got {self.start}")

    @classmethod
    def for_hidden_share(cls, gamma: int, hidden: float, **fields) -> ShadowRule:
        """The rule at the break-even keep rate for a continuation whose share ``hidden``
        of draft time hides behind the verify call at ``gamma``
        (:func:`quickdraft.theory.shadow_break_even`); ``fields``: ``memory``, ``start``.
        Where no continuation pays (the rate is 1), the running rate starts at 0 unless
        ``start`` is given, so none is drafted: from 0, with the default memory 0.8, the rate
        never rounds up to 1 however many iterations keep everything (with memory 0 one
        kept iteration reaches it)."""
        rate = shadow_break_even(gamma, hidden)
        if rate >= 1.0:
            fields.setdefault("start", 0.0)
        return cls(min_keep_rate=rate, **fields)

    def shadow(self, rate: float) -> bool:
        """Draft a continuation at the running keep rate ``rate``?"""
        return rate >= self.min_keep_rate

    def update(self, rate: float, step: PipelinedStep) -> float:
        """The running rate after ``step`` (kept: every candidate it checked accepted)."""
        kept = step.n_accepted == step.checked
        return self.memory * rate + (1.0 - self.memory) * float(kept)


def pipeline_lengths(remaining: int, gamma: int, pending: int | None,
                     shadow: bool = True) -> tuple[int, int]:
    """(k, L) for an iteration while ``remaining`` tokens are still wanted: k proposal tokens
    (``pending`` of them pre-drafted, None: min(gamma, remaining - 1) drafted now) and L
    continuation tokens, the stand-in and a next proposal of at most gamma tokens that
    itself leaves room for a stand-in: min(gamma + 1, max(1, remaining - k - 1)). Without
    ``shadow`` L is 0 (an iteration of Algorithm 1), unless k is 0: a stand-in alone.

    A pre-drafted proposal always fits (it was cut to fit when it was drafted), and the
    lengths depend only on the budget and ``shadow``: never on a token or a uniform."""
    k = min(gamma, remaining - 1) if pending is None else pending
    if not 0 <= k <= remaining - 1:
        raise ValueError(f"a proposal of {k} tokens does not fit {remaining} wanted tokens")
    if not shadow and k > 0:
        return k, 0
    return k, min(gamma + 1, max(1, remaining - k - 1))


def target_probs(target: DecodeState, scored: Sequence[int], rows: int,
                 sampling: SamplingConfig) -> np.ndarray:
    """p at the last ``rows`` positions of ``scored`` [rows, V], from one target call."""
    logits = advance(target, scored, min_new=rows)[-rows:]  # [rows, V]
    return adjust_logits(logits, sampling)


def verify_without_bonus(p: np.ndarray, q: np.ndarray, x: np.ndarray, u: np.ndarray,
                         s: float, *, validate: bool = True) -> tuple[int, int | None]:
    """Algorithm 1 on candidates x [m] with p [m, V] and q [m, V], no bonus (the target did
    not score past x_m). -> (n, recovered), recovered None when all m are kept.

    ``verify`` wants one row more; it feeds only the bonus, which is dropped here (n and a
    recovered token never read it), so p_m serves."""
    p_padded = np.concatenate([p, p[-1:]])  # [m + 1, V]
    n, token = verify(p_padded, q, x, u, s, validate=validate)
    return n, (None if n == len(x) else token)


def verify_greedy_without_bonus(target_choices: np.ndarray,
                                candidates: np.ndarray) -> tuple[int, int | None]:
    """:func:`verify_without_bonus` for greedy target rows (one-hot on ``target_choices``
    [m]) and checked candidates [m], from the ids alone, as ``verify_greedy`` is ``verify``
    for them. -> (n, recovered), recovered None when all m are kept."""
    choices = np.asarray(target_choices)  # [m]
    n, token = verify_greedy(np.append(choices, choices[-1:]), candidates)  # [m + 1], [m]
    return n, (None if n == len(candidates) else token)


def greedy_betas(n: int, m: int) -> list[float]:
    """beta at the candidates a greedy verdict reached (one-hot p and q: 1 where they
    agree): n ones, and a zero at the rejected candidate if there was one."""
    return [1.0] * n + ([0.0] if n < m else [])


def _rest(y: Candidates) -> Candidates:
    """y_2..y_L of a continuation: the next proposal, with its q rows."""
    rows = None if y.one_hot else y.probs[1:]  # [L - 1, V] or one-hot
    # model_calls 0: they were made in the shadow, counted there
    return Candidates(y.tokens[1:], rows, 0, y.checked, vocab_size=y.vocab_size)


def pipelined_step(
    target: DecodeState,
    drafter: Drafter,
    ids: Sequence[int],
    pending: Candidates | None,
    sampling: SamplingConfig,
    open_uniforms: np.ndarray,
    shadow_uniforms: np.ndarray,
    accept_uniforms: np.ndarray,
    sample_uniform: float,
) -> PipelinedStep:
    """One pipelined iteration, pure given the states and the uniforms: open [k] (the
    proposal's draws; empty when ``pending``, the proposal pre-drafted last iteration, is
    given), shadow [L] (the continuation's; empty: no continuation, Algorithm 1 with the
    bonus), accept [k + 1], sample."""
    # the proposal x_1..x_k: pre-drafted in the last call's shadow, or drafted now (target waits)
    x = pending if pending is not None else drafter.get_candidates(
        ids, len(open_uniforms), open_uniforms)
    k = len(x.tokens)
    if len(shadow_uniforms) < 1 and k < 1:
        raise ValueError("an iteration needs a proposal or a continuation (its first token "
                         "is the stand-in)")
    scored = list(ids) + x.tokens.tolist()  # ids + x
    # one target call; in its shadow the draft continues from x_k as if every x_i were kept
    p = target_probs(target, scored, k + 1, sampling)  # [k + 1, V]
    open_calls = 0 if pending is not None else x.model_calls
    if not len(shadow_uniforms):  # no continuation: Algorithm 1, the bonus from p_{k+1}
        n, token = verify(p, x.probs, x.tokens, accept_uniforms[:k], sample_uniform,
                          validate=not x.checked)
        reached = min(n + 1, k)
        return PipelinedStep(x.tokens[:n].tolist() + [int(token)], n, k,
                             beta(p[:reached], x.probs[:reached]).tolist(), None,
                             pending is not None, open_calls, 0, 0)
    y = drafter.get_candidates(scored, len(shadow_uniforms), shadow_uniforms)  # [L] y_1..y_L
    # the verdict: Algorithm 1 on x_1..x_k and the stand-in y_1, in the bonus's place
    candidates = np.append(x.tokens, y.tokens[:1])  # [k + 1]
    q = np.concatenate([x.probs, y.probs[:1]])  # [k + 1, V]
    n, recovered = verify_without_bonus(p, q, candidates, accept_uniforms[: k + 1],
                                        sample_uniform, validate=not (x.checked and y.checked))
    if recovered is None:  # all k + 1 kept: y_2..y_L is the next proposal, already drafted
        tokens, nxt = candidates.tolist(), _rest(y)
    else:  # a rejection: the continuation assumed a token that was not kept
        tokens, nxt = candidates[:n].tolist() + [recovered], None
    reached = min(n + 1, k + 1)
    return PipelinedStep(
        tokens, n, k + 1, beta(p[:reached], q[:reached]).tolist(), nxt, pending is not None,
        open_calls, y.model_calls, len(y.tokens),
    )


def pipelined_generate(
    target: LanguageModel,
    draft: LanguageModel,
    prompt_ids: Sequence[int],
    *,
    gamma: int,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    rng: np.random.Generator,
    eos_id: EosIds = None,
    rule: ShadowRule = ShadowRule(),
) -> PipelinedResult:
    """Pipelined speculative sampling: the output follows the target's distribution.

    Each iteration checks gamma + 1 candidates (fewer near ``max_new_tokens``): the
    proposal and the stand-in; where ``rule`` declines a continuation, the proposal alone
    (then the bonus). Uniforms per iteration: ``rng.random(k_open + L + k + 2)`` (open
    draft, shadow draft, accept, sample; k_open = 0 for a pre-drafted proposal, L = 0
    without a continuation). Returns the new tokens and :class:`PipelinedStats`.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (np.random.default_rng(seed))")
    if not isinstance(rule, ShadowRule):
        raise TypeError("rule must be a quickdraft.pipelined.ShadowRule")
    if isinstance(gamma, bool) or int(gamma) != gamma or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1, got {gamma!r}")
    check_pair(target, draft)
    _check_request(target, prompt_ids, max_new_tokens)
    _check_request(draft, prompt_ids, max_new_tokens)
    gamma = int(gamma)
    drafter = ModelDrafter(draft, sampling, gamma + 1)  # a continuation: stand-in + gamma
    state = target.new_state()
    eos = _eos_set(eos_id)
    stats = PipelinedStats(gamma=gamma)
    ids, out = list(prompt_ids), []
    pending: Candidates | None = None  # the pre-drafted proposal, if the last one was kept
    rate = rule.start  # the running keep rate the rule decides on
    while len(out) < max_new_tokens:
        k, L = pipeline_lengths(max_new_tokens - len(out), gamma,
                                None if pending is None else len(pending.tokens),
                                rule.shadow(rate))
        k_open = 0 if pending is not None else k
        u = rng.random(k_open + L + k + 2)  # [k_open + L + k + 2] open, shadow, accept, sample
        step = pipelined_step(state, drafter, ids, pending, sampling, u[:k_open],
                              u[k_open : k_open + L], u[k_open + L : -1], float(u[-1]))
        piece = _truncate_at_eos(step.tokens, eos)
        ids += piece
        out += piece
        stats.record(step, len(out))
        rate = rule.update(rate, step)
        pending = step.pending
        if piece[-1] in eos:
            break
    return PipelinedResult(out, stats)
