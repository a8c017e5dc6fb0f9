"""The ClientApp's FlowerClient and client_fn, and the ServerApp's pieces."""

import numpy as np
import pytest
import torch
from conftest import NUM_TRAIN, make_split
from flwr.common import (
    Context,
    GetParametersIns,
    RecordDict,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from flower_tutorial import client_app, task
from flower_tutorial.client_app import FlowerClient, client_fn
from flower_tutorial.client_manager import SeededClientManager
from flower_tutorial.config import NodeSettings, RunSettings
from flower_tutorial.server_app import server_fn, weighted_average
from flower_tutorial.strategy import CheckedStrategy
from flower_tutorial.task import Net, get_parameters, load_data, set_seed

NUM_PARTITIONS = 4


def _context(run_config: dict, node_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config=node_config or {},
        state=RecordDict(),
        run_config=run_config,
    )


@pytest.fixture
def client(run_config) -> FlowerClient:
    settings = RunSettings.from_run_config(run_config)
    node = NodeSettings(partition_id=1, num_partitions=NUM_PARTITIONS)
    trainloader, valloader = load_data(1, NUM_PARTITIONS, settings.data)
    return FlowerClient(Net(), trainloader, valloader, settings, node)


def test_fit_trains_and_counts_examples_not_batches(client):
    set_seed(0)
    initial = get_parameters(Net())
    params, num_examples, metrics = client.fit(initial, {"server-round": 1})
    assert num_examples == int(NUM_TRAIN / NUM_PARTITIONS * 0.8)  # 48, not 3 batches
    assert [p.shape for p in params] == [p.shape for p in initial]
    assert [p.dtype for p in params] == [p.dtype for p in initial]
    assert any(not np.array_equal(a, b) for a, b in zip(params, initial, strict=True))
    assert set(metrics) == {"train_loss"} and metrics["train_loss"] > 0


def test_fit_is_reproducible_for_the_same_round(client):
    initial = get_parameters(Net())
    first, _, _ = client.fit(initial, {"server-round": 3})
    again, _, _ = client.fit(initial, {"server-round": 3})
    other, _, _ = client.fit(initial, {"server-round": 4})
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_fit_seeds_its_shuffling_with_the_run_seed_partition_and_round(
    client, monkeypatch
):
    seeds = []
    monkeypatch.setattr(client_app, "set_seed", lambda *seed: seeds.append(seed))
    monkeypatch.setattr(client_app, "train", lambda *args, **kwargs: 1.0)
    client.fit(get_parameters(Net()), {"server-round": 3})
    assert seeds == [(42, 1, 3)]  # the default seed, partition 1, round 3


def test_get_properties_names_the_nodes_partition_and_their_number(client):
    assert client.get_properties({}) == {"partition-id": 1, "num-partitions": 4}


def test_the_client_loads_trains_and_evaluates_on_the_device_get_device_picks(
    monkeypatch, run_config, tmp_path
):
    # A GPU, as get_device would pick it there; the spies never use it.
    gpu = torch.device("cuda", 1)
    settings = RunSettings.from_run_config(run_config)
    loaders = load_data(1, NUM_PARTITIONS, settings.data)
    calls = []

    def load(*args):
        calls.append(("load", args[-1]))
        return loaders

    def train(net, trainloader, epochs, learning_rate, device, proximal_mu):
        calls.append(("train", device))
        return 1.0

    def test(net, testloader, device):
        calls.append(("test", device))
        return 0.5, 0.25

    monkeypatch.setattr(client_app, "get_device", lambda: gpu)
    monkeypatch.setattr(client_app, "load_data", load)
    monkeypatch.setattr(client_app, "load_local_data", load)
    monkeypatch.setattr(client_app, "train", train)
    monkeypatch.setattr(client_app, "test", test)
    node_config = {"partition-id": 1, "num-partitions": NUM_PARTITIONS}
    numpy_client = client_fn(_context(run_config, node_config)).numpy_client
    assert numpy_client.device == gpu
    initial = get_parameters(Net())
    numpy_client.fit(initial, {"server-round": 1})
    assert numpy_client.evaluate(initial, {})[0] == 0.5
    client_fn(_context(run_config, node_config | {"data-path": str(tmp_path)}))
    assert calls == [("load", gpu), ("train", gpu), ("test", gpu), ("load", gpu)]


def test_evaluate_returns_loss_examples_and_accuracy(client):
    net = Net()
    loss, num_examples, metrics = client.evaluate(get_parameters(net), {})
    # What the tutorial's `test` gives on the client's validation split.
    expected_loss, expected_accuracy = task.test(
        net, client.valloader, torch.device("cpu")
    )
    assert loss == expected_loss and metrics == {"accuracy": expected_accuracy}
    assert num_examples == NUM_TRAIN // NUM_PARTITIONS - 48


@pytest.mark.parametrize(
    "setting", [{"local-epochs": 2}, {"learning-rate": 0.05}, {"batch-size": 8}]
)
def test_each_training_setting_reaches_fit(run_config, setting):
    def trained(config: dict) -> list[np.ndarray]:
        settings = RunSettings.from_run_config(config)
        node = NodeSettings(partition_id=1, num_partitions=NUM_PARTITIONS)
        trainloader, valloader = load_data(1, NUM_PARTITIONS, settings.data)
        client = FlowerClient(Net(), trainloader, valloader, settings, node)
        parameters, _, _ = client.fit(initial, {"server-round": 1})
        return parameters

    initial = get_parameters(Net())
    default, changed = trained(run_config), trained(run_config | setting)
    assert not all(np.array_equal(a, b) for a, b in zip(default, changed, strict=True))


def test_robust_settings_reach_the_strategy(run_config):
    run_config |= {"aggregation": "krum", "trim-fraction": 0.3, "krum-byzantine": 2}
    strategy = server_fn(_context(run_config)).strategy
    assert strategy.aggregation == "krum"
    assert strategy.trim_fraction == 0.3
    assert strategy.krum_byzantine == 2


def test_client_fn_builds_the_client_of_its_partition(run_config):
    node_config = {"partition-id": 2, "num-partitions": NUM_PARTITIONS}
    client = client_fn(_context(run_config, node_config))
    res = client.get_parameters(GetParametersIns(config={}))  # a flwr Client
    assert len(parameters_to_ndarrays(res.parameters)) == len(get_parameters(Net()))
    numpy_client = client.numpy_client
    assert numpy_client.partition_id == 2
    assert len(numpy_client.trainloader.dataset) == 48
    assert numpy_client.trainloader.batch_size == 16


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"partition-id": 4, "num-partitions": 4}, r"'partition-id' = 4 .*\[0, 4\)"),
        ({"partition-id": 0, "num-partitions": 0}, r"'num-partitions' = 0 .*>= 1"),
        (
            {"partition-id": 0, "num-partitions": 4, "data-path": "/no/such/site"},
            r"'data-path' = '/no/such/site' .*no such folder",
        ),
        (
            {"partition-id": 0, "num-partitions": 4, "data-path": "NOT_A_DATASET"},
            r"'data-path' = '.*' lacks the column\(s\) \['img', 'label'\]",
        ),
    ],
    ids=["partition-outside", "no-partitions", "missing-folder", "malformed-folder"],
)
def test_client_fn_refuses_a_bad_node_config(
    run_config, tmp_path, node_config, message
):
    if node_config.get("data-path") == "NOT_A_DATASET":
        (tmp_path / "notes.txt").write_text("not a dataset")
        node_config = node_config | {"data-path": str(tmp_path)}
    with pytest.raises(ValueError, match=message):
        client_fn(_context(run_config, node_config))


