"""flower_tutorial: the tutorial's model, training loops and CIFAR-10 loaders."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention
from datasets import Dataset, load_dataset
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    ShardPartitioner,
)
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, ToTensor

from flower_tutorial.config import DataSettings

# A batch as the loaders yield it: {"img": images, "label": labels}.
Batch = dict[str, torch.Tensor]

# Columns of `uoft-cs/cifar10`; a local folder must use the same schema.
IMAGE_KEY = "img"
LABEL_KEY = "label"

# The tutorial's transform: [0, 255] pixels to [-1, 1] per channel.
_TRANSFORM = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


class Net(nn.Module):
    """The tutorial's CNN (from PyTorch's 60-minute blitz) for 32x32 RGB images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of the 10 classes for a batch of images."""
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def get_device() -> torch.device:
    """Return CUDA when a GPU is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_seed(*seed: int) -> None:
    """Seed Python, NumPy and PyTorch from one or more integers.

    Several integers (e.g. seed, partition, round) are mixed by NumPy's
    SeedSequence, so nearby tuples still give unrelated streams.
    """
    value = int(np.random.SeedSequence(list(seed)).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    # cuDNN otherwise picks convolution algorithms whose results vary run to run.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def get_parameters(net: nn.Module) -> list[np.ndarray]:
    """Return the model's state_dict as NumPy arrays, in state_dict order.

    The arrays are copies: on the CPU `Tensor.numpy()` shares memory with the
    model, and later training would silently change what was returned.
    """
    return [value.detach().cpu().numpy().copy() for value in net.state_dict().values()]


def set_parameters(net: nn.Module, parameters: list[np.ndarray]) -> None:
    """Load NumPy arrays into the model, keeping every tensor's dtype.

    Unlike the tutorial's `torch.Tensor(v)`, integer buffers stay integers. A wrong
    number of arrays or a wrong shape raises instead of loading part of the model.
    """
    keys = list(net.state_dict().keys())
    if len(parameters) != len(keys):
        raise ValueError(
            f"{type(net).__name__} has {len(keys)} state_dict entries, "
            f"got {len(parameters)} arrays."
        )
    state_dict = OrderedDict(
        (key, torch.tensor(np.asarray(value)))
        for key, value in zip(keys, parameters, strict=True)
    )
    net.load_state_dict(state_dict, strict=True)


def train(
    net: nn.Module,
    trainloader: Iterable[Batch],
    epochs: int,
    learning_rate: float,
    device: torch.device,
) -> float:
    """Train with Adam and cross-entropy; return the mean loss per sample."""
    net.to(device)
    net.train()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    # Summed on the device: a `.item()` per batch would sync with a GPU every step.
    loss_sum = torch.zeros((), device=device)
    num_samples = 0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch[IMAGE_KEY].to(device)
            labels = batch[LABEL_KEY].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * labels.size(0)
            num_samples += labels.size(0)
    if num_samples == 0:
        raise ValueError("train() got an empty trainloader: nothing to train on.")
    return loss_sum.item() / num_samples


def test(
    net: nn.Module, testloader: Iterable[Batch], device: torch.device
) -> tuple[float, float]:
    """Evaluate the model; return (mean cross-entropy per sample, accuracy).

    Any iterable of batches works, e.g. a list of batches decoded once.
    """
    net.to(device)
    net.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    num_samples = 0
    with torch.no_grad():
        for batch in testloader:
            images = batch[IMAGE_KEY].to(device)
            labels = batch[LABEL_KEY].to(device)
            outputs = net(images)
            loss_sum += criterion(outputs, labels)
            correct += (outputs.argmax(dim=1) == labels).sum()
            num_samples += labels.size(0)
    if num_samples == 0:
        raise ValueError("test() got an empty testloader: nothing to evaluate.")
    return loss_sum.item() / num_samples, correct.item() / num_samples


def apply_transforms(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Turn a batch of PIL images into normalized tensors (the tutorial's transform)."""
    batch[IMAGE_KEY] = [_TRANSFORM(img) for img in batch[IMAGE_KEY]]
    return batch


def dataset_source(dataset: str) -> str:
    """Return what `load_dataset` should open: a local folder or a hub id.

    A value that names an existing folder is used as a local copy in the hub layout
    (e.g. ``plain_text/train-*.parquet``), so the app runs offline; anything else is
    taken as a dataset id on the Hugging Face hub (``uoft-cs/cifar10``).
    """
    path = Path(dataset).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if dataset.startswith((".", "/", "~")):
        raise ValueError(
            f"run config key 'dataset' = {dataset!r} is not allowed: no such folder. "
            "Expected a hub dataset id (e.g. 'uoft-cs/cifar10') or the path of an "
            "existing folder holding the dataset in the hub's layout."
        )
    return dataset


def _check_schema(split: Dataset, dataset: str) -> None:
    missing = {IMAGE_KEY, LABEL_KEY} - set(split.column_names)
    if missing:
        raise ValueError(
            f"dataset {dataset!r} lacks the column(s) {sorted(missing)}: expected "
            f"the CIFAR-10 schema ('{IMAGE_KEY}': image, '{LABEL_KEY}': class label), "
            f"found {split.column_names}."
        )


def make_partitioner(data: DataSettings, num_partitions: int) -> Partitioner:
    """Return the flwr-datasets partitioner that `data.partitioner` names.

    "iid": equal random shares (the tutorial); "dirichlet": label proportions per
    organization drawn from Dir(alpha), smaller alpha = more skew; "shards": the
    train split sorted by label and dealt out in `shards-per-partition` shards.
    """
    if data.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL_KEY,
            alpha=data.dirichlet_alpha,
            seed=data.seed,
        )
    if data.partitioner == "shards":
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL_KEY,
            num_shards_per_partition=data.shards_per_partition,
            seed=data.seed,
        )
    return IidPartitioner(num_partitions=num_partitions)


@lru_cache(maxsize=4)
def _federated_dataset(data: DataSettings, num_partitions: int) -> FederatedDataset:
    """Build the FederatedDataset once per process and reuse it across rounds."""
    return FederatedDataset(
        dataset=dataset_source(data.dataset),
        partitioners={"train": make_partitioner(data, num_partitions)},
        seed=data.seed,
    )


def load_partition(
    partition_id: int, num_partitions: int, data: DataSettings
) -> Dataset:
    """Return one organization's raw partition (PIL images, integer labels)."""
    partition = _federated_dataset(data, num_partitions).load_partition(partition_id)
    _check_schema(partition, data.dataset)
    if len(partition) < 2:
        raise ValueError(
            f"partition {partition_id} of {num_partitions} holds {len(partition)} "
            f"image(s) with partitioner {data.partitioner!r}: too few to split into "
            "training and validation data. Use fewer partitions or less skew."
        )
    return partition


def load_data(
    partition_id: int, num_partitions: int, data: DataSettings
) -> tuple[DataLoader, DataLoader]:
    """Load one organization's partition of the train split as (train, val) loaders.

    The partition is split 80/20 into training and validation data with the run's
    seed (the tutorial's 42 by default), so every client holds its own validation set.
    """
    partition = load_partition(partition_id, num_partitions, data)
    splits = partition.train_test_split(test_size=0.2, seed=data.seed)
    splits = splits.with_transform(apply_transforms)
    trainloader = DataLoader(splits["train"], batch_size=data.batch_size, shuffle=True)
    valloader = DataLoader(splits["test"], batch_size=data.batch_size)
    return trainloader, valloader


def load_test_data(data: DataSettings) -> DataLoader:
    """Load the dataset's whole test split (10,000 images for CIFAR-10)."""
    split = load_dataset(dataset_source(data.dataset), split="test")
    _check_schema(split, data.dataset)
    return DataLoader(
        split.with_transform(apply_transforms), batch_size=data.batch_size
    )


def class_names(data: DataSettings) -> list[str]:
    """Return the names of the label classes, in label order."""
    split = load_dataset(dataset_source(data.dataset), split="test")
    return list(split.features[LABEL_KEY].names)


def label_counts(data: DataSettings, num_partitions: int) -> np.ndarray:
    """Return how many images of each class every partition holds.

    Shape (num_partitions, num_classes); row i is what organization i trains and
    validates on.
    """
    fds = _federated_dataset(data, num_partitions)
    num_classes = fds.load_partition(0).features[LABEL_KEY].num_classes
    return np.stack(
        [
            np.bincount(fds.load_partition(pid)[LABEL_KEY], minlength=num_classes)
            for pid in range(num_partitions)
        ]
    )
