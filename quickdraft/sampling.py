"""Sampling settings, applied identically to p and q before verification.

Speculative sampling reproduces whatever distribution it is given. To sample from the
target at temperature T with top-k / top-p, the same transformation must be applied to
both the target logits and the draft logits before :func:`quickdraft.verification.verify`
(applying it to only one of them changes the output distribution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SamplingConfig", "adjust_logits", "greedy_tokens", "sample_token"]


@dataclass(frozen=True)
class SamplingConfig:
    """How next-token distributions are shaped before sampling."""

    temperature: float = 1.0  # 0 means greedy (one-hot on the argmax); must be >= 0
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose mass reaches top_p; 1 keeps all

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}"
            )
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_INVALID = (
    "logits contain NaN or +inf; the model produced invalid scores "
    "(with fp16 weights this is usually an overflow: try fp32 or bf16)"
)
_ALL_MINUS_INF = "a logits row is entirely -inf: no token can be sampled"


def _check_maxima(m: np.ndarray) -> None:
    """Refuse logits by their row maxima m [...]: NaN where a row holds a NaN, +inf where
    it holds +inf (and no NaN), -inf where every entry is -inf."""
    if m.ndim == 0:  # one row: Python floats are the cheapest test
        v = float(m)
        if not math.isfinite(v):
            raise ValueError(_ALL_MINUS_INF if v == -math.inf else _INVALID)
        return
    if not np.all(np.isfinite(m)):
        if np.any(np.isnan(m)) or np.any(m == np.inf):
            raise ValueError(_INVALID)
        raise ValueError(_ALL_MINUS_INF)


def _as_logits(logits) -> np.ndarray:
    z = np.asarray(logits)
    if z.ndim == 0 or z.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary axis of length >= 1")
    return z


def greedy_tokens(logits: np.ndarray) -> np.ndarray:
    """The tokens temperature 0 picks: the argmax of each row (the first one on ties).

    logits [..., V] -> [...] int64, refused as :func:`adjust_logits` refuses them.
    ``adjust_logits(logits, SamplingConfig(temperature=0))`` is one-hot on exactly these,
    and :func:`sample_token` draws them from those rows whatever the uniform.
    """
    z = _as_logits(logits)
    if z.dtype == np.float16:
        best = _argmax_float16(z)  # [...]
    else:
        best = np.argmax(z, axis=-1)  # [...]; the first NaN if a row holds one
    # the entry argmax picked is the row's maximum, or its first NaN: what the checks need
    if z.ndim == 1:
        _check_maxima(z[best])
    else:
        _check_maxima(np.take_along_axis(z, best[..., None], axis=-1)[..., 0])
    return best


_F16_NEG_NAN = 0xFC00  # float16 bits, read as uint16, above this: a NaN with the sign set


def _argmax_float16(z: np.ndarray) -> np.ndarray:
    """``np.argmax(z, axis=-1)`` for float16 logits z [..., V] -> [...], tens of times faster.

    NumPy compares float16 values one by one in software; here the comparisons are made on
    the bits read as int16. Non-negative floats (sign bit 0) are the non-negative int16s,
    in the same order, so when a row's largest int16 is positive its index is the row's
    first maximum, unless the row holds a NaN with the sign bit set, which ``np.argmax``
    would return. Other rows (maximum 0 or negative, or a negative NaN) are ranked on an
    order key: magnitude bits m for a positive value, -m for a negative one (+0 and -0
    both 0, equal as floats are, so the first maximum still wins ties), a NaN's key above
    +inf or below -inf. A row holding a NaN returns the index of a NaN, as ``np.argmax``
    does (which one may differ), so the callers' NaN check sees it.
    """
    bits = z.view(np.int16) if z.flags.c_contiguous else np.ascontiguousarray(z).view(np.int16)
    best = bits.argmax(axis=-1)  # [...]
    top = bits.max(axis=-1)  # [...]
    negative_nan = bits.view(np.uint16).max(axis=-1) > _F16_NEG_NAN  # [...]
    if z.ndim == 1:  # Python scalars: cheaper than array reductions for one row
        if top > 0 and not negative_nan:
            return best
    elif (top > 0).all() and not negative_nan.any():
        return best
    sign = bits >> 15  # [..., V] 0 or -1
    key = ((bits & 0x7FFF) ^ sign) - sign  # [..., V] magnitude, negated where negative
    ranked = np.argmax(key, axis=-1)  # [...]
    low = np.argmin(key, axis=-1)  # [...] a negative NaN has the smallest key
    return np.where(negative_nan, low, ranked)[()]  # a scalar for one row, as argmax gives


def adjust_logits(logits: np.ndarray, config: SamplingConfig = SamplingConfig()) -> np.ndarray:
    """Turn logits into the sampling distribution: temperature, then top-k, then top-p.

    logits [..., V] -> probs [..., V] float64, each row summing to 1.
    Temperature 0 gives a one-hot row on the argmax (the first one on ties).
    """
    if config.greedy:
        best = greedy_tokens(logits)  # [...]
        vocab = np.shape(logits)[-1]
        one_hot = np.zeros((best.size, vocab), dtype=np.float64)  # [rows, V]
        one_hot[np.arange(best.size), best.reshape(-1)] = 1.0
        return one_hot.reshape(*best.shape, vocab)
    z = np.array(_as_logits(logits), dtype=np.float64)  # [..., V] a copy: worked in place
    m = np.max(z, axis=-1, keepdims=True)  # [..., 1]
    _check_maxima(m[..., 0])
    vocab = z.shape[-1]
    z -= m  # [..., V] each row's max at 0: z / T cannot overflow, however small T is
    if config.temperature != 1.0:
        with np.errstate(over="ignore"):  # entries below the max may reach -inf: exp 0
            z /= config.temperature  # dividing by T > 0 keeps the order and the max at 0
    if 0 < config.top_k < vocab:
        keep = np.stack([_top_k_row(row, config.top_k) for row in z.reshape(-1, vocab)])
        z = np.where(keep.reshape(z.shape), z, -np.inf)  # keeps the max (rank 0)
    probs = _softmax_(z)  # [..., V]
    if config.top_p < 1.0:
        keep = np.stack([_top_p_row(row, config.top_p) for row in probs.reshape(-1, vocab)])
        probs = np.where(keep.reshape(probs.shape), probs, 0.0)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def _top_k_row(z: np.ndarray, k: int) -> np.ndarray:
    """The k tokens of z [V] ranked first by (logit desc, index asc) -> keep [V] bool,
    found by a partition: those above the k-th largest logit, then its ties by index."""
    if np.isnan(z).any():  # NaN has no rank among values: the full sort's order
        return _sorted_rank(z) < k
    t = np.partition(z, z.size - k)[z.size - k]  # the k-th largest
    keep = z > t  # [V]
    ties = np.flatnonzero(z == t)[: k - int(keep.sum())]
    keep[ties] = True
    return keep


def _top_p_row(p: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest set of tokens of p [V], by (probability desc, index asc), whose mass
    reaches top_p -> keep [V] bool: a token stays when the mass ranked before it is below
    top_p. Only the largest probabilities are sorted, more of them until their mass
    reaches top_p (every later token then has at least that mass before it), and the whole
    row once that would be a quarter of it; the sums are the full sort's, bit for bit
    (cumsum adds left to right)."""
    size = p.size
    n = 32
    while 4 * n <= size and not np.isnan(p).any():  # a flat row: sort it all
        t = np.partition(p, size - n)[size - n]  # the n-th largest probability
        candidates = np.flatnonzero(p >= t)  # ascending index: ties stay in index order
        order = candidates[np.argsort(-p[candidates], kind="stable")]
        mass = np.cumsum(p[order])  # [n']
        if mass[-1] >= top_p:
            keep = np.zeros(size, dtype=bool)
            keep[order] = mass - p[order] < top_p
            return keep
        n *= 16
    order = np.argsort(-p, kind="stable")  # [V]
    keep = np.empty(size, dtype=bool)
    keep[order] = np.cumsum(p[order]) - p[order] < top_p
    return keep


def _sorted_rank(z: np.ndarray) -> np.ndarray:
    """Each token's rank in z [V] by (value desc, index asc; NaN last) [V]."""
    order = np.argsort(-z, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(z.size)
    return rank


def sample_token(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw of one token from probs [V] with a uniform u in [0, 1)."""
    from quickdraft.verification.rule import inverse_cdf_row

    if not (0.0 <= u < 1.0):
        raise ValueError(f"uniform must be in [0, 1), got {u}")
    return inverse_cdf_row(np.asarray(probs, dtype=np.float64), u)


def _softmax_(z: np.ndarray) -> np.ndarray:
    """softmax of z [..., V] whose row maxima are 0 (subtracted already), computed in z's
    memory; each row's sum is at least 1 (the max's term)."""
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z
