"""Run-config and node-config checking: every bad value names key, value, rule."""

import math
import operator
import re
import sys

import pytest
from conftest import default_run_config

from flower_tutorial.config import (
    NodeSettings,
    PrivacySettings,
    RunSettings,
    StrategySettings,
    app_run_config,
    clipped_count_stddev,
)


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
        ("secagg-num-shares", 1, r"an integer >= 3, or a fraction in \(0, 1\]"),
        ("secagg-num-shares", 2, r"an integer >= 3, or a fraction in \(0, 1\]"),
        (
            "secagg-reconstruction-threshold",
            0.5,
            r"an integer >= 2, or a fraction in \[2/3, 1\]",
        ),
        ("secagg-clipping-range", 0.0, "a number > 0"),
        ("secagg-quantization-range", 1, "an integer >= 2"),
        ("secagg-quantization-range", 2**32, "an integer below 2\\*\\*32"),
        ("dp", "global", "one of 'none', 'central-fixed', 'central-adaptive', 'local'"),
        ("dp-noise-multiplier", 0.0, "a number > 0"),
        ("dp-clipping-norm", -1.0, "a number > 0"),
        ("dp-target-clipped-quantile", 1.0, r"a number in \(0, 1.0\)"),
        ("dp-clip-norm-lr", 0, r"a number in \(0, 1.0\]"),
        ("dp-clip-norm-lr", 1.5, r"a number in \(0, 1.0\]"),
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


# Each run-config key and where its value lands in RunSettings.
FIELDS = {
    "num-server-rounds": "num_server_rounds",
    "fraction-fit": "fraction_fit",
    "fraction-evaluate": "fraction_evaluate",
    "min-fit-clients": "min_fit_clients",
    "min-evaluate-clients": "min_evaluate_clients",
    "min-available-clients": "min_available_clients",
    "local-epochs": "local_epochs",
    "learning-rate": "learning_rate",
    "dataset": "data.dataset",
    "partitioner": "data.partitioner",
    "dirichlet-alpha": "data.dirichlet_alpha",
    "shards-per-partition": "data.shards_per_partition",
    "batch-size": "data.batch_size",
    "seed": "data.seed",
    "data-cache": "data.cache",
    "data-cache-dir": "data.cache_dir",
    "node-wait-timeout": "node_wait_timeout",
    "round-timeout": "round_timeout",
    "centralized-evaluation": "centralized_evaluation",
    "initial-checkpoint": "initial_checkpoint",
    "resume-from": "resume_from",
    "output-dir": "output_dir",
    "save-best-model": "save_best_model",
    "aggregation": "aggregation",
    "trim-fraction": "trim_fraction",
    "krum-byzantine": "krum_byzantine",
    "strategy": "strategy.name",
    "proximal-mu": "strategy.proximal_mu",
    "server-learning-rate": "strategy.server_learning_rate",
    "server-momentum": "strategy.server_momentum",
    "beta-1": "strategy.beta_1",
    "beta-2": "strategy.beta_2",
    "tau": "strategy.tau",
    "secure-aggregation": "privacy.secure_aggregation",
    "secagg-num-shares": "privacy.secagg_num_shares",
    "secagg-reconstruction-threshold": "privacy.secagg_reconstruction_threshold",
    "secagg-clipping-range": "privacy.secagg_clipping_range",
    "secagg-quantization-range": "privacy.secagg_quantization_range",
    "dp": "privacy.dp",
    "dp-noise-multiplier": "privacy.dp_noise_multiplier",
    "dp-clipping-norm": "privacy.dp_clipping_norm",
    "dp-target-clipped-quantile": "privacy.dp_target_clipped_quantile",
    "dp-clip-norm-lr": "privacy.dp_clip_norm_lr",
    "dp-local-epsilon": "privacy.dp_local_epsilon",
    "dp-delta": "privacy.dp_delta",
    "dp-max-epsilon": "privacy.dp_max_epsilon",
    "dp-client-metrics": "privacy.dp_client_metrics",
}
# Keys whose non-default values need another key set too.
NEEDS = {"secagg-reconstruction-threshold": {"secagg-num-shares": 5}}


