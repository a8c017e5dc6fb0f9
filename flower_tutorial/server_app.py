"""flower_tutorial: a Flower ServerApp running FedAvg over the organizations."""

from __future__ import annotations

from flwr.common import Context, Metrics, Scalar, ndarrays_to_parameters
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
    # Seeds the initial model and FedAvg's client sampling (Python's `random`).
    set_seed(settings.seed)
    # Initial model made here, so no client is asked for its random weights.
    initial_parameters = ndarrays_to_parameters(get_parameters(Net()))
    strategy = FedAvg(
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
