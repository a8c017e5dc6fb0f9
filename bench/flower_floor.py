"""Flower's own cost, for the benchmark's row (d): clients that train nothing.

The same federation as the app's (FedAvg, the same sampling, the model's real
parameters sent and returned), but each client hands the model back unchanged:
what is left is Flower's and Ray's start-up and messaging.
"""

from __future__ import annotations

from flwr.client import Client, NumPyClient
from flwr.common import Context, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server.strategy import FedAvg
from tutorial_pipeline import federation_apps, tutorial_fedavg  # bench/

from flower_tutorial.task import Net, get_parameters


class IdleClient(NumPyClient):
    """Returns what it gets, as if it had trained on 3,200 images."""

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Hand the model back unchanged."""
        return parameters, 3200, {}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Report a loss without evaluating."""
        return 1.0, 800, {"accuracy": 0.0}


def make_apps(num_clients: int, rounds: int):  # noqa: ANN201
    """Return (server_fn, client_app) for this federation."""

    def client_fn(context: Context) -> Client:
        return IdleClient().to_client()

    def strategy() -> FedAvg:
        return tutorial_fedavg(
            num_clients,
            initial_parameters=ndarrays_to_parameters(get_parameters(Net())),
        )

    return federation_apps(strategy, client_fn, rounds)