def setting(config: dict, key: str):
    """The value RunSettings gives `key` of `config` (with the keys it needs)."""
    settings = RunSettings.from_run_config(config | NEEDS.get(key, {}))
    return operator.attrgetter(FIELDS[key])(settings)


def test_the_fields_cover_every_run_config_key():
    assert set(FIELDS) == set(default_run_config())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 7),
        ("fraction-fit", 0.25),
        ("fraction-evaluate", 0.75),
        ("min-fit-clients", 4),
        ("min-evaluate-clients", 3),
        ("min-available-clients", 6),
        ("local-epochs", 2),
        ("learning-rate", 0.01),
        ("dataset", "some/dataset"),
        ("partitioner", "dirichlet"),
        ("dirichlet-alpha", 0.3),
        ("shards-per-partition", 5),
        ("batch-size", 16),
        ("seed", 7),
        ("data-cache", False),
        ("data-cache-dir", "/somewhere/cache"),
        ("node-wait-timeout", 30.0),
        ("round-timeout", 60.0),
        ("centralized-evaluation", False),
        ("initial-checkpoint", "start.pt"),
        ("resume-from", "outputs/run"),
        ("output-dir", "elsewhere"),
        ("save-best-model", False),
        ("aggregation", "median"),
        ("trim-fraction", 0.1),
        ("krum-byzantine", 2),
        ("strategy", "fedprox"),
        ("proximal-mu", 0.5),
        ("server-learning-rate", 0.1),
        ("server-momentum", 0.9),
        ("beta-1", 0.8),
        ("beta-2", 0.95),
        ("tau", 0.001),
        ("secure-aggregation", True),
        ("secagg-num-shares", 5),
        ("secagg-reconstruction-threshold", 4),
        ("secagg-clipping-range", 4.0),
        ("secagg-quantization-range", 1024),
        ("dp", "local"),
        ("dp-noise-multiplier", 0.5),
        ("dp-clipping-norm", 2.0),
        ("dp-target-clipped-quantile", 0.25),
        ("dp-clip-norm-lr", 0.1),
        ("dp-local-epsilon", 3.0),
        ("dp-delta", 1e-6),
        ("dp-max-epsilon", 8.0),
        ("dp-client-metrics", True),
    ],
)
def test_each_key_reaches_its_setting(key, value):
    assert default_run_config()[key] != value
    assert setting(default_run_config() | {key: value}, key) == value


def test_the_defaults_of_the_other_settings():
    settings = RunSettings.from_run_config(default_run_config())
    assert settings.data.dirichlet_alpha == 0.5
    assert settings.data.shards_per_partition == 2
    assert (settings.data.cache, settings.data.cache_dir) == (True, "")
    assert settings.resume_from == ""
    assert (settings.trim_fraction, settings.krum_byzantine) == (0.2, 1)
    assert settings.strategy == StrategySettings(
        name="fedavg",
        proximal_mu=0.0,
        server_learning_rate=1.0,
        server_momentum=0.0,
        beta_1=0.9,
        beta_2=0.99,
        tau=1e-9,
    )
    assert settings.privacy == PrivacySettings(
        secure_aggregation=False,
        secagg_num_shares=1.0,
        secagg_reconstruction_threshold=0.7,
        secagg_clipping_range=8.0,
        secagg_quantization_range=4194304,
        dp="none",
        dp_noise_multiplier=1.0,
        dp_clipping_norm=1.0,
        dp_target_clipped_quantile=0.5,
        dp_clip_norm_lr=0.2,
        dp_local_epsilon=10.0,
        dp_delta=1e-5,
        dp_max_epsilon=math.inf,
        dp_client_metrics=False,
    )
    assert settings.privacy.central_dp is False
    assert settings.privacy.client_metrics is True


@pytest.mark.parametrize(
    ("dp", "central"),
    [("none", False), ("local", False), ("central-fixed", True)],
)
def test_central_dp_is_the_servers_noise(dp, central):
    config = default_run_config() | {"dp": dp}
    assert RunSettings.from_run_config(config).privacy.central_dp is central


