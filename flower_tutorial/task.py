"""flower_tutorial: the tutorial's model, training loops and CIFAR-10 loaders."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from functools import cache, lru_cache
from pathlib import Path

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
from torch.utils.data import TensorDataset

from flower_tutorial.config import DATA_PATH, DataSettings

# A batch as the loaders yield it: {"img": images, "label": labels}.
Batch = dict[str, torch.Tensor]

# Columns of `uoft-cs/cifar10`; a local folder must use the same schema.
IMAGE_KEY = "img"
LABEL_KEY = "label"
# What `Net` takes: (channels, height, width) and the number of classes.
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


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


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images (N, 3, H, W) to the tutorial's [-1, 1] floats.

    The same operations, in the same order, as the tutorial's
    ``Compose([ToTensor(), Normalize((0.5,) * 3, (0.5,) * 3)])``, so the result is
    bit-identical, but on a whole batch at once instead of image by image.
    """
    return images.float().div(255).sub(0.5).div(0.5)


def decode(split: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a split's images once into uint8 (N, 3, H, W) and labels into int64."""
    pixels = np.stack([np.asarray(img.convert("RGB")) for img in split[IMAGE_KEY]])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(split[LABEL_KEY], dtype=torch.int64)


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


def _check_schema(split: Dataset, dataset: str, key: str = "dataset") -> None:
    missing = {IMAGE_KEY, LABEL_KEY} - set(split.column_names)
    if missing:
        raise ValueError(
            f"{key} {dataset!r} lacks the column(s) {sorted(missing)}: expected "
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


@cache
def _decoded_partition(
    partition_id: int, num_partitions: int, data: DataSettings, device: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Decode one partition's 80/20 splits once per process, onto `device`.

    Ray reuses a worker for many clients and rounds: each partition it serves is
    decoded the first time only. All partitions together are the train split once
    (150 MB of uint8 for CIFAR-10), however many clients share it.
    """
    partition = load_partition(partition_id, num_partitions, data)
    splits = partition.train_test_split(test_size=0.2, seed=data.seed)
    return {
        name: tuple(t.to(device) for t in decode(split))
        for name, split in splits.items()
    }


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
    splits = _decoded_partition(
        partition_id, num_partitions, data, str(device or torch.device("cpu"))
    )
    return _loaders(splits, data.batch_size)


def _loaders(
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int
) -> tuple[TensorLoader, TensorLoader]:
    """(train, val) loaders over decoded splits; only training data is shuffled."""
    trainloader = TensorLoader(*splits["train"], batch_size, shuffle=True)
    return trainloader, TensorLoader(*splits["test"], batch_size)


@cache
def _decoded_folder(
    data_path: str, seed: int, device: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Decode a node's own folder once per process: its train and validation data."""
    key = f"node config key '{DATA_PATH}' = {data_path!r}"
    try:
        splits = load_dataset(str(Path(data_path).expanduser().resolve()))
    except Exception as ex:  # datasets raises many kinds for an unusable folder
        raise ValueError(
            f"{key} is not allowed: no dataset could be loaded from it ({ex}). "
            "Expected a folder holding a train split in the CIFAR-10 schema, e.g. "
            "train-00000-of-00001.parquet with the columns 'img' and 'label'."
        ) from ex
    if "train" not in splits:
        raise ValueError(
            f"{key} is not allowed: it holds the split(s) {sorted(splits)} but no "
            "'train' split (files named train-*.parquet, or a train/ folder)."
        )
    for split in splits.values():
        _check_schema(split, data_path, key=f"node config key '{DATA_PATH}' =")
    if "validation" in splits:
        parts = {"train": splits["train"], "test": splits["validation"]}
    elif len(splits["train"]) >= 2:
        parts = splits["train"].train_test_split(test_size=0.2, seed=seed)
    else:
        raise ValueError(
            f"{key} is not allowed: its train split holds {len(splits['train'])} "
            "image(s), too few to split into training and validation data."
        )
    decoded = {}
    for name, split in parts.items():
        try:
            images, labels = decode(split)
        except ValueError as ex:  # np.stack: images of different sizes
            raise ValueError(f"{key}: its images differ in size ({ex}).") from ex
        _check_images(images, labels, key)
        decoded[name] = (images.to(device), labels.to(device))
    return decoded


def _check_images(images: torch.Tensor, labels: torch.Tensor, key: str) -> None:
    """Check decoded data against what `Net` takes: 32x32 RGB, labels 0-9."""
    if tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"{key} is not allowed: its images are {tuple(images.shape[1:])} "
            f"(channels, height, width), the CNN takes {IMAGE_SHAPE}."
        )
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if len(bad):
        raise ValueError(
            f"{key} is not allowed: label {int(bad[0])} is outside "
            f"[0, {NUM_CLASSES}), CIFAR-10's classes."
        )


def load_local_data(
    data_path: str, data: DataSettings, device: torch.device | None = None
) -> tuple[TensorLoader, TensorLoader]:
    """Load a node's own data folder as (train, val) loaders, like `load_data`.

    The folder holds a train split in the CIFAR-10 schema and, optionally, a
    validation split; without one, the train split is split 80/20 with the seed.
    """
    splits = _decoded_folder(data_path, data.seed, str(device or torch.device("cpu")))
    return _loaders(splits, data.batch_size)


@lru_cache(maxsize=2)
def _decoded_test_split(
    data: DataSettings, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    split = load_dataset(dataset_source(data.dataset), split="test")
    _check_schema(split, data.dataset)
    return tuple(t.to(device) for t in decode(split))


def load_test_data(
    data: DataSettings, device: torch.device | None = None
) -> TensorLoader:
    """Load the whole test split (10,000 images for CIFAR-10), decoded once."""
    images, labels = _decoded_test_split(data, str(device or torch.device("cpu")))
    return TensorLoader(images, labels, data.batch_size)


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
