"""Run-config and node-config checking: every bad value names key, value, rule."""

import re

import pytest
from conftest import default_run_config

from flower_tutorial.config import NodeSettings, RunSettings


def test_defaults_reproduce_the_tutorial():
    settings = RunSettings.from_run_config(default_run_config())
    assert settings.num_server_rounds == 5
    assert settings.fraction_fit == 1.0
    assert settings.fraction_evaluate == 0.5
    assert settings.min_fit_clients == 10
    assert settings.min_evaluate_clients == 5
    assert settings.min_available_clients == 10
    assert settings.local_epochs == 1
    assert settings.data.batch_size == 32
    assert settings.learning_rate == 0.001  # Adam's default, as the tutorial
    assert settings.data.dataset == "uoft-cs/cifar10"
    assert settings.data.partitioner == "iid"
    assert settings.seed == settings.data.seed == 42
    assert settings.node_wait_timeout == 120.0
    assert settings.round_timeout == 3600.0
    assert settings.centralized_evaluation is True
    assert settings.initial_checkpoint == ""
    assert settings.output_dir == "outputs"
    assert settings.save_best_model is True
    assert settings.aggregation == "fedavg"


def test_fraction_evaluate_zero_turns_federated_evaluation_off():
    config = default_run_config() | {"fraction-evaluate": 0}
    assert RunSettings.from_run_config(config).fraction_evaluate == 0.0


# With the default secagg-num-shares = 3.
BELOW_THE_SHARES = "an integer below secagg-num-shares = 3"


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("num-server-rounds", 0, "an integer >= 1"),
        ("num-server-rounds", 2.5, "an integer >= 1"),
        ("num-server-rounds", True, "an integer >= 1"),
        ("fraction-fit", 0.0, r"a number in \(0, 1.0\]"),
        ("fraction-fit", 1.5, r"a number in \(0, 1.0\]"),
        ("fraction-evaluate", -0.5, r"a number in \[0, 1.0\]"),
        ("fraction-evaluate", 1.01, r"a number in \[0, 1.0\]"),
        ("fraction-evaluate", "half", r"a number in \[0, 1.0\]"),
        ("min-fit-clients", 0, "an integer >= 1"),
        ("min-evaluate-clients", -1, "an integer >= 1"),
        ("min-available-clients", "10", "an integer >= 1"),
        ("local-epochs", 0, "an integer >= 1"),
        ("batch-size", 0, "an integer >= 1"),
        ("learning-rate", 0.0, "a number > 0"),
        ("learning-rate", float("nan"), "a number > 0"),
        ("learning-rate", float("inf"), "a number > 0"),
        ("dataset", "", "a non-empty string"),
        ("dataset", 10, "a non-empty string"),
        ("seed", -1, "an integer >= 0"),
        ("node-wait-timeout", 0, "a number > 0"),
        ("round-timeout", -5.0, "a number > 0"),
        ("partitioner", "pathological", "one of 'iid', 'dirichlet', 'shards'"),
        ("partitioner", 1, "one of 'iid', 'dirichlet', 'shards'"),
        ("dirichlet-alpha", 0.0, "a number > 0"),
        ("dirichlet-alpha", -0.3, "a number > 0"),
        ("shards-per-partition", 0, "an integer >= 1"),
        ("centralized-evaluation", "yes", "true or false"),
        ("centralized-evaluation", 1, "true or false"),
        ("save-best-model", 0, "true or false"),
        ("initial-checkpoint", 3, "a string"),
        ("output-dir", "", "a non-empty string"),
        ("aggregation", "mean", "one of 'fedavg', 'median', 'trimmed-mean', 'krum'"),
        ("trim-fraction", 0.5, r"a number in \(0, 0.49\]"),
        ("trim-fraction", 0, r"a number in \(0, 0.49\]"),
        ("krum-byzantine", -1, "an integer >= 0"),
        ("data-cache", "yes", "true or false"),
        ("data-cache-dir", 5, "a string"),
        (
            "strategy",
            "fedsgd",
            "one of 'fedavg', 'fedprox', 'fedadam', 'fedyogi', 'fedadagrad', 'fedavgm'",
        ),
        ("proximal-mu", -0.1, "a number >= 0"),
        ("server-learning-rate", 0.0, "a number > 0"),
        ("server-momentum", 1.0, r"a number in \[0, 1.0\)"),
        ("beta-1", 1.5, r"a number in \[0, 1.0\)"),
        ("beta-2", -0.1, r"a number in \[0, 1.0\)"),
        ("tau", 0.0, "a number > 0"),
        ("secure-aggregation", "on", "true or false"),
        ("secagg-num-shares", 1, "an integer >= 3"),
        ("secagg-num-shares", 2, "an integer >= 3"),
        ("secagg-reconstruction-threshold", 1, "an integer >= 2"),
        ("secagg-reconstruction-threshold", 3, BELOW_THE_SHARES),
        ("secagg-reconstruction-threshold", 4, BELOW_THE_SHARES),
        ("secagg-clipping-range", 0.0, "a number > 0"),
        ("secagg-quantization-range", 1, "an integer >= 2"),
        ("secagg-quantization-range", 2**32, "an integer below 2\\*\\*32"),
        ("dp", "global", "one of 'none', 'central-fixed', 'central-adaptive', 'local'"),
        ("dp-noise-multiplier", 0.0, "a number > 0"),
        ("dp-clipping-norm", -1.0, "a number > 0"),
        ("dp-target-clipped-quantile", 1.0, r"a number in \(0, 1.0\)"),
        ("dp-clip-norm-lr", 0, "a number > 0"),
        ("dp-local-epsilon", float("inf"), "a number > 0"),
        ("dp-delta", 1.0, r"a number in \(0, 1.0\)"),
        ("dp-max-epsilon", 0.0, "a number > 0, or inf"),
        ("dp-max-epsilon", float("nan"), "a number > 0, or inf"),
    ],
)
def test_bad_run_config_values_are_named(key, value, allowed):
    config = default_run_config() | {key: value}
    with pytest.raises(ValueError) as err:
        RunSettings.from_run_config(config)
    message = str(err.value)
    assert f"'{key}' = {value!r}" in message
    assert re.search(f"expected {allowed}", message)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"secure-aggregation": True, "aggregation": "median"},
            r"'aggregation' = 'median' is not allowed with secure-aggregation",
        ),
        (
            {"dp": "central-fixed", "aggregation": "krum"},
            r"'aggregation' = 'krum' is not allowed with dp = 'central-fixed'",
        ),
        (
            {"dp": "central-adaptive", "strategy": "fedadam"},
            r"'strategy' = 'fedadam' is not allowed with dp = 'central-adaptive'",
        ),
        (
            {
                "dp": "central-adaptive",
                "min-fit-clients": 3,
                "dp-noise-multiplier": 0.3,
            },
            r"'dp-noise-multiplier' = 0.3 is not allowed with dp = 'central-adaptive' "
            r"and min-fit-clients = 3: .* below min-fit-clients / 10 = 0.3",
        ),
    ],
    ids=["secagg-robust", "central-dp-robust", "central-dp-fedadam", "adaptive-noise"],
)
def test_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_run_config(default_run_config() | overrides)