# The smallest float above 0, and the floats next to 1.0 and 0.49.
TINY = 5e-324
BELOW_ONE = math.nextafter(1.0, 0.0)
ABOVE_ONE = math.nextafter(1.0, 2.0)
HUGE = sys.float_info.max
NAN, INF = float("nan"), float("inf")
# Float keys without an upper bound, each refused at 0 and at infinity.
POSITIVE_FLOATS = (
    "learning-rate",
    "dirichlet-alpha",
    "node-wait-timeout",
    "round-timeout",
    "server-learning-rate",
    "tau",
    "secagg-clipping-range",
    "dp-noise-multiplier",
    "dp-clipping-norm",
    "dp-local-epsilon",
)
# Integer keys and the smallest value each allows.
MINIMUM = {
    "num-server-rounds": 1,
    "min-fit-clients": 1,
    "min-evaluate-clients": 1,
    "min-available-clients": 1,
    "local-epochs": 1,
    "batch-size": 1,
    "shards-per-partition": 1,
    "seed": 0,
    "krum-byzantine": 0,
    "secagg-quantization-range": 2,
}
# (key, an allowed value at the edge of the range) for the keys with an upper bound.
HIGHEST = [
    ("fraction-fit", 1.0),
    ("fraction-fit", 1),
    ("fraction-evaluate", 1.0),
    ("trim-fraction", 0.49),
    ("server-momentum", BELOW_ONE),
    ("beta-1", BELOW_ONE),
    ("beta-2", BELOW_ONE),
    ("dp-target-clipped-quantile", BELOW_ONE),
    ("dp-delta", BELOW_ONE),
    ("dp-clip-norm-lr", 1.0),
    ("dp-clip-norm-lr", 1),
    ("secagg-quantization-range", 2**32 - 1),
    ("dp-max-epsilon", INF),
    ("num-server-rounds", 10**9),
]
LOWEST = [
    ("fraction-fit", TINY),
    ("fraction-evaluate", 0),
    ("fraction-evaluate", 0.0),
    ("trim-fraction", TINY),
    ("proximal-mu", 0),
    ("server-momentum", 0.0),
    ("beta-1", 0.0),
    ("beta-2", 0),
    ("dp-target-clipped-quantile", TINY),
    ("dp-delta", TINY),
    ("dp-max-epsilon", TINY),
    ("dp-clip-norm-lr", TINY),
]


@pytest.mark.parametrize(
    ("key", "value"),
    [*((key, TINY) for key in POSITIVE_FLOATS)]
    + [*((key, HUGE) for key in POSITIVE_FLOATS)]
    + [*((key, 3) for key in POSITIVE_FLOATS)]
    + [*MINIMUM.items()]
    + LOWEST
    + HIGHEST
    + [("proximal-mu", HUGE), ("dp-max-epsilon", HUGE)],
)
def test_the_edges_of_each_range_are_allowed(key, value):
    got = setting(default_run_config() | {key: value}, key)
    assert got == value
    # Float keys give floats, also for TOML integers; integer keys give integers.
    if key in MINIMUM:
        assert type(got) is int
    else:
        assert type(got) is float


def refused(key: str, value: object, allowed: str, source: str = "run config") -> str:
    return f"{source} key '{key}' = {value!r} is not allowed: expected {allowed}."


def positive(key: str) -> list:
    return [(key, v, "a number > 0") for v in (0, 0.0, -TINY, INF, -INF, NAN, True)]


def integer(key: str) -> list:
    low = MINIMUM[key]
    allowed = f"an integer >= {low}"
    return [
        (key, v, allowed) for v in (low - 1, float(low), True, False, str(low), None)
    ]


