"""The ClientApp's FlowerClient and client_fn, and the ServerApp's pieces."""

import math
import random
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NUM_TRAIN, make_context, make_split
from flwr.common import GetParametersIns, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from flower_tutorial import checkpoint, client_app, server_app, task
from flower_tutorial.client_app import FlowerClient, client_fn
from flower_tutorial.client_manager import SeededClientManager
from flower_tutorial.config import (
    DataSettings,
    NodeSettings,
    PrivacySettings,
    RunSettings,
)
from flower_tutorial.differential_privacy import (
    AdaptiveClipping,
    FixedClipping,
    PrivacyLedger,
)
from flower_tutorial.server_app import (
    centralized_evaluation,
    run_rounds,
    server_fn,
    weighted_average,
)
from flower_tutorial.strategy import CheckedStrategy
from flower_tutorial.task import (
    Net,
    get_parameters,
    load_data,
    load_test_data,
    set_seed,
)

NUM_PARTITIONS = 4


@pytest.fixture
def client(run_config) -> FlowerClient:
    settings = RunSettings.from_run_config(run_config)
    node = NodeSettings(partition_id=1, num_partitions=NUM_PARTITIONS)
    trainloader, valloader = load_data(1, NUM_PARTITIONS, settings.data)
    return FlowerClient(Net(), trainloader, valloader, settings, node)


def test_the_client_uses_task_py_itself():
    # Imported at its first use (for messages that need the model): the same names.
    assert client_app.task.Net is task.Net
    assert client_app.task.train is task.train


