"""Bootstrap intervals of an accuracy, against the normal approximation computed by hand."""
import math

import pytest

from lwm.stats import bootstrap_interval, seeds_bootstrap_interval


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


def test_seeds_interval_holds_the_spread_between_seeds():
    """Two seeds at 0.6 and 0.8 (400 cases each): drawing seeds gives means 0.6, 0.7 or 0.8 (1/4,
    1/2, 1/4), so the 95% interval reaches about 0.6 and 0.8 (the case noise, sd 0.017 per
    seed, widens it a little); pooling the cases would claim 0.70 +- 0.03."""
    runs = [[1] * 240 + [0] * 160, [1] * 320 + [0] * 80]
    low, high = seeds_bootstrap_interval(runs)
    assert 0.55 < low < 0.63 and 0.77 < high < 0.85
    pooled = bootstrap_interval(runs[0] + runs[1])
    assert pooled[1] - pooled[0] < 0.08
    same = seeds_bootstrap_interval([runs[0], runs[0]])  # identical seeds: only the case noise is left
    assert same[0] == pytest.approx(0.6 - 1.96 * math.sqrt(0.24 / 800), abs=0.015)
    assert seeds_bootstrap_interval([runs[0]]) == bootstrap_interval(runs[0])
    assert seeds_bootstrap_interval([]) is None
