"""Paired comparisons for multi-seed studies: mean ± SE, the paired t-test and its confidence interval.

Student's t distribution from the regularised incomplete beta function (continued fraction, modified Lentz), so
that the report needs neither SciPy nor a table: P(|T| > t) = I_{df / (df + t²)}(df / 2, 1 / 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (converges for x < (a + 1) / (a + b + 2))."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t-test: df={df} must be > 0")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (0.5 < q < 1), by bisection on the two-sided tail."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"t_quantile: q={q} must lie in (0.5, 1)")
    tail = 2 * (1 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean); SE is None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_se: no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass
class Paired:
    """A paired comparison (treatment − control over common seeds)."""

    n: int
    mean: float
    se: float | None
    ci: tuple[float, float] | None  # two-sided, at ``level``
    t: float | None
    p: float | None  # two-sided paired t-test
    level: float = 0.95


def paired_t(treatment: list[float], control: list[float], *, level: float = 0.95) -> Paired:
    """Paired t-test of ``treatment[i] - control[i]``; the CI is mean ± t_{(1+level)/2, n-1} · SE."""
    if len(treatment) != len(control):
        raise ValueError(f"paired_t: {len(treatment)} treatment values, {len(control)} control values")
    diffs = [a - b for a, b in zip(treatment, control)]
    mean, se = mean_se(diffs)
    n = len(diffs)
    if se is None:
        return Paired(n, mean, None, None, None, None, level)
    if se <= 1e-12 * max(abs(d) for d in diffs):
        # every pair differs by the same amount (up to the rounding of the differences): no spread to test against
        return Paired(n, mean, 0.0, (mean, mean), None, None, level)
    t = mean / se
    half = t_quantile((1 + level) / 2, n - 1) * se
    return Paired(n, mean, se, (mean - half, mean + half), t, t_two_sided_p(t, n - 1), level)
