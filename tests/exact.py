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

import copy
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


def exact_step_outcomes(target, draft, ids, m, sampling, drafter):
    """Like :func:`exact_step_distribution` for any drafter (a copy of ``drafter`` is run
    per cell): {(output tokens, n_accepted): (probability, the drafter after the step)}.
    Draft uniforms are enumerated through the cells of ``draft``'s CDF at all m positions;
    a drafter that uses fewer (or none, like n-gram lookup) integrates the rest to 1."""
    out: dict = {}

    def draft_paths(prefix, i):
        if i == m:
            yield [], [], 1.0
            return
        q = adjust_logits(draft.score(prefix), sampling)  # [V]
        mids, widths = cells(cdf_breakpoints(q[None]))
        for v, w in zip(mids, widths):
            x = min(int(np.searchsorted(np.cumsum(q), v, side="right")), len(q) - 1)
            for vs, xs, w2 in draft_paths(prefix + [x], i + 1):
                yield [v] + vs, [x] + xs, w * w2

    vocab = np.shape(target.score(list(ids)))[-1]
    extra = _all_sample_breakpoints(target, draft, ids, m, sampling)
    for v, xs, w_draft in draft_paths(list(ids), 0):
        p = adjust_logits(np.stack([target.score(list(ids) + xs[:i]) for i in range(m + 1)]),
                          sampling)  # [m + 1, V] (rows at the draft model's path)
        q = (adjust_logits(np.stack([draft.score(list(ids) + xs[:i]) for i in range(m)]),
                           sampling) if m else np.zeros((0, vocab)))  # [m, V]
        s_mids, s_widths = cells(np.concatenate([sample_breakpoints(p, q), *extra]))
        per_pos = [_all_accept_cells(target, draft, ids, i, sampling) for i in range(m)]
        for combo in itertools.product(*per_pos):
            u = np.array([c[0] for c in combo], dtype=np.float64)  # [m]
            w_accept = float(np.prod([c[1] for c in combo]))
            for s, w_s in zip(s_mids, s_widths):
                d = copy.deepcopy(drafter)
                step = speculative_step(target.new_state(), d, list(ids), sampling,
                                        np.asarray(v, dtype=np.float64), u, float(s))
                d.update_candidate_strategy(list(ids) + step.tokens, step.n_accepted)
                key = (tuple(step.tokens), step.n_accepted)
                w, kept = out.get(key, (0.0, d))
                out[key] = (w + w_draft * w_accept * w_s, kept)
    return out


def _all_sample_breakpoints(target, draft, ids, m, sampling):
    """The CDF steps of every distribution a verification could sample its next token from
    after any proposal of up to m tokens: p rows, residuals against the draft model's q
    rows and against one-hot rows (lookup proposals)."""
    out = []
    for c in _prefixes(ids, target, m):
        pre = list(ids) + list(c)
        p = adjust_logits(target.score(pre), sampling)  # [V]
        q = adjust_logits(draft.score(pre), sampling)  # [V]
        one_hot = np.eye(len(p))  # [V, V]
        out.append(cdf_breakpoints(p[None]))
        out.append(cdf_breakpoints(residual_distribution(p[None], q[None])))
        out.append(cdf_breakpoints(residual_distribution(np.broadcast_to(p, one_hot.shape),
                                                         one_hot)))
    return out


def _prefixes(ids, target, m):
    """Every continuation of up to m tokens (for the breakpoints of small vocabularies)."""
    vocab = np.shape(target.score(list(ids)))[-1]
    for k in range(m + 1):
        yield from itertools.product(range(vocab), repeat=k)


def _all_accept_cells(target, draft, ids, i, sampling):
    """Accept-uniform cells valid for any token at position i on any path: cut at every
    ratio p(x) / q(x) a proposal could meet (a superset: the cells only get finer). For a
    one-hot proposal (q(x) = 1) the ratio is p(x)."""
    vocab = np.shape(target.score(list(ids)))[-1]
    cuts = []
    for c in itertools.product(range(vocab), repeat=i):
        pre = list(ids) + list(c)
        p = adjust_logits(target.score(pre), sampling)  # [V]
        q = adjust_logits(draft.score(pre), sampling)  # [V]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(q > 0, p / np.where(q > 0, q, 1.0), 1.0)
        cuts.extend(np.minimum(1.0, r).tolist())
        cuts.extend(p.tolist())  # one-hot proposals: accepted while u < p(x)
    mids, widths = cells(np.asarray(cuts))
    return list(zip(mids, widths))


