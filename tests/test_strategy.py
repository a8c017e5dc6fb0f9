"""CheckedStrategy on its own: checks, partition order, robust rules, composition."""

import random
from dataclasses import replace

import numpy as np
import pytest
from conftest import default_run_config
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    GetPropertiesRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from flower_tutorial.aggregation import robust_combination
from flower_tutorial.client_manager import SeededClientManager
from flower_tutorial.config import RunSettings
from flower_tutorial.recording import RunRecorder
from flower_tutorial.secure_aggregation import SecAggClientError
from flower_tutorial.strategy import CheckedStrategy

SIZE = 50  # one array of 50 floats: the model of these tests
OK = Status(code=Code.OK, message="")


class _Proxy:
    """A node of the federation that holds partition `pid` and says so."""

    def __init__(self, pid: int) -> None:
        self.cid = f"node-{pid}"
        self.pid = pid

    def get_properties(self, ins, timeout, group_id) -> GetPropertiesRes:
        properties = {"partition-id": self.pid, "num-partitions": 10}
        return GetPropertiesRes(OK, properties)


def _sent() -> Parameters:
    return ndarrays_to_parameters([np.zeros(SIZE, dtype=np.float32)])


def _strategy(
    tmp_path,
    num_nodes: int,
    inner: Strategy | None = None,
    aggregation: str = "fedavg",
    secure_aggregation: bool = False,
) -> CheckedStrategy:
    """The app's checks around `inner` (FedAvg), after a fit round was configured."""
    settings = RunSettings.from_run_config(default_run_config())
    manager = SeededClientManager(timeout=5.0, seed=0)
    for pid in range(num_nodes):
        manager.register(_Proxy(pid))
    recorder = RunRecorder(tmp_path, {}, settings.data, 2, False)
    privacy = RunSettings.from_run_config(
        default_run_config() | {"secure-aggregation": secure_aggregation}
    ).privacy
    strategy = CheckedStrategy(
        inner or FedAvg(),
        client_manager=manager,
        recorder=recorder,
        aggregation=aggregation,
        privacy=privacy,
    )
    strategy.configure_fit(1, _sent(), manager)
    return strategy


def _fit_res(array: np.ndarray, num_examples: int = 100) -> FitRes:
    metrics = {"train_loss": 1.0}  # as the app's clients report it
    return FitRes(OK, ndarrays_to_parameters([array]), num_examples, metrics)


def _results(strategy: CheckedStrategy, arrays: list, **kwargs) -> list[tuple]:
    """(proxy, FitRes) of node i for arrays[i]."""
    proxies = strategy.client_manager.all()
    return [(proxies[f"node-{i}"], _fit_res(a, **kwargs)) for i, a in enumerate(arrays)]


def _array(res: tuple[Parameters | None, dict]) -> np.ndarray:
    (array,) = parameters_to_ndarrays(res[0])
    return array


@pytest.mark.parametrize(
    ("aggregation", "resists"),
    [("fedavg", False), ("median", True), ("trimmed-mean", True), ("krum", True)],
)
def test_robust_rules_resist_one_poisoned_update_of_five(
    tmp_path, aggregation, resists
):
    rng = np.random.default_rng(0)
    clean = [rng.normal(1.0, 0.1, SIZE).astype(np.float32) for _ in range(4)]
    poisoned = np.full(SIZE, 1e4, dtype=np.float32)
    strategy = _strategy(tmp_path, 5, aggregation=aggregation)
    combined = _array(
        strategy.aggregate_fit(1, _results(strategy, [*clean, poisoned]), [])
    )
    distance = np.abs(combined - np.mean(clean, axis=0)).max()
    assert bool(distance < 0.5) is resists


