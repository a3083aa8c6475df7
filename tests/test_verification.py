"""The acceptance rule: exact output distributions (integrated over the uniforms), greedy,
edge cases and input validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from exact import accept_cells, cells, sample_breakpoints
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from quickdraft.verification import inverse_cdf, residual_distribution, verify, verify_batch

KINDS = ["random", "equal", "disjoint", "one_hot", "sparse"]


@st.composite
def pq_rows(draw):
    """Target rows p [gamma + 1, V] and draft rows q [gamma, V] of one verification."""
    vocab = draw(st.integers(2, 6))
    gamma = draw(st.integers(1, 4))
    assume(vocab**gamma <= 256)  # keeps the exact enumeration small
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(vocab), size=gamma + 1)  # [gamma + 1, V]
    q = rng.dirichlet(np.ones(vocab), size=gamma)  # [gamma, V]
    if kind == "equal":
        q = p[:gamma].copy()
    elif kind == "disjoint":
        half = vocab // 2
        p[:, :half] = 0
        q[:, half:] = 0
    elif kind == "one_hot":
        p = np.eye(vocab)[rng.integers(vocab, size=gamma + 1)]
        q = np.eye(vocab)[rng.integers(vocab, size=gamma)]
    elif kind == "sparse":
        p = p * (rng.random(p.shape) < 0.6)
        q = q * (rng.random(q.shape) < 0.6)
        p[np.arange(gamma + 1), rng.integers(vocab, size=gamma + 1)] += 0.1
        q[np.arange(gamma), rng.integers(vocab, size=gamma)] += 0.1
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    return p, q


def exact_outputs(p: np.ndarray, q: np.ndarray):
    """All (weight, emitted tokens) of verify(p, q, ...) with x ~ q, integrated exactly."""
    gamma, vocab = q.shape
    s_mids, s_widths = cells(sample_breakpoints(p, q))
    rows_p, rows_q, rows_x, rows_u, rows_s, weights = [], [], [], [], [], []
    for x in itertools.product(*[np.flatnonzero(q[i]) for i in range(gamma)]):
        w_x = float(np.prod([q[i, x[i]] for i in range(gamma)]))
        per_pos = [accept_cells(p[i, x[i]], q[i, x[i]]) for i in range(gamma)]
        for combo in itertools.product(*per_pos):
            w_u = float(np.prod([c[1] for c in combo]))
            for s, w_s in zip(s_mids, s_widths):
                rows_x.append(x)
                rows_u.append([c[0] for c in combo])
                rows_s.append(s)
                weights.append(w_x * w_u * w_s)
    b = len(weights)
    rows_p = np.broadcast_to(p, (b, *p.shape))
    rows_q = np.broadcast_to(q, (b, *q.shape))
    n, token = verify_batch(rows_p, rows_q, np.array(rows_x), np.array(rows_u), np.array(rows_s))
    outputs = [tuple(rows_x[j][: n[j]]) + (int(token[j]),) for j in range(b)]
    return np.array(weights), outputs


@settings(max_examples=120)
@given(pq_rows())
def test_emitted_tokens_follow_p_exactly(rows):
    """Token k of an iteration, given the tokens before it and that the iteration reaches
    position k, is distributed as p_k: the heart of the paper's Theorem 3.5 / Appendix A.1."""
    p, q = rows
    gamma, vocab = q.shape
    weights, outputs = exact_outputs(p, q)
    assert abs(weights.sum() - 1) < 1e-9
    for k in range(gamma + 1):
        by_prefix: dict[tuple, np.ndarray] = {}
        for w, out in zip(weights, outputs):
            if len(out) > k:
                row = by_prefix.setdefault(out[:k], np.zeros(vocab))
                row[out[k]] += w
        for row in by_prefix.values():
            if row.sum() > 1e-12:
                np.testing.assert_allclose(row / row.sum(), p[k], atol=1e-9)


@settings(max_examples=60)
@given(pq_rows())
def test_acceptance_matches_beta_exactly(rows):
    """P(first draft token accepted) = beta = sum min(p_0, q_0) (Lemma 3.3)."""
    p, q = rows
    weights, outputs = exact_outputs(p, q)
    gamma = q.shape[0]
    # accepted first token <=> the iteration emitted at least two tokens ... or emitted one
    # token when gamma == 0; with gamma >= 1, n >= 1 <=> len(output) >= 2
    accepted = sum(w for w, out in zip(weights, outputs) if len(out) >= 2)
    assert gamma >= 1
    assert accepted == pytest.approx(np.minimum(p[0], q[0]).sum(), abs=1e-9)


