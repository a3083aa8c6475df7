"""Calls into one model, counted and timed by the state that makes them."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

__all__ = ["ModelTimes"]


@dataclass
class ModelTimes:
    """Forward calls and cache roll-backs of one model state (or the difference of two
    snapshots: :meth:`since`)."""

    calls: int = 0  # forward calls
    tokens: int = 0  # tokens those calls consumed
    call_s: float = 0.0  # seconds in those calls
    rewinds: int = 0  # cache roll-backs that cut something
    rewind_s: float = 0.0  # seconds in those roll-backs

    def record_call(self, tokens: int, t0: float, calls: int = 1) -> None:
        """Count ``calls`` calls of ``tokens`` tokens in all, started at ``t0``
        (``time.perf_counter``) and run back to back."""
        self.call_s += time.perf_counter() - t0
        self.calls += calls
        self.tokens += tokens

    def record_rewind(self, t0: float) -> None:
        self.rewind_s += time.perf_counter() - t0
        self.rewinds += 1

    def copy(self) -> ModelTimes:
        return replace(self)

    def since(self, before: ModelTimes) -> ModelTimes:
        """What happened after the snapshot ``before``."""
        return ModelTimes(self.calls - before.calls, self.tokens - before.tokens,
                          self.call_s - before.call_s, self.rewinds - before.rewinds,
                          self.rewind_s - before.rewind_s)

    def __add__(self, other: ModelTimes) -> ModelTimes:
        return ModelTimes(self.calls + other.calls, self.tokens + other.tokens,
                          self.call_s + other.call_s, self.rewinds + other.rewinds,
                          self.rewind_s + other.rewind_s)

    @property
    def decode_s(self) -> float:
        """Time in this model: forward calls plus cache roll-backs."""
        return self.call_s + self.rewind_s

    @property
    def mean_call_s(self) -> float:
        return self.call_s / self.calls if self.calls else float("nan")

    def as_dict(self) -> dict:
        return {
            "calls": self.calls,
            "tokens": self.tokens,
            "call_s": self.call_s,
            "mean_call_ms": 1e3 * self.mean_call_s,
            "rewinds": self.rewinds,
            "rewind_s": self.rewind_s,
        }
