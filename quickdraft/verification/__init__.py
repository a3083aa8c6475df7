"""The acceptance rule of speculative sampling (Leviathan et al., 2023, Algorithm 1).

The one implementation of the rule in quickdraft, in two forms side by side:
:mod:`~quickdraft.verification.rule` in NumPy (float64; every verifier on the host) and
:mod:`~quickdraft.verification.graph`, the same steps as an ONNX graph that runs next to
the target's logits on the device. Every random choice enters as a uniform in [0, 1), so
both are pure: the same inputs and uniforms give the same decision, up to rounding within a
stated margin of a decision boundary (tests/test_verify_graph.py). Greedy decoding is
decided once: where :func:`greedy_applies`, :func:`verify_greedy` on the target's argmax
ids is what :func:`verify` returns on one-hot rows; the graph handles sampling only.

Notation follows the paper: ``p`` the target distribution, ``q`` the draft's, ``gamma``
draft tokens, ``n`` accepted. Output tokens are *accepted* (draft tokens kept),
*recovered* (drawn from ``norm(max(0, p_n - q_n))`` after a rejection) or *bonus* (drawn
from ``p_gamma`` when all were accepted).
"""

from quickdraft.verification.graph import build_sample_graph, build_verify_graph
from quickdraft.verification.rule import (
    PROB_SUM_ATOL,
    RESIDUAL_EPS,
    greedy_applies,
    inverse_cdf,
    inverse_cdf_row,
    residual_distribution,
    verify,
    verify_batch,
    verify_greedy,
)

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
    "build_sample_graph",
    "build_verify_graph",
]
