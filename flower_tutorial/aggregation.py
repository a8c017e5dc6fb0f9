"""flower_tutorial: which client updates are sound, and how they are combined."""

from __future__ import annotations

import math

import numpy as np
from flwr.common import EvaluateRes, FitRes, NDArrays, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy.aggregate import (
    aggregate_inplace,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)


def check_update(res: FitRes, reference: NDArrays) -> str | None:
    """Return why an update cannot be averaged into `reference`'s model, or None."""
    if res.num_examples <= 0:
        return f"num_examples = {res.num_examples}, expected > 0"
    arrays = parameters_to_ndarrays(res.parameters)
    if len(arrays) != len(reference):
        return f"{len(arrays)} arrays, expected {len(reference)}"
    for i, (array, expected) in enumerate(zip(arrays, reference, strict=True)):
        if array.shape != expected.shape:
            return f"array {i} has shape {array.shape}, expected {expected.shape}"
        if array.dtype != expected.dtype:
            return f"array {i} has dtype {array.dtype}, expected {expected.dtype}"
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return f"array {i} holds NaN or infinite values"
    return None


def check_evaluation(res: EvaluateRes) -> str | None:
    """Return why an evaluation result cannot be averaged, or None."""
    if res.num_examples <= 0:
        return f"num_examples = {res.num_examples}, expected > 0"
    if not math.isfinite(res.loss):
        return f"loss = {res.loss}, expected a finite number"
    return None


def combine(
    rule: str,
    results: list[tuple[ClientProxy, FitRes]],
    trim_fraction: float,
    byzantine: int,
) -> NDArrays:
    """Combine the clients' updates with a rule of config.AGGREGATIONS.

    "fedavg" is the example-weighted mean (the tutorial); the others are Flower's
    robust rules, which tolerate a minority of poisoned updates.
    """
    if rule == "fedavg":
        return aggregate_inplace(results)  # exactly what Flower's FedAvg does
    updates = [
        (parameters_to_ndarrays(r.parameters), r.num_examples) for _, r in results
    ]
    if rule == "median":
        return aggregate_median(updates)
    if rule == "trimmed-mean":
        return aggregate_trimmed_avg(updates, trim_fraction)
    if rule == "krum":
        return aggregate_krum(updates, num_malicious=byzantine, to_keep=0)
    raise ValueError(f"unknown aggregation {rule!r}")
