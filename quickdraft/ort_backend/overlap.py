"""Pipelined decoding on ONNX Runtime: the draft drafts while the target verifies.

:mod:`quickdraft.pipelined`'s scheme (PEARL's post-verify) with both models in flight at
once. Each iteration launches the target's verify call (enqueued on its session's CUDA
stream, not waited for), then the draft's whole continuation as one chain on the draft
session's stream, and the host waits once, for both. Greedy: the chain feeds each step's
argmax to the next (``StaticDecodeState.launch_chain``) and the verdict reads argmax ids.
Sampled: each step draws inside the draft's run (``launch_sampled_chain``), its q rows stay
on the device in one of two banks (the proposal's in one, the continuation's in the
other), and the verification graph decides there (``GraphVerifier.decide_without_bonus``).
On the CPU every launch runs to its end: the same tokens, one after the other.
docs/explanation/pipelined.md has the scheme, its proof and its walltime.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from quickdraft.generation import (
    EosIds,
    ModelDrafter,
    _eos_set,
    _truncate_at_eos,
    check_uniforms,
)
from quickdraft.ort_backend.static import StaticDecodeState
from quickdraft.ort_backend.verify_graph import DeviceRows, GraphVerifier
from quickdraft.pipelined import (
    PipelinedStats,
    PipelinedStep,
    ShadowRule,
    greedy_betas,
    pipeline_lengths,
    verify_greedy_without_bonus,
)
from quickdraft.protocols import (
    Candidates,
    Scores,
    catch_up,
    launch_greedy_chain,
    rewind_to_common_prefix,
)
from quickdraft.sampling import SamplingConfig
from quickdraft.verification import verify_greedy

__all__ = ["OverlapTimes", "GreedyHalves", "SampledHalves", "overlapped_stream"]


@dataclass
class OverlapTimes:
    """Where a pipelined generation's iterations spent their time (host clock)."""

    open_s: float = 0.0  # drafting proposals while the target waited (cold iterations)
    shadow_s: float = 0.0  # from the target's launch until both models were done

    def as_dict(self) -> dict:
        return {"open_s": self.open_s, "shadow_s": self.shadow_s}


@dataclass
class Drafted:
    """Draft tokens with their q rows where they lie (None: greedy, one-hot) and the row
    bank holding them."""

    tokens: list[int]
    rows: DeviceRows | None = None
    bank: int = 0


def _launch_verify(target: StaticDecodeState, scored: list[int], rows: int, greedy: bool):
    """Enqueue the target's call on the tokens of ``scored`` it has not consumed (at least
    the last ``rows``); its ``wait()`` gives the greedy tokens of them (``greedy``) or
    their logits on the device."""
    common = rewind_to_common_prefix(target, scored, rows)
    tokens = scored[common:]
    return target.launch_greedy(tokens) if greedy else target.launch_device(tokens)


class GreedyHalves:
    """The greedy loop's model calls and verdict: argmax chains and ids."""

    greedy = True

    def __init__(self, drafter: ModelDrafter):
        self.draft = drafter.state

    def propose(self, ids: list[int], uniforms: np.ndarray, bank: int) -> Drafted:
        """A cold proposal of ``len(uniforms)`` tokens, drafted while the target waits."""
        check_uniforms(uniforms)
        k = len(uniforms)
        return Drafted(launch_greedy_chain(self.draft, ids, k).wait().tolist() if k else [])

    def launch_continuation(self, scored: list[int], uniforms: np.ndarray, bank: int):
        return launch_greedy_chain(self.draft, scored, len(uniforms))

    def continuation(self, launched, bank: int) -> Drafted:
        return Drafted(launched.wait().tolist())

    def verdict(self, scores, x: Drafted, y: Drafted, candidates: list[int],
                accept_uniforms: np.ndarray, sample_uniform: float
                ) -> tuple[int, int | None, list[float]]:
        m = len(candidates)
        choices = scores[-m:]  # [k + 1] the target's argmax ids
        n, recovered = verify_greedy_without_bonus(choices, np.array(candidates))
        return n, recovered, greedy_betas(n, m)

    def verdict_with_bonus(self, scores, x: Drafted, accept_uniforms: np.ndarray,
                           sample_uniform: float) -> tuple[int, int, list[float]]:
        """Algorithm 1's verdict on x alone (an iteration without a continuation)."""
        k = len(x.tokens)
        n, token = verify_greedy(np.asarray(scores[-(k + 1):]), np.array(x.tokens))
        return n, token, greedy_betas(n, k)