def in_range(key: str, low: str, high: str, values) -> list:
    return [(key, v, f"a number in {low}{high}") for v in values]


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [row for key in POSITIVE_FLOATS for row in positive(key)]
    + [("learning-rate", "0.1", "a number > 0")]
    + [row for key in MINIMUM for row in integer(key)]
    + in_range(
        "fraction-fit", "(0, ", "1.0]", [0, 0.0, -TINY, ABOVE_ONE, 2, NAN, True, "1"]
    )
    + in_range(
        "fraction-evaluate", "[0, ", "1.0]", [-TINY, -1, ABOVE_ONE, INF, NAN, False]
    )
    + in_range("trim-fraction", "(0, ", "0.49]", [0.0, math.nextafter(0.49, 1), NAN])
    + in_range(
        "dp-clip-norm-lr", "(0, ", "1.0]", [0, 0.0, -TINY, ABOVE_ONE, INF, NAN, True]
    )
    + [
        row
        for key in ("server-momentum", "beta-1", "beta-2")
        for row in in_range(key, "[0, ", "1.0)", [-TINY, 1.0, 1, INF, NAN, False])
    ]
    + [
        row
        for key in ("dp-target-clipped-quantile", "dp-delta")
        for row in in_range(key, "(0, ", "1.0)", [0, 0.0, -TINY, 1.0, NAN, True])
    ]
    + [("proximal-mu", v, "a number >= 0") for v in (-TINY, INF, NAN, False, "0")]
    + [("dp-max-epsilon", v, "a number > 0, or inf") for v in (0, -INF, NAN, True)]
    + [
        (key, v, "a non-empty string")
        for key in ("dataset", "output-dir")
        for v in ("", "   ", "\t\n", 1, None, True)
    ]
    + [
        (key, v, "a string")
        for key in ("initial-checkpoint", "resume-from", "data-cache-dir")
        for v in (0, None, False)
    ]
    + [
        (key, v, "true or false")
        for key in (
            "data-cache",
            "centralized-evaluation",
            "save-best-model",
            "secure-aggregation",
            "dp-client-metrics",
        )
        for v in (1, 0, "true", "false", None)
    ]
    + [
        ("partitioner", v, "one of 'iid', 'dirichlet', 'shards'")
        for v in ("IID", "", " iid", None)
    ]
    + [
        ("aggregation", v, "one of 'fedavg', 'median', 'trimmed-mean', 'krum'")
        for v in ("FedAvg", "trimmed_mean", "")
    ]
    + [
        (
            "strategy",
            v,
            "one of 'fedavg', 'fedprox', 'fedadam', 'fedyogi', 'fedadagrad', 'fedavgm'",
        )
        for v in ("FEDAVG", "fedadamw", "")
    ]
    + [
        ("dp", v, "one of 'none', 'central-fixed', 'central-adaptive', 'local'")
        for v in ("central", "None", "")
    ],
)
def test_values_outside_each_range_are_refused_saying_what_is_allowed(
    key, value, allowed
):
    with pytest.raises(ValueError) as err:
        RunSettings.from_run_config(default_run_config() | {key: value})
    assert str(err.value) == refused(key, value, allowed)


@pytest.mark.parametrize(
    ("key", "choices"),
    [
        ("partitioner", ("iid", "dirichlet", "shards")),
        ("aggregation", ("fedavg", "median", "trimmed-mean", "krum")),
        (
            "strategy",
            ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"),
        ),
        ("dp", ("none", "central-fixed", "central-adaptive", "local")),
    ],
)
def test_each_choice_is_allowed(key, choices):
    # min-fit-clients = 30 leaves room for central-adaptive's default noise.
    config = default_run_config() | {"min-fit-clients": 30}
    for choice in choices:
        assert setting(config | {key: choice}, key) == choice


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dataset", " x "),
        ("output-dir", "."),
        ("initial-checkpoint", "   "),
        ("resume-from", " "),
        ("data-cache-dir", "\t"),
    ],
)
def test_strings_are_kept_as_written(key, value):
    assert setting(default_run_config() | {key: value}, key) == value


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_each_missing_run_config_key_says_where_to_set_it(key):
    config = default_run_config()
    del config[key]
    with pytest.raises(ValueError) as err:
        RunSettings.from_run_config(config)
    assert str(err.value) == (
        f"The run config has no '{key}' key: set it in [tool.flwr.app.config] of "
        f'pyproject.toml or with `flwr run . --run-config "{key}=..."`.'
    )


