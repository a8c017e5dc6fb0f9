"""flower_tutorial: typed, checked view of the run config and the node config.

The defaults live in ``[tool.flwr.app.config]`` of ``pyproject.toml``; this module
only reads and checks what Flower hands to the ServerApp and the ClientApp, so that a
mistyped value stops the run with a message naming the key, the value and what is
allowed, before any training starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.config import get_fused_config_from_dir

# SecAgg+'s modulus (Flower's default, passed on): quantized values stay below it.
SECAGG_MODULUS = 2**32
# The app's root, where pyproject.toml holds the run config's defaults.
APP_DIR = Path(__file__).resolve().parent.parent


def app_run_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return pyproject.toml's run config with `overrides`, as `flwr run` fuses it.

    For entry points outside `flwr run` (notebooks, the centralized baseline); an
    unknown key is an error. Needs the source checkout (``pip install -e .``).
    """
    return dict(get_fused_config_from_dir(APP_DIR, dict(overrides or {})))


# A run config or a node config, as Flower hands it over.
_Keys = Mapping[str, Any]
# Which config a key is read from, as the messages name it; most are the run's.
_RUN_CONFIG = "run config"
_WHERE_TO_SET = {
    _RUN_CONFIG: "in [tool.flwr.app.config] of pyproject.toml or with "
    '`flwr run . --run-config "KEY=..."`',
    "node config": 'with `flower-supernode --node-config "KEY=..."`',
}


def _get(config: _Keys, key: str, source: str) -> Any:
    if key not in config:
        where = _WHERE_TO_SET[source].replace("KEY", key)
        raise ValueError(f"The {source} has no '{key}' key: set it {where}.")
    return config[key]


def _int(config: _Keys, key: str, minimum: int, *, source: str = _RUN_CONFIG) -> int:
    value = _get(config, key, source)
    # bool is a subclass of int, but `true` is never a sensible count.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: "
            f"expected an integer >= {minimum}."
        )
    return value


def _float(
    config: _Keys,
    key: str,
    *,
    source: str = _RUN_CONFIG,
    upper: float = math.inf,
    zero_allowed: bool = False,
    upper_open: bool = False,
    finite: bool = True,
) -> float:
    """Read a float in (0, upper] or [0, upper] (upper excluded if open).

    TOML integers count too; infinity only where `finite` is False.
    """
    value = _get(config, key, source)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    above_low = number and (value >= 0 if zero_allowed else value > 0)
    below_high = number and (value < upper if upper_open else value <= upper)
    in_range = above_low and below_high and (math.isfinite(value) or not finite)
    if not in_range:
        if math.isinf(upper):
            allowed = "a number >= 0" if zero_allowed else "a number > 0"
        else:
            low = "[" if zero_allowed else "("
            high = ")" if upper_open else "]"
            allowed = f"a number in {low}0, {upper}{high}"
        if not finite:
            allowed += ", or inf"
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: expected {allowed}."
        )
    return float(value)


def _str(
    config: _Keys, key: str, *, source: str = _RUN_CONFIG, empty_allowed: bool = False
) -> str:
    value = _get(config, key, source)
    if not isinstance(value, str) or not (value.strip() or empty_allowed):
        allowed = "a string" if empty_allowed else "a non-empty string"
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: expected {allowed}."
        )
    return value


def _bool(config: _Keys, key: str, *, source: str = _RUN_CONFIG) -> bool:
    value = _get(config, key, source)
    if not isinstance(value, bool):
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: expected true or false."
        )
    return value


def _choice(
    config: _Keys, key: str, choices: tuple[str, ...], *, source: str = _RUN_CONFIG
) -> str:
    value = _get(config, key, source)
    if value not in choices:
        raise ValueError(
            f"{source} key '{key}' = {value!r} is not allowed: "
            f"expected one of {', '.join(repr(c) for c in choices)}."
        )
    return value


# _float's keywords for a number below 1: a probability, a momentum, a decay rate.
_BELOW_ONE: dict[str, Any] = {"upper": 1.0, "upper_open": True}