class SampledHalves:
    """The sampled loop's model calls and verdict: chains that draw on the device into
    two row banks, and the verification graph on the rows where they lie.

    ``drafter``: its state a SampledChainState whose chains take gamma + 1 steps;
    ``verifier``: the target's :class:`GraphVerifier`, computing in ``compute`` (the
    chains' arithmetic)."""

    greedy = False

    def __init__(self, drafter: ModelDrafter, verifier: GraphVerifier, sampling: SamplingConfig,
                 compute: str = "float32"):
        self.draft, self.verifier = drafter.state, verifier
        self.sampling, self.compute = sampling, compute

    def _launch(self, ids: list[int], uniforms: np.ndarray, bank: int):
        check_uniforms(uniforms)
        return self.draft.launch_sampled_chain(catch_up(self.draft, ids), uniforms,
                                               self.sampling, self.compute, bank)

    def propose(self, ids: list[int], uniforms: np.ndarray, bank: int) -> Drafted:
        if not len(uniforms):
            return Drafted([], None, bank)
        return self.continuation(self._launch(ids, uniforms, bank), bank)

    def launch_continuation(self, scored: list[int], uniforms: np.ndarray, bank: int):
        return self._launch(scored, uniforms, bank)

    def continuation(self, launched, bank: int) -> Drafted:
        return Drafted(launched.wait().tolist(), launched.rows, bank)

    def verdict(self, scores, x: Drafted, y: Drafted, candidates: list[int],
                accept_uniforms: np.ndarray, sample_uniform: float
                ) -> tuple[int, int | None, list[float]]:
        return self.verifier.decide_without_bonus(
            scores, x.rows, y.rows.slice(0, 1), np.array(candidates, dtype=np.int64),
            self.sampling, accept_uniforms, sample_uniform)

    def verdict_with_bonus(self, scores, x: Drafted, accept_uniforms: np.ndarray,
                           sample_uniform: float) -> tuple[int, int, list[float]]:
        """Algorithm 1's verdict on x alone, on its rows where they lie (an iteration
        without a continuation)."""
        candidates = Candidates(np.array(x.tokens, dtype=np.int64), None, 0, True,
                                vocab_size=self.verifier.vocab, rows_on_device=x.rows)
        return self.verifier.decide(Scores(logits=scores), candidates, self.sampling,
                                    accept_uniforms, sample_uniform)


def _rest(y: Drafted) -> Drafted:
    """y_2..y_L of a continuation, in its bank: the next proposal."""
    rows = None if y.rows is None else y.rows.slice(1, y.rows.count - 1)
    return Drafted(y.tokens[1:], rows, y.bank)


def _settle(launched) -> None:
    """Wait for ``launched`` so its state takes calls again; its own error, if any, is
    raised by the caller's ``wait()`` (the result is kept), not here."""
    try:
        launched.wait()
    except Exception:  # noqa: BLE001 - the caller's wait reports it
        pass


