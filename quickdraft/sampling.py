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

__all__ = ["SamplingConfig", "adjust_logits", "sample_token"]


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


def adjust_logits(logits: np.ndarray, config: SamplingConfig = SamplingConfig()) -> np.ndarray:
    """Turn logits into the sampling distribution: temperature, then top-k, then top-p.

    logits [..., V] -> probs [..., V] float64, each row summing to 1.
    Temperature 0 gives a one-hot row on the argmax (the first one on ties).
    """
    z = np.asarray(logits, dtype=np.float64)  # [..., V]
    if z.ndim == 0 or z.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary axis of length >= 1")
    if np.any(np.isnan(z)) or np.any(z == np.inf):
        raise ValueError(
            "logits contain NaN or +inf; the model produced invalid scores "
            "(with fp16 weights this is usually an overflow: try fp32 or bf16)"
        )
    if np.any(np.all(z == -np.inf, axis=-1)):
        raise ValueError("a logits row is entirely -inf: no token can be sampled")
    vocab = z.shape[-1]
    if config.greedy:
        one_hot = np.zeros(z.shape, dtype=np.float64)  # [..., V]
        np.put_along_axis(one_hot, np.argmax(z, axis=-1)[..., None], 1.0, axis=-1)
        return one_hot
    z = z / config.temperature
    if 0 < config.top_k < vocab:
        # keep exactly k on ties: rank tokens by (logit desc, index asc)
        order = np.argsort(-z, axis=-1, kind="stable")  # [..., V]
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(vocab), axis=-1)
        z = np.where(rank < config.top_k, z, -np.inf)
    probs = _softmax(z)  # [..., V]
    if config.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")  # [..., V]
        sorted_p = np.take_along_axis(probs, order, axis=-1)  # [..., V]
        mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p  # [..., V]
        keep_sorted = mass_before < config.top_p  # always keeps the most likely token
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def sample_token(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw of one token from probs [V] with a uniform u in [0, 1)."""
    from quickdraft.verification import inverse_cdf

    if not (0.0 <= u < 1.0):
        raise ValueError(f"uniform must be in [0, 1), got {u}")
    return int(inverse_cdf(np.asarray(probs, dtype=np.float64)[None], np.asarray([u]))[0])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - np.max(z, axis=-1, keepdims=True)  # [..., V]
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
