"""A drafter with a controlled acceptance rate, for measuring realized against theoretical
speedup at a chosen alpha.

:class:`ControlledAlphaDrafter` is a :class:`quickdraft.protocols.Drafter` proposing
``gamma`` tokens (``max_tokens``; a ``StatefulDrafter`` when it runs the draft model, so a
Generator prefills, rewinds, times and closes its state). It runs the real
draft model (the same calls :class:`quickdraft.generation.ModelDrafter` makes, so it costs
what the draft costs) but ignores the draft's logits: it proposes the target's own greedy
continuation, precomputed by a greedy autoregressive run of the target on the same prompt,
with each proposed token replaced by a different one with probability ``1 - alpha``. Its q
is one-hot on the proposed token.

Under greedy decoding p is one-hot on the target's argmax, so each draft position the
target reaches is accepted with probability exactly ``alpha``, independently: the i.i.d.
assumption behind Eq. 1 and Theorem 3.8 holds by construction. The verification rule is
still the exact one, so the output must equal the target's greedy output token for token;
:func:`check_greedy_equal` asserts it.

NumPy only (plus quickdraft).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quickdraft.protocols import (
    Candidates,
    DecodeState,
    LanguageModel,
    advance_greedy,
    greedy_append,
)

__all__ = [
    "ControlledAlphaDrafter",
    "check_greedy_equal",
    "alpha_from_tokens_per_iteration",
]


class ControlledAlphaDrafter:
    """Propose the target's greedy continuation, each token corrupted with prob. 1 - alpha.

    Args:
        draft: the draft model, run for its cost (its logits are not used).
        prompt_ids: the prompt the generation starts from.
        greedy_tokens: the target's greedy continuation of ``prompt_ids`` (at least as many
            tokens as the generation will produce; positions past its end are proposed as
            random tokens, which the target rejects unless they happen to match).
        alpha: probability that a proposed token is the target's greedy token.
        rng: a seeded ``numpy.random.Generator`` (the corruption draws).
        gamma: tokens proposed per iteration (fewer when the loop's cap is lower).
        vocab_size: the shared vocabulary size (default: the draft's).
        run_draft: False skips the draft calls (a cost-free drafter, for tests).
        phases: ``(position, alpha)`` pairs, sorted: alpha from that output position on
            (a workload whose alpha changes within a generation); ``alpha`` before the first.
    """

    def __init__(self, draft: LanguageModel | None, prompt_ids: Sequence[int],
                 greedy_tokens: Sequence[int], alpha: float, rng: np.random.Generator, *,
                 gamma: int, vocab_size: int | None = None, run_draft: bool = True,
                 phases: Sequence[tuple[int, float]] = ()):
        if int(gamma) != gamma or gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {gamma!r}")
        for a in [alpha, *(a for _, a in phases)]:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {a}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator")
        if run_draft and draft is None:
            raise ValueError("give a draft model, or run_draft=False")
        self.draft = draft
        self.vocab = int(vocab_size if vocab_size is not None else draft.vocab_size)
        if self.vocab < 2:
            raise ValueError("a corrupted token needs a vocabulary of at least 2 tokens")
        self.prompt = [int(t) for t in prompt_ids]
        self.greedy = [int(t) for t in greedy_tokens]
        self.alpha = float(alpha)
        self.phases = sorted((int(p), float(a)) for p, a in phases)
        self.gamma = int(gamma)
        self.rng = rng
        self.run_draft = run_draft
        self.state: DecodeState | None = draft.new_state() if run_draft else None
        self.proposed = 0  # tokens proposed
        self.corrupted = 0  # of which corrupted

    @property
    def max_tokens(self) -> int:
        return self.gamma

    @property
    def states(self) -> list[DecodeState]:
        """The draft model's state (none without ``run_draft``)."""
        return [self.state] if self.state is not None else []

    @property
    def max_length(self) -> int | None:
        return self.draft.max_length if self.run_draft else None

    def _propose(self, position: int) -> int:
        """The token proposed at output position ``position`` (0 = first new token)."""
        self.proposed += 1
        if position < len(self.greedy):
            good = self.greedy[position]
        else:  # past the precomputed continuation: nothing to copy
            return int(self.rng.integers(self.vocab))
        alpha = self.alpha
        for start, a in self.phases:
            if position >= start:
                alpha = a
        if self.rng.random() < alpha:
            return good
        self.corrupted += 1
        return int((good + 1 + self.rng.integers(self.vocab - 1)) % self.vocab)  # != good

    def get_candidates(self, ids: Sequence[int], max_tokens: int,
                       uniforms: np.ndarray) -> Candidates:
        ids = list(ids)
        gamma = min(self.gamma, int(max_tokens))
        start = len(ids) - len(self.prompt)
        if start < 0 or ids[: len(self.prompt)] != self.prompt:
            raise ValueError("the sequence does not start with this drafter's prompt")
        done = ids[len(self.prompt):]
        if done != self.greedy[: len(done)]:
            raise AssertionError(
                "the output left the target's greedy continuation: greedy speculative decoding "
                "must reproduce greedy autoregressive decoding token for token"
            )
        tokens = [self._propose(start + i) for i in range(gamma)]
        calls = 0
        if self.run_draft and tokens:
            # the calls ModelDrafter makes when greedy (argmax ids only, so a model that
            # computes them on its device copies one id per call): one for the new prefix,
            advance_greedy(self.state, ids)
            calls = 1
            for x in tokens[:-1]:  # then one per proposed token but the last
                greedy_append(self.state, [x])
                calls += 1
        # q is one-hot on the proposed tokens (no [gamma, V] rows unless a verifier reads
        # them): valid rows with q_i(x_i) = 1, so verifiers may skip their input checks
        return Candidates(np.asarray(tokens, dtype=np.int64), None, model_calls=calls,
                          checked=True, vocab_size=self.vocab)

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        """Fixed gamma and alpha: nothing to learn. Rejected tokens are rewound lazily."""


def check_greedy_equal(tokens: Sequence[int], greedy: Sequence[int]) -> None:
    """Raise AssertionError unless ``tokens`` equal the greedy reference (same length)."""
    tokens, greedy = list(tokens), list(greedy)[: len(tokens)]
    if tokens != greedy:
        first = next(i for i, (a, b) in enumerate(zip(tokens, greedy)) if a != b) \
            if any(a != b for a, b in zip(tokens, greedy)) else min(len(tokens), len(greedy))
        raise AssertionError(
            f"greedy speculative output differs from greedy autoregressive output at new "
            f"token {first} (of {len(tokens)})"
        )


def alpha_from_tokens_per_iteration(tokens_per_iteration: float, gamma: int) -> float | None:
    """Invert Eq. 1: the alpha whose expected tokens per iteration (gamma draft tokens) is
    ``tokens_per_iteration``; for systems that report only counts (e.g. Hugging Face)."""
    from quickdraft.theory import expected_tokens

    if tokens_per_iteration is None or gamma < 1:
        return None
    t = float(tokens_per_iteration)
    if t <= 1.0:
        return 0.0
    if t >= gamma + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens(mid, gamma) < t:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
