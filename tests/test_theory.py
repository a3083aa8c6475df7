"""The analysis of section 3: the paper's Table 1, the expected column of its T5 results,
and the relations between the quantities."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quickdraft import theory
from quickdraft.cli import main

# Table 1 (alpha, gamma -> operations, speed), computed with c = c_hat = 0
TABLE_1 = [
    (0.6, 2, 1.53, 1.96),
    (0.7, 3, 1.58, 2.53),
    (0.8, 2, 1.23, 2.44),
    (0.8, 5, 1.63, 3.69),
    (0.9, 2, 1.11, 2.71),
    (0.9, 10, 1.60, 6.86),
]


@pytest.mark.parametrize("alpha,gamma,operations,speed", TABLE_1)
def test_table_1(alpha, gamma, operations, speed):
    assert round(theory.operations_factor(alpha, gamma, c_hat=0.0), 2) == operations
    assert round(theory.walltime_improvement(alpha, gamma, c=0.0), 2) == speed


# The T5 "expected" speedup: alpha and gamma from the T5-XXL experiments, c measured per
# draft size (T5-small 0.02, base 0.04, large 0.11). EnDe / T5-small / T=0 is 3.2X.
C_T5 = {"small": 0.02, "base": 0.04, "large": 0.11}


def test_t5_expected_speedup():
    assert round(theory.walltime_improvement(0.75, 7, C_T5["small"]), 1) == 3.2


def test_expected_tokens_edge_cases():
    assert theory.expected_tokens(0.0, 5) == 1.0  # only the recovered token
    assert theory.expected_tokens(1.0, 5) == 6.0  # gamma accepted + bonus
    assert theory.expected_tokens(0.5, 1) == pytest.approx(1.5)


@given(st.floats(0.01, 0.99), st.integers(1, 20))
def test_expected_tokens_is_the_truncated_geometric_mean(alpha, gamma):
    # sum over k of P(at least k + 1 tokens) = sum_{k=0..gamma} alpha^k
    assert theory.expected_tokens(alpha, gamma) == pytest.approx(
        sum(alpha**k for k in range(gamma + 1)))


@given(st.floats(0.0, 0.99), st.floats(0.0, 1.0))
def test_best_gamma_is_the_argmax_and_beats_the_bound(alpha, c):
    g = theory.best_gamma(alpha, c, 40)
    best = theory.walltime_improvement(alpha, g, c)
    assert all(best >= theory.walltime_improvement(alpha, k, c) for k in range(1, 41))
    if alpha > c:  # Corollary 3.9
        assert best >= theory.improvement_lower_bound(alpha, c) - 1e-12


def test_beta_and_alpha():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = np.array([[0.25, 0.25, 0.5], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(theory.beta(p, q), [0.5, 0.0])
    assert theory.alpha_from_distributions(p, q) == pytest.approx(0.25)
    np.testing.assert_allclose(theory.lenient_alpha(p, q, 1.0), theory.beta(p, q))
    assert np.all(theory.lenient_alpha(p, q, 0.5) >= theory.beta(p, q))


def test_alpha_from_acceptances():
    # 3 of gamma = 3 accepted (3 successes), 1 accepted (1 success, 1 failure)
    assert theory.alpha_from_acceptances([3, 1], 3) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="accepted counts"):
        theory.alpha_from_acceptances([4], 3)
    assert theory.alpha_from_acceptances([2, 1], [2, 3]) == pytest.approx(3 / 4)


@pytest.mark.parametrize("call", [
    lambda: theory.expected_tokens(1.2, 3),
    lambda: theory.expected_tokens(0.5, 0),
    lambda: theory.walltime_improvement(0.5, 3, -1),
    lambda: theory.lenient_alpha(np.ones(2) / 2, np.ones(2) / 2, 0.0),
])
def test_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_theory_cli_prints_table_1_row(capsys):
    assert main(["theory", "--alpha", "0.8", "--c", "0", "--max-gamma", "5"]) == 0
    out = capsys.readouterr().out
    assert "3.69X" in out and "1.63X" in out  # alpha 0.8, gamma 5
    assert main(["theory", "--alpha", "1.5"]) == 1


def test_demo_cli_runs_on_ngram_models(capsys):
    assert main(["demo", "--max-new-tokens", "40", "--chars", "50000", "--gamma", "3"]) == 0
    out = capsys.readouterr().out
    assert "tokens per target call" in out and "acceptance rate" in out


# --- pipelined drafting ------------------------------------------------------------------


@given(st.floats(0.0, 1.0), st.integers(1, 16), st.floats(0.0, 2.0), st.floats(0.0, 1.0))
def test_pipelined_without_continuations_is_theorem_3_8(alpha, gamma, c, h):
    """s = 0: no iteration drafts a continuation, whatever h; equal to the last bit."""
    assert theory.pipelined_walltime_improvement(alpha, gamma, c, h, shadow_rate=0.0) == (
        theory.walltime_improvement(alpha, gamma, c))


@given(st.floats(0.0, 1.0), st.integers(1, 16), st.floats(0.0, 2.0), st.floats(0.0, 1.0),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_pipelined_improvement_grows_with_the_hidden_share(alpha, gamma, c, h1, h2, s):
    lo, hi = sorted((h1, h2))
    f = lambda h: theory.pipelined_walltime_improvement(  # noqa: E731
        alpha, gamma, c, h, shadow_rate=s)
    assert f(lo) <= f(hi) <= theory.expected_tokens(alpha, gamma)


@given(st.floats(0.0, 1.0), st.integers(1, 16), st.floats(0.0, 2.0))
def test_fully_hidden_continuations_are_the_old_formula(alpha, gamma, c):
    """h = 1, s = 1: only the warm proposals' draft time is saved, nothing is added; this
    is what the model predicted before it charged continuations."""
    kept = alpha ** (gamma + 1)
    closed = (1.0 - kept) / (1.0 - alpha) if alpha < 1.0 else gamma + 1.0
    want = closed / (1.0 + gamma * c * (1.0 - kept))
    assert theory.pipelined_walltime_improvement(alpha, gamma, c, 1.0) == pytest.approx(
        want, rel=1e-12)
    assert theory.pipelined_walltime_improvement(alpha, gamma, c, 1.0, shadow_rate=1.0) == (
        theory.expected_tokens(alpha, gamma) / (1.0 + gamma * c * (1.0 - kept)))


@given(st.floats(0.0, 1.0), st.integers(1, 16), st.floats(0.001, 2.0))
def test_nothing_hidden_is_slower_than_the_sequential_loop(alpha, gamma, c):
    """h = 0, s = 1 (the loop run sequentially, as on a CPU): every continuation costs its
    gamma + 1 draft steps, more than the gamma c a kept one saves: the iteration costs
    c ((gamma + 1) - gamma alpha^(gamma + 1)) more than Theorem 3.8's gamma c + 1."""
    piped = theory.pipelined_walltime_improvement(alpha, gamma, c, 0.0)
    assert piped < theory.walltime_improvement(alpha, gamma, c)
    cost = theory.expected_tokens(alpha, gamma) / piped
    assert cost - (gamma * c + 1.0) == pytest.approx(
        c * ((gamma + 1) - gamma * alpha ** (gamma + 1)), rel=1e-9, abs=1e-12)


