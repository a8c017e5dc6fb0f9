"""flower_tutorial: whether a client's result is sound enough to be combined.

Each check returns None for a sound result, else the reason it is left out; the
reason is logged and kept in history.json.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.common import EvaluateRes, FitRes, NDArrays, parameters_to_ndarrays


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