RESUMED = (
    "run config key 'initial-checkpoint' = 'start.pt' is not allowed with "
    "resume-from: a resumed run starts from its own checkpoint."
)
SECAGG_ROBUST = (
    "run config key 'aggregation' = {rule!r} is not allowed with "
    "secure-aggregation = true: the server sees only the sum of the updates, never "
    "one update, so a robust rule has nothing to sort."
)
CENTRAL_ROBUST = (
    "run config key 'aggregation' = {rule!r} is not allowed with dp = {dp!r}: the "
    "noise is calibrated to a mean of clipped updates, not to a median or a chosen "
    "update."
)
CENTRAL_STEPPING = (
    "run config key 'strategy' = {strategy!r} is not allowed with dp = {dp!r}: "
    "Flower's DP wrapper adds its noise after the strategy's own server-side step, "
    "which would already have seen the noiseless mean. Use fedavg or fedprox, or "
    "dp = 'local'."
)
ADAPTIVE_NOISE = (
    "run config key 'dp-noise-multiplier' = {z} is not allowed with "
    "dp = 'central-adaptive' and min-fit-clients = {clients}: adaptive clipping "
    "spends part of the noise on the count of clipped updates (standard deviation "
    "min-fit-clients / 20), which leaves room for noise multipliers below "
    "min-fit-clients / 10 = {room}. Use more clients per round, a smaller noise "
    "multiplier, or dp = 'central-fixed'."
)
ROBUST_RULES = ("median", "trimmed-mean", "krum")
CENTRAL_DP = ("central-fixed", "central-adaptive")
STEPPING = ("fedadam", "fedyogi", "fedadagrad", "fedavgm")
# Enough clients for central-adaptive's default noise multiplier (1.0 < 30 / 10).
ROOMY = {"min-fit-clients": 30}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"initial-checkpoint": "start.pt", "resume-from": "outputs/run"}, RESUMED),
        *(
            (
                {"secure-aggregation": True, "aggregation": rule},
                SECAGG_ROBUST.format(rule=rule),
            )
            for rule in ROBUST_RULES
        ),
        *(
            (
                ROOMY | {"dp": dp, "aggregation": rule},
                CENTRAL_ROBUST.format(rule=rule, dp=dp),
            )
            for dp in CENTRAL_DP
            for rule in ROBUST_RULES
        ),
        *(
            (
                ROOMY | {"dp": dp, "strategy": strategy},
                CENTRAL_STEPPING.format(strategy=strategy, dp=dp),
            )
            for dp in CENTRAL_DP
            for strategy in STEPPING
        ),
        *(
            (
                {
                    "dp": "central-adaptive",
                    "min-fit-clients": clients,
                    "dp-noise-multiplier": z,
                },
                ADAPTIVE_NOISE.format(z=z_shown, clients=clients, room=room),
            )
            # The message writes the numbers with :g.
            for clients, z, z_shown, room in [
                (3, 0.3, "0.3", "0.3"),
                (3, 5, "5", "0.3"),
                (10, 1.0, "1", "1"),
                (20, 2.0, "2", "2"),
                (20, 20.5, "20.5", "2"),
                (1, 0.1, "0.1", "0.1"),
            ]
        ),
    ],
)
def test_each_refused_combination_says_why(overrides, message):
    with pytest.raises(ValueError) as err:
        RunSettings.from_run_config(default_run_config() | overrides)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "overrides",
    [
        {"initial-checkpoint": "start.pt"},
        {"resume-from": "outputs/run"},
        {"initial-checkpoint": "", "resume-from": ""},
        {"secure-aggregation": True, "aggregation": "fedavg"},
        *({"secure-aggregation": False, "aggregation": r} for r in ROBUST_RULES),
        *(
            {"dp": dp, "aggregation": r}
            for dp in ("none", "local")
            for r in ROBUST_RULES
        ),
        *(
            ROOMY | {"dp": dp, "strategy": s}
            for dp in CENTRAL_DP
            for s in ("fedavg", "fedprox")
        ),
        *({"dp": dp, "strategy": s} for dp in ("none", "local") for s in STEPPING),
        # Adaptive clipping leaves room for noise multipliers below clients / 10.
        {"dp": "central-adaptive", "min-fit-clients": 3, "dp-noise-multiplier": 0.29},
        {
            "dp": "central-adaptive",
            "min-fit-clients": 20,
            "dp-noise-multiplier": math.nextafter(2.0, 0.0),
        },
        {"dp": "central-adaptive", "min-fit-clients": 11, "dp-noise-multiplier": 1.0},
        # Only adaptive clipping spends noise on the count.
        {"dp": "central-fixed", "min-fit-clients": 1, "dp-noise-multiplier": 50.0},
        {"dp": "local", "min-fit-clients": 1, "dp-noise-multiplier": 50.0},
    ],
)
def test_combinations_that_can_work_are_accepted(overrides):
    for key, value in overrides.items():
        assert setting(default_run_config() | overrides, key) == value


