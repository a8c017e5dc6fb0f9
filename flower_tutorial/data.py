"""flower_tutorial: CIFAR-10 decoded: partitions, a node's own folder, the test split.

`task.load_data` and its siblings hand these tensors to the tutorial's loops; this
module finds the data (a hub id or a local folder), partitions it with Flower
Datasets, checks its schema and decodes each split once per process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, lru_cache
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flower_tutorial.cache import Decoded, DecodedCache, Tensors, default_cache_dir
from flower_tutorial.config import DATA_PATH, DataSettings

# datasets and flwr_datasets take a second to import: a process that finds its
# data in the cache never imports them.
if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import Partitioner

# Columns of `uoft-cs/cifar10`; a local folder must use the same schema.
IMAGE_KEY = "img"
LABEL_KEY = "label"
# What `Net` takes: (channels, height, width) and the number of classes.
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
# The fewest images the Dirichlet partitioner gives a partition: it redraws (ten
# times at most) until every partition holds this many (Flower Datasets' default).
DIRICHLET_MIN_PARTITION_SIZE = 10


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


@contextmanager
def hub_errors(dataset: str) -> Iterator[None]:
    """Turn "the hub cannot be reached" into what to do about it, in a few lines."""
    try:
        yield
    except ConnectionError as ex:
        raise ConnectionError(
            f"run config key 'dataset' = {dataset!r}: the Hugging Face hub cannot be "
            f"reached from this machine ({ex}). Download it where the hub can be "
            "reached, or set 'dataset' to a local copy in the hub's layout (a folder "
            "with plain_text/train-*.parquet and test-*.parquet): flwr run . "
            "--run-config 'dataset=\"/abs/path/to/cifar10\"' (docs/configuration.md)."
        ) from None


def data_cache(data: DataSettings) -> DecodedCache:
    """Return the run's data cache: the `data-cache-dir` folder, or none when off."""
    if not data.cache:
        return DecodedCache(None)
    if not data.cache_dir:
        return DecodedCache(default_cache_dir())
    return DecodedCache(Path(data.cache_dir).expanduser())