def test_combinations_that_work_are_accepted():
    for overrides in (
        {"dp": "local", "aggregation": "median"},  # each update noised on its own
        {"dp": "central-fixed", "strategy": "fedprox"},  # the same mean on the server
        {"secure-aggregation": True, "dp": "central-fixed"},
        {"secure-aggregation": True, "strategy": "fedadam"},
    ):
        RunSettings.from_run_config(default_run_config() | overrides)


def test_a_missing_run_config_key_says_where_to_set_it():
    config = default_run_config()
    del config["batch-size"]
    with pytest.raises(ValueError, match=r"no 'batch-size' key.*--run-config"):
        RunSettings.from_run_config(config)


def test_node_config_is_checked():
    good = NodeSettings.from_node_config({"partition-id": 9, "num-partitions": 10})
    assert (good.partition_id, good.num_partitions) == (9, 10)
    with pytest.raises(ValueError, match=r"'partition-id' = 10 .*\[0, 10\)"):
        NodeSettings.from_node_config({"partition-id": 10, "num-partitions": 10})
    with pytest.raises(ValueError, match=r"'partition-id' = -1 .*>= 0"):
        NodeSettings.from_node_config({"partition-id": -1, "num-partitions": 10})
    with pytest.raises(ValueError, match=r"'num-partitions' = 0 .*>= 1"):
        NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 0})
    with pytest.raises(ValueError, match=r"no 'partition-id' key.*--node-config"):
        NodeSettings.from_node_config({"num-partitions": 2})


def test_a_node_data_path_must_name_a_folder(tmp_path):
    node = {"partition-id": 0, "num-partitions": 2}
    assert NodeSettings.from_node_config(node).data_path is None
    with_path = NodeSettings.from_node_config(node | {"data-path": str(tmp_path)})
    assert with_path.data_path == str(tmp_path)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"'data-path' = '.*nowhere' .*no such folder"):
        NodeSettings.from_node_config(node | {"data-path": missing})
    with pytest.raises(ValueError, match=r"'data-path' = 3 .*non-empty string"):
        NodeSettings.from_node_config(node | {"data-path": 3})
