"""Pipelined greedy decoding on ONNX Runtime: the draft drafts while the target verifies.

:mod:`quickdraft.pipelined`'s scheme (PEARL's post-verify) with both models in flight at
once. Each iteration launches the target's verify call (enqueued on its session's CUDA
stream, not waited for), then the draft's whole continuation as one greedy chain on the
draft session's stream (``StaticDecodeState.launch_chain``), and the host waits once, for
both. On the CPU every launch runs to its end: the same tokens, one after the other.
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
from quickdraft.pipelined import (
    PipelinedStats,
    PipelinedStep,
    greedy_betas,
    pipeline_lengths,
    verify_greedy_without_bonus,
)
from quickdraft.protocols import Candidates, launch_greedy_chain, rewind_to_common_prefix

__all__ = ["OverlapTimes", "overlapped_greedy_stream"]


@dataclass
class OverlapTimes:
    """Where a pipelined generation's iterations spent their time (host clock)."""

    open_s: float = 0.0  # drafting proposals while the target waited (cold iterations)
    shadow_s: float = 0.0  # from the target's launch until both models were done

    def as_dict(self) -> dict:
        return {"open_s": self.open_s, "shadow_s": self.shadow_s}


def _launch_verify(target: StaticDecodeState, scored: list[int], rows: int):
    """Enqueue the target's call on the tokens of ``scored`` it has not consumed (at least
    the last ``rows``); its ``wait()`` gives the greedy tokens of the last ``rows``."""
    common = rewind_to_common_prefix(target, scored, rows)
    return target.launch_greedy(scored[common:])


def _settle(launched) -> None:
    """Wait for ``launched`` so its state takes calls again; its own error, if any, is
    raised by the caller's ``wait()`` (the result is kept), not here."""
    try:
        launched.wait()
    except Exception:  # noqa: BLE001 - the caller's wait reports it
        pass


def overlapped_greedy_stream(
    target: StaticDecodeState,
    drafter: ModelDrafter,
    prompt_ids: Sequence[int],
    *,
    gamma: int,
    max_new_tokens: int,
    rng: np.random.Generator,
    eos_id: EosIds = None,
    stats: PipelinedStats | None = None,
    times: OverlapTimes | None = None,
) -> Iterator[list[int]]:
    """Yield each iteration's new tokens, greedy (temperature 0) and pipelined: the same
    tokens as greedy autoregressive decoding, and the same iterations as
    :func:`quickdraft.pipelined.pipelined_generate` on these models.

    ``drafter``: a greedy :class:`ModelDrafter` whose state (a :class:`StaticDecodeState`
    of a model with ``chain_length >= gamma + 1``) drafts the cold proposals (its greedy
    proposal, run as one chain) and the continuations. ``target``: the target's state,
    holding fewer tokens than the prompt. ``rng`` gives the reference's uniforms per
    iteration (greedy decisions read none).
    """
    eos = _eos_set(eos_id)
    stats = stats if stats is not None else PipelinedStats(gamma=gamma)
    times = times if times is not None else OverlapTimes()
    draft = drafter.state
    ids, produced = list(prompt_ids), 0
    pending: list[int] | None = None  # the pre-drafted proposal, if the last one was kept
    while produced < max_new_tokens:
        k, L = pipeline_lengths(max_new_tokens - produced, gamma,
                                None if pending is None else len(pending))
        warm = pending is not None
        k_open = 0 if warm else k
        u = rng.random(k_open + L + k + 2)  # [k_open + L + k + 2] as the reference draws
        t0 = time.perf_counter()
        # the proposal x: pre-drafted in the last iteration's shadow, or drafted now, as
        # the drafter's greedy proposal is, in one chain on the device (one wait, not k)
        check_uniforms(u[:k_open])
        if warm:
            x = pending
        else:
            x = launch_greedy_chain(draft, ids, k).wait().tolist() if k else []
        t1 = time.perf_counter()
        scored = ids + x
        verifying = _launch_verify(target, scored, k + 1)  # p_1..p_{k+1}, not waited for
        try:
            drafting = launch_greedy_chain(draft, scored, L)  # y_1..y_L beside it
        except BaseException:
            _settle(verifying)
            raise
        try:
            choices = verifying.wait()[-(k + 1):]  # [k + 1] the target's argmax ids
        finally:
            _settle(drafting)  # waited for even when the target's call failed
        y = drafting.wait()  # [L]
        times.open_s += t1 - t0
        times.shadow_s += time.perf_counter() - t1
        # the verdict on x_1..x_k and the stand-in y_1, in the bonus's place
        candidates = np.array(x + [int(y[0])], dtype=np.int64)  # [k + 1]
        n, recovered = verify_greedy_without_bonus(choices, candidates)
        if recovered is None:  # all k + 1 kept: y_2..y_L is the next proposal
            tokens, pending = candidates.tolist(), y[1:].tolist()
        else:
            tokens, pending = candidates[:n].tolist() + [recovered], None
        nxt = None if pending is None else Candidates(
            np.array(pending, dtype=np.int64), None, 0, True, vocab_size=target.model.vocab_size)
        step = PipelinedStep(tokens, n, k + 1, greedy_betas(n, k + 1), nxt, warm,
                             k_open, L, L)
        piece = _truncate_at_eos(tokens, eos)
        ids += piece
        produced += len(piece)
        stats.record(step, produced)
        yield piece
        if piece[-1] in eos:
            break
