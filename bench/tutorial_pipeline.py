"""The tutorial's pipeline as written, for the benchmark's baseline (a).

Per-image PIL -> ToTensor -> Normalize through `with_transform`, a DataLoader, the
tutorial's NumPyClient (which loads its data in every `client_fn` call) and FedAvg
without server-side initial parameters. Only what Flower 1.42 requires changed:
the partition comes from `node_config`, the dataset path is a parameter, and
`min_*_clients` follow the federation size so smaller ones can be benchmarked too.
The model is the app's `Net`, which is the tutorial's CNN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context, Metrics
from flwr.server import ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg, Strategy
from flwr_datasets import FederatedDataset
from torch.utils.data import DataLoader
from torchvision import transforms

from flower_tutorial.task import Net, get_parameters, set_parameters

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH_SIZE = 32


def load_datasets(partition_id: int, num_partitions: int, dataset: str):
    """Load a partition as the tutorial does: new FederatedDataset, per-image work."""
    fds = FederatedDataset(dataset=dataset, partitioners={"train": num_partitions})
    partition = fds.load_partition(partition_id)
    partition_train_test = partition.train_test_split(test_size=0.2, seed=42)
    pytorch_transforms = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )

    def apply_transforms(batch):
        batch["img"] = [pytorch_transforms(img) for img in batch["img"]]
        return batch

    partition_train_test = partition_train_test.with_transform(apply_transforms)
    trainloader = DataLoader(
        partition_train_test["train"], batch_size=BATCH_SIZE, shuffle=True
    )
    valloader = DataLoader(partition_train_test["test"], batch_size=BATCH_SIZE)
    return trainloader, valloader


def train(net, trainloader, epochs: int):
    """Train as the tutorial does (Adam, default learning rate)."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters())
    net.train()
    for _ in range(epochs):
        for batch in trainloader:
            images, labels = batch["img"].to(DEVICE), batch["label"].to(DEVICE)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()


def test(net, testloader):
    """Evaluate as the tutorial does (its loss: a sum of batch means / examples)."""
    criterion = torch.nn.CrossEntropyLoss()
    correct, total, loss = 0, 0, 0.0
    net.eval()
    with torch.no_grad():
        for batch in testloader:
            images, labels = batch["img"].to(DEVICE), batch["label"].to(DEVICE)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return loss / len(testloader.dataset), correct / total


class FlowerClient(NumPyClient):
    """The tutorial's client (fit returns batches, as written)."""

    def __init__(self, net, trainloader, valloader):
        self.net, self.trainloader, self.valloader = net, trainloader, valloader

    def get_parameters(self, config):
        """Return the model's parameters."""
        return get_parameters(self.net)

    def fit(self, parameters, config):
        """Train one epoch; return the number of batches, as the tutorial does."""
        set_parameters(self.net, parameters)
        train(self.net, self.trainloader, epochs=1)
        return get_parameters(self.net), len(self.trainloader), {}

    def evaluate(self, parameters, config):
        """Evaluate on the validation batches."""
        set_parameters(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader)
        return float(loss), len(self.valloader), {"accuracy": float(accuracy)}


def weighted_average(metrics: list[tuple[int, Metrics]]) -> Metrics:
    """Average accuracy as the tutorial does."""
    accuracies = [num_examples * m["accuracy"] for num_examples, m in metrics]
    examples = [num_examples for num_examples, _ in metrics]
    return {"accuracy": sum(accuracies) / sum(examples)}


def tutorial_fedavg(num_clients: int, **kwargs: Any) -> FedAvg:
    """Return the tutorial's FedAvg for `num_clients` clients (plus `kwargs`)."""
    return FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.5,
        min_fit_clients=num_clients,
        min_evaluate_clients=max(1, num_clients // 2),
        min_available_clients=num_clients,
        **kwargs,
    )


def federation_apps(
    make_strategy: Callable[[], Strategy],
    client_fn: Callable[[Context], Client],
    rounds: int,
) -> tuple[Callable[[Context], ServerAppComponents], ClientApp]:
    """Return (server_fn, client_app): `rounds` rounds of `make_strategy()`'s strategy.

    The strategy is made anew in each `server_fn` call.
    """

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(
            strategy=make_strategy(), config=ServerConfig(num_rounds=rounds)
        )

    return server_fn, ClientApp(client_fn=client_fn)


def make_apps(dataset: str, num_clients: int, rounds: int):
    """Return the tutorial's (server_fn, client_app) for this federation."""

    def client_fn(context: Context) -> Client:
        net = Net().to(DEVICE)
        partition_id = int(context.node_config["partition-id"])
        trainloader, valloader = load_datasets(partition_id, num_clients, dataset)
        return FlowerClient(net, trainloader, valloader).to_client()

    def strategy() -> FedAvg:
        return tutorial_fedavg(
            num_clients, evaluate_metrics_aggregation_fn=weighted_average
        )

    return federation_apps(strategy, client_fn, rounds)
