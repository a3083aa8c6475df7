"""Pearson's chi-square goodness of fit, for the few seeded statistical tests."""

from __future__ import annotations

import math

import numpy as np

# standard normal upper quantiles for the false-alarm rates the tests use
_Z = {1e-3: 3.0902323, 1e-4: 3.7190165}


def chi2_quantile(df: int, alpha: float) -> float:
    """Upper-alpha quantile of chi-square(df), Wilson-Hilferty (within ~1% for df >= 3)."""
    z = _Z[alpha]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``p`` over the tokens with an expected count
    of 5 or more (the others pooled into one cell), and its degrees of freedom."""
    expected = counts.sum() * p
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])), int(keep.sum()) - 1


def check_fit(counts: np.ndarray, p: np.ndarray, q: np.ndarray, alpha: float, *,
              min_df: int) -> None:
    """Assert that draws ``counts`` [V] fit ``p`` at the false-alarm rate ``alpha``, never
    landing where p is 0, and that the same test rejects as many seeded draws from ``q``
    (so it has the power to see a sampler that ignores p)."""
    assert counts[p == 0].sum() == 0  # never a token the target cannot produce
    stat, df = chi2(counts, p)
    assert df >= min_df
    assert stat < chi2_quantile(df, alpha), (stat, df)
    runs = int(counts.sum())
    from_q = np.bincount(np.random.default_rng(0).choice(len(q), size=runs, p=q),
                         minlength=len(q)).astype(float)
    stat_q, df_q = chi2(from_q, p)
    assert stat_q > chi2_quantile(df_q, alpha), (stat_q, df_q)