def exact_drafter_sequences(target, draft, prompt, n_tokens, sampling, drafter, bound):
    """Exact distribution over the first ``n_tokens`` output tokens of speculative
    generation with ``drafter`` (at most ``bound`` tokens per iteration), whatever it
    learns between iterations: each branch of the history carries its own drafter."""
    frontier = [((), 1.0, drafter)]
    done: dict[tuple[int, ...], float] = {}
    while frontier:
        nxt = []
        for seq, w, d in frontier:
            m = draft_budget(n_tokens - len(seq), bound)
            for (toks, _), (w2, after) in exact_step_outcomes(
                    target, draft, list(prompt) + list(seq), m, sampling, d).items():
                new = (seq + toks)[:n_tokens]
                if len(new) == n_tokens:
                    done[new] = done.get(new, 0.0) + w * w2
                else:
                    nxt.append((new, w * w2, after))
        frontier = nxt
    return done


def draft_paths(draft, prefix, m, sampling):
    """(draft uniforms [m], draft tokens [m], weight) for every path of m inverse-CDF draws
    from ``draft`` after ``prefix``, one per cell of the CDF at each position."""
    if m == 0:
        yield [], [], 1.0
        return
    q = adjust_logits(draft.score(list(prefix)), sampling)  # [V]
    for v, w in zip(*cells(cdf_breakpoints(q[None]))):
        x = min(int(np.searchsorted(np.cumsum(q), v, side="right")), len(q) - 1)
        for vs, xs, w2 in draft_paths(draft, list(prefix) + [x], m - 1, sampling):
            yield [v] + vs, [x] + xs, w * w2


def exact_pipelined_sequences(target, draft, prompt, gamma, n_tokens, sampling, rule=None):
    """Exact distribution over the first ``n_tokens`` output tokens of
    :func:`quickdraft.pipelined.pipelined_generate`, integrated over every uniform of every
    iteration: the proposal's draft cells (when it is drafted afresh), the continuation's
    draft cells, the accept cells of the candidates and the sample cells. Each branch of
    the history carries the proposal it continues with (None: drafted afresh) and the
    running keep rate ``rule`` (a ShadowRule; None: the default) decides on."""
    from quickdraft.pipelined import ShadowRule, pipeline_lengths, pipelined_step

    rule = rule or ShadowRule()
    # (emitted, pending tokens, rate) -> (weight, pending)
    frontier = {((), None, rule.start): (1.0, None)}
    done: dict[tuple[int, ...], float] = {}
    while frontier:
        nxt: dict = {}
        for (seq, held, rate), (w, pending) in frontier.items():
            ids = list(prompt) + list(seq)
            k, L = pipeline_lengths(n_tokens - len(seq), gamma,
                                    None if held is None else len(held), rule.shadow(rate))
            m = k + 1 if L else k  # candidates: the proposal, and the stand-in if any
            for v_open, x_open, w_open in draft_paths(draft, ids, 0 if held else k, sampling):
                x = list(held) if held is not None else x_open
                for v_shadow, y, w_shadow in draft_paths(draft, ids + x, L, sampling):
                    c = x + y[:1]  # [m] the candidates
                    p = adjust_logits(np.stack([target.score(ids + x[:i]) for i in range(k + 1)]),
                                      sampling)  # [k + 1, V]
                    q = adjust_logits(np.stack([draft.score(ids + c[:i]) for i in range(m)]),
                                      sampling)  # [m, V]
                    # the sample cells: p_{k+1} is the bonus's row, or unused past a stand-in
                    p_rows = np.concatenate([p, p[-1:]]) if L else p  # [m + 1, V]
                    s_cells = cells(sample_breakpoints(p_rows, q))
                    per_pos = [accept_cells(p[i, c[i]], q[i, c[i]]) for i in range(m)]
                    for combo in itertools.product(*per_pos):
                        u = np.array([a[0] for a in combo] + [0.5] * (k + 1 - m))  # [k + 1]
                        w_accept = float(np.prod([a[1] for a in combo]))
                        for s, w_s in zip(*s_cells):
                            step = pipelined_step(
                                target.new_state(), ModelDrafter(draft, sampling, gamma + 1),
                                ids, pending, sampling, np.asarray(v_open, dtype=np.float64),
                                np.asarray(v_shadow, dtype=np.float64), u, float(s))
                            weight = w * w_open * w_shadow * w_accept * w_s
                            new = seq + tuple(step.tokens)
                            if len(new) >= n_tokens:
                                done[new[:n_tokens]] = done.get(new[:n_tokens], 0.0) + weight
                                continue
                            key = (new, None if step.pending is None
                                   else tuple(step.pending.tokens.tolist()),
                                   rule.update(rate, step))
                            old = nxt.get(key, (0.0, step.pending))
                            nxt[key] = (old[0] + weight, old[1])
        frontier = nxt
    return done
