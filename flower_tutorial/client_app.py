"""flower_tutorial: a Flower ClientApp, one organization of the federation."""

from __future__ import annotations

from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Config, Context, NDArrays, Scalar
from torch import nn

from flower_tutorial.config import (
    NUM_PARTITIONS,
    PARTITION_ID,
    NodeSettings,
    RunSettings,
)
from flower_tutorial.privacy import privacy_mod
from flower_tutorial.task import (
    Net,
    TensorLoader,
    get_device,
    get_parameters,
    load_data,
    load_local_data,
    set_parameters,
    set_seed,
    test,
    train,
)


class FlowerClient(NumPyClient):
    """Trains and evaluates the global model on one organization's data."""

    def __init__(
        self,
        net: nn.Module,
        trainloader: TensorLoader,
        valloader: TensorLoader,
        settings: RunSettings,
        node: NodeSettings,
    ) -> None:
        self.net = net
        self.trainloader = trainloader
        self.valloader = valloader
        self.settings = settings
        self.partition_id = node.partition_id
        self.num_partitions = node.num_partitions
        self.device = get_device()

    def get_properties(self, config: Config) -> dict[str, Scalar]:
        """Tell the server which partition this node holds (it orders sampling)."""
        return {PARTITION_ID: self.partition_id, NUM_PARTITIONS: self.num_partitions}

    def get_parameters(self, config: Config) -> NDArrays:
        """Return the local model's parameters."""
        return get_parameters(self.net)

    def fit(
        self, parameters: NDArrays, config: Config
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train the received model on the local training data.

        Returns the number of training *examples* (not batches, as the tutorial
        does), so that FedAvg weighs each client by how much data it holds. Under
        FedProx, the server's `proximal_mu` adds its proximal term to the loss.
        """
        set_parameters(self.net, parameters)
        # Same (seed, partition, round) -> same shuffling, whichever worker runs it.
        set_seed(self.settings.seed, self.partition_id, int(config["server-round"]))
        train_loss = train(
            self.net,
            self.trainloader,
            epochs=self.settings.local_epochs,
            learning_rate=self.settings.learning_rate,
            device=self.device,
            proximal_mu=float(config.get("proximal_mu", 0.0)),
        )
        num_examples = len(self.trainloader.dataset)
        return get_parameters(self.net), num_examples, {"train_loss": train_loss}

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the received model on the local validation data."""
        set_parameters(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader, self.device)
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}


def client_fn(context: Context) -> Client:
    """Create the client of the organization that `context.node_config` names.

    Its data: the `partition-id` partition of the run's `dataset`, or the node's
    own folder when its node config has a `data-path`.
    """
    settings = RunSettings.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    if node.data_path is not None:
        trainloader, valloader = load_local_data(
            node.data_path, settings.data, get_device()
        )
    else:
        trainloader, valloader = load_data(
            node.partition_id, node.num_partitions, settings.data, get_device()
        )
    return FlowerClient(Net(), trainloader, valloader, settings, node).to_client()


# Secure aggregation and differential privacy, as the run config asks.
app = ClientApp(client_fn=client_fn, mods=[privacy_mod])