def test_client_fn_builds_a_client_on_its_own_data_folder(run_config, tmp_path):
    make_split(25, 3).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    node_config = {"partition-id": 0, "num-partitions": 1, "data-path": str(tmp_path)}
    numpy_client = client_fn(_context(run_config, node_config)).numpy_client
    assert len(numpy_client.trainloader.dataset) == 20
    assert len(numpy_client.valloader.dataset) == 5


def test_weighted_average_weighs_by_examples():
    metrics = [
        (10, {"accuracy": 0.5, "train_loss": 2.0, "note": "x"}),
        (30, {"accuracy": 0.9, "train_loss": 1.0}),
    ]
    assert weighted_average(metrics) == pytest.approx(
        {"accuracy": 0.8, "train_loss": 1.25}
    )
    assert weighted_average([(0, {"accuracy": 1.0})]) == {}
    assert weighted_average([]) == {}


def test_server_fn_builds_fedavg_from_the_run_config(run_config):
    run_config |= {
        "num-server-rounds": 3,
        "fraction-evaluate": 0.25,
        "round-timeout": 30.0,
        "node-wait-timeout": 7.5,
    }
    components = server_fn(_context(run_config))
    assert isinstance(components.strategy, CheckedStrategy)
    strategy = components.strategy.strategy
    assert isinstance(strategy, FedAvg)
    assert components.config.num_rounds == 3
    assert components.config.round_timeout == 30.0
    assert isinstance(components.client_manager, SeededClientManager)
    assert components.client_manager.timeout == 7.5
    assert components.strategy.client_manager is components.client_manager
    assert strategy.fraction_fit == 1.0
    assert strategy.fraction_evaluate == 0.25
    assert strategy.min_fit_clients == 10
    assert strategy.min_evaluate_clients == 5
    assert strategy.min_available_clients == 10
    assert strategy.evaluate_metrics_aggregation_fn is weighted_average
    assert strategy.fit_metrics_aggregation_fn is weighted_average
    assert strategy.on_fit_config_fn(2) == {"server-round": 2}


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("fedavg", FedAvg, {}),
        ("fedprox", FedProx, {"proximal_mu": 0.3}),
        (
            "fedadam",
            FedAdam,
            {"eta": 0.05, "eta_l": 0.002, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3},
        ),
        (
            "fedyogi",
            FedYogi,
            {"eta": 0.05, "eta_l": 0.002, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3},
        ),
        ("fedadagrad", FedAdagrad, {"eta": 0.05, "eta_l": 0.002, "tau": 1e-3}),
        (
            "fedavgm",
            FedAvgM,
            {"server_learning_rate": 0.05, "server_momentum": 0.7},
        ),
    ],
)
def test_server_fn_builds_the_strategy_chosen(run_config, name, cls, expected):
    run_config |= {
        "strategy": name,
        "proximal-mu": 0.3,
        "server-learning-rate": 0.05,
        "server-momentum": 0.7,
        "beta-1": 0.8,
        "beta-2": 0.95,
        "tau": 1e-3,
        "learning-rate": 0.002,
        "fraction-evaluate": 0.25,
    }
    components = server_fn(_context(run_config))
    strategy = components.strategy.strategy
    assert type(strategy) is cls
    assert {key: getattr(strategy, key) for key in expected} == expected
    # What every strategy shares comes from the run config too.
    assert strategy.fraction_evaluate == 0.25
    assert strategy.fit_metrics_aggregation_fn is weighted_average
    assert strategy.initial_parameters is not None


