"""CIFAR-10 loading through the real FederatedDataset path, on synthetic data."""

import hashlib

import numpy as np
import pytest
import torch
from conftest import NUM_TEST, NUM_TRAIN, data_settings, make_split, write_hub_layout
from datasets import load_dataset

from flower_tutorial import task
from flower_tutorial.task import (
    dataset_source,
    label_counts,
    load_data,
    load_test_data,
)

NUM_PARTITIONS = 4


def _digests(loader: torch.utils.data.DataLoader) -> list[str]:
    """Identify each sample of a loader's dataset by its tensor's bytes, in order."""
    return [
        hashlib.sha1(sample["img"].numpy().tobytes()).hexdigest()
        for sample in loader.dataset
    ]


def _load_all(cifar_dir, seed: int = 42) -> list[tuple[list[str], list[str]]]:
    data = data_settings(cifar_dir, **{"batch-size": 8, "seed": seed})
    loaders = [load_data(pid, NUM_PARTITIONS, data) for pid in range(NUM_PARTITIONS)]
    return [(_digests(train), _digests(val)) for train, val in loaders]


def test_partitions_split_80_20_into_batches(cifar_dir):
    data = data_settings(cifar_dir, **{"batch-size": 8})
    trainloader, valloader = load_data(0, NUM_PARTITIONS, data)
    per_partition = NUM_TRAIN // NUM_PARTITIONS
    assert len(trainloader.dataset) == int(per_partition * 0.8)
    assert len(valloader.dataset) == per_partition - int(per_partition * 0.8)
    batch = next(iter(trainloader))
    assert batch["img"].shape == (8, 3, 32, 32)
    assert batch["img"].dtype == torch.float32
    assert batch["img"].min() >= -1.0 and batch["img"].max() <= 1.0
    assert batch["label"].dtype == torch.int64


def test_partitions_are_disjoint_and_cover_the_train_split(cifar_dir):
    everything = load_dataset(str(cifar_dir), split="train")
    reference = {
        hashlib.sha1(sample["img"].numpy().tobytes()).hexdigest()
        for sample in everything.with_transform(task.apply_transforms)
    }
    seen = [d for train, val in _load_all(cifar_dir) for d in train + val]
    assert len(seen) == NUM_TRAIN
    assert len(set(seen)) == NUM_TRAIN
    assert set(seen) == reference


def test_partitioning_is_deterministic_and_follows_the_seed(cifar_dir):
    first = _load_all(cifar_dir)
    task._federated_dataset.cache_clear()  # rebuild from scratch
    assert _load_all(cifar_dir) == first
    assert _load_all(cifar_dir, seed=7) != first


def test_test_split_is_loaded_whole(cifar_dir):
    testloader = load_test_data(data_settings(cifar_dir, **{"batch-size": 16}))
    assert len(testloader.dataset) == NUM_TEST
    assert sum(len(b["label"]) for b in testloader) == NUM_TEST


def test_dataset_source_tells_folders_from_hub_ids(cifar_dir, tmp_path):
    assert dataset_source("uoft-cs/cifar10") == "uoft-cs/cifar10"
    assert dataset_source(str(cifar_dir)) == str(cifar_dir.resolve())
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(ValueError, match="'dataset' = .*no-such-folder.*no such"):
        dataset_source(missing)


def test_a_folder_without_the_cifar_columns_is_refused(tmp_path):
    split = make_split(20, 3).rename_column("img", "image")
    folder = write_hub_layout(tmp_path / "other", {"train": split, "test": split})
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['img'\]"):
        load_data(0, 2, data_settings(folder))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['img'\]"):
        load_test_data(data_settings(folder))


def _skew(counts: np.ndarray) -> float:
    """Mean total-variation distance of the partitions' label mix from the whole's."""
    overall = counts.sum(axis=0) / counts.sum()
    shares = counts / counts.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(shares - overall).sum(axis=1).mean())


@pytest.mark.parametrize(
    "overrides",
    [
        {"partitioner": "iid"},
        {"partitioner": "dirichlet", "dirichlet-alpha": 0.5},
        {"partitioner": "shards", "shards-per-partition": 2},
    ],
)
def test_each_partitioner_fills_every_partition(cifar_dir, overrides):
    data = data_settings(cifar_dir, **overrides)
    counts = label_counts(data, NUM_PARTITIONS)
    assert counts.shape == (NUM_PARTITIONS, 10)
    assert (counts.sum(axis=1) > 0).all()
    assert counts.sum() == NUM_TRAIN
    for pid in range(NUM_PARTITIONS):
        trainloader, valloader = load_data(pid, NUM_PARTITIONS, data)
        assert len(trainloader.dataset) + len(valloader.dataset) == counts[pid].sum()


def test_small_dirichlet_alpha_skews_the_labels(cifar_dir):
    iid = _skew(label_counts(data_settings(cifar_dir), NUM_PARTITIONS))
    skewed = _skew(
        label_counts(
            data_settings(
                cifar_dir, partitioner="dirichlet", **{"dirichlet-alpha": 0.1}
            ),
            NUM_PARTITIONS,
        )
    )
    assert iid < 0.25
    assert skewed > 0.5
    assert skewed > 2 * iid


def test_shards_give_each_partition_few_classes(cifar_dir):
    data = data_settings(cifar_dir, partitioner="shards", **{"shards-per-partition": 2})
    classes_held = (label_counts(data, NUM_PARTITIONS) > 0).sum(axis=1)
    # 240 images sorted by label in 8 shards of 30: a shard spans at most 2 classes.
    assert classes_held.max() <= 4
    assert (label_counts(data_settings(cifar_dir), NUM_PARTITIONS) > 0).sum(
        axis=1
    ).min() >= 8
