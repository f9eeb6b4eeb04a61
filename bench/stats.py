"""Figures over paired differences (per seed, per round), shared by the benchmarks that pair."""

from __future__ import annotations

import math
import statistics


def sd_se(differences: list[float]) -> tuple[float | None, float | None]:
    """(sd, standard error of the mean) of paired differences; None for fewer than two."""
    if len(differences) < 2:
        return None, None
    sd = statistics.stdev(differences)
    return sd, sd / math.sqrt(len(differences))
