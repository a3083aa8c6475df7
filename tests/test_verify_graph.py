"""The verification graph makes the same decisions as quickdraft.verification.verify.

Property tests on the CPU execution provider, in float32 and float64.

The boundary rule. The graph computes in float32 (or float64) what ``verify`` computes in
float64, so a decision can legitimately flip only where the compared quantities are within
rounding of each other. An example is skipped (``assume``) when, at a position the rule
examines:

* an acceptance test is that close: ``|u_i q_i(x_i) - p_i(x_i)| <= REL * max(u_i q_i(x_i),
  p_i(x_i))`` (unless ``p_i(x_i)`` is exactly 0: a masked token is 0 in both);
* the inverse-CDF threshold is: ``|u * total - cdf_k| <= REL * total`` for some k;
* a top-p cut is: ``|mass_before_j - top_p| <= REL`` for some sorted j;
* a rejection leaves a residual of total mass <= MIN_RESIDUAL (p_n ~ q_n: its
  normalisation amplifies rounding; such a rejection has probability ~0 anyway).

REL is 1e-5 in float32 and 1e-10 in float64. Logits are drawn on a grid of eighths, so two
logits are either equal (ties, which both sides break towards the lower index) or far apart.
Greedy decoding (temperature 0) needs no rule: it is compared on arbitrary fp16/fp32 logits.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from quickdraft.ort_backend.verify_graph import (  # noqa: E402
    DeviceVerifier,
    build_verify_graph,
)
from quickdraft.sampling import SamplingConfig, adjust_logits, sample_token  # noqa: E402
from quickdraft.theory import beta  # noqa: E402
from quickdraft.verification import residual_distribution, verify  # noqa: E402

REL = {"float32": 1e-5, "float64": 1e-10}
MIN_RESIDUAL = {"float32": 1e-3, "float64": 1e-8}
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

_VERIFIERS: dict = {}


def verifier(gamma, vocab, sampling, compute="float32", **kw) -> DeviceVerifier:
    key = (gamma, vocab, sampling, compute, tuple(sorted(kw.items())))
    if key not in _VERIFIERS:
        _VERIFIERS[key] = DeviceVerifier(gamma, vocab, sampling, compute=compute, **kw)
    return _VERIFIERS[key]


samplings = st.builds(
    SamplingConfig,
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 2, 3, 6]),
    top_p=st.sampled_from([1.0, 0.9, 0.6, 0.3]),
)
unit = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)


def grid_logits(rows, vocab):
    return st.lists(st.lists(st.integers(-24, 24), min_size=vocab, max_size=vocab),
                    min_size=rows, max_size=rows).map(lambda r: np.asarray(r, np.float32) / 8)


@st.composite
def logit_cases(draw, sampling=samplings):
    vocab = draw(st.integers(2, 9))
    gamma = draw(st.integers(1, 5))
    extra = draw(st.integers(0, 2))  # rows before the last gamma + 1 (a prefill)
    cfg = draw(sampling)
    target = draw(grid_logits(gamma + 1 + extra, vocab))
    # draft logits: the target's plus a grid offset (often equal, so tokens get accepted)
    offset = draw(grid_logits(gamma, vocab)) * draw(st.sampled_from([0.0, 0.25, 1.0]))
    draft_logits = target[extra: extra + gamma] + offset
    q = adjust_logits(draft_logits, cfg)
    tokens = np.asarray([sample_token(q[i], draw(unit)) for i in range(gamma)], np.int64)
    u = np.asarray([draw(unit) for _ in range(gamma)])
    s = draw(unit)
    return target, q, tokens, u, s, cfg


def assume_clear_of_boundaries(p, q, x, u, s, n, compute, top_p=1.0, before_adjust=None):
    """Skip examples within rounding of a decision boundary (see the module docstring)."""
    rel = REL[compute]
    gamma = len(x)
    for i in range(min(n + 1, gamma)):
        a, b = u[i] * q[i, x[i]], p[i, x[i]]
        if b != 0.0:
            assume(abs(a - b) > rel * max(a, b))
    if top_p < 1.0 and before_adjust is not None:
        for row in before_adjust[: n + 1]:
            srt = np.sort(row)[::-1]
            before = np.cumsum(srt) - srt
            assume(np.all(np.abs(before - top_p) > rel))
    q_pad = np.concatenate([q, np.zeros_like(p[:1])])
    r = np.maximum(p[n] - q_pad[n], 0.0)
    if n < gamma:
        assume(r.sum() > MIN_RESIDUAL[compute])
    w = residual_distribution(p[n], q_pad[n])
    cdf = np.cumsum(w)
    assume(np.all(np.abs(cdf - s * cdf[-1]) > rel * cdf[-1]))


def _softmax_tempered_topk(logits, cfg):
    """The probabilities top-p cuts (temperature and top-k applied, before top-p)."""
    return adjust_logits(logits, SamplingConfig(cfg.temperature, cfg.top_k, 1.0))


@pytest.mark.parametrize("compute", ["float32", "float64"])
@SETTINGS
@given(case=logit_cases())
def test_logits_graph_matches_verify(compute, case):
    target, q, x, u, s, cfg = case
    gamma = len(x)
    rows = target[-(gamma + 1):]
    p = adjust_logits(rows, cfg)
    n, token = verify(p, q, x, u, s)
    assume_clear_of_boundaries(p, q, x, u, s, n, compute, cfg.top_p,
                               _softmax_tempered_topk(rows, cfg))
    got_n, got_token, got_beta = verifier(gamma, target.shape[1], cfg, compute).run(
        target, q, x, u, s)
    assert (got_n, got_token) == (n, token)
    # beta output: sum_x min(p_i(x), q_i(x)) at every draft position, for the statistics
    np.testing.assert_allclose(got_beta, beta(p[:gamma], q), atol=1e-5)


@st.composite
def prob_cases(draw):
    """Arbitrary p and q rows: random weights with zeros, p == q, disjoint supports."""
    vocab = draw(st.integers(2, 8))
    gamma = draw(st.integers(1, 4))
    weights = st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 7.0]),
                       min_size=vocab, max_size=vocab).filter(lambda w: sum(w) > 0)
    p = np.asarray([draw(weights) for _ in range(gamma + 1)], np.float64)
    p /= p.sum(axis=1, keepdims=True)
    mode = draw(st.sampled_from(["random", "equal", "disjoint"]))
    if mode == "equal":
        q = p[:gamma].copy()
    else:
        q = np.asarray([draw(weights) for _ in range(gamma)], np.float64)
        if mode == "disjoint":
            q = np.where(p[:gamma] > 0, 0.0, q)
            q[q.sum(axis=1) == 0, 0] = 1.0
        q /= q.sum(axis=1, keepdims=True)
    x = np.asarray([sample_token(q[i], draw(unit)) for i in range(gamma)], np.int64)
    u = np.asarray([draw(unit) for _ in range(gamma)])
    return p, q, x, u, draw(unit)


@pytest.mark.parametrize("compute", ["float32", "float64"])
@SETTINGS
@given(case=prob_cases())
def test_probs_graph_matches_verify(compute, case):
    p, q, x, u, s = case
    gamma, vocab = q.shape
    n, token = verify(p, q, x, u, s)
    np_type = np.float32 if compute == "float32" else np.float64
    # the graph sees p and q in its own type: the reference decides on the same numbers
    p_c, q_c = p.astype(np_type).astype(np.float64), q.astype(np_type).astype(np.float64)
    assume((n, token) == verify(p_c, q_c, x, u, s, validate=False))
    assume_clear_of_boundaries(p_c, q_c, x, u, s, n, compute)
    got = verifier(gamma, vocab, SamplingConfig(), compute, target_input="probs")(p, q, x, u, s)
    assert got == (n, token)


@pytest.mark.parametrize("logits_dtype", ["fp32", "fp16"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_greedy_graph_matches_verify_exactly(logits_dtype, data):
    """Temperature 0: one-hot argmax rows, no rounding anywhere, no boundary rule."""
    vocab = data.draw(st.integers(2, 40))
    gamma = data.draw(st.integers(1, 6))
    np_type = np.float32 if logits_dtype == "fp32" else np.float16
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(gamma + 1 + data.draw(st.integers(0, 2)), vocab)).astype(np_type)
    if data.draw(st.booleans()):  # ties: argmax takes the first
        target = np.round(target).astype(np_type)
    cfg = SamplingConfig(temperature=0)
    best = target[-(gamma + 1):].astype(np.float64).argmax(axis=1)
    # draft tokens that agree with the target's argmax for a while, then maybe not
    agree = data.draw(st.integers(0, gamma))
    x = np.where(np.arange(gamma) < agree, best[:gamma], rng.integers(0, vocab, gamma))
    q = np.eye(vocab)[x]
    if data.draw(st.booleans()):  # q need not be one-hot: any q supporting x
        q = 0.5 * q + 0.5 * rng.dirichlet(np.ones(vocab), size=gamma)
    u, s = rng.random(gamma), float(rng.random())
    p = adjust_logits(target[-(gamma + 1):], cfg)
    expected = verify(p, q, x, u, s)
    got_n, got_token, got_beta = verifier(gamma, vocab, cfg, logits_dtype=logits_dtype).run(
        target, q, x, u, s)
    assert (got_n, got_token) == expected
    np.testing.assert_array_equal(got_beta, beta(p[:gamma], q).astype(np.float32))  # exact


def test_graph_uses_standard_operators_only():
    for cfg in (SamplingConfig(), SamplingConfig(0), SamplingConfig(0.7, 5, 0.9)):
        model = build_verify_graph(4, 100, cfg)
        assert {op.domain for op in model.opset_import} == {""}
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
        inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        if cfg.greedy:  # the argmax decision: no q or uniforms go to the device
            assert inputs == ["target_logits", "draft_tokens"]
            assert outputs == ["n", "next_token", "choices"]
        else:
            assert inputs == ["target_logits", "draft_probs", "draft_tokens",
                              "accept_uniforms", "sample_uniform"]
            assert outputs == ["n", "next_token", "beta"]
    probs_greedy = build_verify_graph(4, 100, SamplingConfig(0), target_input="probs")
    assert [o.name for o in probs_greedy.graph.output][-1] == "beta"


def test_bonus_token_and_full_acceptance():
    """p == q everywhere: every draft token is accepted, the bonus comes from p_gamma."""
    gamma, vocab = 3, 5
    logits = np.log(np.asarray([[1, 2, 3, 4, 5]] * (gamma + 1), np.float32))
    cfg = SamplingConfig()
    q = adjust_logits(logits[:gamma], cfg)
    x = np.asarray([4, 2, 0])
    for s in (0.0, 0.3, 0.99):
        n, token = verifier(gamma, vocab, cfg)(logits, q, x, np.full(gamma, 0.5), s)
        assert n == gamma
        assert token == verify(adjust_logits(logits, cfg), q, x, np.full(gamma, 0.5), s)[1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        build_verify_graph(0, 10)
    with pytest.raises(ValueError, match="compute"):
        build_verify_graph(2, 10, compute="float16")
    with pytest.raises(ValueError, match="target_input"):
        build_verify_graph(2, 10, target_input="hidden")