def _shadowed(halves, verifying, scored: list[int], x: Drafted, k: int, L: int,
              u: np.ndarray, k_open: int, warm: bool, vocab: int, times: OverlapTimes,
              t0: float, t1: float) -> tuple[PipelinedStep, Drafted | None]:
    """The rest of an iteration with a continuation: y_1..y_L drafted beside the target's
    call ``verifying``, then the verdict on x and the stand-in y_1. -> (the step, the next
    proposal when all k + 1 were kept)."""
    try:
        drafting = halves.launch_continuation(scored, u[k_open : k_open + L], 1 - x.bank)
    except BaseException:
        _settle(verifying)
        raise
    try:
        scores = verifying.wait()
    finally:
        _settle(drafting)  # waited for even when the target's call failed
    y = halves.continuation(drafting, 1 - x.bank)  # [L]
    times.open_s += t1 - t0
    times.shadow_s += time.perf_counter() - t1
    # the verdict on x_1..x_k and the stand-in y_1, in the bonus's place
    candidates = x.tokens + y.tokens[:1]  # [k + 1]
    n, recovered, betas = halves.verdict(scores, x, y, candidates, u[k_open + L : -1],
                                         float(u[-1]))
    if recovered is None:  # all k + 1 kept: y_2..y_L is the next proposal
        tokens, pending = candidates, _rest(y)
    else:
        tokens, pending = candidates[:n] + [recovered], None
    nxt = None if pending is None else Candidates(
        np.array(pending.tokens, dtype=np.int64), None, 0, True, vocab_size=vocab)
    return PipelinedStep(tokens, n, k + 1, betas, nxt, warm, k_open, L, L), pending


def overlapped_stream(
    target: StaticDecodeState,
    halves: GreedyHalves | SampledHalves,
    prompt_ids: Sequence[int],
    *,
    gamma: int,
    max_new_tokens: int,
    rng: np.random.Generator,
    eos_id: EosIds = None,
    stats: PipelinedStats | None = None,
    times: OverlapTimes | None = None,
    rule: ShadowRule = ShadowRule(),
) -> Iterator[list[int]]:
    """Yield each iteration's new tokens, pipelined: the iterations of
    :func:`quickdraft.pipelined.pipelined_generate` on these models with the same
    uniforms (``rng.random(k_open + L + k + 2)`` per iteration: open draft, shadow draft,
    accept, sample), so the output follows the target exactly (greedy: it is greedy
    autoregressive decoding's).

    ``halves``: :class:`GreedyHalves` or :class:`SampledHalves` over the draft's state (a
    :class:`StaticDecodeState` whose chains take gamma + 1 steps). ``target``: the
    target's state, holding fewer tokens than the prompt. ``rule``: which iterations
    draft a continuation (the others verify the proposal with the bonus, as the
    reference's).
    """
    eos = _eos_set(eos_id)
    stats = stats if stats is not None else PipelinedStats(gamma=gamma)
    times = times if times is not None else OverlapTimes()
    ids, produced = list(prompt_ids), 0
    pending: Drafted | None = None  # the pre-drafted proposal, if the last one was kept
    rate = rule.start  # the running keep rate the rule decides on
    while produced < max_new_tokens:
        k, L = pipeline_lengths(max_new_tokens - produced, gamma,
                                None if pending is None else len(pending.tokens),
                                rule.shadow(rate))
        warm = pending is not None
        k_open = 0 if warm else k
        u = rng.random(k_open + L + k + 2)  # [k_open + L + k + 2] as the reference draws
        t0 = time.perf_counter()
        # the proposal x: pre-drafted in the last iteration's shadow, or drafted now in one
        # chain (one wait, not k)
        x = pending if warm else halves.propose(ids, u[:k_open], bank=0)
        t1 = time.perf_counter()
        scored = ids + x.tokens
        # p_1..p_{k+1}, not waited for; beside it y_1..y_L, in the other row bank
        verifying = _launch_verify(target, scored, k + 1, halves.greedy)
        if not L:  # no continuation: Algorithm 1 on x, the bonus from p_{k+1}
            scores = verifying.wait()
            times.open_s += t1 - t0
            times.shadow_s += time.perf_counter() - t1
            n, token, betas = halves.verdict_with_bonus(scores, x, u[k_open : k_open + k],
                                                        float(u[-1]))
            pending = None
            step = PipelinedStep(x.tokens[:n] + [int(token)], n, k, betas, None, warm, k_open,
                                 0, 0)
        else:
            step, pending = _shadowed(halves, verifying, scored, x, k, L, u, k_open, warm,
                                      target.model.vocab_size, times, t0, t1)
        tokens = step.tokens
        piece = _truncate_at_eos(tokens, eos)
        ids += piece
        produced += len(piece)
        stats.record(step, produced)
        rate = rule.update(rate, step)
        yield piece
        if piece[-1] in eos:
            break