@pytest.mark.parametrize(
    ("clients", "stddev"), [(1, 0.05), (3, 0.15), (10, 0.5), (20, 1.0), (40, 2.0)]
)
def test_clipped_count_stddev_is_flowers_default(clients, stddev):
    assert clipped_count_stddev(clients) == stddev


def test_app_run_config_is_pyproject_tomls_with_overrides():
    assert app_run_config() == default_run_config()
    assert app_run_config(None) == default_run_config()
    assert app_run_config({}) == default_run_config()
    overrides = {"num-server-rounds": 2, "dp": "local", "dp-max-epsilon": 3.0}
    assert app_run_config(overrides) == default_run_config() | overrides
    with pytest.raises(ValueError, match="'no-such-key'"):
        app_run_config({"no-such-key": 1})


NODE = {"partition-id": 0, "num-partitions": 2}


@pytest.mark.parametrize(
    ("partition_id", "num_partitions"), [(0, 1), (0, 10), (9, 10), (999, 1000)]
)
def test_each_partition_of_the_federation_is_allowed(partition_id, num_partitions):
    node = NodeSettings.from_node_config(
        {"partition-id": partition_id, "num-partitions": num_partitions}
    )
    assert node == NodeSettings(partition_id, num_partitions, None)


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        *(
            (
                {"partition-id": 0, "num-partitions": v},
                refused("num-partitions", v, "an integer >= 1", "node config"),
            )
            for v in (0, -1, 1.0, True, "2", None)
        ),
        *(
            (
                {"partition-id": v, "num-partitions": 2},
                refused("partition-id", v, "an integer >= 0", "node config"),
            )
            for v in (-1, 0.0, False, "0", None)
        ),
        *(
            (
                {"partition-id": v, "num-partitions": n},
                f"node config key 'partition-id' = {v} is not allowed: expected an "
                f"integer in [0, {n}) (num-partitions = {n}).",
            )
            for v, n in [(1, 1), (10, 10), (11, 10)]
        ),
        *(
            (
                NODE | {"data-path": v},
                refused("data-path", v, "a non-empty string", "node config"),
            )
            for v in ("", "  ", 3, None, True)
        ),
        *(
            (
                {k: v for k, v in NODE.items() if k != key},
                f"The node config has no '{key}' key: set it with "
                f'`flower-supernode --node-config "{key}=..."`.',
            )
            for key in NODE
        ),
    ],
)
def test_bad_node_configs_are_refused_saying_what_is_allowed(node_config, message):
    with pytest.raises(ValueError) as err:
        NodeSettings.from_node_config(node_config)
    assert str(err.value) == message


def test_a_missing_data_folder_is_refused_saying_what_is_expected(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError) as err:
        NodeSettings.from_node_config(NODE | {"data-path": missing})
    assert str(err.value) == (
        f"node config key 'data-path' = {missing!r} is not allowed: no such folder. "
        "Expected the path of a folder on this node holding a train split in the "
        "CIFAR-10 schema."
    )
    a_file = tmp_path / "train.parquet"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match="no such folder"):
        NodeSettings.from_node_config(NODE | {"data-path": str(a_file)})


def test_a_data_folder_under_home_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cifar").mkdir()
    node = NodeSettings.from_node_config(NODE | {"data-path": "~/cifar"})
    assert node == NodeSettings(0, 2, "~/cifar")


SHARES = r"an integer >= 3, or a fraction in (0, 1]"
THRESHOLD = r"an integer >= 2, or a fraction in [2/3, 1]"


def _secagg(shares: object, threshold: object) -> dict:
    return default_run_config() | {
        "secagg-num-shares": shares,
        "secagg-reconstruction-threshold": threshold,
    }


