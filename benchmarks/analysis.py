"""Turning raw runs into the reported quantities: alpha, c, tokens per iteration against
Eq. 1, realized against theoretical walltime improvement (Theorem 3.8, and the same with
the measured verify cost). NumPy only."""

from __future__ import annotations

import math
import statistics

from quickdraft import theory


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize_spec(stats: list[dict], gamma: int) -> dict:
    """Aggregate the statistics of several speculative generations (one per prompt) made
    with draft length ``gamma``."""
    accepted, drafted = [], []
    beta_sum, beta_count = 0.0, 0
    cs, target_ms, draft_ms = [], [], []
    for s in stats:
        acc = list(s.get("accepted_per_iteration") or [])
        dr = list(s.get("drafted_per_iteration") or [])
        if len(dr) != len(acc):
            dr = [gamma] * len(acc)
        accepted += acc
        drafted += dr
        beta_sum += float(s.get("beta_sum") or 0.0)
        beta_count += int(s.get("beta_count") or 0)
        if _finite(s.get("cost_ratio_c")):
            cs.append(s["cost_ratio_c"])
        for key, sink in (("target", target_ms), ("draft", draft_ms)):
            v = (s.get(key) or {}).get("mean_call_ms")
            if _finite(v):
                sink.append(v)
    out: dict = {"gamma": gamma, "iterations": len(accepted)}
    if accepted:
        out["alpha"] = theory.alpha_from_acceptances(accepted, drafted)  # MLE, i.i.d.
        out["acceptance_rate"] = sum(accepted) / max(1, sum(drafted))
        out["tokens_per_iteration"] = (sum(accepted) + len(accepted)) / len(accepted)
        out["expected_tokens_eq1"] = theory.expected_tokens(out["alpha"], gamma)
    if beta_count:
        out["alpha_mean_beta"] = beta_sum / beta_count
    if cs:
        out["cost_ratio_c"] = statistics.median(cs)
    if target_ms:
        out["target_call_ms"] = statistics.median(target_ms)
    if draft_ms:
        out["draft_call_ms"] = statistics.median(draft_ms)
    return out


def measured_verify(verify) -> bool:
    """Whether ``verify`` is a usable verify cost: a finite number > 0."""
    return _finite(verify) and not isinstance(verify, bool) and verify > 0


def theoretical(alpha, gamma: int, c, verify=None) -> float | None:
    """Theorem 3.8's walltime improvement, or None without finite alpha and c; with
    ``verify`` (the target's call on gamma + 1 tokens over its 1-token step, finite and
    > 0), the improvement with that verify cost (None for any other ``verify``)."""
    if not (_finite(alpha) and _finite(c)) or not 0 <= alpha <= 1 or c < 0:
        return None
    if verify is None:
        return theory.walltime_improvement(float(alpha), int(gamma), float(c))
    if not measured_verify(verify):
        return None
    return theory.walltime_improvement(float(alpha), int(gamma), float(c), float(verify))


def compare(ar_tokens_per_s, spec_tokens_per_s, alpha, gamma: int, c, verify=None) -> dict:
    """Realized speedup over the autoregressive baseline and its ratio to Theorem 3.8
    (``theoretical_improvement``, ``realized_over_theoretical``); with a measured
    ``verify`` cost (finite, > 0) also to the theory with it (``theoretical_with_verify``,
    ``realized_over_theoretical_with_verify``)."""
    out: dict = {}
    if _finite(ar_tokens_per_s) and _finite(spec_tokens_per_s) and ar_tokens_per_s > 0:
        out["speedup"] = spec_tokens_per_s / ar_tokens_per_s
    th = theoretical(alpha, gamma, c)
    if th is not None:
        out["theoretical_improvement"] = th
        if "speedup" in out:
            out["realized_over_theoretical"] = out["speedup"] / th
    th_v = theoretical(alpha, gamma, c, verify) if measured_verify(verify) else None
    if th_v is not None:
        out["theoretical_with_verify"] = th_v
        if "speedup" in out:
            out["realized_over_theoretical_with_verify"] = out["speedup"] / th_v
    if _finite(alpha) and _finite(c) and 0 <= alpha <= 1 and c >= 0:
        out["best_gamma_theory"] = theory.best_gamma(float(alpha), float(c), max_gamma=16)
    return out


def floor_ms(weight_bytes, bandwidth_gbps) -> float | None:
    """Weight bytes over memory bandwidth: the ms per token no decoder can beat at batch 1."""
    if not (_finite(weight_bytes) and _finite(bandwidth_gbps)) or bandwidth_gbps <= 0:
        return None
    return 1e3 * weight_bytes / (bandwidth_gbps * 1e9)
