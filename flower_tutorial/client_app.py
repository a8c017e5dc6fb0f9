"""flower_tutorial: a Flower ClientApp, one organization of the federation."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Config, Context, NDArrays, Scalar

from flower_tutorial.config import (
    NUM_PARTITIONS,
    PARTITION_ID,
    NodeSettings,
    RunSettings,
)
from flower_tutorial.privacy import privacy_mod

if TYPE_CHECKING:
    from torch import nn

    from flower_tutorial.task import TensorLoader


class LazyModule:
    """The names of module `name`, which is imported when the first one is used.

    A plain import at first use, so a second thread waits for the first one's
    import to finish (importlib's LazyLoader does not, in Python 3.11).
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        """Return the module's `attr`, importing the module on the first call."""
        return getattr(importlib.import_module(self._name), attr)


# The model's code, and PyTorch with it, loads when a message needs the model. In a
# deployment every message starts a ClientApp process, and under SecAgg+ three
# messages in four only exchange keys and shares: those processes skip PyTorch's
# import, about 4 s of CPU each.
task = LazyModule("flower_tutorial.task")


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
        self.device = task.get_device()

    def get_properties(self, config: Config) -> dict[str, Scalar]:
        """Tell the server which partition this node holds (it orders sampling)."""
        return {PARTITION_ID: self.partition_id, NUM_PARTITIONS: self.num_partitions}

    def get_parameters(self, config: Config) -> NDArrays:
        """Return the local model's parameters."""
        return task.get_parameters(self.net)

    def fit(
        self, parameters: NDArrays, config: Config
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train the received model on the local training data.

        Returns the number of training *examples* (not batches, as the tutorial
        does), so that FedAvg weighs each client by how much data it holds. Under
        FedProx, the server's `proximal_mu` adds its proximal term to the loss.
        """
        task.set_parameters(self.net, parameters)
        # Same (seed, partition, round) -> same shuffling, whichever worker runs it.
        task.set_seed(
            self.settings.seed, self.partition_id, int(config["server-round"])
        )
        train_loss = task.train(
            self.net,
            self.trainloader,
            epochs=self.settings.local_epochs,
            learning_rate=self.settings.learning_rate,
            device=self.device,
            proximal_mu=float(config.get("proximal_mu", 0.0)),
        )
        num_examples = len(self.trainloader.dataset)
        return task.get_parameters(self.net), num_examples, {"train_loss": train_loss}

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the received model on the local validation data."""
        task.set_parameters(self.net, parameters)
        loss, accuracy = task.test(self.net, self.valloader, self.device)
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}


def client_fn(context: Context) -> Client:
    """Create the client of the organization that `context.node_config` names.

    Its data: the `partition-id` partition of the run's `dataset`, or the node's
    own folder when its node config has a `data-path`.
    """
    settings = RunSettings.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    if node.data_path is not None:
        trainloader, valloader = task.load_local_data(
            node.data_path, settings.data, task.get_device()
        )
    else:
        trainloader, valloader = task.load_data(
            node.partition_id, node.num_partitions, settings.data, task.get_device()
        )
    return FlowerClient(task.Net(), trainloader, valloader, settings, node).to_client()


# Secure aggregation and differential privacy, as the run config asks.
app = ClientApp(client_fn=client_fn, mods=[privacy_mod])
