"""Intervals for accuracies measured on a finite set of eval cases.

    bootstrap_interval([1, 0, 1, 1], seed=0)  # -> (low, high): a 95% percentile-bootstrap interval of the mean

A study's accuracy is a mean over cases (a needle prompt, a question, a generated image); the
interval says how far it could move with another draw of cases of the same kind. Cases that share
a haystack or a picture are correlated, so the interval is, if anything, too narrow.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_interval(values: Sequence[float], level: float = 0.95, n_resamples: int = 4000,
                       seed: int = 0) -> tuple[float, float] | None:
    """(low, high) percentile-bootstrap interval of the mean of `values` (None for no values).

    Resamples the cases with replacement n_resamples times; the interval holds the central
    `level` of the resampled means. Seeded: the same values give the same interval."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return None
    _check_level(level)
    rng = np.random.default_rng(seed)
    return _central(_resampled_means(x, rng, n_resamples), level)


def seeds_bootstrap_interval(runs: Sequence[Sequence[float]], level: float = 0.95, n_resamples: int = 4000,
                             seed: int = 0) -> tuple[float, float] | None:
    """(low, high) interval of the mean over several training runs (seeds), each a list of case scores.

    Two-level bootstrap: draw the runs with replacement, then each drawn run's cases with
    replacement (afresh for every draw, so a run drawn twice counts as two samples); the
    statistic is the mean of the drawn runs' means. It holds both the case sampling error and
    the spread between seeds (with one run it is `bootstrap_interval`)."""
    runs = [np.asarray(r, np.float64) for r in runs if len(r)]
    if len(runs) <= 1:
        return bootstrap_interval(runs[0], level, n_resamples, seed) if runs else None
    _check_level(level)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(runs), size=(n_resamples, len(runs)))
    slots = [np.stack([_resampled_means(r, rng, n_resamples) for r in runs], 1) for _ in runs]  # [slot][i, run]
    means = np.mean([np.take_along_axis(slot, picks[:, [k]], axis=1)[:, 0] for k, slot in enumerate(slots)], axis=0)
    return _central(means, level)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _resampled_means(x: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    return x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)


def _central(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return round(float(low), 4), round(float(high), 4)