@pytest.mark.parametrize(
    ("shares", "threshold"),
    [
        (3, 2),
        (5, 3),
        (5, 4),
        (10, 6),
        (10, 9),
        (2**40, 2**39 + 1),
        (3, 0.7),
        (2**40, 2 / 3),
        (TINY, 2 / 3),
        (0.5, 1.0),
        (1.0, 0.7),
        (1.0, 1.0),
    ],
)
def test_secagg_shares_and_thresholds_that_hold_are_allowed(shares, threshold):
    privacy = RunSettings.from_run_config(_secagg(shares, threshold)).privacy
    got = (privacy.secagg_num_shares, privacy.secagg_reconstruction_threshold)
    assert got == (shares, threshold)
    assert [type(v) for v in got] == [type(shares), type(threshold)]


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("secagg-num-shares", v, SHARES)
        for v in (2, 1, 0, -3, 0.0, -TINY, ABOVE_ONE, 3.0, INF, NAN, True, "3", None)
    ]
    + [
        ("secagg-reconstruction-threshold", v, THRESHOLD)
        for v in (1, 0, math.nextafter(2 / 3, 0), 0.5, ABOVE_ONE, 2.0, NAN, True, None)
    ],
)
def test_secagg_values_outside_their_ranges_are_refused(key, value, allowed):
    with pytest.raises(ValueError) as err:
        RunSettings.from_run_config(default_run_config() | {key: value})
    assert str(err.value) == refused(key, value, allowed)


@pytest.mark.parametrize(
    ("shares", "threshold"), [(3, 3), (3, 4), (4, 2), (5, 2), (10, 5), (10, 100)]
)
def test_a_threshold_of_half_the_shares_or_fewer_or_all_is_refused(shares, threshold):
    # Half or fewer: a server that tells half the holders a client is active
    # and the others that it dropped out collects both its secrets.
    with pytest.raises(ValueError) as err:
        RunSettings.from_run_config(_secagg(shares, threshold))
    assert str(err.value) == (
        f"run config key 'secagg-reconstruction-threshold' = {threshold} is not "
        f"allowed: expected an integer above half of secagg-num-shares = {shares} "
        "and below it (a secret is split into that many shares, and rebuilt from "
        "fewer; half or fewer would let a server that lies about who dropped out "
        "rebuild both of a client's secrets)."
    )


@pytest.mark.parametrize(("fraction", "clients"), [(0.2, 4), (0.1, 9), (0.49, 2)])
def test_a_trimmed_mean_that_trims_nothing_is_refused(fraction, clients):
    config = default_run_config() | {
        "aggregation": "trimmed-mean",
        "trim-fraction": fraction,
        "min-fit-clients": clients,
        "min-available-clients": clients,
    }
    with pytest.raises(ValueError) as err:
        RunSettings.from_run_config(config)
    assert str(err.value) == (
        f"run config key 'trim-fraction' = {fraction:g} is not allowed with "
        f"aggregation = 'trimmed-mean' and min-fit-clients = {clients}: it trims "
        f"int({fraction:g} * {clients}) = 0 updates at each end, which is the "
        "plain mean. Train more clients a round (at least 1 / trim-fraction), or "
        "trim a larger fraction."
    )
    # One client more trims one at each end.
    settings = RunSettings.from_run_config(config | {"min-fit-clients": clients + 1})
    assert settings.trim_fraction == fraction


def test_a_threshold_count_needs_a_count_of_shares():
    with pytest.raises(ValueError) as err:
        RunSettings.from_run_config(_secagg(0.5, 3))
    assert str(err.value) == (
        "run config key 'secagg-reconstruction-threshold' = 3 is not allowed with "
        "secagg-num-shares = 0.5 (a fraction of the clients): expected a fraction "
        "in [2/3, 1] too, as the number of shares is known only when a round "
        "samples its clients."
    )


@pytest.mark.parametrize("quantization", [2**32, 2**32 + 1, 2**64])
def test_a_quantization_range_past_the_modulus_is_refused(quantization):
    config = default_run_config() | {"secagg-quantization-range": quantization}
    with pytest.raises(ValueError) as err:
        RunSettings.from_run_config(config)
    assert str(err.value) == (
        f"run config key 'secagg-quantization-range' = {quantization} is not "
        "allowed: expected an integer below 2**32, SecAgg+'s modulus."
    )
