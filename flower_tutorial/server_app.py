"""flower_tutorial: a Flower ServerApp running FedAvg over the organizations."""

from __future__ import annotations

from flwr.common import (
    Context,
    EvaluateRes,
    FitRes,
    Metrics,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAvg

from flower_tutorial.config import RunSettings
from flower_tutorial.task import Net, get_parameters, set_seed


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


def _describe(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    return failure[1].status.message


def _raise_if_all_failed(
    stage: str, server_round: int, results: list, failures: list
) -> None:
    if failures and not results:
        raise RuntimeError(
            f"All {len(failures)} clients failed in round {server_round} ({stage}); "
            f"the first said: {_describe(failures[0])}"
        )


class TutorialFedAvg(FedAvg):
    """FedAvg that ends the run when every client of a round failed.

    Flower's FedAvg skips such a round and carries on, so a setting that breaks
    every client (a wrong dataset path, say) would run all rounds and report
    nothing. Rounds where only some clients fail still go on, as in FedAvg.
    """

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Average the results; raise if there are none but failures."""
        _raise_if_all_failed("fit", server_round, results, failures)
        return super().aggregate_fit(server_round, results, failures)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Average the losses and metrics; raise if there are none but failures."""
        _raise_if_all_failed("evaluate", server_round, results, failures)
        return super().aggregate_evaluate(server_round, results, failures)


class BoundedClientManager(SimpleClientManager):
    """A client manager that waits a bounded time for enough SuperNodes.

    Flower's SimpleClientManager waits up to a day for the strategy's minimum
    number of nodes, and silently skips a round when fewer are connected than it
    samples. Here either case ends the run with a message saying what to change.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        """Sample `num_clients` nodes after waiting (bounded) for enough of them."""
        needed = max(num_clients, min_num_clients or 0)
        if not self.wait_for(needed, timeout=self.timeout):
            raise RuntimeError(
                f"The strategy needs {needed} SuperNodes but only {len(self)} "
                f"connected within node-wait-timeout = {self.timeout:g} s. In "
                f"simulation, set the federation size, e.g. `flwr run . "
                f'--federation-config "num-supernodes={needed}"`; in a deployment, '
                f"start more SuperNodes; or lower min-fit-clients, "
                f"min-evaluate-clients and min-available-clients."
            )
        return super().sample(num_clients, min_num_clients, criterion)


def fit_config(server_round: int) -> dict[str, Scalar]:
    """Tell each client the round, which seeds its local data shuffling."""
    return {"server-round": server_round}


def server_fn(context: Context) -> ServerAppComponents:
    """Build FedAvg, the round count and the client manager from the run config."""
    settings = RunSettings.from_run_config(context.run_config)
    # Seeds the initial model. FedAvg's sampling draws from Python's `random` too,
    # but over node IDs that Flower makes anew each run, so *which* clients are
    # sampled still varies between runs.
    set_seed(settings.seed)
    # Initial model made here, so no client is asked for its random weights.
    initial_parameters = ndarrays_to_parameters(get_parameters(Net()))
    strategy = TutorialFedAvg(
        fraction_fit=settings.fraction_fit,
        fraction_evaluate=settings.fraction_evaluate,
        min_fit_clients=settings.min_fit_clients,
        min_evaluate_clients=settings.min_evaluate_clients,
        min_available_clients=settings.min_available_clients,
        initial_parameters=initial_parameters,
        on_fit_config_fn=fit_config,
        fit_metrics_aggregation_fn=weighted_average,
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    config = ServerConfig(
        num_rounds=settings.num_server_rounds, round_timeout=settings.round_timeout
    )
    return ServerAppComponents(
        strategy=strategy,
        config=config,
        client_manager=BoundedClientManager(settings.node_wait_timeout),
    )


app = ServerApp(server_fn=server_fn)
