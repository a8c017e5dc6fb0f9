"""flower_tutorial: a Flower ServerApp running FedAvg over the organizations."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.common import Context, Metrics, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import (
    Grid,
    LegacyContext,
    ServerApp,
    ServerAppComponents,
    ServerConfig,
)
from flwr.server.compat import start_grid
from flwr.server.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)
from flwr.server.workflow import DefaultWorkflow

from flower_tutorial import checkpoint
from flower_tutorial.client_manager import SeededClientManager
from flower_tutorial.config import (
    DataSettings,
    PrivacySettings,
    RunSettings,
    StrategySettings,
)
from flower_tutorial.differential_privacy import (
    LocalRelease,
    PrivacyLedger,
    ServerNoise,
    with_central_dp,
)
from flower_tutorial.outputs import RunFolderLock, load_checkpoint, make_run_dir
from flower_tutorial.recording import RunRecorder
from flower_tutorial.secure_aggregation import secure_fit_workflow
from flower_tutorial.strategy import CheckedStrategy
from flower_tutorial.task import (
    Net,
    get_device,
    get_parameters,
    load_test_data,
    set_parameters,
    set_seed,
    test,
)

EvaluateFn = Callable[
    [int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None
]


def weighted_average(metrics: list[tuple[int, Metrics]]) -> Metrics:
    """Average each metric that every client reported, weighted by its examples.

    The tutorial averages only "accuracy"; the same rule serves the clients'
    "train_loss" from `fit`.
    """
    total = sum(num_examples for num_examples, _ in metrics)
    if total == 0:
        return {}
    shared_keys = set.intersection(*(set(m) for _, m in metrics))
    numeric_keys = [
        key
        for key in sorted(shared_keys)
        if all(isinstance(m[key], int | float) for _, m in metrics)
    ]
    return {
        key: sum(n * float(m[key]) for n, m in metrics) / total for key in numeric_keys
    }


def fit_config(server_round: int) -> dict[str, Scalar]:
    """Tell each client the round, which seeds its local data shuffling."""
    return {"server-round": server_round}


def centralized_evaluation(data: DataSettings) -> EvaluateFn:
    """Return FedAvg's `evaluate_fn`: the global model on the whole test split.

    The test split is decoded once here, not at every round.
    """
    net, device = Net(), get_device()
    testloader = load_test_data(data, device)

    def evaluate(
        server_round: int, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        set_parameters(net, parameters)
        loss, accuracy = test(net, testloader, device)
        return loss, {"accuracy": accuracy}

    return evaluate


def flower_strategy(
    chosen: StrategySettings, learning_rate: float, **common: Any
) -> Strategy:
    """Return the Flower strategy `chosen` names, with its own parameters.

    `common` are FedAvg's (fractions, minimums, initial model, functions), which
    every one of them takes.
    """
    adaptive = {"eta": chosen.server_learning_rate, "eta_l": learning_rate}
    moments = {"beta_1": chosen.beta_1, "beta_2": chosen.beta_2, "tau": chosen.tau}
    if chosen.name == "fedprox":
        return FedProx(**common, proximal_mu=chosen.proximal_mu)
    if chosen.name == "fedadam":
        return FedAdam(**common, **adaptive, **moments)
    if chosen.name == "fedyogi":
        return FedYogi(**common, **adaptive, **moments)
    if chosen.name == "fedadagrad":
        return FedAdagrad(**common, **adaptive, tau=chosen.tau)
    if chosen.name == "fedavgm":
        return FedAvgM(
            **common,
            server_learning_rate=chosen.server_learning_rate,
            server_momentum=chosen.server_momentum,
        )
    return FedAvg(**common)


def server_fn(context: Context) -> ServerAppComponents:
    """Build FedAvg (or the strategy chosen), its checks, the client manager and rounds.

    Every setting is checked, the checkpoint and test data loaded, before the
    output folder is created: a bad value leaves nothing behind.
    """
    settings = RunSettings.from_run_config(context.run_config)
    set_seed(settings.seed)
    # The initial model is made (or loaded) here, so no client is asked for its
    # random weights.
    saved = None
    resume_dir = Path(settings.resume_from).expanduser()
    if settings.resume_from:
        saved = checkpoint.load(resume_dir)
        checkpoint.check_resumable(saved, dict(context.run_config))
        net = Net()
        set_parameters(net, saved.model)
    elif settings.initial_checkpoint:
        net = load_checkpoint(settings.initial_checkpoint)
    else:
        net = Net()
    evaluate_fn = None
    if settings.centralized_evaluation:
        evaluate_fn = centralized_evaluation(settings.data)
    inner = flower_strategy(
        settings.strategy,
        settings.learning_rate,
        fraction_fit=settings.fraction_fit,
        fraction_evaluate=settings.fraction_evaluate,
        min_fit_clients=settings.min_fit_clients,
        min_evaluate_clients=settings.min_evaluate_clients,
        min_available_clients=settings.min_available_clients,
        initial_parameters=ndarrays_to_parameters(get_parameters(net)),
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=fit_config,
        fit_metrics_aggregation_fn=weighted_average,
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    privacy = settings.privacy
    noise, ledger = None, None
    if privacy.central_dp:
        # The server's secret, which no other party holds (docs/threat-model.md).
        noise = ServerNoise(saved.noise_secret if saved else None)
        inner = with_central_dp(inner, privacy, settings.min_fit_clients, noise)
        ledger = PrivacyLedger(privacy, release=inner)
    elif privacy.dp == "local":
        ledger = PrivacyLedger(privacy, release=LocalRelease(privacy))
    # Which clients are sampled is seeded too (see SeededClientManager).
    client_manager = SeededClientManager(settings.node_wait_timeout, settings.seed)
    run_dir = (
        resume_dir.resolve()
        if saved
        else make_run_dir(settings.output_dir, context.run_id)
    )
    lock = RunFolderLock(run_dir, _writer(context))
    try:
        recorder = RunRecorder(
            run_dir=run_dir,
            run_config=dict(context.run_config),
            data=settings.data,
            num_rounds=settings.num_server_rounds,
            save_best_model=settings.save_best_model,
            lock=lock,
        )
        strategy = CheckedStrategy(
            inner,
            client_manager=client_manager,
            recorder=recorder,
            aggregation=settings.aggregation,
            trim_fraction=settings.trim_fraction,
            krum_byzantine=settings.krum_byzantine,
            privacy=privacy,
            ledger=ledger,
            noise=noise,
        )
        if saved:
            strategy.resume(saved)
    except BaseException:
        lock.release()
        raise
    config = ServerConfig(
        num_rounds=settings.num_server_rounds, round_timeout=settings.round_timeout
    )
    return ServerAppComponents(
        strategy=strategy, config=config, client_manager=client_manager
    )


def _writer(context: Context) -> str:
    """Describe this ServerApp, for a second writer of its run folder to read."""
    started = datetime.now().isoformat(" ", "seconds")
    return (
        f"the ServerApp of run {context.run_id} (process {os.getpid()} on "
        f"{socket.gethostname()}, since {started})"
    )


def run_rounds(grid: Grid, context: Context, components: ServerAppComponents) -> None:
    """Run the rounds of `server_fn`'s components.

    In Flower's legacy loop, exactly as `ServerApp(server_fn=server_fn)` would; with
    `secure-aggregation`, in Flower's DefaultWorkflow with SecAgg+, which waits for
    replies up to round-timeout only through the grid given here.
    """
    privacy = PrivacySettings.from_run_config(context.run_config)
    manager = components.client_manager
    if not privacy.secure_aggregation:
        start_grid(
            grid=grid,
            config=components.config,
            strategy=components.strategy,
            client_manager=manager,
        )
        return
    data = DataSettings.from_run_config(context.run_config)
    DefaultWorkflow(fit_workflow=secure_fit_workflow(privacy, data))(
        manager.stoppable(grid, components.config.round_timeout),
        LegacyContext(
            context,
            config=components.config,
            strategy=components.strategy,
            client_manager=manager,
        ),
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the components with `server_fn` and run their rounds."""
    run_rounds(grid, context, server_fn(context))
