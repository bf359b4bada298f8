"""Scoring shared by the evals and the demo: the option a model finds most likely, and the accuracy of scored
records (dicts with a true/false entry per answer) overall, per needle-depth bin and per (length, depth) cell."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def most_likely(options: Sequence, scores: Sequence[float]):
    """The option of the highest score (the first of equal ones)."""
    return options[int(np.argmax(scores))]


def accuracy(records: Sequence[dict], key: str = "correct") -> float:
    """The share of `records` whose `key` is true (NaN when there are none)."""
    return float(np.mean([bool(r[key]) for r in records])) if records else float("nan")


def depth_bin(depth: float, bins: int) -> int:
    """Which of `bins` equal parts of [0, 1] a needle depth lies in (depth 1 in the last)."""
    return min(int(depth * bins), bins - 1)


def depth_bin_labels(bins: int) -> list[str]:
    """Names of the depth bins: "0-25%", "25-50%", "50-75%", "75-100%" for 4."""
    return [f"{100 * i // bins}-{100 * (i + 1) // bins}%" for i in range(bins)]


def accuracy_by_depth_bin(records: Sequence[dict], bins: int, key: str = "correct") -> list[float]:
    """Accuracy of the records (each with a `depth` in [0, 1]) in each depth bin."""
    return [accuracy([r for r in records if depth_bin(r["depth"], bins) == b], key) for b in range(bins)]


def accuracy_table(
    records: Sequence[dict], lengths: Sequence, depths: Sequence, key: str = "correct"
) -> list:
    """Accuracy of the records of each (`length`, `depth`) cell: [len(lengths)][len(depths)] floats."""
    return [
        [accuracy([r for r in records if r["length"] == n and r["depth"] == d], key) for d in depths]
        for n in lengths
    ]
