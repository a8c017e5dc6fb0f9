"""flower_tutorial: typed, checked view of the run config and the node config.

The defaults live in ``[tool.flwr.app.config]`` of ``pyproject.toml``; this module
only reads and checks what Flower hands to the ServerApp and the ClientApp, so that a
mistyped value stops the run with a message naming the key, the value and what is
allowed, before any training starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.config import get_fused_config_from_dir

# The app's root, where pyproject.toml holds the run config's defaults.
APP_DIR = Path(__file__).resolve().parent.parent


def app_run_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return pyproject.toml's run config with `overrides`, as `flwr run` fuses it.

    For entry points outside `flwr run` (notebooks, the centralized baseline); an
    unknown key is an error. Needs the source checkout (``pip install -e .``).
    """
    return dict(get_fused_config_from_dir(APP_DIR, dict(overrides or {})))


_WHERE_TO_SET = {
    "run config": "in [tool.flwr.app.config] of pyproject.toml or with "
    '`flwr run . --run-config "KEY=..."`',
    "node config": 'with `flower-supernode --node-config "KEY=..."`',
}


def _get(config: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in config:
        where = _WHERE_TO_SET[source].replace("KEY", key)
        raise ValueError(f"The {source} has no '{key}' key: set it {where}.")
    return config[key]


def _int(config: Mapping[str, Any], key: str, minimum: int, source: str) -> int:
    value = _get(config, key, source)
    # bool is a subclass of int, but `true` is never a sensible count.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: "
            f"expected an integer >= {minimum}."
        )
    return value


def _float(
    config: Mapping[str, Any],
    key: str,
    source: str,
    *,
    upper: float = math.inf,
    zero_allowed: bool = False,
    upper_open: bool = False,
) -> float:
    """Read a finite float in (0, upper] or [0, upper] (upper excluded if open).

    TOML integers count too.
    """
    value = _get(config, key, source)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    above_low = number and (value >= 0 if zero_allowed else value > 0)
    below_high = number and (value < upper if upper_open else value <= upper)
    if not above_low or not math.isfinite(value) or not below_high:
        if math.isinf(upper):
            allowed = "a number >= 0" if zero_allowed else "a number > 0"
        else:
            low = "[" if zero_allowed else "("
            high = ")" if upper_open else "]"
            allowed = f"a number in {low}0, {upper}{high}"
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: expected {allowed}."
        )
    return float(value)


def _str(
    config: Mapping[str, Any], key: str, source: str, *, empty_allowed: bool = False
) -> str:
    value = _get(config, key, source)
    if not isinstance(value, str) or not (value.strip() or empty_allowed):
        allowed = "a string" if empty_allowed else "a non-empty string"
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: expected {allowed}."
        )
    return value


def _bool(config: Mapping[str, Any], key: str, source: str) -> bool:
    value = _get(config, key, source)
    if not isinstance(value, bool):
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: expected true or false."
        )
    return value


def _choice(
    config: Mapping[str, Any], key: str, choices: tuple[str, ...], source: str
) -> str:
    value = _get(config, key, source)
    if value not in choices:
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: "
            f"expected one of {', '.join(repr(c) for c in choices)}."
        )
    return value


PARTITIONERS = ("iid", "dirichlet", "shards")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")

# Node-config keys; clients also echo them in their metrics, so that the server
# knows which partition a result came from.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
# Optional node-config key: a folder of the node's own data instead of a partition.
DATA_PATH = "data-path"


@dataclass(frozen=True)
class DataSettings:
    """Where the data comes from and how it is split among the organizations.

    Frozen and hashable: it keys the per-process cache of FederatedDatasets.
    """

    dataset: str
    partitioner: str
    dirichlet_alpha: float
    shards_per_partition: int
    batch_size: int
    seed: int
    cache: bool = True
    cache_dir: str = ""  # "": the user's cache folder

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> DataSettings:
        """Read and check the data keys of ``context.run_config``."""
        src = "run config"
        return cls(
            dataset=_str(run_config, "dataset", src),
            partitioner=_choice(run_config, "partitioner", PARTITIONERS, src),
            dirichlet_alpha=_float(run_config, "dirichlet-alpha", src),
            shards_per_partition=_int(run_config, "shards-per-partition", 1, src),
            batch_size=_int(run_config, "batch-size", 1, src),
            seed=_int(run_config, "seed", 0, src),
            cache=_bool(run_config, "data-cache", src),
            cache_dir=_str(run_config, "data-cache-dir", src, empty_allowed=True),
        )