PARTITIONERS = ("iid", "dirichlet", "shards")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")
DP_MODES = ("none", "central-fixed", "central-adaptive", "local")
# Strategies that step from the mean update on the server (an optimizer, or
# momentum): Flower's DP wrappers add their noise after that step, too late.
SERVER_STEPPING = ("fedadam", "fedyogi", "fedadagrad", "fedavgm")

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
        return cls(
            dataset=_str(run_config, "dataset"),
            partitioner=_choice(run_config, "partitioner", PARTITIONERS),
            dirichlet_alpha=_float(run_config, "dirichlet-alpha"),
            shards_per_partition=_int(run_config, "shards-per-partition", 1),
            batch_size=_int(run_config, "batch-size", 1),
            seed=_int(run_config, "seed", 0),
            cache=_bool(run_config, "data-cache"),
            cache_dir=_str(run_config, "data-cache-dir", empty_allowed=True),
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
        return cls(
            name=_choice(run_config, "strategy", STRATEGIES),
            proximal_mu=_float(run_config, "proximal-mu", zero_allowed=True),
            server_learning_rate=_float(run_config, "server-learning-rate"),
            server_momentum=_float(
                run_config, "server-momentum", zero_allowed=True, **_BELOW_ONE
            ),
            beta_1=_float(run_config, "beta-1", zero_allowed=True, **_BELOW_ONE),
            beta_2=_float(run_config, "beta-2", zero_allowed=True, **_BELOW_ONE),
            tau=_float(run_config, "tau"),
        )


@dataclass(frozen=True)
class PrivacySettings:
    """Secure aggregation (SecAgg+) and differential privacy (docs/privacy.md)."""

    secure_aggregation: bool
    secagg_num_shares: int | float
    secagg_reconstruction_threshold: int | float
    secagg_clipping_range: float
    secagg_quantization_range: int
    dp: str
    dp_noise_multiplier: float
    dp_clipping_norm: float
    dp_target_clipped_quantile: float
    dp_clip_norm_lr: float
    dp_local_epsilon: float
    dp_delta: float
    dp_max_epsilon: float
    dp_client_metrics: bool

    @property
    def central_dp(self) -> bool:
        """Whether the server adds the noise (to the mean of clipped updates)."""
        return self.dp.startswith("central")

    @property
    def client_metrics(self) -> bool:
        """Whether clients send their metrics: without DP, or where the run opts in."""
        return self.dp == "none" or self.dp_client_metrics

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> PrivacySettings:
        """Read and check the privacy keys of ``context.run_config``."""
        shares, threshold = _secagg_shares(run_config)
        quantization = _int(run_config, "secagg-quantization-range", 2)
        if quantization >= SECAGG_MODULUS:
            raise ValueError(
                f"run config key 'secagg-quantization-range' = {quantization} is "
                f"not allowed: expected an integer below 2**32, SecAgg+'s modulus."
            )
        return cls(
            secure_aggregation=_bool(run_config, "secure-aggregation"),
            secagg_num_shares=shares,
            secagg_reconstruction_threshold=threshold,
            secagg_clipping_range=_float(run_config, "secagg-clipping-range"),
            secagg_quantization_range=quantization,
            dp=_choice(run_config, "dp", DP_MODES),
            dp_noise_multiplier=_float(run_config, "dp-noise-multiplier"),
            dp_clipping_norm=_float(run_config, "dp-clipping-norm"),
            dp_target_clipped_quantile=_float(
                run_config, "dp-target-clipped-quantile", **_BELOW_ONE
            ),
            dp_clip_norm_lr=_float(run_config, "dp-clip-norm-lr", upper=1.0),
            dp_local_epsilon=_float(run_config, "dp-local-epsilon"),
            dp_delta=_float(run_config, "dp-delta", **_BELOW_ONE),
            dp_max_epsilon=_float(run_config, "dp-max-epsilon", finite=False),
            dp_client_metrics=_bool(run_config, "dp-client-metrics"),
        )


# A fraction of the share holders that rounds to more than half of them, however
# many there are: round(2/3 * k) > k / 2 for every k >= 2.
MIN_THRESHOLD_FRACTION = 2 / 3


def _secagg_shares(run_config: _Keys) -> tuple[int | float, int | float]:
    """Read SecAgg+'s number of shares and reconstruction threshold, as Flower does.

    An integer is a count; a float a fraction: of the clients a round samples
    (shares), of the shares (threshold). The threshold must be more than half of
    the shares: below that, a server that tells different clients different
    stories of who dropped out collects both secrets of one client.
    """
    shares = _count_or_fraction(
        run_config, "secagg-num-shares", 3, ("(0, 1]", lambda v: 0 < v <= 1)
    )
    threshold = _count_or_fraction(
        run_config,
        "secagg-reconstruction-threshold",
        2,
        ("[2/3, 1]", lambda v: MIN_THRESHOLD_FRACTION <= v <= 1),
    )
    key = "run config key 'secagg-reconstruction-threshold'"
    if isinstance(threshold, int) and isinstance(shares, float):
        raise ValueError(
            f"{key} = {threshold} is not allowed with secagg-num-shares = {shares} "
            "(a fraction of the clients): expected a fraction in [2/3, 1] too, as "
            "the number of shares is known only when a round samples its clients."
        )
    if isinstance(threshold, int) and not shares / 2 < threshold < shares:
        raise ValueError(
            f"{key} = {threshold} is not allowed: expected an integer above half of "
            f"secagg-num-shares = {shares} and below it (a secret is split into "
            "that many shares, and rebuilt from fewer; half or fewer would let a "
            "server that lies about who dropped out rebuild both of a client's "
            "secrets)."
        )
    return shares, threshold


def _count_or_fraction(
    config: _Keys,
    key: str,
    minimum: int,
    fractions: tuple[str, Callable[[float], bool]],
) -> int | float:
    """Read an integer >= `minimum`, or a float that `fractions` allows (in words)."""
    value = _get(config, key, _RUN_CONFIG)
    allowed, is_allowed = fractions
    if isinstance(value, float) and is_allowed(value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise ValueError(
        f"run config key '{key}' = {value!r} is not allowed: expected an integer "
        f">= {minimum}, or a fraction in {allowed}."
    )


def trimmed(trim_fraction: float, num_updates: int) -> int:
    """Return how many updates the trimmed mean cuts at each end, as Flower does."""
    return int(trim_fraction * num_updates)


def clipped_count_stddev(min_fit_clients: int) -> float:
    """Return adaptive clipping's noise (std) on the count of clipped updates.

    Flower's default for that many clients; the DP wrapper is given it, so that
    the check of dp-noise-multiplier (below twice it) holds for what runs.
    """
    return min_fit_clients / 20


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
    resume_from: str
    output_dir: str
    save_best_model: bool
    aggregation: str
    trim_fraction: float
    krum_byzantine: int
    strategy: StrategySettings
    privacy: PrivacySettings

    @property
    def seed(self) -> int:
        """The run's one seed (kept with the data settings it also seeds)."""
        return self.data.seed

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Read and check ``context.run_config``; raise ValueError on a bad value."""
        return cls(
            num_server_rounds=_int(run_config, "num-server-rounds", 1),
            fraction_fit=_float(run_config, "fraction-fit", upper=1.0),
            fraction_evaluate=_float(
                run_config, "fraction-evaluate", upper=1.0, zero_allowed=True
            ),
            min_fit_clients=_int(run_config, "min-fit-clients", 1),
            min_evaluate_clients=_int(run_config, "min-evaluate-clients", 1),
            min_available_clients=_int(run_config, "min-available-clients", 1),
            local_epochs=_int(run_config, "local-epochs", 1),
            learning_rate=_float(run_config, "learning-rate"),
            data=DataSettings.from_run_config(run_config),
            node_wait_timeout=_float(run_config, "node-wait-timeout"),
            round_timeout=_float(run_config, "round-timeout"),
            centralized_evaluation=_bool(run_config, "centralized-evaluation"),
            initial_checkpoint=_str(
                run_config, "initial-checkpoint", empty_allowed=True
            ),
            resume_from=_str(run_config, "resume-from", empty_allowed=True),
            output_dir=_str(run_config, "output-dir"),
            save_best_model=_bool(run_config, "save-best-model"),
            aggregation=_choice(run_config, "aggregation", AGGREGATIONS),
            trim_fraction=_float(run_config, "trim-fraction", upper=0.49),
            krum_byzantine=_int(run_config, "krum-byzantine", 0),
            strategy=StrategySettings.from_run_config(run_config),
            privacy=PrivacySettings.from_run_config(run_config),
        )._checked()

    def _checked(self) -> RunSettings:
        """Refuse combinations of keys that cannot work together, saying why."""
        if self.resume_from and self.initial_checkpoint:
            raise ValueError(
                f"run config key 'initial-checkpoint' = {self.initial_checkpoint!r} "
                "is not allowed with resume-from: a resumed run starts from its own "
                "checkpoint."
            )
        privacy, rule = self.privacy, self.aggregation
        if (
            rule == "trimmed-mean"
            and trimmed(self.trim_fraction, self.min_fit_clients) == 0
        ):
            raise ValueError(
                f"run config key 'trim-fraction' = {self.trim_fraction:g} is not "
                f"allowed with aggregation = 'trimmed-mean' and min-fit-clients = "
                f"{self.min_fit_clients}: it trims int({self.trim_fraction:g} * "
                f"{self.min_fit_clients}) = 0 updates at each end, which is the plain "
                "mean. Train more clients a round (at least 1 / trim-fraction), "
                "or trim a larger fraction."
            )
        if privacy.secure_aggregation and rule != "fedavg":
            raise ValueError(
                f"run config key 'aggregation' = {rule!r} is not allowed with "
                "secure-aggregation = true: the server sees only the sum of the "
                "updates, never one update, so a robust rule has nothing to sort."
            )
        if privacy.central_dp and rule != "fedavg":
            raise ValueError(
                f"run config key 'aggregation' = {rule!r} is not allowed with "
                f"dp = {privacy.dp!r}: the noise is calibrated to a mean of clipped "
                "updates, not to a median or a chosen update."
            )
        if privacy.central_dp and self.strategy.name in SERVER_STEPPING:
            raise ValueError(
                f"run config key 'strategy' = {self.strategy.name!r} is not allowed "
                f"with dp = {privacy.dp!r}: Flower's DP wrapper adds its noise after "
                "the strategy's own server-side step, which would already have seen "
                "the noiseless mean. Use fedavg or fedprox, or dp = 'local'."
            )
        z, clients = privacy.dp_noise_multiplier, self.min_fit_clients
        room = 2 * clipped_count_stddev(clients)  # Flower's bound on z
        if privacy.dp == "central-adaptive" and z >= room:
            raise ValueError(
                f"run config key 'dp-noise-multiplier' = {z:g} is not allowed with "
                f"dp = 'central-adaptive' and min-fit-clients = {clients}: adaptive "
                "clipping spends part of the noise on the count of clipped updates "
                f"(standard deviation min-fit-clients / 20), which leaves room for "
                f"noise multipliers below min-fit-clients / 10 = {room:g}. "
                "Use more clients per round, a smaller noise multiplier, or "
                "dp = 'central-fixed'."
            )
        return self


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
        source = "node config"
        num_partitions = _int(node_config, NUM_PARTITIONS, 1, source=source)
        partition_id = _int(node_config, PARTITION_ID, 0, source=source)
        if partition_id >= num_partitions:
            raise ValueError(
                f"node config key 'partition-id' = {partition_id} is not allowed: "
                f"expected an integer in [0, {num_partitions}) "
                f"(num-partitions = {num_partitions})."
            )
        data_path = None
        if DATA_PATH in node_config:
            data_path = _str(node_config, DATA_PATH, source=source)
            if not Path(data_path).expanduser().is_dir():
                raise ValueError(
                    f"node config key '{DATA_PATH}' = {data_path!r} is not allowed: "
                    "no such folder. Expected the path of a folder on this node "
                    "holding a train split in the CIFAR-10 schema."
                )
        return cls(partition_id, num_partitions, data_path)