def dataset_fingerprint(dataset: str) -> dict[str, Any] | None:
    """Return what identifies a dataset's bytes: its files, or its hub revision.

    A local folder is known by its files' names, sizes and modification times; a
    hub dataset by the revision the Hugging Face cache holds of it. None before
    its first download: nothing decoded from it is cached then.
    """
    source = dataset_source(dataset)
    folder = Path(source)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return {
            "folder": source,
            "files": [
                [str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
                for p in files
            ],
        }
    revision = _hub_revision(source)
    return None if revision is None else {"hub": source, "revision": revision}


def _hub_revision(dataset_id: str) -> str | None:
    """Return the commit of a hub dataset in the local Hugging Face cache, if any."""
    from huggingface_hub.constants import HF_HUB_CACHE

    name = "datasets--" + dataset_id.replace("/", "--")
    ref = Path(HF_HUB_CACHE) / name / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def partitioner_settings(data: DataSettings) -> dict[str, Any]:
    """Return the partitioner's name and the parameters it uses (not the others)."""
    settings: dict[str, Any] = {"name": data.partitioner}
    if data.partitioner == "dirichlet":
        settings["alpha"] = data.dirichlet_alpha
    if data.partitioner == "shards":
        settings["shards_per_partition"] = data.shards_per_partition
    return settings


def check_schema(split: Dataset, dataset: str, key: str = "dataset") -> None:
    """Refuse a split without the CIFAR-10 columns, naming what it has instead."""
    missing = {IMAGE_KEY, LABEL_KEY} - set(split.column_names)
    if missing:
        raise ValueError(
            f"{key} {dataset!r} lacks the column(s) {sorted(missing)}: expected "
            f"the CIFAR-10 schema ('{IMAGE_KEY}': image, '{LABEL_KEY}': class label), "
            f"found {split.column_names}."
        )
    label = split.features[LABEL_KEY]
    if not hasattr(label, "names"):  # the class names label the plots and history
        raise ValueError(
            f"{key} {dataset!r}: column '{LABEL_KEY}' is {label}, expected a class "
            "label (datasets.ClassLabel with the 10 CIFAR-10 class names)."
        )


def make_partitioner(data: DataSettings, num_partitions: int) -> Partitioner:
    """Return the flwr-datasets partitioner that `data.partitioner` names.

    "iid": equal random shares (the tutorial); "dirichlet": label proportions per
    organization drawn from Dir(alpha), smaller alpha = more skew; "shards": the
    train split sorted by label and dealt out in `shards-per-partition` shards.
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        ShardPartitioner,
    )

    if data.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL_KEY,
            alpha=data.dirichlet_alpha,
            min_partition_size=DIRICHLET_MIN_PARTITION_SIZE,
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
    from flwr_datasets import FederatedDataset

    return FederatedDataset(
        dataset=dataset_source(data.dataset),
        partitioners={"train": make_partitioner(data, num_partitions)},
        seed=data.seed,
    )


def load_partition(
    partition_id: int, num_partitions: int, data: DataSettings
) -> Dataset:
    """Return one organization's raw partition (PIL images, integer labels).

    A Dirichlet split that cannot give every partition its minimum fails the same
    way for every partition, with the numbers to change.
    """
    fds = _federated_dataset(data, num_partitions)
    with hub_errors(data.dataset):
        partitioner = fds.partitioners["train"]  # loads the dataset, once
    try:
        partition = fds.load_partition(partition_id)
    except ValueError as ex:  # only partitioning is left to fail
        if data.partitioner != "dirichlet":
            raise
        # The next try must draw from the seed again, as every other process does.
        _federated_dataset.cache_clear()
        raise ValueError(
            f"partitioner 'dirichlet' with 'dirichlet-alpha' = "
            f"{data.dirichlet_alpha} could not give each of the {num_partitions} "
            f"partitions at least {DIRICHLET_MIN_PARTITION_SIZE} of the train "
            f"split's {partitioner.dataset.num_rows} images (Flower Datasets: {ex}). "
            "Use fewer partitions, a larger 'dirichlet-alpha' (less skew) or "
            "another partitioner."
        ) from ex
    check_schema(partition, data.dataset)
    if len(partition) < 2:
        raise ValueError(
            f"partition {partition_id} of {num_partitions} holds {len(partition)} "
            f"image(s) with partitioner {data.partitioner!r}: too few to split into "
            "training and validation data. Use fewer partitions or less skew."
        )
    return partition


def decode(split: Dataset) -> Tensors:
    """Decode a split's images once into uint8 (N, 3, H, W) and labels into int64."""
    pixels = np.stack([np.asarray(img.convert("RGB")) for img in split[IMAGE_KEY]])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(split[LABEL_KEY], dtype=torch.int64)


def _names(split: Dataset) -> list[str]:
    return list(split.features[LABEL_KEY].names)


def _partition_key(
    partition_id: int, num_partitions: int, data: DataSettings
) -> dict[str, Any] | None:
    """Return what makes a partition's bytes (None: unknown, nothing is cached)."""
    fingerprint = dataset_fingerprint(data.dataset)
    if fingerprint is None:
        return None
    return {
        "what": "partition",
        "dataset": fingerprint,
        "partitioner": partitioner_settings(data),
        "num_partitions": num_partitions,
        "partition_id": partition_id,
        "seed": data.seed,
    }


@cache
def decoded_partition(
    partition_id: int, num_partitions: int, data: DataSettings, device: str
) -> Decoded:
    """Return one partition's 80/20 splits ("train", "test"), decoded, on `device`.

    From the data cache when an earlier process or run decoded them; else decoded
    here, once per process: Ray reuses a worker for many clients and rounds. All
    partitions together are the train split once (150 MB of uint8 for CIFAR-10),
    however many clients share it.
    """

    def build() -> Decoded:
        partition = load_partition(partition_id, num_partitions, data)
        splits = partition.train_test_split(test_size=0.2, seed=data.seed)
        decoded = {name: decode(split) for name, split in splits.items()}
        return Decoded(decoded, _names(partition))

    key = _partition_key(partition_id, num_partitions, data)
    return data_cache(data).get(key, build).on(device)


@cache
def decoded_folder(data_path: str, data: DataSettings, device: str) -> Decoded:
    """Return a node's own folder decoded: its train and validation data.

    From the data cache when an earlier process decoded the same files.
    """
    key = {
        "what": "folder",
        "dataset": dataset_fingerprint(data_path),
        "seed": data.seed,
    }
    build = lambda: _decode_folder(data_path, data.seed)  # noqa: E731
    return data_cache(data).get(key, build).on(device)


def _decode_folder(data_path: str, seed: int) -> Decoded:
    """Check and decode a node's folder: a train split, and maybe a validation one."""
    from datasets import load_dataset

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
        check_schema(split, data_path, key=f"node config key '{DATA_PATH}' =")
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
        _check_image_sizes(split, key)
        decoded[name] = decode(split)
        _check_labels(decoded[name][1], key)
    return Decoded(decoded, _names(splits["train"]))


def _check_image_sizes(split: Dataset, key: str) -> None:
    """Refuse images other than 32x32 by their headers, before decoding any.

    A folder of large images would otherwise be decoded whole, and could fill
    the memory, before its size was seen.
    """
    from datasets import Image
    from PIL import Image as PILImage

    expected = (IMAGE_SHAPE[2], IMAGE_SHAPE[1])  # PIL's (width, height)
    encoded = split.cast_column(IMAGE_KEY, Image(decode=False))[IMAGE_KEY]
    for i, image in enumerate(encoded):
        source = BytesIO(image["bytes"]) if image["bytes"] else image["path"]
        try:
            with PILImage.open(source) as opened:  # reads the header only
                size = opened.size
        except Exception as ex:  # PIL raises many kinds for a broken file
            raise ValueError(f"{key}: image {i} cannot be read ({ex}).") from ex
        if size != expected:
            raise ValueError(
                f"{key} is not allowed: image {i} is {size[0]}x{size[1]} pixels, "
                f"the CNN takes {expected[0]}x{expected[1]}."
            )


def _check_labels(labels: torch.Tensor, key: str) -> None:
    """Refuse labels outside CIFAR-10's classes, which `Net` could not predict."""
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if len(bad):
        raise ValueError(
            f"{key} is not allowed: label {int(bad[0])} is outside "
            f"[0, {NUM_CLASSES}), CIFAR-10's classes."
        )


@lru_cache(maxsize=2)
def decoded_test_split(data: DataSettings, device: str) -> Decoded:
    """Return the whole test split decoded (the server's evaluation), once a process."""

    def build() -> Decoded:
        split = _load_split(data, "test")
        check_schema(split, data.dataset)
        return Decoded({"test": decode(split)}, _names(split))

    fingerprint = dataset_fingerprint(data.dataset)
    key = (
        None if fingerprint is None else {"what": "test split", "dataset": fingerprint}
    )
    return data_cache(data).get(key, build).on(device)


def train_split_size(data: DataSettings) -> int:
    """Return how many images the train split holds.

    No partition of it holds more; a node's own `data-path` folder may.
    """
    return _load_split(data, "train").num_rows


def _load_split(data: DataSettings, split: str) -> Dataset:
    """Open the run's dataset's `split` (undecoded), from its folder or the hub."""
    from datasets import load_dataset

    with hub_errors(data.dataset):
        return load_dataset(dataset_source(data.dataset), split=split)


def label_counts(data: DataSettings, num_partitions: int) -> np.ndarray:
    """Return how many images of each class every partition holds.

    Shape (num_partitions, num_classes); row i is what organization i trains and
    validates on. From the partitions' labels in the data cache when it holds
    them all (a simulation's clients put them there); else from the label column
    of each partition (Flower Datasets' own `plot_label_distributions` reads the
    partitions row by row: 3-6 s for CIFAR-10's 50,000 images).
    """
    cache = data_cache(data)
    cached = [
        cache.peek(_partition_key(pid, num_partitions, data))
        for pid in range(num_partitions)
    ]
    if all(cached):
        labels = [torch.cat([y for _, y in c.splits.values()]) for c in cached]
        return np.stack([np.bincount(y, minlength=NUM_CLASSES) for y in labels])
    fds = _federated_dataset(data, num_partitions)
    with hub_errors(data.dataset):
        return np.stack(
            [
                np.bincount(fds.load_partition(pid)[LABEL_KEY], minlength=NUM_CLASSES)
                for pid in range(num_partitions)
            ]
        )
