"""The analysis of Leviathan et al. (2023), section 3, as small functions.

alpha is the expected acceptance rate E[beta], beta = sum_x min(p(x), q(x)); gamma the
number of draft tokens per iteration; c the cost of one draft call relative to one
target call; c_hat the ratio of arithmetic operations per token (draft over target);
verify the cost of the target's call on gamma + 1 tokens in 1-token target calls (1 in
the paper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "beta",
    "alpha_from_distributions",
    "alpha_from_acceptances",
    "expected_tokens",
    "walltime_improvement",
    "pipelined_walltime_improvement",
    "shadow_break_even",
    "best_gamma",
    "operations_factor",
    "improvement_lower_bound",
    "lenient_alpha",
    "hierarchical_draft_cost",
    "hierarchical_walltime_improvement",
    "best_hierarchical",
]


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _check_cost(name: str, c: float) -> None:
    if not 0.0 <= c < np.inf:  # NaN fails too
        raise ValueError(f"{name} must be a finite number >= 0, got {c}")


def _check_verify(verify: float) -> None:
    if not 0.0 < verify < np.inf:  # NaN fails too
        raise ValueError(f"verify (the cost of the target's call on gamma + 1 tokens, in "
                         f"1-token target steps) must be a finite number > 0, got {verify}")


def _check_gamma(gamma: int) -> None:
    if int(gamma) != gamma or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1, got {gamma}")


def beta(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Acceptance probability of one draft token: sum_x min(p(x), q(x)).

    p, q [..., V] -> [...]. Equals 1 - TV(p, q) (paper, Definition 3.2 and Lemma 3.3).
    """
    return np.minimum(np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)).sum(-1)


def alpha_from_distributions(p: np.ndarray, q: np.ndarray) -> float:
    """alpha = E[beta] estimated as the mean beta over rows p, q [N, V]."""
    return float(np.mean(beta(p, q)))