def test_pipelined_improvement_by_hand():
    # alpha^5 = 0.32768, Eq. 1 = 3.3616; cost 1 + 0.4 (1 - 0.32768) + 0.5 * 5 * 0.1
    # = 1.518928 (the old model's 1 + 0.4 (1 - 0.5 * 0.32768) = 1.334464 gave 2.519)
    assert theory.pipelined_walltime_improvement(0.8, 4, 0.1, 0.5) == pytest.approx(
        3.3616 / 1.518928, rel=1e-12)  # 2.21313...; Theorem 3.8 gives 2.40114
    # half the iterations draft: 1 + 0.4 (1 - 0.16384) + 0.125 = 1.459464
    assert theory.pipelined_walltime_improvement(
        0.8, 4, 0.1, 0.5, shadow_rate=0.5) == pytest.approx(3.3616 / 1.459464, rel=1e-12)
    # nothing hidden: 1 + 0.4 (1 - 0.32768) + 0.5 = 1.768928
    assert theory.pipelined_walltime_improvement(0.8, 4, 0.1, 0.0) == pytest.approx(
        3.3616 / 1.768928, rel=1e-12)
    # everything kept and everything hidden: the target alone, gamma + 1 tokens per call
    assert theory.pipelined_walltime_improvement(1.0, 4, 0.3, 1.0) == pytest.approx(5.0)


