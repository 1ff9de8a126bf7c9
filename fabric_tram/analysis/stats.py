"""Mean, spread and the 95% confidence interval of a mean over seeds (Student's t), for the result tables."""

from __future__ import annotations

import math
import statistics

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond, the normal's 1.96
# fmt: off
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# fmt: on


def t_quantile(df: int) -> float:
    return T_975[df - 1] if df <= len(T_975) else 1.96


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard deviation and the half-width of the 95% confidence interval of the mean (t, n−1 df); the
    last two are NaN for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    std = statistics.stdev(values)
    return mean, std, t_quantile(len(values) - 1) * std / math.sqrt(len(values))


def mean_std_ci(values: list[float], digits: int = 2) -> str:
    """``mean ± std [low, high]`` (the 95% CI of the mean); ``mean (n=1)`` for one value."""
    mean, std, half = mean_ci(values)
    if math.isnan(half):
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"
