"""The acceptance rule in NumPy: :func:`verify` and its parts, in float64.

Each step has its ONNX-graph twin under the same name (underscored) in
:mod:`quickdraft.verification.graph`.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PROB_SUM_ATOL",
    "RESIDUAL_EPS",
    "verify",
    "verify_batch",
    "residual_distribution",
    "inverse_cdf",
    "inverse_cdf_row",
    "verify_greedy",
    "greedy_applies",
]

# How far a probability row may sum from 1 before it is refused.
PROB_SUM_ATOL = 1e-4
# Residual masses at or below this are treated as zero (p == q up to rounding).
RESIDUAL_EPS = 1e-12


def _check_probs(name: str, probs: np.ndarray) -> None:
    if not np.all(np.isfinite(probs)):
        raise ValueError(
            f"{name} contains NaN or infinite values; check the model's logits "
            "(a NaN logit usually means an fp16 overflow in the model)"
        )
    if np.any(probs < 0):
        raise ValueError(f"{name} has negative entries; pass probabilities, not logits")
    sums = probs.sum(axis=-1)
    if np.any(np.abs(sums - 1.0) > PROB_SUM_ATOL):
        worst = float(sums.flat[np.argmax(np.abs(sums - 1.0))])
        raise ValueError(
            f"{name} rows must sum to 1 (within {PROB_SUM_ATOL}); one sums to {worst:.6g}. "
            "Apply softmax (quickdraft.sampling.adjust_logits) before verification"
        )


def _check_uniforms(name: str, u: np.ndarray) -> None:
    if not np.all(np.isfinite(u)) or np.any(u < 0) or np.any(u >= 1):
        raise ValueError(f"{name} must be finite and in [0, 1)")


def inverse_cdf(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Sample indices by inverse CDF from unnormalised non-negative ``weights``.

    weights [B, V] with a positive sum per row; u [B] in [0, 1)  ->  [B] int64.
    The token chosen is the first whose cumulative weight exceeds ``u * total``; it always
    has positive weight, also when rounding puts ``u * total`` on the last step.
    """
    cdf = np.cumsum(weights, axis=-1)  # [B, V] non-decreasing: the weights are >= 0
    total = cdf[:, -1]  # [B]
    threshold = u * total  # [B]
    idx = np.count_nonzero(cdf <= threshold[:, None], axis=-1)  # [B]
    # Below V, idx has positive weight (cdf rises there). idx == V (u * total rounded up to
    # total) falls back to the last token of positive weight.
    over = np.flatnonzero(idx >= weights.shape[-1])
    if over.size:
        idx = idx.copy()
        w = weights[over]  # [O, V]
        idx[over] = weights.shape[-1] - 1 - np.argmax(w[:, ::-1] > 0, axis=-1)
    return idx.astype(np.int64)