def alpha_from_acceptances(accepted_per_iteration: Sequence[int],
                           gamma: int | Sequence[int]) -> float:
    """Maximum-likelihood alpha from accepted counts, assuming i.i.d. beta = alpha.

    An iteration that accepted n < gamma tokens saw n successes and one failure; one that
    accepted all gamma saw gamma successes. alpha = successes / trials. ``gamma`` is one
    draft length for all iterations or one per iteration (0: an iteration that drafted
    nothing, no trial; NaN when no iteration drafted).
    """
    n = np.asarray(accepted_per_iteration, dtype=np.int64)  # [iterations]
    g = np.broadcast_to(np.asarray(gamma, dtype=np.int64), n.shape)  # [iterations]
    if np.ndim(gamma) == 0:
        _check_gamma(int(gamma))
    elif np.any(g < 0):
        raise ValueError(f"draft lengths must be >= 0, got {np.asarray(gamma).tolist()}")
    if n.size == 0:
        raise ValueError("no iterations to estimate alpha from")
    if np.any(n < 0) or np.any(n > g):
        raise ValueError(f"accepted counts must be in [0, gamma]; got {n.tolist()}")
    trials = n.sum() + np.sum(n < g)
    return float(n.sum() / trials) if trials else float("nan")


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens per iteration, Eq. (1): (1 - alpha^(gamma + 1)) / (1 - alpha)."""
    _check_alpha(alpha)
    _check_gamma(gamma)
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def walltime_improvement(alpha: float, gamma: int, c: float, verify: float = 1.0) -> float:
    """Expected walltime improvement over autoregressive decoding, Theorem 3.8.

    (1 - alpha^(gamma + 1)) / ((1 - alpha)(gamma c + verify)), ``verify`` the cost of p's
    call on gamma + 1 tokens in 1-token steps of p. The paper takes it as one step:
    ``verify=1`` is Theorem 3.8 exactly.
    """
    _check_cost("c", c)
    _check_verify(verify)
    return expected_tokens(alpha, gamma) / (gamma * c + verify)


def pipelined_walltime_improvement(alpha: float, gamma: int, c: float, h: float, *,
                                   shadow_rate: float = 1.0, verify: float = 1.0) -> float:
    """Theorem 3.8 for pipelined drafting (:mod:`quickdraft.pipelined`).

    Each iteration emits Eq. (1) tokens and costs, in target calls,
    verify + gamma c (1 - s alpha^(gamma + 1)) + s (1 - h)(gamma + 1) c: the verify call
    (``verify`` 1-token target steps, 1 in the paper's model); the proposal's gamma draft
    steps unless it was pre-drafted (the last iteration drafted a continuation and kept
    all gamma + 1 candidates); and the unhidden part of a continuation's gamma + 1 draft
    steps, kept or discarded. s = ``shadow_rate`` is the share of iterations that draft a
    continuation (1 for plain pipelining, less under a
    :class:`~quickdraft.pipelined.ShadowRule`); h in [0, 1] the hidden share of one
    continuation's draft time. s = 0 is :func:`walltime_improvement` with the same
    ``verify`` exactly. The derivation and its assumptions:
    ``docs/explanation/pipelined.md``.
    """
    if not 0.0 <= h <= 1.0:
        raise ValueError(f"h must be in [0, 1], got {h}")
    if not 0.0 <= shadow_rate <= 1.0:  # NaN fails too
        raise ValueError(f"shadow_rate (the share of iterations that draft a continuation) "
                         f"must be in [0, 1], got {shadow_rate}")
    _check_cost("c", c)
    _check_verify(verify)
    tokens = expected_tokens(alpha, gamma)  # checks alpha and gamma
    s = shadow_rate
    warm = s * alpha ** (gamma + 1)  # P(the proposal was pre-drafted)
    unhidden = s * (1.0 - h) * (gamma + 1) * c  # continuations' time beyond the verify call
    return tokens / (verify + gamma * c * (1.0 - warm) + unhidden)


def shadow_break_even(gamma: int, h: float) -> float:
    """The keep rate above which drafting a continuation in the target's shadow pays.

    A continuation is gamma + 1 draft steps beside the verify call; the share 1 - h of
    them not hidden lengthens the iteration by (1 - h)(gamma + 1) c target steps, whether
    or not it is used. It is used, saving the next proposal's gamma c, only when the
    iteration keeps every candidate, with probability P. It pays when
    P gamma c > (1 - h)(gamma + 1) c: P > (1 - h)(gamma + 1) / gamma (capped at 1, at
    which no continuation pays), whatever c. h is measured per pair and device
    (``bench.py --pipelined``'s hidden share); :class:`quickdraft.pipelined.ShadowRule`
    takes the result as its ``min_keep_rate``.
    """
    _check_gamma(gamma)
    if not 0.0 <= h <= 1.0:
        raise ValueError(f"h must be in [0, 1], got {h}")
    return min(1.0, (1.0 - h) * (gamma + 1) / gamma)


def best_gamma(alpha: float, c: float, max_gamma: int = 64,
               verify: Callable[[int], float] | None = None) -> int:
    """The integer gamma in [1, max_gamma] that maximises :func:`walltime_improvement`.

    ``verify``: gamma -> the cost of p's call on gamma + 1 tokens in 1-token steps of p
    (None: 1 at every gamma, Theorem 3.8).
    """
    _check_gamma(max_gamma)
    gammas = range(1, max_gamma + 1)
    if verify is None:
        return max(gammas, key=lambda g: walltime_improvement(alpha, g, c))
    return max(gammas, key=lambda g: walltime_improvement(alpha, g, c, verify(g)))


def operations_factor(alpha: float, gamma: int, c_hat: float = 0.0) -> float:
    """Expected factor of extra arithmetic operations, Theorem 3.11.

    (1 - alpha)(gamma c_hat + gamma + 1) / (1 - alpha^(gamma + 1)).
    """
    _check_cost("c_hat", c_hat)
    return (gamma * c_hat + gamma + 1.0) / expected_tokens(alpha, gamma)


def improvement_lower_bound(alpha: float, c: float) -> float:
    """(1 + alpha) / (1 + c): the improvement gamma = 1 already guarantees (Corollary 3.9).

    Speculative decoding helps whenever alpha > c.
    """
    _check_alpha(alpha)
    _check_cost("c", c)
    return (1.0 + alpha) / (1.0 + c)


def lenient_alpha(p: np.ndarray, q: np.ndarray, lenience: float) -> np.ndarray:
    """Acceptance rate of the lossy rule with lenience l (appendix A.5).

    A draft token x ~ q is accepted with probability min(1, p(x) / (l q(x))), so
    beta_l = sum_x min(q(x), p(x) / l). p, q [..., V] -> [...]; l = 1 gives :func:`beta`.
    """
    if not 0.0 < lenience <= 1.0:
        raise ValueError(f"lenience must be in (0, 1], got {lenience}")
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return np.minimum(q, p / lenience).sum(-1)


def hierarchical_draft_cost(c_draft: float, alpha_inner: float, gamma_inner: int,
                            c_inner: float) -> float:
    """Cost per draft token (relative to a target call) when the draft q is itself decoded
    speculatively by a smaller draft: an inner iteration costs gamma_inner * c_inner + c_draft
    and yields expected_tokens(alpha_inner, gamma_inner) tokens of q (Eq. 1 one level down;
    the truncation of the last inner iteration is neglected). Plain drafting costs c_draft."""
    if min(c_draft, c_inner) < 0:
        raise ValueError(f"costs must be >= 0, got c_draft={c_draft}, c_inner={c_inner}")
    return (gamma_inner * c_inner + c_draft) / expected_tokens(alpha_inner, gamma_inner)


def hierarchical_walltime_improvement(alpha: float, gamma: int, c_draft: float,
                                      alpha_inner: float, gamma_inner: int,
                                      c_inner: float) -> float:
    """Theorem 3.8 with the draft's cost per token replaced by
    :func:`hierarchical_draft_cost`: target p, draft q (alpha, c_draft), draft of the draft
    (alpha_inner between q and it, c_inner; both costs relative to a target call)."""
    c_eff = hierarchical_draft_cost(c_draft, alpha_inner, gamma_inner, c_inner)
    return expected_tokens(alpha, gamma) / (gamma * c_eff + 1.0)


def best_hierarchical(alpha: float, c_draft: float, alpha_inner: float, c_inner: float,
                      max_gamma: int = 32) -> tuple[int, int, float]:
    """(gamma, gamma_inner, improvement) maximising
    :func:`hierarchical_walltime_improvement` over 1 <= gamma, gamma_inner <= max_gamma.
    The two-level scheme beats plain drafting with q exactly when the inner loop makes a q
    token cheaper: gamma_inner * c_inner < c_draft * (expected_tokens(alpha_inner,
    gamma_inner) - 1)."""
    _check_gamma(max_gamma)
    best = (1, 1, -1.0)
    for g in range(1, max_gamma + 1):
        for g2 in range(1, max_gamma + 1):
            v = hierarchical_walltime_improvement(alpha, g, c_draft, alpha_inner, g2, c_inner)
            if v > best[2]:
                best = (g, g2, v)
    return best