@dataclass(frozen=True)
class StrategySettings:
    """Which of Flower's strategies runs the rounds, with its own parameters.

    Each applies to the strategies that have it, under Flower's name for it:
    `proximal_mu` (FedProx), `server_learning_rate` (FedAvgM; FedAdam, FedYogi and
    FedAdagrad call it eta), `server_momentum` (FedAvgM), `beta_1`, `beta_2`
    (FedAdam, FedYogi) and `tau` (FedAdam, FedYogi, FedAdagrad).
    """

    name: str
    proximal_mu: float
    server_learning_rate: float
    server_momentum: float
    beta_1: float
    beta_2: float
    tau: float

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> StrategySettings:
        """Read and check the strategy keys of ``context.run_config``."""
        src = "run config"
        return cls(
            name=_choice(run_config, "strategy", STRATEGIES, src),
            proximal_mu=_float(run_config, "proximal-mu", src, zero_allowed=True),
            server_learning_rate=_float(run_config, "server-learning-rate", src),
            server_momentum=_float(
                run_config,
                "server-momentum",
                src,
                upper=1.0,
                zero_allowed=True,
                upper_open=True,
            ),
            beta_1=_float(
                run_config, "beta-1", src, upper=1.0, zero_allowed=True, upper_open=True
            ),
            beta_2=_float(
                run_config, "beta-2", src, upper=1.0, zero_allowed=True, upper_open=True
            ),
            tau=_float(run_config, "tau", src),
        )


@dataclass(frozen=True)
class RunSettings:
    """Every run-config key of the app, typed and range-checked."""

    num_server_rounds: int
    fraction_fit: float
    fraction_evaluate: float
    min_fit_clients: int
    min_evaluate_clients: int
    min_available_clients: int
    local_epochs: int
    learning_rate: float
    data: DataSettings
    node_wait_timeout: float
    round_timeout: float
    centralized_evaluation: bool
    initial_checkpoint: str
    output_dir: str
    save_best_model: bool
    aggregation: str
    trim_fraction: float
    krum_byzantine: int
    strategy: StrategySettings

    @property
    def seed(self) -> int:
        """The run's one seed (kept with the data settings it also seeds)."""
        return self.data.seed

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Read and check ``context.run_config``; raise ValueError on a bad value."""
        src = "run config"
        return cls(
            num_server_rounds=_int(run_config, "num-server-rounds", 1, src),
            fraction_fit=_float(run_config, "fraction-fit", src, upper=1.0),
            fraction_evaluate=_float(
                run_config, "fraction-evaluate", src, upper=1.0, zero_allowed=True
            ),
            min_fit_clients=_int(run_config, "min-fit-clients", 1, src),
            min_evaluate_clients=_int(run_config, "min-evaluate-clients", 1, src),
            min_available_clients=_int(run_config, "min-available-clients", 1, src),
            local_epochs=_int(run_config, "local-epochs", 1, src),
            learning_rate=_float(run_config, "learning-rate", src),
            data=DataSettings.from_run_config(run_config),
            node_wait_timeout=_float(run_config, "node-wait-timeout", src),
            round_timeout=_float(run_config, "round-timeout", src),
            centralized_evaluation=_bool(run_config, "centralized-evaluation", src),
            initial_checkpoint=_str(
                run_config, "initial-checkpoint", src, empty_allowed=True
            ),
            output_dir=_str(run_config, "output-dir", src),
            save_best_model=_bool(run_config, "save-best-model", src),
            aggregation=_choice(run_config, "aggregation", AGGREGATIONS, src),
            trim_fraction=_float(run_config, "trim-fraction", src, upper=0.49),
            krum_byzantine=_int(run_config, "krum-byzantine", 0, src),
            strategy=StrategySettings.from_run_config(run_config),
        )


@dataclass(frozen=True)
class NodeSettings:
    """The node-config keys a SuperNode gives its ClientApp.

    `partition_id` is the node's number in the federation (it seeds the node's
    shuffling and orders sampling). Without `data_path` the node trains on that
    partition of the run's `dataset`; with it, on its own local folder.
    """

    partition_id: int
    num_partitions: int
    data_path: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Read and check ``context.node_config``; raise ValueError on a bad value."""
        src = "node config"
        num_partitions = _int(node_config, NUM_PARTITIONS, 1, src)
        partition_id = _int(node_config, PARTITION_ID, 0, src)
        if partition_id >= num_partitions:
            raise ValueError(
                f"node config key 'partition-id' = {partition_id} is not allowed: "
                f"expected an integer in [0, {num_partitions}) "
                f"(num-partitions = {num_partitions})."
            )
        data_path = None
        if DATA_PATH in node_config:
            data_path = _str(node_config, DATA_PATH, src)
            if not Path(data_path).expanduser().is_dir():
                raise ValueError(
                    f"node config key '{DATA_PATH}' = {data_path!r} is not allowed: "
                    "no such folder. Expected the path of a folder on this node "
                    "holding a train split in the CIFAR-10 schema."
                )
        return cls(partition_id, num_partitions, data_path)
