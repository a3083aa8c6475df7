"""Wall-clock timing of model calls, kept out of the NumPy generation code.

:class:`TimedModel` wraps any :class:`~quickdraft.protocols.LanguageModel` and its states so
that every ``append`` and ``rewind`` the generic loops make is timed and counted into a
:class:`ModelTimes`. ORT calls are synchronous at their end (the logits are on the host
when ``append`` returns; ``append_device`` returns once the call has finished, its logits
left on the device), so these are real device times.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quickdraft.protocols import greedy_append

__all__ = ["ModelTimes", "TimedModel", "TimedState", "TimedDeviceState"]


@dataclass
class ModelTimes:
    """Calls into one model during one generation."""

    prefill_calls: int = 0  # forward calls that filled the cache with the prompt
    prefill_tokens: int = 0  # prompt tokens those calls consumed
    prefill_s: float = 0.0  # seconds in those calls
    calls: int = 0  # decode-phase forward calls (``append`` after the prefill)
    tokens: int = 0  # tokens those calls consumed
    call_s: float = 0.0  # seconds in those calls
    rewinds: int = 0  # cache roll-backs that cut something
    rewind_s: float = 0.0  # seconds in those roll-backs

    @property
    def decode_s(self) -> float:
        """Decode-phase time in this model: forward calls plus cache roll-backs."""
        return self.call_s + self.rewind_s

    @property
    def mean_call_s(self) -> float:
        return self.call_s / self.calls if self.calls else float("nan")

    def as_dict(self) -> dict:
        return {
            "prefill_calls": self.prefill_calls,
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": self.prefill_s,
            "calls": self.calls,
            "tokens": self.tokens,
            "call_s": self.call_s,
            "mean_call_ms": 1e3 * self.mean_call_s,
            "rewinds": self.rewinds,
            "rewind_s": self.rewind_s,
        }


class TimedState:
    """A :class:`~quickdraft.protocols.DecodeState` that times the state it wraps."""

    def __init__(self, inner, times: ModelTimes):
        self.inner = inner
        self.times = times

    @property
    def tokens(self) -> list[int]:
        return self.inner.tokens

    def prefill(self, tokens: Sequence[int]):
        """``append`` counted as prefill (nothing runs for no tokens). A state that can leave
        its logits on the device (``append_device``) does so: nobody reads them."""
        if len(tokens) == 0:
            return self.inner.append(tokens)
        t0 = time.perf_counter()
        logits = getattr(self.inner, "append_device", self.inner.append)(tokens)
        self.times.prefill_s += time.perf_counter() - t0
        self.times.prefill_calls += 1
        self.times.prefill_tokens += len(tokens)
        return logits

    def append(self, tokens: Sequence[int]) -> np.ndarray:
        return self._call(self.inner.append, tokens)

    def append_greedy(self, tokens: Sequence[int]) -> np.ndarray:
        """The greedy token after each of ``tokens`` (``quickdraft.protocols.greedy_append``
        of the wrapped state: on the device when it can), timed as a call."""
        return self._call(lambda t: greedy_append(self.inner, t), tokens)

    def _call(self, run, tokens: Sequence[int]):
        t0 = time.perf_counter()
        logits = run(tokens)
        self.times.call_s += time.perf_counter() - t0
        self.times.calls += 1
        self.times.tokens += len(tokens)
        return logits

    def rewind(self, length: int) -> None:
        if length == len(self.inner.tokens):
            self.inner.rewind(length)  # validates; cuts nothing
            return
        t0 = time.perf_counter()
        self.inner.rewind(length)
        self.times.rewind_s += time.perf_counter() - t0
        self.times.rewinds += 1


class TimedDeviceState(TimedState):
    """A :class:`TimedState` over a state that can keep its logits on the device."""

    def append_device(self, tokens: Sequence[int]):
        return self._call(self.inner.append_device, tokens)


class TimedModel:
    """A :class:`~quickdraft.protocols.LanguageModel` whose states report to ``times``."""

    def __init__(self, inner, times: ModelTimes | None = None):
        self.inner = inner
        self.times = times if times is not None else ModelTimes()

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def max_length(self) -> int | None:
        return self.inner.max_length

    def new_state(self) -> TimedState:
        state = self.inner.new_state()
        timed = TimedDeviceState if hasattr(state, "append_device") else TimedState
        return timed(state, self.times)