def test_fedprox_pulls_the_update_towards_the_global_model(client):
    initial = get_parameters(Net())

    def distance(config: dict) -> float:
        params, _, _ = client.fit(initial, {"server-round": 1} | config)
        return sum(
            float(((a - b) ** 2).sum()) for a, b in zip(params, initial, strict=True)
        )

    free, pulled = distance({}), distance({"proximal_mu": 10.0})
    assert pulled < 0.5 * free
    assert distance({"proximal_mu": 0.0}) == free  # mu 0: the tutorial's loss


def test_server_fn_makes_the_initial_model_from_the_seed(run_config):
    def initial(seed: int) -> list[np.ndarray]:
        strategy = server_fn(_context(run_config | {"seed": seed})).strategy.strategy
        return parameters_to_ndarrays(strategy.initial_parameters)

    first, again, other = initial(1), initial(1), initial(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_a_round_where_every_client_failed_ends_the_run(run_config):
    strategy = server_fn(_context(run_config)).strategy
    failures = [ValueError("dataset folder not found"), RuntimeError("boom")]
    with pytest.raises(RuntimeError, match=r"All 2 clients failed in round 3 \(fit\)"):
        strategy.aggregate_fit(3, [], failures)
    with pytest.raises(RuntimeError, match="ValueError: dataset folder not found"):
        strategy.aggregate_evaluate(1, [], failures)


def test_too_few_nodes_end_the_run_with_what_to_change():
    manager = SeededClientManager(timeout=0.2, seed=0)
    with pytest.raises(RuntimeError) as err:
        manager.sample(num_clients=10, min_num_clients=10)
    message = str(err.value)
    assert "needs 10 SuperNodes but only 0 connected" in message
    assert '--federation-config "num-supernodes=10"' in message
