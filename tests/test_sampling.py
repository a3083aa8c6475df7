"""Sampling settings: the working code against a plain statement of the same transformations.

``adjust_logits`` works in place on one float64 copy, tests the logits by their row maxima
and takes the argmax directly at temperature 0; ``sample_token`` draws one row by bisection.
The plain versions below (a fresh array per step, every check over the whole array, the
batched inverse CDF with its clamp) define what they must return, bit for bit, and which
inputs they must refuse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quickdraft.sampling import SamplingConfig, adjust_logits, greedy_tokens, sample_token
from quickdraft.verification import inverse_cdf, inverse_cdf_row


def plain_adjust_logits(logits, config: SamplingConfig) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)  # [..., V]
    if z.ndim == 0 or z.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary axis of length >= 1")
    if np.any(np.isnan(z)) or np.any(z == np.inf):
        raise ValueError("logits contain NaN or +inf")
    if np.any(np.all(z == -np.inf, axis=-1)):
        raise ValueError("a logits row is entirely -inf")
    vocab = z.shape[-1]
    if config.greedy:
        one_hot = np.zeros(z.shape, dtype=np.float64)
        np.put_along_axis(one_hot, np.argmax(z, axis=-1)[..., None], 1.0, axis=-1)
        return one_hot
    z = (z - np.max(z, axis=-1, keepdims=True)) / config.temperature  # max 0: no overflow
    if 0 < config.top_k < vocab:
        order = np.argsort(-z, axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(vocab), axis=-1)
        z = np.where(rank < config.top_k, z, -np.inf)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=-1, keepdims=True)
    if config.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < config.top_p
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def plain_inverse_cdf(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights, axis=-1)  # [B, V]
    idx = np.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
    last_positive = weights.shape[-1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=-1)
    return np.minimum(idx, last_positive)


configs = st.builds(
    SamplingConfig,
    temperature=st.sampled_from([0.0, 0.0, 1.0, 1.0, 0.7, 1.9, 1e-3, 1e-300]),
    top_k=st.sampled_from([0, 0, 1, 2, 5]),
    top_p=st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.05]),
)


@st.composite
def logit_arrays(draw, allow_invalid: bool = False, max_vocab: int = 40):
    """Logits [V] or [R, V] in float16/32/64: gaussian, on a coarse grid (ties), large."""
    vocab = draw(st.integers(1, max_vocab))
    shape = (vocab,) if draw(st.booleans()) else (draw(st.integers(1, 4)), vocab)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "grid", "large"]))
    z = rng.normal(size=shape) * (30.0 if kind == "large" else 2.0)
    if kind == "grid":
        z = np.round(z)
    if draw(st.booleans()):  # masked entries (never a whole row unless invalid)
        z = np.where(rng.random(shape) < 0.3, -np.inf, z)
        z.reshape(-1, vocab)[:, 0] = 0.0
    if allow_invalid:
        bad = draw(st.sampled_from([np.nan, np.inf, "row"]))
        flat = z.reshape(-1, vocab)
        row = int(rng.integers(flat.shape[0]))
        if bad == "row":
            flat[row] = -np.inf
        else:
            flat[row, int(rng.integers(vocab))] = bad
    return z.astype(draw(st.sampled_from([np.float16, np.float32, np.float64])))


@settings(max_examples=400)
@given(z=logit_arrays(), config=configs)
def test_adjust_logits_is_the_plain_transformation_bit_for_bit(z, config):
    got = adjust_logits(z, config)
    assert got.dtype == np.float64 and got.shape == z.shape
    np.testing.assert_array_equal(got, plain_adjust_logits(z, config))
    assert np.isfinite(got).all()  # tiny temperatures included: the max is subtracted first


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-30])
def test_a_tiny_temperature_puts_all_mass_on_the_maxima(temperature):
    """Near T=0 the distribution is the argmax's (shared by ties), never NaN: logits
    divided by T before the max is subtracted would overflow to inf - inf."""
    z = np.array([[1.0, 3.0, 2.0, 3.0 - 1e-9], [-5.0, 250.0, 249.0, -np.inf]])  # [2, 4]
    probs = adjust_logits(z, SamplingConfig(temperature=temperature))
    want = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(probs, want)
    ties = adjust_logits(np.array([2.0, 7.0, 7.0]), SamplingConfig(temperature=temperature))
    np.testing.assert_array_equal(ties, [0.0, 0.5, 0.5])
    assert sample_token(probs[1], 0.999) == 1


@settings(max_examples=150)
@given(z=logit_arrays(max_vocab=3000),
       config=st.builds(SamplingConfig, temperature=st.sampled_from([1.0, 0.7, 0.2, 3.0]),
                        top_k=st.sampled_from([0, 1, 7, 40, 500]),
                        top_p=st.sampled_from([0.9, 0.5, 0.99, 0.999999])))
def test_partial_sorts_of_large_vocabularies_are_the_full_sort_bit_for_bit(z, config):
    """top-k and top-p sort only the largest entries of a row (more until their mass is
    enough); on vocabularies of thousands, ties included, they keep what a full sort keeps."""
    with np.errstate(over="ignore", invalid="ignore"):
        want = plain_adjust_logits(z, config)
        got = adjust_logits(z, config)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=200)
@given(z=logit_arrays(allow_invalid=True), config=configs)
def test_invalid_logits_are_refused_alike(z, config):
    with pytest.raises(ValueError) as want:
        plain_adjust_logits(z, config)
    with pytest.raises(ValueError) as got:
        adjust_logits(z, config)
    # the same refusal: NaN / +inf first, then a row of only -inf
    assert ("NaN or +inf" in str(want.value)) == ("NaN or +inf" in str(got.value))
    assert ("entirely -inf" in str(want.value)) == ("entirely -inf" in str(got.value))
    with pytest.raises(ValueError):
        greedy_tokens(z)


def test_empty_vocabulary_is_refused():
    for bad in (np.zeros((2, 0)), np.float32(1.0)):
        with pytest.raises(ValueError, match="vocabulary axis"):
            adjust_logits(bad)
        with pytest.raises(ValueError, match="vocabulary axis"):
            greedy_tokens(bad)


@settings(max_examples=300)
@given(z=logit_arrays(), u=st.floats(0.0, 1.0, exclude_max=True))
def test_greedy_tokens_are_what_temperature_zero_samples(z, u):
    best = greedy_tokens(z)
    one_hot = plain_adjust_logits(z, SamplingConfig(temperature=0))
    np.testing.assert_array_equal(best, np.argmax(one_hot, axis=-1))
    for row, token in zip(one_hot.reshape(-1, z.shape[-1]), best.reshape(-1)):
        assert sample_token(row, u) == token  # any uniform draws the argmax


@st.composite
def weight_rows(draw):
    """Non-negative weights [B, V] with zeros, tiny and equal entries, and uniforms."""
    vocab = draw(st.integers(1, 30))
    batch = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["dirichlet", "sparse", "tiny", "subnormal", "one_hot",
                                 "unnormalised"]))
    w = rng.dirichlet(np.ones(vocab), size=batch)
    if kind == "sparse":
        w = w * (rng.random(w.shape) < 0.5)
        w[:, int(rng.integers(vocab))] += 0.2
    elif kind == "tiny":
        w = w * 1e-300
    elif kind == "subnormal":  # thresholds that round up to the total
        w = np.round(w * 4) * np.nextafter(0.0, 1.0)
        w[:, 0] += np.nextafter(0.0, 1.0)
    elif kind == "one_hot":
        w = np.eye(vocab)[rng.integers(vocab, size=batch)]
    elif kind == "unnormalised":
        w = w * 7.3
    # uniforms at the edges too: 0, the largest double below 1, and arbitrary ones
    edge = st.sampled_from([0.0, np.nextafter(1.0, 0.0), 0.5])
    u = np.asarray([draw(st.one_of(edge, st.floats(0.0, 1.0, exclude_max=True)))
                    for _ in range(batch)])
    return w, u


@settings(max_examples=400)
@given(case=weight_rows())
def test_inverse_cdf_is_the_plain_count_with_its_clamp(case):
    w, u = case
    want = plain_inverse_cdf(w, u)
    np.testing.assert_array_equal(inverse_cdf(w, u), want)
    for b in range(len(u)):
        assert inverse_cdf_row(w[b], float(u[b])) == want[b]
        assert sample_token(w[b] / w[b].sum(), float(u[b])) == plain_inverse_cdf(
            (w[b] / w[b].sum())[None], u[b : b + 1])[0]


def test_inverse_cdf_clamps_a_threshold_rounded_up_to_the_total():
    """u * total == total (rounding, here of subnormal weights) must not pick a trailing
    zero-weight token."""
    tiny = np.nextafter(0.0, 1.0)  # the smallest subnormal double
    w = np.array([tiny, 2 * tiny, 0.0, 0.0])
    assert 0.9 * w.sum() == w.sum()  # the threshold rounds up to the total
    assert plain_inverse_cdf(w[None], np.array([0.9]))[0] == 1
    assert inverse_cdf_row(w, 0.9) == 1
    assert inverse_cdf(w[None], np.array([0.9]))[0] == 1


@st.composite
def float16_rows(draw):
    """float16 logits [B, V] or [V] from arbitrary bit patterns (so NaNs of both signs,
    +-inf, +-0 and subnormals), mixed with ordinary values and repeated entries (ties)."""
    vocab = draw(st.integers(1, 40))
    shape = (vocab,) if draw(st.booleans()) else (draw(st.integers(1, 4)), vocab)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16).view(np.float16)
    kind = draw(st.sampled_from(["bits", "normal", "mixed", "specials", "negative", "zeros"]))
    normal = rng.normal(scale=5.0, size=shape).astype(np.float16)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 6e-8, -6e-8, 65504,
                         -65504, 1.0, -1.0], dtype=np.float16)
    z = {"bits": bits, "normal": normal,
         "mixed": np.where(rng.random(shape) < 0.1, bits, normal),
         "specials": rng.choice(specials, size=shape),
         "negative": -np.abs(normal),
         "zeros": rng.choice(np.array([0.0, -0.0, -1.0], dtype=np.float16), size=shape)}[kind]
    return np.ascontiguousarray(z if draw(st.booleans()) else z[..., ::-1])


@settings(max_examples=500)
@given(z=float16_rows())
def test_float16_greedy_tokens_are_numpys_argmax(z):
    """greedy_tokens on float16 (compared on the bits, not by NumPy's float16 loop) picks the
    first maximum of each row, as on the exact float32 copy; rows with a NaN are refused
    with the same message."""
    wide = z.astype(np.float32)  # exact: every float16 is a float32
    try:
        want = greedy_tokens(wide)
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            greedy_tokens(z)
        assert str(got.value) == str(e)
        return
    got = greedy_tokens(z)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.argmax(z, axis=-1))  # NumPy's own float16 loop