def _combined(tmp_path, aggregation: str, arrays: list, **settings) -> np.ndarray:
    """The model a robust rule makes of `arrays` (clients of different sizes).

    The wrapped FedAvg averages copies of the rule's result, weighted: exact to
    within one float32 ulp (`_same`).
    """
    strategy = _strategy(tmp_path, len(arrays), aggregation=aggregation)
    for name, value in settings.items():
        setattr(strategy, name, value)
    results = [
        (proxy, replace(res, num_examples=10 + 7 * i))
        for i, (proxy, res) in enumerate(_results(strategy, arrays))
    ]
    return _array(strategy.aggregate_fit(1, results, []))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a and b are equal to within one ulp, everywhere."""
    return bool(np.all(np.abs(a - b) <= np.spacing(np.abs(b))))


def test_median_is_the_coordinatewise_median(tmp_path):
    rng = np.random.default_rng(2)
    arrays = [rng.normal(0, 1, SIZE).astype(np.float32) for _ in range(5)]
    expected = np.median(np.stack(arrays), axis=0)
    assert _same(_combined(tmp_path, "median", arrays), expected)


def test_trimmed_mean_loses_two_poisoned_updates_of_ten(tmp_path):
    # A 0.2 trim of ten cuts two off each end: both poisoned ones, and the
    # lowest two clean values of each coordinate.
    rng = np.random.default_rng(3)
    clean = np.stack([rng.normal(1, 0.1, SIZE).astype(np.float32) for _ in range(8)])
    poisoned = [np.full(SIZE, 1e4, np.float32), np.full(SIZE, 5e3, np.float32)]
    combined = _combined(
        tmp_path, "trimmed-mean", [*clean, *poisoned], trim_fraction=0.2
    )
    expected = np.sort(clean, axis=0)[2:].mean(axis=0)
    np.testing.assert_allclose(combined, expected, rtol=1e-6)
    # A trim of 0.1 keeps one poisoned update in the mean.
    kept = _combined(
        tmp_path / "b", "trimmed-mean", [*clean, *poisoned], trim_fraction=0.1
    )
    assert kept.min() > 100


def test_a_trimmed_mean_of_too_few_updates_voids_the_round(tmp_path):
    # At trim-fraction 0.2, four sound updates trim int(0.8) = 0 from each end:
    # Flower's trimmed mean is then the plain mean, 250000.75 with one outlier
    # of 1e6. The round changes nothing instead, and says why.
    strategy = _strategy(tmp_path, 5, aggregation="trimmed-mean")
    arrays = [np.full(SIZE, v, np.float32) for v in (1.0, 1.0, 2.0, 1e6)]
    unsound = np.full(SIZE, np.nan, np.float32)  # the fifth, left out
    assert strategy.aggregate_fit(1, _results(strategy, [*arrays, unsound]), []) == (
        None,
        {},
    )
    assert strategy.recorder.rounds[1]["fit_voided"] == (
        "the trimmed mean of 4 sound update(s) trims none at trim-fraction = 0.2: "
        "too few to resist a poisoned one"
    )


def test_krum_returns_exactly_one_clean_update(tmp_path):
    rng = np.random.default_rng(4)
    clean = [rng.normal(1, 0.1, SIZE).astype(np.float32) for _ in range(4)]
    poisoned = np.full(SIZE, 1e4, np.float32)
    combined = _combined(tmp_path, "krum", [*clean, poisoned], krum_byzantine=1)
    assert sum(_same(combined, c) for c in clean) == 1


def test_krum_returns_the_chosen_update_bit_for_bit_whatever_its_examples():
    # Multi-Krum of one would average the chosen update with itself, weighted:
    # (x * n) / n, which rounds some float32 values of x away (11 of these 50).
    rng = np.random.default_rng(4)
    clean = [rng.normal(1, 0.1, SIZE).astype(np.float32) for _ in range(4)]
    poisoned = np.full(SIZE, 1e4, np.float32)
    results = [_fit_res(a, 10 + 7 * i) for i, a in enumerate([*clean, poisoned])]
    (combined,) = robust_combination("krum", results, 0.2, 1)
    assert sum(np.array_equal(combined, c) for c in clean) == 1


def test_an_unknown_robust_rule_is_refused_naming_the_rules():
    with pytest.raises(ValueError) as err:
        robust_combination("mean", [_fit_res(np.zeros(SIZE, np.float32))], 0.2, 1)
    assert str(err.value) == (
        "unknown robust rule 'mean': expected one of ('median', 'trimmed-mean', 'krum')"
    )


def test_fedavg_weighs_each_client_by_its_examples(tmp_path):
    arrays = [np.full(SIZE, v, np.float32) for v in (1.0, 2.0, 4.0)]
    combined = _combined(tmp_path, "fedavg", arrays)
    sizes = np.array([10, 17, 24])  # as _combined gives them
    expected = (sizes * np.array([1.0, 2.0, 4.0])).sum() / sizes.sum()
    np.testing.assert_allclose(combined, np.full(SIZE, expected), rtol=1e-6)


def test_shuffled_results_give_the_same_bytes(tmp_path):
    # Completion order varies between runs; the sum must not.
    rng = np.random.default_rng(1)
    arrays = [rng.normal(0, 1, SIZE).astype(np.float32) for _ in range(6)]
    strategy = _strategy(tmp_path, 6)
    proxies = strategy.client_manager.all()
    # Of different sizes, so that the order of a weighted sum could show.
    results = [
        (proxies[f"node-{i}"], _fit_res(a, num_examples=10 + i))
        for i, a in enumerate(arrays)
    ]
    first = _array(strategy.aggregate_fit(1, list(results), [])).tobytes()
    for seed in range(5):
        random.Random(seed).shuffle(results)
        assert _array(strategy.aggregate_fit(1, list(results), [])).tobytes() == first


def test_checks_compose_with_a_server_side_optimizer(tmp_path):
    # FedAdam inside the checks gets only the sound updates: the same model as a
    # FedAdam that never saw the unsound one.
    good = [np.full(SIZE, v, dtype=np.float32) for v in (1.0, 2.0)]
    nan = np.full(SIZE, np.nan, dtype=np.float32)
    strategy = _strategy(tmp_path, 3, inner=FedAdam(initial_parameters=_sent()))
    checked = strategy.aggregate_fit(1, _results(strategy, [*good, nan]), [])
    alone = FedAdam(initial_parameters=_sent()).aggregate_fit(
        1, _results(strategy, good), []
    )
    # In the model's float32: FedAdam itself computes in float64.
    assert _array(checked).dtype == np.float32
    np.testing.assert_array_equal(_array(checked), _array(alone).astype(np.float32))
    assert strategy.recorder.rounds[1]["fit_failures"] == [
        "partition 2: array 0 holds NaN or infinite values"
    ]


def test_a_robust_rule_composes_with_fedprox(tmp_path):
    arrays = [np.full(SIZE, v, dtype=np.float32) for v in (1.0, 2.0, 9.0)]
    strategy = _strategy(
        tmp_path, 3, inner=FedProx(proximal_mu=0.1), aggregation="median"
    )
    combined = _array(strategy.aggregate_fit(1, _results(strategy, arrays), []))
    np.testing.assert_allclose(combined, np.median(arrays, axis=0), rtol=1e-6)


def test_checks_work_inside_flowers_dp_wrapper(tmp_path):
    # Central DP (client-side clipping) wraps the checks; with no noise the model
    # is the average of the sound updates, and the unsound one is recorded.
    strategy = _strategy(tmp_path, 3)
    dp = DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=0.0, clipping_norm=10.0, num_sampled_clients=3
    )
    good = [np.full(SIZE, v, dtype=np.float32) for v in (1.0, 3.0)]
    wrong = np.zeros(SIZE + 1, dtype=np.float32)
    combined = _array(dp.aggregate_fit(1, _results(strategy, [*good, wrong]), []))
    np.testing.assert_array_equal(combined, np.full(SIZE, 2.0, dtype=np.float32))
    (reason,) = strategy.recorder.rounds[1]["fit_failures"]
    assert reason == "partition 2: array 0 has shape (51,), expected (50,)"


def test_an_evaluation_without_replies_ends_the_round_quietly(tmp_path):
    # Every evaluation reply missing (DefaultWorkflow's timeout): nothing to average,
    # nothing failed, the round is recorded and the run goes on.
    strategy = _strategy(tmp_path, 3)
    assert strategy.configure_evaluate(1, _sent(), strategy.client_manager)
    assert strategy.aggregate_evaluate(1, [], []) == (None, {})
    assert strategy.recorder.rounds[1]["evaluate_clients"] == 0
    assert (tmp_path / "checkpoint.pt").exists()


def test_unsound_evaluations_are_left_out(tmp_path):
    strategy = _strategy(tmp_path, 3)
    proxies = strategy.client_manager.all()

    def res(loss: float, n: int, pid: int) -> tuple:
        return proxies[f"node-{pid}"], EvaluateRes(OK, loss, n, {"accuracy": 0.5})

    assert strategy.configure_evaluate(1, _sent(), strategy.client_manager)
    loss, _ = strategy.aggregate_evaluate(
        1, [res(1.0, 10, 0), res(float("nan"), 10, 1), res(3.0, 0, 2)], []
    )
    assert loss == 1.0
    failures = strategy.recorder.rounds[1]["evaluate_failures"]
    assert failures == [
        "partition 1: loss = nan, expected a finite number >= 0",
        "partition 2: num_examples = 0, expected > 0",
    ]


def test_a_round_in_which_no_result_came_in_time_ends_the_run(tmp_path):
    strategy = _strategy(tmp_path, 2)
    expired = ValueError(
        "Message contains an Error (reason: Error: Message Unavailable - The "
        "requested message could not be found in the database. It may have "
        "expired due to its TTL, been deleted ...)"
    )
    with pytest.raises(
        RuntimeError,
        match=r"All 2 clients failed in round 3 \(fit\); the first said: "
        r"no reply within round-timeout",
    ):
        strategy.aggregate_fit(3, [], [expired, expired])


def test_a_halted_secure_round_is_voided_unless_every_client_failed(tmp_path):
    # SecAgg+ halts a round without calling aggregate_fit; its workflow hands
    # the round's failures over. A client that failed at unmasking had its
    # update summed: it does not count toward "every client failed".
    strategy = _strategy(tmp_path, 3, secure_aggregation=True)
    nodes = list(strategy.client_manager.clients)
    crashed = [SecAggClientError(nodes[0], Stage.SHARE_KEYS, "crashed")]
    late = SecAggClientError(nodes[1], Stage.UNMASK, "gone")
    strategy.record_halted_fit(1, [*crashed, late])
    record = strategy.recorder.rounds[1]
    assert record["fit_clients"] == 0
    assert record["fit_failures"] == ["partition 0, SecAgg+ stage share_keys: crashed"]
    assert record["fit_voided"].startswith(
        "secure aggregation halted before the sum was unmasked: 1 of the 3 "
        "clients asked failed before their update was summed, 1 at unmasking"
    )
    every = [SecAggClientError(n, Stage.SETUP, "no keys") for n in nodes]
    with pytest.raises(RuntimeError, match=r"All 3 clients failed in round 1"):
        strategy.record_halted_fit(1, every)


@pytest.mark.parametrize(
    ("aggregate", "why"),
    [
        (
            ndarrays_to_parameters([np.ones(SIZE), np.ones(SIZE)]),
            "2 arrays, expected 1",
        ),
        (
            Parameters(tensors=[b"not an array"], tensor_type="numpy.ndarray"),
            "its arrays cannot be read",
        ),
        (ndarrays_to_parameters([np.ones(SIZE + 1)]), "array 0 has shape (51,)"),
    ],
    ids=["array-count", "unreadable", "shape"],
)
def test_an_unsound_secure_aggregate_voids_the_round(tmp_path, aggregate, why):
    # SecAgg+ hands every result the same aggregate: one that cannot stand for
    # the model changes nothing, and the record says why.
    strategy = _strategy(tmp_path, 3, secure_aggregation=True)
    results = [
        (proxy, replace(res, parameters=aggregate))
        for proxy, res in _results(strategy, [np.ones(SIZE, np.float32)] * 3)
    ]
    assert strategy.aggregate_fit(1, results, []) == (None, {})
    voided = strategy.recorder.rounds[1]["fit_voided"]
    assert voided.startswith(f"the secure aggregate is unsound: {why}")


def test_a_secure_aggregate_becomes_the_model_in_its_dtype(tmp_path):
    strategy = _strategy(tmp_path, 3, secure_aggregation=True)
    mean = ndarrays_to_parameters([np.full(SIZE, 0.5)])  # float64, as SecAgg+'s
    results = [
        (proxy, replace(res, parameters=mean))
        for proxy, res in _results(strategy, [np.ones(SIZE, np.float32)] * 3)
    ]
    model = _array(strategy.aggregate_fit(1, results, []))
    np.testing.assert_array_equal(model, np.full(SIZE, 0.5, np.float32))


def test_updates_in_another_dtype_are_left_out_and_the_rest_averaged(tmp_path):
    # The model sent is float32: a float64 or an integer update is not averaged in.
    strategy = _strategy(tmp_path, 4)
    arrays = [
        np.full(SIZE, 1.0, np.float32),
        np.full(SIZE, 5.0, np.float64),
        np.full(SIZE, 3.0, np.float32),
        np.full(SIZE, 7, np.int64),
    ]
    combined = _array(strategy.aggregate_fit(1, _results(strategy, arrays), []))
    assert combined.dtype == np.float32
    np.testing.assert_array_equal(combined, np.full(SIZE, 2.0, np.float32))
    record = strategy.recorder.rounds[1]
    assert record["fit_failures"] == [
        "partition 1: array 0 has dtype float64, expected float32",
        "partition 3: array 0 has dtype int64, expected float32",
    ]
    assert record["fit_examples"] == {"0": 100, "2": 100}


def test_two_nodes_of_one_partition_are_both_averaged_and_named_apart(tmp_path):
    # node-a and node-b both say partition 3: both count, in (partition, node) order.
    settings = RunSettings.from_run_config(default_run_config())
    manager = SeededClientManager(timeout=5.0, seed=0)
    for cid, pid in (("node-b", 3), ("node-a", 3), ("node-c", 1)):
        proxy = _Proxy(pid)
        proxy.cid = cid
        manager.register(proxy)
    recorder = RunRecorder(tmp_path, {}, settings.data, 2, False)
    strategy = CheckedStrategy(FedAvg(), client_manager=manager, recorder=recorder)
    assert len(strategy.configure_fit(1, _sent(), manager)) == 3
    proxies = manager.all()
    results = [
        (proxies["node-b"], _fit_res(np.full(SIZE, 2.0, np.float32), 20)),
        (proxies["node-c"], _fit_res(np.full(SIZE, 4.0, np.float32), 30)),
        (proxies["node-a"], _fit_res(np.full(SIZE, 1.0, np.float32), 10)),
    ]
    combined = _array(strategy.aggregate_fit(1, results, []))
    np.testing.assert_allclose(combined, np.full(SIZE, 17 / 6), rtol=1e-6)
    examples = strategy.recorder.rounds[1]["fit_examples"]
    assert list(examples.items()) == [("1", 30), ("3", 10), ("3 (node node-b)", 20)]
    assert strategy.recorder.rounds[1]["fit_failures"] == []