def inverse_cdf_row(weights: np.ndarray, u: float) -> int:
    """:func:`inverse_cdf` of one row: weights [V], u in [0, 1) -> the index."""
    cdf = np.cumsum(weights)  # [V] non-decreasing
    threshold = u * cdf[-1]
    if threshold != threshold:  # NaN: no entry is <= it
        return 0
    # the count of entries <= threshold, by bisection of the non-decreasing cdf
    idx = int(np.searchsorted(cdf, threshold, side="right"))
    if idx < cdf.shape[0]:
        return idx
    return cdf.shape[0] - 1 - int(np.argmax(weights[::-1] > 0))


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)) row-wise, falling back to ``p`` where the residual is zero.

    p, q [..., V] -> [..., V]. The residual is empty only when p == q (up to rounding),
    and then a rejection has probability zero; the fallback keeps the result finite.
    """
    r = np.subtract(p, q)  # [..., V]
    if not np.issubdtype(r.dtype, np.floating):
        r = r.astype(np.float64)
    np.maximum(r, 0.0, out=r)
    total = r.sum(axis=-1, keepdims=True)  # [..., 1]
    empty = total <= RESIDUAL_EPS
    if not np.any(empty):
        r /= total
        return r
    safe_total = np.where(empty, 1.0, total)
    return np.where(empty, p, r / safe_total)


def greedy_applies(greedy: bool, checked: bool) -> bool:
    """Whether :func:`verify_greedy` decides an iteration: the target is greedy (p one-hot on
    its argmax) and the candidates are checked (each q_i(x_i) in (0, 1], drawn from their
    rows). Every verifier asks this one question, so the greedy case is decided once."""
    return bool(greedy and checked)


def verify_greedy(target_choices: np.ndarray, draft_tokens: np.ndarray) -> tuple[int, int]:
    """:func:`verify` for greedy target rows, without the rows.

    When ``target_probs`` is one-hot on ``target_choices`` [gamma + 1] (temperature 0:
    :func:`quickdraft.sampling.greedy_tokens` of the logits) and every draft token has a
    draft probability in (0, 1], :func:`verify` returns this for every uniform and every
    lenience: draft token i is accepted (u_i l q_i(x_i) < 1 = p_i(x_i)) exactly when it is
    the target's choice (else p_i(x_i) = 0), and the residual norm(max(0, p_n - l q_n)) is
    one-hot on the target's choice at n (or p_n itself when empty), so the next token is
    that choice. Returns (n, next_token).
    """
    choices = np.asarray(target_choices)  # [gamma + 1]
    x = np.asarray(draft_tokens)  # [gamma]
    gamma = x.shape[0]
    rejected = np.flatnonzero(choices[:gamma] != x)
    n = int(rejected[0]) if rejected.size else gamma
    return n, int(choices[n])


def verify_batch(
    target_probs: np.ndarray,
    draft_probs: np.ndarray,
    draft_tokens: np.ndarray,
    accept_uniforms: np.ndarray,
    sample_uniforms: np.ndarray,
    *,
    lenience: float = 1.0,
    validate: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Batched :func:`verify`: B independent verifications at once.

    Args:
        target_probs: [B, gamma + 1, V] p at each draft position and one more (gamma >= 0;
            with no draft tokens the next token is drawn from p_0).
        draft_probs: [B, gamma, V] q at each draft position.
        draft_tokens: [B, gamma] tokens the draft proposed.
        accept_uniforms: [B, gamma] u_i in [0, 1).
        sample_uniforms: [B] uniform in [0, 1) for the recovered or bonus token.
        lenience: l in (0, 1]. 1 is exact speculative sampling. Below 1 the rule is
            LOSSY (paper appendix A.5): token i is accepted while u_i < p_i(x) / (l q_i(x))
            and a rejection resamples from norm(max(0, p - l q)); the output no longer
            follows p.
        validate: check shapes, probabilities, token ids and uniforms first.

    Returns:
        n [B] accepted draft tokens (0..gamma) and next_token [B]: the recovered token
        when n < gamma, else the bonus token.
    """
    p = np.asarray(target_probs, dtype=np.float64)  # [B, gamma + 1, V]
    q = np.asarray(draft_probs, dtype=np.float64)  # [B, gamma, V]
    x = np.asarray(draft_tokens)  # [B, gamma]
    u = np.asarray(accept_uniforms, dtype=np.float64)  # [B, gamma]
    s = np.asarray(sample_uniforms, dtype=np.float64)  # [B]
    if validate:
        _validate(p, q, x, u, s, lenience)
    x = x.astype(np.int64)
    batch, gamma = x.shape
    b = np.arange(batch)[:, None]  # [B, 1]
    i = np.arange(gamma)[None, :]  # [1, gamma]
    p_x = p[b, i, x]  # [B, gamma]
    q_x = q[b, i, x]  # [B, gamma]
    if validate and np.any(q_x <= 0):
        raise ValueError(
            "a draft token has zero probability under draft_probs; draft_tokens must be "
            "sampled from (or be supported by) the draft distribution"
        )
    accepted = u * (lenience * q_x) < p_x  # [B, gamma]   u < p / (l q) without a division
    # n: the first rejection, gamma if none (gamma 0: no draft tokens, n = 0, the bonus)
    n = (np.where(accepted.all(axis=-1), gamma, np.argmin(accepted, axis=-1)) if gamma
         else np.zeros(batch, dtype=np.int64))  # [B]
    # q_n is q at the first rejection, and a zero row at gamma: the residual there is
    # p_gamma (bonus).
    rows = np.arange(batch)
    p_n = p[rows, n]  # [B, V]
    rejected = n < gamma  # [B]
    q_n = np.zeros_like(p_n)  # [B, V]
    q_n[rejected] = q[rows[rejected], n[rejected]]
    if lenience != 1.0:
        q_n *= lenience
    weights = residual_distribution(p_n, q_n)  # [B, V]
    if batch == 1:
        next_token = np.asarray([inverse_cdf_row(weights[0], float(s[0]))], dtype=np.int64)
    else:
        next_token = inverse_cdf(weights, s)  # [B]
    return n.astype(np.int64), next_token