@given(st.integers(1, 16), st.floats(0.01, 2.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_continuations_pay_exactly_above_the_break_even_rate(gamma, c, h, alpha, s1, s2):
    """The walltime model and shadow_break_even agree: with P = alpha^(gamma + 1), more
    continuations (a larger s) help above the break-even rate, hurt below it, and change
    nothing at it."""
    lo, hi = sorted((s1, s2))
    f = lambda s, a=alpha: theory.pipelined_walltime_improvement(  # noqa: E731
        a, gamma, c, h, shadow_rate=s)
    rate, keep = theory.shadow_break_even(gamma, h), alpha ** (gamma + 1)
    if keep > rate + 1e-9:  # up to rounding: the two cost terms move in opposite ways
        assert f(hi) >= f(lo) * (1 - 1e-12)
    elif keep < rate - 1e-9:
        assert f(hi) <= f(lo) * (1 + 1e-12)
    if 0.0 < rate < 1.0:  # at the rate: s does not matter
        even = rate ** (1.0 / (gamma + 1))
        assert f(hi, even) == pytest.approx(f(lo, even), rel=1e-9)
        assert f(hi, even) == pytest.approx(theory.walltime_improvement(even, gamma, c),
                                            rel=1e-9)


def test_the_break_even_rate_by_hand_in_the_walltime():
    # gamma 4, h 0.76: rate 0.3; alpha = 0.3^(1/5) keeps all five candidates 30% of the time
    alpha = 0.3 ** 0.2
    at = [theory.pipelined_walltime_improvement(alpha, 4, 0.1, 0.76, shadow_rate=s)
          for s in (0.0, 0.5, 1.0)]
    assert at == pytest.approx([theory.walltime_improvement(alpha, 4, 0.1)] * 3, rel=1e-12)


def _iteration_cost(gamma: int, c: float, h: float, keep: float, shadow: bool) -> float:
    """Expected target steps of an iteration and the next proposal: with a continuation,
    its unhidden (1 - h)(gamma + 1) c always, the next proposal's gamma c when not kept."""
    if not shadow:
        return 1.0 + gamma * c
    return 1.0 + (1.0 - h) * (gamma + 1) * c + (1.0 - keep) * gamma * c


@given(st.integers(1, 16), st.floats(0.01, 2.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_the_shadow_break_even_rate_is_where_a_continuation_starts_to_pay(gamma, c, h, keep):
    rate = theory.shadow_break_even(gamma, h)
    assert 0.0 <= rate <= 1.0
    if rate < 1.0:  # at the rate both costs are equal, whatever c
        assert _iteration_cost(gamma, c, h, rate, True) == pytest.approx(
            _iteration_cost(gamma, c, h, rate, False), rel=1e-12)
    with_shadow = _iteration_cost(gamma, c, h, keep, True)
    without = _iteration_cost(gamma, c, h, keep, False)
    if keep > rate + 1e-9:
        assert with_shadow < without
    elif keep < rate - 1e-9:
        assert with_shadow > without


def test_shadow_break_even_by_hand():
    assert theory.shadow_break_even(4, 0.76) == pytest.approx(0.3)  # 0.24 * 5 / 4
    assert theory.shadow_break_even(8, 1.0) == 0.0  # all hidden: always worth drafting
    assert theory.shadow_break_even(1, 0.0) == 1.0  # nothing hidden: never (capped)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="h must be in"):
            theory.shadow_break_even(4, bad)
    with pytest.raises(ValueError):
        theory.shadow_break_even(0, 0.5)


@pytest.mark.parametrize("h,c", [(-0.1, 0.1), (1.5, 0.1), (0.5, -1.0)])
def test_pipelined_bad_arguments(h, c):
    with pytest.raises(ValueError):
        theory.pipelined_walltime_improvement(0.5, 3, c, h)


@pytest.mark.parametrize("s", [-0.1, 1.5, float("nan"), float("inf")])
def test_a_shadow_rate_outside_0_1_is_refused(s):
    with pytest.raises(ValueError, match=r"shadow_rate .* must be in \[0, 1\]"):
        theory.pipelined_walltime_improvement(0.5, 3, 0.1, 0.5, shadow_rate=s)


@pytest.mark.parametrize("c", [-1.0, float("nan"), float("inf")])
def test_a_cost_ratio_that_is_not_a_finite_number_at_least_0_is_refused(c):
    """c = -1 made the lower bound divide by zero; NaN passed every `c < 0` check."""
    for call in (lambda: theory.walltime_improvement(0.8, 4, c),
                 lambda: theory.pipelined_walltime_improvement(0.8, 4, c, 0.5),
                 lambda: theory.improvement_lower_bound(0.8, c),
                 lambda: theory.operations_factor(0.8, 4, c),
                 lambda: theory.best_gamma(0.8, c)):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            call()


# --- the measured verify cost --------------------------------------------------------------


@given(st.floats(0.0, 1.0), st.integers(1, 32), st.floats(0.0, 2.0))
def test_verify_1_is_theorem_3_8_to_the_last_bit(alpha, gamma, c):
    want = theory.expected_tokens(alpha, gamma) / (gamma * c + 1.0)  # Theorem 3.8 as it was
    assert theory.walltime_improvement(alpha, gamma, c) == want
    assert theory.walltime_improvement(alpha, gamma, c, verify=1.0) == want
    assert theory.walltime_improvement(alpha, gamma, c, 1) == want


@pytest.mark.parametrize("alpha,gamma,c,verify", [
    (0.8, 4, 0.1, 1.14), (0.6, 2, 0.05, 1.02), (0.9, 8, 0.02, 1.21), (0.7, 3, 0.2, 0.95),
    (0.0, 5, 0.1, 1.5), (1.0, 4, 0.3, 1.1)])
def test_the_verify_cost_adds_to_the_iteration_cost(alpha, gamma, c, verify):
    """Eq. 1 / (gamma c + verify), Eq. 1 summed term by term."""
    tokens = sum(alpha**k for k in range(gamma + 1))
    got = theory.walltime_improvement(alpha, gamma, c, verify=verify)
    assert got == pytest.approx(tokens / (gamma * c + verify), rel=1e-12)
    if verify > 1.0:  # a dearer verify call predicts less
        assert got < theory.walltime_improvement(alpha, gamma, c)


def test_the_verify_cost_by_hand():
    # alpha 0.8, gamma 4: Eq. 1 = 3.3616; 4 x 0.1 + 1.14 = 1.54 (Theorem 3.8: 1.4)
    assert theory.walltime_improvement(0.8, 4, 0.1, verify=1.14) == pytest.approx(
        3.3616 / 1.54, rel=1e-12)  # 2.18286, against 2.40114
    # pipelined, h 0.5, s 1: 1.14 + 0.4 (1 - 0.32768) + 0.5 * 5 * 0.1 = 1.658928
    assert theory.pipelined_walltime_improvement(0.8, 4, 0.1, 0.5, verify=1.14) == (
        pytest.approx(3.3616 / 1.658928, rel=1e-12))


@given(st.floats(0.0, 1.0), st.integers(1, 16), st.floats(0.0, 2.0), st.floats(0.0, 1.0),
       st.floats(0.5, 2.0))
def test_pipelined_without_continuations_is_the_walltime_with_the_same_verify(alpha, gamma, c,
                                                                              h, verify):
    assert theory.pipelined_walltime_improvement(
        alpha, gamma, c, h, shadow_rate=0.0, verify=verify) == theory.walltime_improvement(
        alpha, gamma, c, verify=verify)


@given(st.floats(0.0, 1.0), st.integers(1, 16), st.floats(0.0, 2.0), st.floats(0.0, 1.0),
       st.floats(0.0, 1.0), st.floats(0.5, 2.0))
def test_pipelined_verify_replaces_the_leading_1(alpha, gamma, c, h, s, verify):
    """verify 1 is the formula without it exactly; any verify shifts the iteration's cost
    by verify - 1 target steps."""
    f = lambda v=1.0: theory.pipelined_walltime_improvement(  # noqa: E731
        alpha, gamma, c, h, shadow_rate=s, verify=v)
    assert f() == theory.pipelined_walltime_improvement(alpha, gamma, c, h, shadow_rate=s)
    tokens = theory.expected_tokens(alpha, gamma)
    assert tokens / f(verify) - tokens / f() == pytest.approx(verify - 1.0, abs=1e-9)


@pytest.mark.parametrize("verify", [0.0, -1.0, float("nan"), float("inf")])
def test_a_verify_cost_that_is_not_a_finite_number_above_0_is_refused(verify):
    for call in (lambda: theory.walltime_improvement(0.8, 4, 0.1, verify),
                 lambda: theory.pipelined_walltime_improvement(0.8, 4, 0.1, 0.5, verify=verify),
                 lambda: theory.best_gamma(0.8, 0.1, 8, verify=lambda g: verify)):
        with pytest.raises(ValueError, match=r"verify \(the cost of the target's call on "
                                             r"gamma \+ 1 tokens.*must be a finite number > 0"):
            call()


@given(st.floats(0.0, 0.99), st.floats(0.0, 1.0), st.floats(0.0, 0.2))
def test_best_gamma_with_a_verify_cost_is_the_argmax_of_it(alpha, c, slope):
    def verify(g):
        return 1.0 + slope * g  # a verify call dearer with every token

    g = theory.best_gamma(alpha, c, 24, verify=verify)
    best = theory.walltime_improvement(alpha, g, c, verify(g))
    assert all(best >= theory.walltime_improvement(alpha, k, c, verify(k)) for k in range(1, 25))
    assert theory.best_gamma(alpha, c, 24, verify=lambda k: 1.0) == theory.best_gamma(
        alpha, c, 24)


def test_best_gamma_with_a_verify_cost_by_hand():
    # alpha 0.8, c 0.05: Theorem 3.8's best is 8 (3.09x); a verify call costing 1 + 0.05
    # gamma is gamma 0.1 + 1 in all: Theorem 3.8 at c 0.1, whose best is 6
    assert theory.best_gamma(0.8, 0.05) == 8
    assert theory.best_gamma(0.8, 0.05, verify=lambda g: 1.0 + 0.05 * g) == 6
    assert theory.best_gamma(0.8, 0.1) == 6
