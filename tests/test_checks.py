"""Every value a client sends is checked: weights, counts, metrics, identity."""

from io import BytesIO

import numpy as np
import pytest
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
)

from flower_tutorial.checks import check_evaluation, check_update
from flower_tutorial.client_manager import _identity
from flower_tutorial.task import Net, get_parameters

OK = Status(Code.OK, "")
REFERENCE = get_parameters(Net())


def _fit(
    arrays=None, num_examples=10, metrics=None, parameters: Parameters | None = None
) -> FitRes:
    if parameters is None:
        parameters = ndarrays_to_parameters(REFERENCE if arrays is None else arrays)
    metrics = {"train_loss": 1.5} if metrics is None else metrics
    return FitRes(OK, parameters, num_examples, metrics)


def test_a_sound_update_passes():
    assert check_update(_fit(), REFERENCE) is None
    assert (
        check_update(_fit(metrics={"train_loss": 0.0, "note": "x"}), REFERENCE) is None
    )
    # One example is the fewest a client can train on, and is enough.
    assert check_update(_fit(num_examples=1), REFERENCE) is None


@pytest.mark.parametrize(
    ("res", "reason"),
    [
        (_fit(num_examples=0), "num_examples = 0, expected > 0"),
        (_fit(num_examples=-3), "num_examples = -3, expected > 0"),
        (_fit(num_examples=2.5), "num_examples = 2.5, expected an integer > 0"),
        (_fit(num_examples="10"), "num_examples = '10', expected an integer > 0"),
        (_fit(num_examples=True), "num_examples = True, expected an integer > 0"),
        (_fit(metrics={}), "metric 'train_loss' = None, expected a finite number >= 0"),
        (
            _fit(metrics={"train_loss": "low"}),
            "metric 'train_loss' = 'low', expected a finite number >= 0",
        ),
        (
            _fit(metrics={"train_loss": float("nan")}),
            "metric 'train_loss' = nan, expected a finite number >= 0",
        ),
        (
            _fit(metrics={"train_loss": float("inf")}),
            "metric 'train_loss' = inf, expected a finite number >= 0",
        ),
        (
            _fit(metrics={"train_loss": -1.0}),
            "metric 'train_loss' = -1.0, expected a finite number >= 0",
        ),
        (
            _fit(metrics={"train_loss": 1.0, "other": float("-inf")}),
            "metric 'other' = -inf, expected a finite number",
        ),
        (
            _fit(parameters=Parameters(tensors=[b"not numpy"], tensor_type="numpy")),
            "its arrays cannot be read (ValueError",
        ),
        (_fit(arrays=REFERENCE[:-1]), "9 arrays, expected 10"),
        (
            _fit(arrays=[a.astype(np.float64) for a in REFERENCE]),
            "array 0 has dtype float64, expected float32",
        ),
        (
            _fit(arrays=[np.zeros((2, 2), np.float32), *REFERENCE[1:]]),
            "array 0 has shape (2, 2), expected (6, 3, 5, 5)",
        ),
        (
            _fit(arrays=[*REFERENCE[:-1], np.full_like(REFERENCE[-1], np.inf)]),
            "array 9 holds NaN or infinite values",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_an_unsound_update_is_named(res, reason):
    assert check_update(res, REFERENCE).startswith(reason)


@pytest.mark.parametrize(
    "dtype", ["float64", "float16", "int64", "int32", "uint8", "bool", ">f4"]
)
def test_an_array_of_another_dtype_is_refused_naming_the_array_and_both_dtypes(dtype):
    # Same shapes and finite values: only the dtype of array 3 differs.
    arrays = [*REFERENCE[:3], REFERENCE[3].astype(dtype), *REFERENCE[4:]]
    reason = check_update(_fit(arrays=arrays), REFERENCE)
    assert reason == f"array 3 has dtype {np.dtype(dtype)}, expected float32"


def test_an_object_array_is_refused_without_unpickling():
    buffer = BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    parameters = Parameters(tensors=[buffer.getvalue()], tensor_type="numpy.ndarray")
    reason = check_update(_fit(parameters=parameters), REFERENCE)
    assert reason.startswith("its arrays cannot be read (ValueError")


def _evaluation(loss=1.0, num_examples=5, metrics=None) -> EvaluateRes:
    metrics = {"accuracy": 0.5} if metrics is None else metrics
    return EvaluateRes(OK, loss, num_examples, metrics)


@pytest.mark.parametrize(
    ("res", "reason"),
    [
        (_evaluation(), None),
        (_evaluation(metrics={"accuracy": 1}), None),
        (_evaluation(loss=0.0), None),
        (_evaluation(loss=0.25), None),
        (_evaluation(num_examples=1), None),
        (_evaluation(loss=float("inf")), "loss = inf, expected a finite number >= 0"),
        (_evaluation(loss=float("nan")), "loss = nan, expected a finite number >= 0"),
        (_evaluation(loss="1.0"), "loss = '1.0', expected a finite number >= 0"),
        (_evaluation(loss=-0.5), "loss = -0.5, expected a finite number >= 0"),
        (_evaluation(num_examples=0), "num_examples = 0, expected > 0"),
        (
            _evaluation(metrics={"accuracy": float("nan")}),
            "metric 'accuracy' = nan, expected a number in [0, 1]",
        ),
        (
            _evaluation(metrics={"accuracy": 1e9}),
            "metric 'accuracy' = 1000000000.0, expected a number in [0, 1]",
        ),
        (
            _evaluation(metrics={"accuracy": "high"}),
            "metric 'accuracy' = 'high', expected a number in [0, 1]",
        ),
        (
            _evaluation(metrics={}),
            "metric 'accuracy' = None, expected a number in [0, 1]",
        ),
    ],
)
def test_evaluations_are_checked(res, reason):
    assert check_evaluation(res) == reason


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"partition-id": 3, "num-partitions": 10}, (3, 10)),
        ({"partition-id": "3", "num-partitions": 10}, "partition-id = '3', expected"),
        ({"partition-id": 3.0, "num-partitions": 10}, "partition-id = 3.0, expected"),
        ({"partition-id": True, "num-partitions": 10}, "partition-id = True, expected"),
        ({"num-partitions": 10}, "partition-id = None, expected an integer"),
        ({"partition-id": 3}, "num-partitions = None, expected an integer"),
        ({"partition-id": 10, "num-partitions": 10}, "partition-id = 10 is outside"),
        ({"partition-id": -1, "num-partitions": 10}, "partition-id = -1 is outside"),
    ],
)
def test_a_nodes_identity_is_checked(properties, expected):
    answer = _identity(properties)
    if isinstance(expected, tuple):
        assert answer == expected
    else:
        assert answer.startswith(expected)