def test_a_lazy_module_is_imported_at_its_first_use_once_for_all_threads(
    tmp_path, monkeypatch
):
    ran = tmp_path / "ran"
    # Slow to import, as PyTorch is: other threads ask for it meanwhile.
    (tmp_path / "lazily_imported.py").write_text(
        f"import time\nopen({str(ran)!r}, 'a').write('ran ')\n"
        "time.sleep(0.5)\nANSWER = 42\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    try:
        lazy = client_app.LazyModule("lazily_imported")
        assert not ran.exists() and "lazily_imported" not in sys.modules
        answers, errors = [], []

        def ask() -> None:
            try:
                answers.append(lazy.ANSWER)
            except Exception as error:  # noqa: BLE001 - what a thread saw, to assert
                errors.append(error)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []
        assert answers == [42] * 4
        assert ran.read_text() == "ran "  # imported once
        assert sys.modules["lazily_imported"].ANSWER == 42
    finally:
        sys.modules.pop("lazily_imported", None)


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
    monkeypatch.setattr(client_app.task, "set_seed", lambda *seed: seeds.append(seed))
    monkeypatch.setattr(client_app.task, "train", lambda *args, **kwargs: 1.0)
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

    monkeypatch.setattr(client_app.task, "get_device", lambda: gpu)
    monkeypatch.setattr(client_app.task, "load_data", load)
    monkeypatch.setattr(client_app.task, "load_local_data", load)
    monkeypatch.setattr(client_app.task, "train", train)
    monkeypatch.setattr(client_app.task, "test", test)
    node_config = {"partition-id": 1, "num-partitions": NUM_PARTITIONS}
    numpy_client = client_fn(make_context(run_config, node_config)).numpy_client
    assert numpy_client.device == gpu
    initial = get_parameters(Net())
    numpy_client.fit(initial, {"server-round": 1})
    assert numpy_client.evaluate(initial, {})[0] == 0.5
    client_fn(make_context(run_config, node_config | {"data-path": str(tmp_path)}))
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
    strategy = server_fn(make_context(run_config)).strategy
    assert strategy.aggregation == "krum"
    assert strategy.trim_fraction == 0.3
    assert strategy.krum_byzantine == 2


def test_client_fn_builds_the_client_of_its_partition(run_config):
    node_config = {"partition-id": 2, "num-partitions": NUM_PARTITIONS}
    client = client_fn(make_context(run_config, node_config))
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
        client_fn(make_context(run_config, node_config))


def test_client_fn_builds_a_client_on_its_own_data_folder(run_config, tmp_path):
    make_split(25, 3).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    node_config = {"partition-id": 0, "num-partitions": 1, "data-path": str(tmp_path)}
    numpy_client = client_fn(make_context(run_config, node_config)).numpy_client
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
        "fraction-fit": 0.5,
        "seed": 7,
    }
    components = server_fn(make_context(run_config))
    assert isinstance(components.strategy, CheckedStrategy)
    strategy = components.strategy.strategy
    assert isinstance(strategy, FedAvg)
    assert components.config.num_rounds == 3
    assert components.config.round_timeout == 30.0
    assert isinstance(components.client_manager, SeededClientManager)
    assert components.client_manager.timeout == 7.5
    assert components.strategy.client_manager is components.client_manager
    # The client manager samples with the run's seed.
    assert components.client_manager.sampler_state() == random.Random(7).getstate()
    assert strategy.fraction_fit == 0.5
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
    components = server_fn(make_context(run_config))
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
        context = make_context(run_config | {"seed": seed})
        strategy = server_fn(context).strategy.strategy
        return parameters_to_ndarrays(strategy.initial_parameters)

    first, again, other = initial(1), initial(1), initial(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_server_fn_starts_from_the_initial_checkpoint(run_config, tmp_path):
    set_seed(123)
    saved = Net()
    torch.save(saved.state_dict(), tmp_path / "start.pt")
    run_config["initial-checkpoint"] = str(tmp_path / "start.pt")
    strategy = server_fn(make_context(run_config)).strategy.strategy
    got = parameters_to_ndarrays(strategy.initial_parameters)
    for array, want in zip(got, get_parameters(saved), strict=True):
        np.testing.assert_array_equal(array, want)


def test_a_round_where_every_client_failed_ends_the_run(run_config):
    strategy = server_fn(make_context(run_config)).strategy
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


def test_server_fn_records_into_a_new_folder_named_after_the_run(run_config):
    run_config |= {"num-server-rounds": 3, "save-best-model": True}
    recorder = server_fn(make_context(run_config, run_id=77)).strategy.recorder
    assert recorder.run_dir.parent == Path(run_config["output-dir"]).resolve()
    assert recorder.run_dir.name.endswith("-77") and recorder.run_dir.is_dir()
    assert recorder.run_config == run_config
    assert recorder.data == RunSettings.from_run_config(run_config).data
    assert recorder.num_rounds == 3
    assert recorder.save_best_model is True
    run_config["save-best-model"] = False
    recorder = server_fn(make_context(run_config)).strategy.recorder
    assert recorder.save_best_model is False


def _expected_evaluation(run_config: dict, parameters: list) -> tuple:
    """What the tutorial's `test` gives for `parameters` on the whole test split."""
    net, device = Net(), task.get_device()
    task.set_parameters(net, parameters)
    testloader = load_test_data(RunSettings.from_run_config(run_config).data, device)
    loss, accuracy = task.test(net, testloader, device)
    return loss, {"accuracy": accuracy}


def test_centralized_evaluation_is_the_tutorials_test_on_the_test_split(run_config):
    evaluate = centralized_evaluation(RunSettings.from_run_config(run_config).data)
    set_seed(3)
    parameters = get_parameters(Net())  # not the model it was made with
    assert evaluate(2, parameters, {}) == _expected_evaluation(run_config, parameters)


def test_centralized_evaluation_decodes_and_evaluates_on_the_device_get_device_picks(
    monkeypatch, run_config
):
    # A GPU, as get_device would pick it there; the spies never use it.
    gpu = torch.device("cuda", 1)
    testloader = load_test_data(RunSettings.from_run_config(run_config).data)
    calls = []

    def load(*args):
        calls.append(("load", args[-1]))
        return testloader

    def test(net, loader, device):
        calls.append(("test", device))
        return 0.5, 0.25

    monkeypatch.setattr(server_app, "get_device", lambda: gpu)
    monkeypatch.setattr(server_app, "load_test_data", load)
    monkeypatch.setattr(server_app, "test", test)
    evaluate = centralized_evaluation(RunSettings.from_run_config(run_config).data)
    assert evaluate(1, get_parameters(Net()), {}) == (0.5, {"accuracy": 0.25})
    assert calls == [("load", gpu), ("test", gpu)]


def test_server_fn_evaluates_the_global_model_centrally_only_when_asked(run_config):
    inner = server_fn(make_context(run_config)).strategy.strategy
    parameters = parameters_to_ndarrays(inner.initial_parameters)
    assert inner.evaluate(0, inner.initial_parameters) == _expected_evaluation(
        run_config, parameters
    )
    run_config["centralized-evaluation"] = False
    inner = server_fn(make_context(run_config)).strategy.strategy
    assert inner.evaluate_fn is None
    assert inner.evaluate(0, inner.initial_parameters) is None


@pytest.mark.parametrize(
    ("dp", "wrapper"),
    [("central-fixed", FixedClipping), ("central-adaptive", AdaptiveClipping)],
)
def test_server_fn_wraps_the_strategy_in_central_dp(run_config, dp, wrapper):
    run_config |= {
        "dp": dp,
        "dp-noise-multiplier": 0.4,
        "dp-clipping-norm": 2.5,
        "min-fit-clients": 6,
        "min-available-clients": 6,
    }
    checked = server_fn(make_context(run_config)).strategy
    assert type(checked.strategy) is wrapper
    assert type(checked.strategy.strategy) is FedAvg
    assert checked.strategy.strategy.min_fit_clients == 6
    assert checked.strategy.num_sampled_clients == 6  # until a round samples
    assert checked.strategy.clipping_norm == 2.5
    if dp == "central-fixed":
        assert checked.strategy.noise_multiplier == 0.4
    else:
        # Part of the noise goes to the count of clipped updates: std 6 / 20.
        assert checked.strategy.clipped_count_stddev == 0.3
        assert checked.strategy.noise_multiplier == pytest.approx(
            (0.4**-2 - (2 * 0.3) ** -2) ** -0.5
        )


@pytest.mark.parametrize("dp", ["none", "local", "central-fixed", "central-adaptive"])
def test_server_fn_counts_the_privacy_spent_under_dp_only(run_config, dp):
    run_config |= {
        "dp": dp,
        "dp-noise-multiplier": 0.4,
        "dp-local-epsilon": 5.0,
        "dp-delta": 1e-4,
        "dp-max-epsilon": 8.0,
    }
    checked = server_fn(make_context(run_config)).strategy
    assert checked.central_dp is dp.startswith("central")
    if dp == "none":
        assert checked.ledger is None
        return
    assert isinstance(checked.ledger, PrivacyLedger)
    assert (checked.ledger.delta, checked.ledger.max_epsilon) == (1e-4, 8.0)
    planned = checked.ledger.release.planned_release()
    if dp == "local":
        # The Gaussian mechanism's multiplier for epsilon and delta.
        assert planned == [math.sqrt(2 * math.log(1.25e4)) / 5.0]
    else:
        # Adaptive clipping splits z between the update and the count: the two
        # compose to z (RDP adds 1 / z**2).
        assert sum(z**-2 for z in planned) == pytest.approx(0.4**-2)
        assert len(planned) == (2 if dp == "central-adaptive" else 1)


@pytest.mark.parametrize("secure", [False, True])
def test_server_fn_tells_the_checks_whether_updates_come_secured(run_config, secure):
    run_config["secure-aggregation"] = secure
    assert server_fn(make_context(run_config)).strategy.secure_aggregation is secure


def _save_run(run_dir: Path, run_config: dict) -> checkpoint.Checkpoint:
    """A checkpoint of a run of `run_config` after its round 2 (of 2)."""
    set_seed(9)
    numpy_rng, python_rng = checkpoint.random_states()
    saved = checkpoint.Checkpoint(
        server_round=2,
        model=get_parameters(Net()),
        history={
            "run_config": run_config | {"num-server-rounds": 2},
            "rounds": [{"round": r} for r in range(3)],
            "num_partitions": 10,
            "nodes_left_out": [],
            "best_round": None,
        },
        strategy={},
        privacy=None,
        sampler=random.Random(5).getstate(),
        numpy_rng=numpy_rng,
        python_rng=python_rng,
    )
    run_dir.mkdir()
    checkpoint.save(saved, run_dir)
    return saved


def test_server_fn_resumes_a_saved_run_in_its_own_folder(run_config, tmp_path):
    run_dir = tmp_path / "run"
    saved = _save_run(run_dir, run_config)
    # Extended from 2 rounds to 4: a change a resumed run may make.
    resumed = run_config | {"resume-from": str(run_dir), "num-server-rounds": 4}
    components = server_fn(make_context(resumed))
    checked = components.strategy
    initial = parameters_to_ndarrays(checked.strategy.initial_parameters)
    assert all(np.array_equal(a, b) for a, b in zip(initial, saved.model, strict=True))
    assert checked.first_round == 3
    assert [r["after_round"] for r in checked.recorder.resumed] == [2]
    assert components.client_manager.sampler_state() == saved.sampler
    assert checked.recorder.run_dir == run_dir.resolve()
    assert not Path(run_config["output-dir"]).exists()  # no new run folder


def test_server_fn_refuses_to_resume_a_run_with_another_config(run_config, tmp_path):
    run_dir = tmp_path / "run"
    _save_run(run_dir, run_config)
    resumed = run_config | {"resume-from": str(run_dir), "num-server-rounds": 4}
    with pytest.raises(
        ValueError,
        match=r"differs from the saved run's in learning-rate = 0\.001 -> 0\.5\. Only",
    ):
        server_fn(make_context(resumed | {"learning-rate": 0.5}))
    with pytest.raises(ValueError, match="'num-server-rounds' = 2 leaves nothing"):
        server_fn(make_context(resumed | {"num-server-rounds": 2}))
    assert not Path(run_config["output-dir"]).exists()


def _components() -> ServerAppComponents:
    """Components as server_fn makes them; run_rounds only hands them on."""
    return ServerAppComponents(
        strategy=FedAvg(),
        config=ServerConfig(num_rounds=3, round_timeout=30.0),
        client_manager=SeededClientManager(timeout=5.0, seed=0),
    )


def _not_called(*args, **kwargs) -> None:
    pytest.fail(f"called with {args}, {kwargs}")


def test_run_rounds_runs_flowers_legacy_loop_without_secure_aggregation(
    monkeypatch, run_config
):
    calls = []
    monkeypatch.setattr(server_app, "start_grid", lambda **kw: calls.append(kw))
    monkeypatch.setattr(server_app, "DefaultWorkflow", _not_called)
    grid, components = object(), _components()
    run_rounds(grid, make_context(run_config), components)
    (call,) = calls
    assert call.keys() == {"grid", "config", "strategy", "client_manager"}
    assert call["grid"] is grid
    assert call["config"] is components.config
    assert call["strategy"] is components.strategy
    assert call["client_manager"] is components.client_manager


def test_run_rounds_runs_secaggplus_in_flowers_default_workflow(
    monkeypatch, run_config
):
    run_config |= {"secure-aggregation": True, "secagg-num-shares": 4}
    fit_workflow, stoppable_grid = object(), object()
    made, ran, secured, stoppable = [], [], [], []

    class Workflow:
        def __init__(self, **kwargs) -> None:
            made.append(kwargs)

        def __call__(self, grid, context) -> None:
            ran.append((grid, context))

    def secure_fit_workflow(privacy, data):
        secured.append((privacy, data))
        return fit_workflow

    def wrap(grid, timeout=None):
        stoppable.append((grid, timeout))
        return stoppable_grid

    grid, components, context = object(), _components(), make_context(run_config)
    monkeypatch.setattr(server_app, "start_grid", _not_called)
    monkeypatch.setattr(server_app, "DefaultWorkflow", Workflow)
    monkeypatch.setattr(server_app, "secure_fit_workflow", secure_fit_workflow)
    monkeypatch.setattr(components.client_manager, "stoppable", wrap)
    run_rounds(grid, context, components)
    assert secured == [
        (
            PrivacySettings.from_run_config(run_config),
            DataSettings.from_run_config(run_config),
        )
    ]
    assert made == [{"fit_workflow": fit_workflow}]
    # Its waits for replies end at round-timeout, or when the run is stopped.
    assert stoppable == [(grid, 30.0)]
    ((workflow_grid, legacy),) = ran
    assert workflow_grid is stoppable_grid
    assert isinstance(legacy, LegacyContext)
    assert legacy.config is components.config
    assert legacy.strategy is components.strategy
    assert legacy.client_manager is components.client_manager
    assert (legacy.run_id, legacy.run_config) == (1, run_config)
