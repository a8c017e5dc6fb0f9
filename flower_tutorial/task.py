"""flower_tutorial: the tutorial's data loaders, model and training loops.

In the tutorial's order: `load_data` (one organization's partition, 80/20 into
training and validation data), `Net`, `train`, `test`, `get_parameters` and
`set_parameters`; then what they rest on (`TensorLoader`, device and seeding).
Finding, partitioning and decoding the images is data.py's business.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention
from torch import nn
from torch.utils.data import TensorDataset

from flower_tutorial.config import DataSettings
from flower_tutorial.data import (
    IMAGE_KEY,
    LABEL_KEY,
    NUM_CLASSES,
    Tensors,
    decoded_folder,
    decoded_partition,
    decoded_test_split,
)

# A batch as the loaders yield it: {"img": images, "label": labels}.
Batch = dict[str, torch.Tensor]


def load_data(
    partition_id: int,
    num_partitions: int,
    data: DataSettings,
    device: torch.device | None = None,
) -> tuple[TensorLoader, TensorLoader]:
    """Load one organization's partition of the train split as (train, val) loaders.

    The partition is split 80/20 into training and validation data with the run's
    seed (the tutorial's 42 by default), so every client holds its own validation set.
    """
    decoded = decoded_partition(
        partition_id, num_partitions, data, str(device or torch.device("cpu"))
    )
    return _loaders(decoded.splits, data.batch_size)


def load_local_data(
    data_path: str, data: DataSettings, device: torch.device | None = None
) -> tuple[TensorLoader, TensorLoader]:
    """Load a node's own data folder as (train, val) loaders, like `load_data`.

    The folder holds a train split in the CIFAR-10 schema and, optionally, a
    validation split; without one, the train split is split 80/20 with the seed.
    """
    decoded = decoded_folder(data_path, data, str(device or torch.device("cpu")))
    return _loaders(decoded.splits, data.batch_size)


def load_test_data(
    data: DataSettings, device: torch.device | None = None
) -> TensorLoader:
    """Load the whole test split (10,000 images for CIFAR-10), decoded once."""
    decoded = decoded_test_split(data, str(device or torch.device("cpu")))
    return TensorLoader(*decoded.splits["test"], data.batch_size)


def _loaders(
    splits: dict[str, Tensors], batch_size: int
) -> tuple[TensorLoader, TensorLoader]:
    """(train, val) loaders over decoded splits; only training data is shuffled."""
    trainloader = TensorLoader(*splits["train"], batch_size, shuffle=True)
    return trainloader, TensorLoader(*splits["test"], batch_size)


class Net(nn.Module):
    """The tutorial's CNN (from PyTorch's 60-minute blitz) for 32x32 RGB images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of the 10 classes for a batch of images."""
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def train(
    net: nn.Module,
    trainloader: Iterable[Batch],
    epochs: int,
    learning_rate: float,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> float:
    """Train with Adam and cross-entropy; return the mean cross-entropy per sample.

    With `proximal_mu` > 0 (FedProx), the loss also holds (mu / 2) times the
    squared distance from the weights the training started from, which keeps
    clients on skewed data from drifting apart; 0 is the tutorial's loss.
    """
    net.to(device)
    net.train()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    start = [p.detach().clone() for p in net.parameters()] if proximal_mu else []
    # Summed on the device: a `.item()` per batch would sync with a GPU every step.
    loss_sum = torch.zeros((), device=device)
    num_samples = 0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch[IMAGE_KEY].to(device)
            labels = batch[LABEL_KEY].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            if proximal_mu:
                drift = sum(
                    (w - w0).pow(2).sum()
                    for w, w0 in zip(net.parameters(), start, strict=True)
                )
                (loss + proximal_mu / 2 * drift).backward()
            else:
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

    Any iterable of batches works (a TensorLoader, a DataLoader, a list).
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


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images (N, 3, H, W) to the tutorial's [-1, 1] floats.

    The same operations, in the same order, as the tutorial's
    ``Compose([ToTensor(), Normalize((0.5,) * 3, (0.5,) * 3)])``, so the result is
    bit-identical, but on a whole batch at once instead of image by image.
    """
    return images.float().div(255).sub(0.5).div(0.5)


class TensorLoader:
    """Batches of decoded images, like a DataLoader but without per-image work.

    Images stay uint8 (4x smaller than floats) and are normalized a batch at a
    time; shuffling draws one permutation per epoch from PyTorch's global
    generator, so `set_seed` fixes it. With CUDA the tensors live on the GPU and no
    batch is copied.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
    ) -> None:
        self.dataset = TensorDataset(images, labels)
        self.batch_size = batch_size
        self.shuffle = shuffle

    def __len__(self) -> int:
        """Return the number of batches per epoch."""
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        """Yield {"img": normalized images, "label": labels} batches."""
        images, labels = self.dataset.tensors
        order = (
            torch.randperm(len(labels), device=labels.device) if self.shuffle else None
        )
        for start in range(0, len(labels), self.batch_size):
            if order is None:
                index = slice(start, start + self.batch_size)
            else:
                index = order[start : start + self.batch_size]
            yield {IMAGE_KEY: normalize(images[index]), LABEL_KEY: labels[index]}


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