@settings(max_examples=80)
@given(st.integers(2, 12), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_greedy_is_argmax(vocab, gamma, seed):
    """On one-hot rows verification keeps exactly the draft tokens equal to the target's
    argmax, then emits the target's argmax, whatever the uniforms."""
    rng = np.random.default_rng(seed)
    target_best = rng.integers(vocab, size=gamma + 1)  # [gamma + 1]
    draft = np.where(rng.random(gamma) < 0.7, target_best[:gamma], rng.integers(vocab, size=gamma))
    p = np.eye(vocab)[target_best]  # [gamma + 1, V]
    q = np.eye(vocab)[draft]  # [gamma, V]
    n, token = verify(p, q, draft, rng.random(gamma), float(rng.random()))
    mismatch = np.flatnonzero(draft != target_best[:gamma])
    expected_n = int(mismatch[0]) if mismatch.size else gamma
    assert n == expected_n
    assert token == target_best[expected_n]


def test_verify_equals_batch_elementwise():
    rng = np.random.default_rng(7)
    gamma, vocab, batch = 3, 5, 50
    p = rng.dirichlet(np.ones(vocab), size=(batch, gamma + 1))
    q = rng.dirichlet(np.ones(vocab), size=(batch, gamma))
    x = np.stack([[rng.choice(vocab, p=q[b, i]) for i in range(gamma)] for b in range(batch)])
    u = rng.random((batch, gamma))
    s = rng.random(batch)
    n, tok = verify_batch(p, q, x, u, s)
    for b in range(batch):
        assert verify(p[b], q[b], x[b], u[b], s[b]) == (n[b], tok[b])


def test_equal_p_q_accepts_everything_and_never_nans():
    """p == q: every draft token is accepted (u < 1 = p/q); the residual is empty, and the
    guarded normaliser keeps the (probability-zero) rejection branch finite."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=3)
    x = np.array([0, 1])
    n, token = verify(p, p[:2], x, np.array([0.999999, 0.5]), 0.3)
    assert n == 2 and 0 <= token < 4
    r = residual_distribution(p[0], p[0])  # [V]
    assert np.all(np.isfinite(r)) and r.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(r, p[0])


def test_recovered_token_never_where_residual_is_zero():
    """Inverse CDF never picks a zero-weight token, even for u right below 1."""
    w = np.array([[0.0, 0.3, 0.0, 0.7, 0.0]])
    for u in [0.0, 0.2999, 0.3, 0.9999999999999999]:
        assert inverse_cdf(w, np.array([u]))[0] in (1, 3)


def test_disjoint_supports_reject_and_recover_from_p():
    p = np.array([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])
    q = np.array([[0.5, 0.5, 0.0, 0.0]])
    n, token = verify(p, q, np.array([1]), np.array([0.0]), 0.75)
    assert n == 0 and token == 3


def test_lenience_accepts_more_and_is_exact_at_one():
    p = np.array([[0.2, 0.8], [0.5, 0.5]])
    q = np.array([[0.6, 0.4]])
    # ratio p/q at token 0 is 1/3: u = 0.5 rejects exactly, accepts with l = 0.5 (ratio 2/3)
    assert verify(p, q, np.array([0]), np.array([0.5]), 0.1)[0] == 0
    assert verify(p, q, np.array([0]), np.array([0.5]), 0.1, lenience=0.5)[0] == 1


BAD_INPUTS = [
    (dict(target_probs=np.full((2, 3), 1 / 3)), "target_probs must have shape"),
    (dict(draft_probs=np.full((2, 4), 0.25)), "draft_probs must have shape"),
    (dict(target_probs=np.array([[0.5, 0.6, 0.1], [0.2, 0.3, 0.5], [1, 0, 0]])), "sum to 1"),
    (dict(target_probs=np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5], [1, 0, 0]])), "NaN"),
    (dict(draft_probs=np.array([[-0.1, 0.6, 0.5], [0.2, 0.3, 0.5]])), "negative"),
    (dict(draft_tokens=np.array([0, 3])), "draft_tokens must be in"),
    (dict(draft_tokens=np.array([0.0, 1.0])), "integer"),
    (dict(accept_uniforms=np.array([0.5, 1.0])), "accept_uniforms"),
    (dict(sample_uniform=-0.1), "sample_uniform"),
    (dict(draft_tokens=np.array([2, 0]), draft_probs=np.array([[0.5, 0.5, 0], [1, 0, 0]])),
     "zero probability"),
    (dict(lenience=0.0), "lenience"),
]


@pytest.mark.parametrize("override,message", BAD_INPUTS)
def test_bad_input_is_refused_with_a_clear_error(override, message):
    args = dict(
        target_probs=np.full((3, 3), 1 / 3),
        draft_probs=np.full((2, 3), 1 / 3),
        draft_tokens=np.array([0, 1]),
        accept_uniforms=np.array([0.1, 0.2]),
        sample_uniform=0.5,
    )
    args.update(override)
    with pytest.raises(ValueError, match=message):
        verify(**args)


def plain_residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    r = np.maximum(p - q, 0.0)
    total = r.sum(axis=-1, keepdims=True)
    empty = total <= 1e-12
    return np.where(empty, p, r / np.where(empty, 1.0, total))


@settings(max_examples=150)
@given(pq_rows())
def test_residual_is_the_plain_formula_bit_for_bit(rows):
    p, q = rows
    gamma = q.shape[0]
    np.testing.assert_array_equal(residual_distribution(p[:gamma], q), plain_residual(p[:gamma], q))
    np.testing.assert_array_equal(residual_distribution(p[0], p[0]), p[0])  # empty: p itself


@st.composite
def greedy_cases(draw):
    """Target logits (ties included), valid draft rows q with q_i(x_i) in (0, 1], draft
    tokens that often match the target's argmax, uniforms and a lenience."""
    vocab = draw(st.integers(2, 30))
    gamma = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = rng.normal(size=(gamma + 1, vocab))
    if draw(st.booleans()):
        logits = np.round(logits)  # ties: the first argmax
    logits = logits.astype(draw(st.sampled_from([np.float32, np.float64])))
    best = logits.astype(np.float64).argmax(-1)
    kind = draw(st.sampled_from(["one_hot", "dirichlet", "sparse", "peaked"]))
    agree = draw(st.integers(0, gamma))
    x = np.where(np.arange(gamma) < agree, best[:gamma], rng.integers(vocab, size=gamma))
    if kind == "one_hot":
        q = np.eye(vocab)[x]
    else:
        q = rng.dirichlet(np.ones(vocab) * (0.1 if kind == "peaked" else 1.0), size=gamma)
        if kind == "sparse":
            q = q * (rng.random(q.shape) < 0.4)
        q[np.arange(gamma), x] += 1e-3  # every draft token is supported
        q /= q.sum(-1, keepdims=True)
    u = np.asarray([draw(st.floats(0.0, 1.0, exclude_max=True)) for _ in range(gamma)])
    s = draw(st.floats(0.0, 1.0, exclude_max=True))
    lenience = draw(st.sampled_from([1.0, 1.0, 0.5, 0.01]))
    return logits, q, x, u, s, lenience


@settings(max_examples=400)
@given(greedy_cases())
def test_greedy_decision_is_verify_on_one_hot_rows(case):
    """verify_greedy(argmax tokens, x) == verify(one-hot p, q, x, u, s) for every q that
    supports the draft tokens with probability <= 1, every uniform and every lenience; and
    beta on one-hot p is q at the target's choice."""
    from quickdraft.sampling import SamplingConfig, adjust_logits, greedy_tokens
    from quickdraft.theory import beta
    from quickdraft.verification import verify_greedy

    logits, q, x, u, s, lenience = case
    p = adjust_logits(logits, SamplingConfig(temperature=0))
    choices = greedy_tokens(logits)
    assert np.all((q[np.arange(len(x)), x] > 0) & (q[np.arange(len(x)), x] <= 1))
    assert verify_greedy(choices, x) == verify(p, q, x, u, s, lenience=lenience)
    gamma = len(x)
    np.testing.assert_array_equal(q[np.arange(gamma), choices[:gamma]], beta(p[:gamma], q))


def test_greedy_applies_only_to_greedy_checked_candidates():
    from quickdraft.verification import greedy_applies

    assert greedy_applies(True, True)
    assert not greedy_applies(True, False)  # unchecked q: verify on one-hot rows instead
    assert not greedy_applies(False, True)


def test_the_package_imports_with_numpy_only():
    """quickdraft.verification (rule and graph form) needs no onnx until a graph is built."""
    import json
    import subprocess
    import sys

    code = ("import json, sys, quickdraft.verification as v; "
            "assert not {'onnx', 'onnxruntime'} & set(sys.modules); "
            "print(json.dumps(sorted(v.__all__)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [
        "PROB_SUM_ATOL", "RESIDUAL_EPS", "build_sample_graph", "build_verify_graph",
        "greedy_applies", "inverse_cdf", "inverse_cdf_row", "residual_distribution", "verify",
        "verify_batch", "verify_greedy",
    ]


@pytest.mark.parametrize("validate", [True, False])
def test_no_draft_tokens_draw_the_bonus_from_p0(validate):
    """gamma 0 (one target step): n = 0 and the next token is the inverse-CDF draw from p_0."""
    from quickdraft.verification import inverse_cdf_row, verify_greedy

    p = np.array([[0.2, 0.5, 0.3]])
    none = np.zeros(0, np.int64)
    for s in (0.0, 0.1, 0.5, 0.9):
        got = verify(p, np.zeros((0, 3)), none, np.zeros(0), s, validate=validate)
        assert got == (0, inverse_cdf_row(p[0], s))
    assert verify_greedy(np.array([2]), none) == (0, 2)
