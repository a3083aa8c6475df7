"""Exact integration over the uniforms of the verification rule and of speculative steps.

Every random choice in quickdraft enters as a uniform in [0, 1), and each uniform matters
only through the interval between its breakpoints that it falls in:
- an accept uniform u_i through u_i < r_i with r_i = min(1, p_i(x_i) / q_i(x_i));
- a sampling uniform through the cumulative steps of the distribution it is drawn from.
So a function of the uniforms is constant on each cell of the grid of breakpoints, and
evaluating it once per cell (at the cell's midpoint), weighted by the cell's length, gives
its output distribution exactly. The breakpoints used here are a superset of the true
ones (all residuals a verification could sample from), which only makes the cells finer.
"""

from __future__ import annotations

import itertools

import numpy as np

from quickdraft.generation import ModelDrafter, draft_budget, speculative_step
from quickdraft.sampling import SamplingConfig, adjust_logits
from quickdraft.verification import residual_distribution


def cells(breakpoints) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints and lengths of the cells of [0, 1) cut at ``breakpoints``."""
    b = np.unique(np.clip(np.concatenate([[0.0, 1.0], np.ravel(breakpoints)]), 0.0, 1.0))
    lengths = np.diff(b)  # [cells]
    keep = lengths > 0
    return ((b[:-1] + b[1:]) / 2)[keep], lengths[keep]


def cdf_breakpoints(rows: np.ndarray) -> np.ndarray:
    """Cumulative steps of each normalised row of ``rows`` [k, V]."""
    rows = np.asarray(rows, dtype=np.float64)
    return (np.cumsum(rows, -1) / rows.sum(-1, keepdims=True)).ravel()


def accept_cells(p_x: float, q_x: float) -> list[tuple[float, float]]:
    """(representative u, weight) for the accept and reject cells of one draft token."""
    r = min(1.0, p_x / q_x)
    return [(u, w) for u, w in ((r / 2, r), ((1 + r) / 2, 1 - r)) if w > 0]


def sample_breakpoints(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Every CDF step the sample uniform of a verification with p [g+1, V], q [g, V] can meet."""
    residuals = residual_distribution(p[:-1], q)  # [g, V]
    return np.concatenate([cdf_breakpoints(residuals), cdf_breakpoints(p)])


def exact_step_distribution(target, draft, ids, gamma, sampling: SamplingConfig,
                            make_drafter=None):
    """Exact distribution of the output tokens of one :func:`speculative_step` whose
    drafter may propose up to ``gamma`` tokens.

    ``target``/``draft`` are table-style models with ``score(prefix) -> logits [V]``.
    Returns {tuple(tokens): probability}. Draft uniforms are enumerated through the cells of
    the draft's CDF at every position (so the drafter's own inverse-CDF sampling is
    exercised); ``make_drafter()`` (default: a fixed-gamma ModelDrafter over ``draft``)
    makes the drafter, which may stop early: the cells of the positions it does not use
    sum to weight 1, so any proposal length rule that looks only at the past and its own
    draws is integrated exactly.
    """
    if make_drafter is None:
        make_drafter = lambda: ModelDrafter(draft, sampling, max(gamma, 1))  # noqa: E731
    out: dict[tuple[int, ...], float] = {}

    def draft_paths(prefix, i):
        """Yield (draft uniforms, draft tokens, weight) for positions i..gamma-1."""
        if i == gamma:
            yield [], [], 1.0
            return
        q = adjust_logits(draft.score(prefix), sampling)  # [V]
        mids, widths = cells(cdf_breakpoints(q[None]))
        for v, w in zip(mids, widths):
            x = int(np.searchsorted(np.cumsum(q), v, side="right"))
            x = min(x, len(q) - 1)
            for vs, xs, w2 in draft_paths(prefix + [x], i + 1):
                yield [v] + vs, [x] + xs, w * w2

    for v, xs, w_draft in draft_paths(list(ids), 0):
        p = adjust_logits(np.stack([target.score(list(ids) + xs[:i]) for i in range(gamma + 1)]),
                          sampling)  # [gamma + 1, V]
        vocab = p.shape[-1]
        q = (adjust_logits(np.stack([draft.score(list(ids) + xs[:i]) for i in range(gamma)]),
                           sampling) if gamma else np.zeros((0, vocab)))  # [gamma, V]
        s_mids, s_widths = cells(sample_breakpoints(p, q))
        per_pos = [accept_cells(p[i, xs[i]], q[i, xs[i]]) for i in range(gamma)]
        for combo in itertools.product(*per_pos):
            u = np.array([c[0] for c in combo])  # [gamma]
            w_accept = float(np.prod([c[1] for c in combo]))
            for s, w_s in zip(s_mids, s_widths):
                step = speculative_step(
                    target.new_state(), make_drafter(), list(ids), sampling,
                    np.asarray(v, dtype=np.float64), u, float(s),
                )
                key = tuple(step.tokens)
                out[key] = out.get(key, 0.0) + w_draft * w_accept * w_s
    return out


def exact_speculative_sequences(target, draft, prompt, gamma, n_tokens, sampling,
                                make_drafter=None):
    """Exact distribution over the first ``n_tokens`` output tokens of speculative
    generation, chaining :func:`exact_step_distribution` over iterations. ``make_drafter``
    (default: fixed gamma) is called once per iteration; a drafter that learns across
    iterations must be given as its state after those iterations (see the callers)."""
    frontier = {(): 1.0}  # generated-so-far -> probability, all shorter than n_tokens
    done: dict[tuple[int, ...], float] = {}
    while frontier:
        nxt: dict[tuple[int, ...], float] = {}
        for seq, w in frontier.items():
            # the budget speculative_generate gives a drafter proposing at most gamma
            g = min(gamma, draft_budget(n_tokens - len(seq)))
            step = exact_step_distribution(target, draft, list(prompt) + list(seq), g, sampling,
                                           make_drafter)
            for toks, w2 in step.items():
                new = (seq + toks)[:n_tokens]
                bucket = done if len(new) == n_tokens else nxt
                bucket[new] = bucket.get(new, 0.0) + w * w2
        frontier = nxt
    return done


def exact_target_sequences(target, prompt, n_tokens, sampling):
    """The target's own distribution over its next ``n_tokens`` tokens."""
    dist = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for seq, w in dist.items():
            p = adjust_logits(target.score(list(prompt) + list(seq)), sampling)  # [V]
            for a in np.flatnonzero(p):
                nxt[seq + (int(a),)] = w * p[a]
        dist = nxt
    return dist
