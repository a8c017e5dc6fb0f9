"""flower_tutorial: robust rules, combining updates despite a few poisoned ones."""

from __future__ import annotations

from flwr.common import FitRes, NDArrays, parameters_to_ndarrays
from flwr.server.strategy.aggregate import (
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

# config.AGGREGATIONS but "fedavg", which leaves combining to the strategy.
ROBUST_RULES = ("median", "trimmed-mean", "krum")


def robust_combination(
    rule: str, results: list[FitRes], trim_fraction: float, byzantine: int
) -> NDArrays:
    """Combine the clients' updates with a robust rule of Flower's.

    "median" is the coordinate-wise median, "trimmed-mean" the coordinate-wise mean
    of what is left after cutting `trim_fraction` off each end, "krum" the one
    update closest to its neighbours when up to `byzantine` are poisoned (as in
    Flower's FedMedian, FedTrimmedAvg and Krum strategies). Examples do not weigh.
    """
    updates = [(parameters_to_ndarrays(r.parameters), r.num_examples) for r in results]
    if rule == "median":
        return aggregate_median(updates)
    if rule == "trimmed-mean":
        return aggregate_trimmed_avg(updates, trim_fraction)
    if rule == "krum":
        return aggregate_krum(updates, num_malicious=byzantine, to_keep=0)
    raise ValueError(f"unknown robust rule {rule!r}: expected one of {ROBUST_RULES}")