def verify(
    target_probs: np.ndarray,
    draft_probs: np.ndarray,
    draft_tokens: np.ndarray,
    accept_uniforms: np.ndarray,
    sample_uniform: float,
    *,
    lenience: float = 1.0,
    validate: bool = True,
) -> tuple[int, int]:
    """Decide how many draft tokens to accept and which token comes next.

    Args:
        target_probs: [gamma + 1, V] p at each draft position and one more, already
            adjusted by the sampling settings (temperature, top-k, top-p).
        draft_probs: [gamma, V] q at each draft position, adjusted the same way.
        draft_tokens: [gamma] the tokens the draft sampled from q.
        accept_uniforms: [gamma] u_i in [0, 1): token i is accepted while
            u_i < p_i(x_i) / q_i(x_i).
        sample_uniform: float in [0, 1): inverse-CDF draw of the recovered token from
            norm(max(0, p_n - q_n)) when n < gamma, or of the bonus token from p_gamma
            when every draft token was accepted.
        lenience: 1 (exact). Values below 1 select the lossy rule of appendix A.5.
        validate: check the inputs first (raises ``ValueError`` on bad input).

    Returns:
        (n, next_token): the number of accepted draft tokens and the recovered or bonus
        token. The output of the iteration is ``draft_tokens[:n] + [next_token]``.

    Greedy decoding is this rule on one-hot (argmax) distributions: it accepts exactly
    the draft tokens equal to the target's argmax and then emits the target's argmax.
    """
    p = np.asarray(target_probs)
    q = np.asarray(draft_probs)
    x = np.asarray(draft_tokens)
    u = np.asarray(accept_uniforms)
    if p.ndim != 2 or q.ndim != 2 or x.ndim != 1 or u.ndim != 1:
        raise ValueError(
            "verify expects target_probs [gamma + 1, V], draft_probs [gamma, V], "
            f"draft_tokens [gamma], accept_uniforms [gamma]; got shapes {p.shape}, "
            f"{q.shape}, {x.shape}, {u.shape} (use verify_batch for batches)"
        )
    n, token = verify_batch(
        p[None],
        q[None],
        x[None],
        u[None],
        np.asarray([sample_uniform], dtype=np.float64),
        lenience=lenience,
        validate=validate,
    )
    return int(n[0]), int(token[0])


def _validate(p, q, x, u, s, lenience) -> None:
    if p.ndim != 3 or q.ndim != 3 or x.ndim != 2 or u.ndim != 2 or s.ndim != 1:
        raise ValueError(
            "verify_batch expects target_probs [B, gamma + 1, V], draft_probs [B, gamma, V], "
            "draft_tokens [B, gamma], accept_uniforms [B, gamma], sample_uniforms [B]; got "
            f"{p.shape}, {q.shape}, {x.shape}, {u.shape}, {s.shape}"
        )
    batch, gamma = x.shape
    vocab = p.shape[-1]
    if gamma < 0:
        raise ValueError("gamma must be >= 0 (0: no draft tokens, the bonus token alone)")
    if p.shape != (batch, gamma + 1, vocab):
        raise ValueError(
            f"target_probs must have shape [B, gamma + 1, V] = {(batch, gamma + 1, vocab)}, "
            f"got {p.shape}: the target scores every draft position and one more"
        )
    if q.shape != (batch, gamma, vocab):
        raise ValueError(
            f"draft_probs must have shape [B, gamma, V] = {(batch, gamma, vocab)}, got {q.shape}; "
            "a different last dimension means the draft and target vocabularies differ"
        )
    if u.shape != (batch, gamma) or s.shape != (batch,):
        raise ValueError("need one accept uniform per draft token and one sample uniform")
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"draft_tokens must be integer token ids, got dtype {x.dtype}")
    if np.any(x < 0) or np.any(x >= vocab):
        raise ValueError(f"draft_tokens must be in [0, {vocab}), got {x.min()}..{x.max()}")
    _check_probs("target_probs", p)
    _check_probs("draft_probs", q)
    _check_uniforms("accept_uniforms", u)
    _check_uniforms("sample_uniform", s)
    if not (0.0 < lenience <= 1.0):
        raise ValueError(f"lenience must be in (0, 1], got {lenience}; 1 is exact sampling")
