"""Statistics for task accuracy, by formula (scipy is not a dependency; these few lines are all it would give).

* **Wilson score interval** for k successes in n items (95 %): with p = k/n and z = Φ⁻¹(0.975),
  centre = (p + z²/2n) / (1 + z²/n), half-width = z/(1 + z²/n) · √(p(1−p)/n + z²/4n²).
  It stays inside [0, 1] and is not degenerate at 0/n or n/n, where the normal (Wald) interval is.
* **Exact McNemar test** for two models on the same items: only the discordant items count, b (the
  reference right, the candidate wrong) and c (the reverse). Under "no difference" b ~ Binomial(b + c, ½), so
  the two-sided p = min(1, 2 · Σ_{i ≤ min(b, c)} C(b + c, i) / 2^(b+c)); b = c = 0 gives p = 1.
* **Recovery** = candidate accuracy / reference accuracy.
* **Smallest detectable difference** of a paired comparison on n items (two-sided α = 0.05, power 0.8):
  Connor's normal approximation for McNemar's test (Biometrics 43, 1987) gives the items needed for a
  difference δ = p₀₁ − p₁₀ at discordance rate ψ = p₀₁ + p₁₀:
  n = (z_{α/2}·√ψ + z_β·√(ψ − δ²))² / δ²; here it is solved for δ given n (bisection; the right side falls
  as δ grows). ψ is the fraction of items the two models disagree on: measured, or before measuring the
  conservative 0.5 — the disagreement of two independent models at 50 % accuracy, 2p(1 − p), which is the
  most that two similar models whose errors are not anti-correlated reach (a quantized model's errors are
  positively correlated with its reference's, so its ψ is smaller and the true detectable δ too).
* **Paired standard error** of a difference of per-position means (two precisions' KLD on the same
  positions): SE = sd(aᵢ − bᵢ) / √n, the sample standard deviation (n − 1) of the differences.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.8
UNKNOWN_DISCORDANCE = 0.5  # see the module docstring: 2p(1 − p) at p = ½


def _z(probability: float) -> float:
    return statistics.NormalDist().inv_cdf(probability)


@dataclass(frozen=True)
class Proportion:
    """k of n items right, with its Wilson interval [low, high]."""

    k: int
    n: int
    low: float
    high: float

    @property
    def fraction(self) -> float | None:
        return self.k / self.n if self.n else None


@dataclass(frozen=True)
class PairedTest:
    """Two models on the same n items: b = reference right and candidate wrong, c = the reverse."""

    b: int
    c: int
    n: int
    p_value: float  # exact two-sided McNemar

    @property
    def difference(self) -> float | None:
        """Candidate accuracy minus reference accuracy, (c − b) / n."""
        return (self.c - self.b) / self.n if self.n else None

    @property
    def discordance_rate(self) -> float | None:
        """ψ: the fraction of items the two models disagree on."""
        return (self.b + self.c) / self.n if self.n else None


@dataclass(frozen=True)
class MeanDifference:
    """Mean of aᵢ − bᵢ over n paired positions and its standard error (None below two positions)."""

    mean: float
    standard_error: float | None
    n: int


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> Proportion:
    """The Wilson score interval for k of n; n = 0 says nothing, so the interval is all of [0, 1]."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Proportion(k=0, n=0, low=0.0, high=1.0)
    z = _z(1 - (1 - confidence) / 2)
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # k = 0 and k = n make the bound exactly 0 or 1 in exact arithmetic; clamp the rounding
    return Proportion(k=k, n=n, low=0.0 if k == 0 else max(0.0, centre - half_width),
                      high=1.0 if k == n else min(1.0, centre + half_width))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (exact rational arithmetic until the end)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    discordant = b + c
    if discordant == 0:
        return 1.0
    tail = Fraction(sum(math.comb(discordant, i) for i in range(min(b, c) + 1)), 2 ** discordant)
    return float(min(Fraction(1), 2 * tail))


def paired_test(reference_correct: Sequence[bool], candidate_correct: Sequence[bool]) -> PairedTest:
    """McNemar on two models' per-item results, item i of one paired with item i of the other."""
    if len(reference_correct) != len(candidate_correct):
        raise ValueError(f"paired results need the same items: {len(reference_correct)} vs {len(candidate_correct)}")
    b = sum(1 for ref, cand in zip(reference_correct, candidate_correct, strict=True) if ref and not cand)
    c = sum(1 for ref, cand in zip(reference_correct, candidate_correct, strict=True) if cand and not ref)
    return PairedTest(b=b, c=c, n=len(reference_correct), p_value=mcnemar_exact(b, c))


def recovery(candidate: Proportion, reference: Proportion) -> float | None:
    """Candidate accuracy as a fraction of the reference's; None when the reference got nothing right."""
    if candidate.fraction is None or not reference.fraction:
        return None
    return candidate.fraction / reference.fraction


def detectable_difference(n: int, discordance_rate: float = UNKNOWN_DISCORDANCE, *, alpha: float = ALPHA,
                          power: float = POWER) -> float | None:
    """The smallest accuracy difference a paired test on n items finds with the given power (Connor 1987).

    None when no difference is detectable: n = 0, ψ = 0 (the models never disagree, so there is no
    difference to find), or even δ = ψ (every disagreement going one way) needs more than n items.
    """
    if not 0 <= discordance_rate <= 1:
        raise ValueError(f"a discordance rate is a fraction, got {discordance_rate}")
    if n <= 0 or discordance_rate == 0:
        return None
    z_alpha, z_beta = _z(1 - alpha / 2), _z(power)
    psi = discordance_rate

    def items_needed(delta: float) -> float:
        return (z_alpha * math.sqrt(psi) + z_beta * math.sqrt(max(0.0, psi - delta * delta))) ** 2 / (delta * delta)

    if items_needed(psi) > n:
        return None
    low, high = 0.0, psi  # items_needed(low) = ∞ > n >= items_needed(high)
    for _ in range(100):  # 2⁻¹⁰⁰ of the bracket: far below any figure's printed precision
        middle = (low + high) / 2
        if items_needed(middle) > n:
            low = middle
        else:
            high = middle
    return high


def paired_mean_difference(a: Sequence[float], b: Sequence[float]) -> MeanDifference:
    """Mean of aᵢ − bᵢ and its paired standard error sd(a − b)/√n (a and b measured at the same positions)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same positions: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("no positions to compare")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    n = len(differences)
    error = statistics.stdev(differences) / math.sqrt(n) if n >= 2 else None
    return MeanDifference(mean=statistics.fmean(differences), standard_error=error, n=n)
