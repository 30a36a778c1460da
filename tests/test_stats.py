"""Bootstrap intervals of an accuracy, against the normal approximation computed by hand."""
import math

import pytest

from lwm.stats import bootstrap_interval


def test_bootstrap_interval_matches_the_normal_approximation_for_many_cases():
    values = [1] * 140 + [0] * 60  # accuracy 0.7 over 200 cases
    half = 1.96 * math.sqrt(0.7 * 0.3 / 200)  # 0.0635
    low, high = bootstrap_interval(values, seed=1)
    assert low == pytest.approx(0.7 - half, abs=0.01) and high == pytest.approx(0.7 + half, abs=0.01)
    assert bootstrap_interval(values, seed=1) == (low, high)  # seeded


def test_bootstrap_interval_edges():
    assert bootstrap_interval([]) is None
    assert bootstrap_interval([1, 1, 1]) == (1.0, 1.0)  # no variation, no width
    low, high = bootstrap_interval([0.5, 1.0, 0.0, 0.5])  # fractional per-case scores (multi-needle)
    assert 0.0 <= low < 0.5 < high <= 1.0
    with pytest.raises(ValueError, match="level must lie in"):
        bootstrap_interval([1, 0], level=95)
