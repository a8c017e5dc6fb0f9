"""flower_tutorial: whether a client's result is sound enough to be combined.

Every value a client sends is checked here, where it enters the server: its
weights, its counts and its metrics. Each check returns None for a sound result,
else the reason it is left out; the reason is logged and kept in history.json.
A client may send anything, so no check assumes a type before testing it, and
no reason shows more of a client's own text than `shown` and `cut` allow: a
client's value or message has no length limit on its way in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.common import (
    EvaluateRes,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.supercore.differential_privacy import KEY_NORM_BIT

# The metrics the app's clients report: (lowest, highest allowed, in words).
Ranges = Mapping[str, tuple[float, float, str]]
FIT_METRICS: Ranges = {"train_loss": (0.0, math.inf, "a finite number >= 0")}
EVALUATE_METRICS: Ranges = {"accuracy": (0.0, 1.0, "a number in [0, 1]")}
# How far beyond the clipping range SecAgg+'s quantization can move a mean.
SECURE_SLACK = 1e-4


# The most of a client's text that a reason shows: of one value (a metric, its
# name, a property), and of a whole message (a status, an error it raised).
SHOWN_VALUE_CHARS = 100
SHOWN_MESSAGE_CHARS = 1000


def cut(text: str, limit: int = SHOWN_MESSAGE_CHARS) -> str:
    """Return `text`, or its first `limit` characters and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def shown(value: object) -> str:
    """Return `value` as a reason shows it: its repr, cut to SHOWN_VALUE_CHARS."""
    if isinstance(value, str | bytes) and len(value) > SHOWN_VALUE_CHARS:
        # The repr of the start only: the whole could be megabytes.
        return f"{value[:SHOWN_VALUE_CHARS]!r}... ({len(value):,} characters)"
    return cut(repr(value), SHOWN_VALUE_CHARS)


def check_update(
    res: FitRes,
    reference: NDArrays,
    metrics: Ranges = FIT_METRICS,
    norm_bit: bool = False,
) -> str | None:
    """Return why an update cannot be averaged into `reference`'s model, or None."""
    return check_fit_report(res, metrics, norm_bit) or check_arrays(
        res.parameters, reference
    )


def check_fit_report(
    res: FitRes, metrics: Ranges = FIT_METRICS, norm_bit: bool = False
) -> str | None:
    """Return why a training result's count or metrics are unsound, or None.

    `metrics` are those the clients must report; with `norm_bit`, adaptive
    clipping's norm bit must be there too, a boolean.
    """
    reason = _check_count(res.num_examples) or _check_metrics(res.metrics, metrics)
    if reason is None and norm_bit:
        value = res.metrics.get(KEY_NORM_BIT)
        if not isinstance(value, bool):
            reason = f"metric {KEY_NORM_BIT!r} = {shown(value)}, expected true or false"
    return reason


def check_arrays(parameters: Parameters, reference: NDArrays) -> str | None:
    """Return why `parameters` cannot stand for `reference`'s model, or None."""
    try:
        arrays = parameters_to_ndarrays(parameters)
    except Exception as ex:  # whatever bytes came, reading them must not end the run
        return f"its arrays cannot be read ({type(ex).__name__}: {cut(str(ex))})"
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


def check_secure_aggregate(
    parameters: Parameters, reference: NDArrays, limit: float
) -> str | None:
    """Return why SecAgg+'s aggregate cannot be a mean of what it sums, or None.

    Every update it sums lies in [-limit, limit] (SecAgg+ clips to it, and the
    app's clients refuse to submit beyond it), and so does their mean, up to
    quantization. An aggregate outside came from a corrupted sum: a client that
    submitted NaN, which SecAgg+ quantizes to -2**31, or masks that did not cancel.
    """
    unsound = check_arrays(parameters, reference)
    if unsound:
        return unsound
    for i, array in enumerate(parameters_to_ndarrays(parameters)):
        if array.size and np.abs(array).max() > limit * (1 + SECURE_SLACK):
            return (
                f"array {i} holds {float(np.abs(array).max()):g}, beyond "
                f"secagg-clipping-range = {limit:g}: the sum includes an update that "
                "SecAgg+ could not sum"
            )
    return None


def check_evaluation(res: EvaluateRes) -> str | None:
    """Return why an evaluation result cannot be averaged, or None."""
    if not _is_number(res.loss) or not 0 <= res.loss < math.inf:
        return f"loss = {shown(res.loss)}, expected a finite number >= 0"
    return _check_count(res.num_examples) or _check_metrics(
        res.metrics, EVALUATE_METRICS
    )


def _is_number(value: object) -> bool:
    # bool is an int to Python, but never a sensible count or metric.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_count(num_examples: object) -> str | None:
    """Check a count of examples, which weighs a client: an integer > 0."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        return f"num_examples = {shown(num_examples)}, expected an integer > 0"
    if num_examples <= 0:
        return f"num_examples = {num_examples}, expected > 0"
    return None


def _check_metrics(metrics: Mapping[str, Scalar], expected: Ranges) -> str | None:
    """Check the app's metrics are there and in range, and any other is finite."""
    for key, (low, high, allowed) in expected.items():
        value = metrics.get(key)
        if not _is_number(value) or not low <= value <= high or math.isinf(value):
            return f"metric {key!r} = {shown(value)}, expected {allowed}"
    for key, value in metrics.items():
        if _is_number(value) and not math.isfinite(value):
            return f"metric {shown(key)} = {shown(value)}, expected a finite number"
    return None
