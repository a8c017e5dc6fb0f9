"""CIFAR-10 loading through the real FederatedDataset path, on synthetic data."""

import hashlib
import re

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import (
    CIFAR10_CLASSES,
    NUM_TEST,
    NUM_TRAIN,
    data_settings,
    make_split,
    write_hub_layout,
)
from datasets import ClassLabel, Dataset, Features, Image, Value, load_dataset
from PIL import Image as PILImage
from torchvision.transforms import Compose, Normalize, ToTensor

from flower_tutorial import data as pipeline
from flower_tutorial import task
from flower_tutorial.data import dataset_source, decode, load_partition
from flower_tutorial.task import load_data, load_test_data

NUM_PARTITIONS = 4


def _digests(images: torch.Tensor) -> list[str]:
    """Identify each image by its bytes, in order."""
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images]


def _load_all(cifar_dir, seed: int = 42) -> list[tuple[list[str], list[str]]]:
    data = data_settings(cifar_dir, **{"batch-size": 8, "seed": seed})
    loaders = [load_data(pid, NUM_PARTITIONS, data) for pid in range(NUM_PARTITIONS)]
    return [
        (_digests(train.dataset.tensors[0]), _digests(val.dataset.tensors[0]))
        for train, val in loaders
    ]


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
    images, _ = decode(load_dataset(str(cifar_dir), split="train"))
    reference = set(_digests(images))
    seen = [d for train, val in _load_all(cifar_dir) for d in train + val]
    assert len(seen) == NUM_TRAIN
    assert len(set(seen)) == NUM_TRAIN
    assert set(seen) == reference


def test_partitioning_is_deterministic_and_follows_the_seed(cifar_dir):
    first = _load_all(cifar_dir)
    # Rebuild from scratch.
    pipeline._federated_dataset.cache_clear()
    pipeline.decoded_partition.cache_clear()
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


@pytest.mark.parametrize(
    "missing", ["./no-such-folder", "../no-such-folder", "~/no-such-folder", "/no-such"]
)
def test_a_path_to_no_folder_is_refused_not_taken_for_a_hub_id(
    tmp_path, monkeypatch, missing
):
    # A value written as a path (relative, in the home folder, or absolute) means
    # a local copy: a typo in it must stop the run, not send it to the hub.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as ex:
        dataset_source(missing)
    assert str(ex.value) == (
        f"run config key 'dataset' = {missing!r} is not allowed: no such folder. "
        "Expected a hub dataset id (e.g. 'uoft-cs/cifar10') or the path of an "
        "existing folder holding the dataset in the hub's layout."
    )


def test_a_local_folders_fingerprint_is_its_files_names_sizes_and_mtimes(tmp_path):
    # It is the data cache's key of what was decoded from the folder, written in
    # each entry's manifest and hashed into its name: a renamed, resized or
    # touched file misses the cache; other spellings would miss every user's cache.
    root = write_hub_layout(
        tmp_path / "cifar", {"train": make_split(20, 0), "test": make_split(10, 1)}
    )
    files = [
        "plain_text/test-00000-of-00001.parquet",  # sorted, relative to the folder
        "plain_text/train-00000-of-00001.parquet",
    ]
    stats = [(root / f).stat() for f in files]
    assert pipeline.dataset_fingerprint(str(root)) == {
        "folder": str(root.resolve()),
        "files": [
            [f, st.st_size, st.st_mtime_ns] for f, st in zip(files, stats, strict=True)
        ],
    }


def test_a_folder_without_the_cifar_columns_is_refused(tmp_path):
    split = make_split(20, 3).rename_column("img", "image")
    folder = write_hub_layout(tmp_path / "other", {"train": split, "test": split})
    # The message names the run config's 'dataset', the value to correct.
    refusal = re.escape(f"dataset {str(folder)!r} lacks the column(s) ['img']")
    with pytest.raises(ValueError, match=refusal):
        load_data(0, 2, data_settings(folder))
    with pytest.raises(ValueError, match=refusal):
        load_test_data(data_settings(folder))


def test_labels_without_class_names_are_refused_saying_what_to_give_instead(tmp_path):
    # The class names label the plots and the history: the message names the run
    # config's 'dataset' and the kind of column that holds them.
    split = make_split(20, 3).cast_column("label", Value("int64"))
    folder = write_hub_layout(tmp_path / "plain", {"train": split, "test": split})
    with pytest.raises(ValueError) as err:
        load_test_data(data_settings(folder))
    assert str(err.value) == (
        f"dataset {str(folder)!r}: column 'label' is Value('int64'), expected a "
        "class label (datasets.ClassLabel with the 10 CIFAR-10 class names)."
    )


def label_counts(data, num_partitions: int) -> np.ndarray:
    """Images of each class (columns) in every partition (rows)."""
    return np.stack(
        [
            np.bincount(
                load_partition(pid, num_partitions, data)["label"], minlength=10
            )
            for pid in range(num_partitions)
        ]
    )


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


@pytest.mark.parametrize(
    "overrides",
    [
        {"partitioner": "dirichlet", "dirichlet-alpha": 0.5},
        {"partitioner": "shards", "shards-per-partition": 2},
    ],
    ids=["dirichlet", "shards"],
)
def test_the_label_mix_of_skewed_partitions_follows_the_seed(cifar_dir, overrides):
    # The dataset's shuffle does not change which labels a partition gets; only
    # the partitioner's own draws do. So these show that the partitioner draws
    # from the run's seed: the same partitions in every process, others for
    # another seed.
    def counts(seed: int) -> list[list[int]]:
        pipeline._federated_dataset.cache_clear()  # as a fresh process
        data = data_settings(cifar_dir, seed=seed, **overrides)
        return label_counts(data, NUM_PARTITIONS).tolist()

    first = counts(7)
    for _ in range(2):
        assert counts(7) == first
    assert counts(8) != first


def test_a_partition_needs_two_images_one_to_train_one_to_validate(tmp_path):
    # 6 images in 4 IID partitions: partitions 0 and 1 hold 2, partitions 2 and 3
    # hold 1.
    folder = write_hub_layout(
        tmp_path / "tiny", {"train": make_split(6, 0), "test": make_split(4, 1)}
    )
    data = data_settings(folder)
    trainloader, valloader = load_data(1, NUM_PARTITIONS, data)
    assert (len(trainloader.dataset), len(valloader.dataset)) == (1, 1)
    with pytest.raises(ValueError) as err:
        load_data(2, NUM_PARTITIONS, data)
    assert str(err.value) == (
        "partition 2 of 4 holds 1 image(s) with partitioner 'iid': too few to split "
        "into training and validation data. Use fewer partitions or less skew."
    )


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


@pytest.mark.parametrize(
    ("num_partitions", "alpha", "seed"),
    [
        (30, 0.3, 42),  # 240 images cannot give 30 organizations 10 each
        (16, 0.5, 43),  # 11 draws fail; a 12th, in the same process, would not
    ],
)
def test_a_dirichlet_split_without_10_images_each_fails_every_client_alike(
    cifar_dir, num_partitions, alpha, seed
):
    data = data_settings(
        cifar_dir, partitioner="dirichlet", seed=seed, **{"dirichlet-alpha": alpha}
    )
    message = (
        f"partitioner 'dirichlet' with 'dirichlet-alpha' = {alpha} could not give "
        f"each of the {num_partitions} partitions at least 10 of the train split's "
        "240 images (Flower Datasets: The max number of attempts (10) was reached. "
        "Please update the values of alpha and try again.). Use fewer partitions, a "
        "larger 'dirichlet-alpha' (less skew) or another partitioner."
    )
    # Every client, one after another in one process as Ray's workers run them.
    for pid in (0, num_partitions - 1):
        with pytest.warns(UserWarning), pytest.raises(ValueError) as err:
            load_data(pid, num_partitions, data)
        assert str(err.value) == message


# The tutorial's per-image transform: the reference the decoded pipeline must match.
REFERENCE = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def test_decoded_batches_equal_the_tutorials_transform_bit_for_bit(cifar_dir):
    data = data_settings(cifar_dir, **{"batch-size": 5})
    _, valloader = load_data(1, NUM_PARTITIONS, data)  # unshuffled: known order
    partition = load_partition(1, NUM_PARTITIONS, data)
    reference = partition.train_test_split(test_size=0.2, seed=data.seed)["test"]
    batch = next(iter(valloader))
    for i in range(5):
        expected = REFERENCE(reference[i]["img"])
        assert torch.equal(batch["img"][i], expected)
        assert batch["label"][i].item() == reference[i]["label"]


def test_a_partition_is_decoded_once_per_process_not_per_round(cifar_dir, monkeypatch):
    pipeline.decoded_partition.cache_clear()
    calls = []
    real_decode = pipeline.decode
    monkeypatch.setattr(
        pipeline, "decode", lambda split: calls.append(1) or real_decode(split)
    )
    data = data_settings(cifar_dir, **{"data-cache": False})
    for _ in range(3):  # three rounds of the same client
        trainloader, _ = load_data(2, NUM_PARTITIONS, data)
        sum(len(b["label"]) for b in trainloader)
    assert len(calls) == 2  # its train and validation splits, once each
    load_data(3, NUM_PARTITIONS, data)
    assert len(calls) == 4


def test_shuffling_follows_the_global_seed(cifar_dir):
    trainloader, _ = load_data(0, NUM_PARTITIONS, data_settings(cifar_dir))

    def first_labels(seed: int) -> list[int]:
        torch.manual_seed(seed)
        return next(iter(trainloader))["label"].tolist()

    assert first_labels(1) == first_labels(1)
    assert first_labels(1) != first_labels(2)
    epoch = torch.cat([b["label"] for b in trainloader])
    assert sorted(epoch.tolist()) == sorted(trainloader.dataset.tensors[1].tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_data_lives_on_the_gpu(cifar_dir):
    cuda = torch.device("cuda")
    trainloader, valloader = load_data(
        0, NUM_PARTITIONS, data_settings(cifar_dir), cuda
    )
    assert all(
        t.is_cuda for t in trainloader.dataset.tensors + valloader.dataset.tensors
    )
    torch.manual_seed(5)
    first = next(iter(trainloader))
    torch.manual_seed(5)
    again = next(iter(trainloader))
    assert first["img"].is_cuda and first["img"].dtype == torch.float32
    assert torch.equal(first["label"], again["label"])  # seeded shuffling on the GPU
    cpu_train, _ = load_data(0, NUM_PARTITIONS, data_settings(cifar_dir))
    assert torch.equal(
        trainloader.dataset.tensors[0].cpu(), cpu_train.dataset.tensors[0]
    )


def _resized(split, size: int):
    """The split with its images scaled to size x size."""
    return split.map(lambda row: {"img": row["img"].resize((size, size))})


def _local_folder(root, splits: dict) -> str:
    """A node's own data folder: <split>-00000-of-00001.parquet files."""
    root.mkdir()
    for name, split in splits.items():
        split.to_parquet(str(root / f"{name}-00000-of-00001.parquet"))
    return str(root)


def test_a_local_data_folder_is_split_80_20_like_a_partition(tmp_path, cifar_dir):
    folder = _local_folder(tmp_path / "site", {"train": make_split(50, 7)})
    data = data_settings(cifar_dir, **{"batch-size": 8})
    trainloader, valloader = task.load_local_data(folder, data)
    assert (len(trainloader.dataset), len(valloader.dataset)) == (40, 10)
    assert (len(trainloader), len(valloader)) == (5, 2)  # batches, the last short
    assert [len(b["label"]) for b in valloader] == [8, 2]
    images = trainloader.dataset.tensors[0]
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    expected = decode(load_dataset(folder, split="train"))[0]
    both = torch.cat([images, valloader.dataset.tensors[0]])
    assert sorted(_digests(both)) == sorted(_digests(expected))  # all of it, once


def test_a_local_train_split_is_split_with_the_runs_seed(tmp_path, cifar_dir):
    folder = _local_folder(tmp_path / "site", {"train": make_split(50, 7)})
    data = data_settings(cifar_dir, seed=11)
    trainloader, valloader = task.load_local_data(folder, data)
    reference = load_dataset(folder, split="train").train_test_split(
        test_size=0.2, seed=11
    )
    for loader, name in ((trainloader, "train"), (valloader, "test")):
        images, labels = loader.dataset.tensors
        expected_images, expected_labels = decode(reference[name])
        assert _digests(images) == _digests(expected_images)
        assert torch.equal(labels, expected_labels)


def test_a_local_train_split_of_two_images_gives_one_to_each(tmp_path, cifar_dir):
    folder = _local_folder(tmp_path / "site", {"train": make_split(2, 7)})
    trainloader, valloader = task.load_local_data(folder, data_settings(cifar_dir))
    assert (len(trainloader.dataset), len(valloader.dataset)) == (1, 1)


def test_a_local_validation_split_is_used_as_is(tmp_path, cifar_dir):
    splits = {"train": make_split(30, 7), "validation": make_split(12, 8)}
    folder = _local_folder(tmp_path / "site", splits)
    trainloader, valloader = task.load_local_data(folder, data_settings(cifar_dir))
    assert (len(trainloader.dataset), len(valloader.dataset)) == (30, 12)
    expected = decode(load_dataset(folder, split="validation"))[0]
    assert _digests(valloader.dataset.tensors[0]) == _digests(expected)


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        ({}, r"'data-path' = .* no dataset could be loaded from it"),
        ({"test": make_split(10, 1)}, r"'data-path' = .* no 'train' split"),
        (
            {"train": make_split(10, 1).rename_column("img", "image")},
            r"node config key 'data-path' .* lacks the column\(s\) \['img'\]",
        ),
        (
            {"train": make_split(10, 1).cast_column("label", Value("int64"))},
            r"'data-path' = .* column 'label' is Value\('int64'\), expected a class",
        ),
        ({"train": make_split(1, 1)}, r"'data-path' = .* holds 1 image\(s\)"),
        (
            {"train": _resized(make_split(10, 1), 16)},
            r"image 0 is 16x16 pixels, the CNN takes 32x32",
        ),
        (
            {
                "train": make_split(10, 1)
                .cast_column("label", ClassLabel(num_classes=20))
                .map(lambda row: {"label": row["label"] + 10})
            },
            r"label 1\d is outside \[0, 10\)",
        ),
    ],
    ids=[
        "empty",
        "no-train-split",
        "wrong-columns",
        "plain-int-label",
        "one-image",
        "16x16",
        "label",
    ],
)
def test_an_unusable_local_folder_is_a_clear_error(
    tmp_path, cifar_dir, contents, message
):
    folder = _local_folder(tmp_path / "site", contents)
    with pytest.raises(ValueError, match=message):
        task.load_local_data(folder, data_settings(cifar_dir))


def _refusal(folder: str, cifar_dir) -> str:
    """The message with which `load_local_data` refuses the folder."""
    with pytest.raises(ValueError) as err:
        task.load_local_data(folder, data_settings(cifar_dir))
    return str(err.value)


def test_a_folder_without_a_dataset_says_what_it_should_hold(tmp_path, cifar_dir):
    folder = _local_folder(tmp_path / "site", {})
    message = _refusal(folder, cifar_dir)
    assert message.startswith(
        f"node config key 'data-path' = {folder!r} is not allowed: no dataset could "
        "be loaded from it ("
    )
    assert message.endswith(
        "). Expected a folder holding a train split in the CIFAR-10 schema, e.g. "
        "train-00000-of-00001.parquet with the columns 'img' and 'label'."
    )


def test_a_wrong_image_size_is_given_as_width_x_height(tmp_path, cifar_dir):
    wide = make_split(10, 1).map(lambda row: {"img": row["img"].resize((48, 32))})
    folder = _local_folder(tmp_path / "site", {"train": wide})
    assert _refusal(folder, cifar_dir) == (
        f"node config key 'data-path' = {folder!r} is not allowed: image 0 is "
        "48x32 pixels, the CNN takes 32x32."
    )


def test_an_unreadable_image_is_named_by_its_index(tmp_path, cifar_dir):
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_CLASSES)})
    broken = {"bytes": b"not an image", "path": None}
    good = make_split(3, 2)["img"]
    validation = Dataset.from_dict(
        {"img": [good[0], broken, good[2]], "label": [0, 1, 2]}, features
    )
    folder = _local_folder(
        tmp_path / "site", {"train": make_split(10, 1), "validation": validation}
    )
    message = _refusal(folder, cifar_dir)
    assert message.startswith(
        f"node config key 'data-path' = {folder!r}: image 1 cannot be read ("
    )
    assert message.endswith(").")


def test_class_label_10_is_outside_cifar10s_classes(tmp_path, cifar_dir):
    split = (
        make_split(10, 1)
        .cast_column("label", ClassLabel(num_classes=11))
        .map(
            lambda row, i: {"label": 10 if i == 4 else row["label"]}, with_indices=True
        )
    )
    folder = _local_folder(tmp_path / "site", {"train": split})
    assert _refusal(folder, cifar_dir) == (
        f"node config key 'data-path' = {folder!r} is not allowed: label 10 is "
        "outside [0, 10), CIFAR-10's classes."
    )


def test_images_stored_as_file_paths_are_read_from_their_files(tmp_path, cifar_dir):
    # A parquet file may name its images' files instead of holding their bytes.
    (tmp_path / "images").mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), np.uint8)
    paths = [str(tmp_path / "images" / f"{i}.png") for i in range(5)]
    for array, path in zip(pixels, paths, strict=True):
        PILImage.fromarray(array).save(path)
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_CLASSES)})
    train = Dataset.from_dict({"img": paths, "label": [0, 1, 2, 3, 4]}, features)
    assert train.cast_column("img", Image(decode=False))[0]["img"]["bytes"] is None
    folder = _local_folder(tmp_path / "site", {"train": train, "validation": train})
    _, valloader = task.load_local_data(folder, data_settings(cifar_dir))
    images, labels = valloader.dataset.tensors
    assert torch.equal(images, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert labels.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("channels", [1, 4], ids=["grayscale", "with-alpha"])
def test_grayscale_and_transparent_images_are_decoded_to_rgb(channels):
    # A node's own folder may hold such PNGs, and the CNN takes 3 channels: grey
    # goes to red, green and blue alike; the alpha channel is dropped.
    pixels = np.random.default_rng(5).integers(0, 256, (2, 32, 32, channels), np.uint8)
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_CLASSES)})
    stored = [PILImage.fromarray(p[..., 0] if channels == 1 else p) for p in pixels]
    split = Dataset.from_dict({"img": stored, "label": [0, 1]}, features)
    assert {img.mode for img in split["img"]} == {"L" if channels == 1 else "RGBA"}
    images, _ = decode(split)
    rgb = np.repeat(pixels, 3, axis=-1) if channels == 1 else pixels[..., :3]
    assert torch.equal(images, torch.from_numpy(rgb).permute(0, 3, 1, 2))


def test_loaders_put_the_data_on_the_device_asked_for(tmp_path, cifar_dir):
    # PyTorch's "meta" device (shapes, no data) stands in for a GPU here.
    meta = torch.device("meta")
    data = data_settings(cifar_dir)
    folder = _local_folder(tmp_path / "site", {"train": make_split(10, 7)})
    loaders = [
        *load_data(0, NUM_PARTITIONS, data, meta),
        *task.load_local_data(folder, data, meta),
        load_test_data(data, meta),
    ]
    for loader in loaders:
        assert [t.device for t in loader.dataset.tensors] == [meta, meta]


def test_large_images_are_refused_before_any_is_decoded(
    tmp_path, cifar_dir, monkeypatch
):
    folder = _local_folder(
        tmp_path / "site", {"train": _resized(make_split(4, 1), 512)}
    )
    monkeypatch.setattr(pipeline, "decode", lambda split: pytest.fail("decoded"))
    with pytest.raises(ValueError, match=r"image 0 is 512x512 pixels, the CNN takes"):
        task.load_local_data(folder, data_settings(cifar_dir))


@pytest.mark.parametrize(
    "load",
    [
        lambda hub: pipeline.decoded_test_split(hub, "cpu"),
        lambda hub: pipeline.train_split_size(hub),
        lambda hub: pipeline.label_counts(hub, NUM_PARTITIONS),
        lambda hub: load_data(0, NUM_PARTITIONS, hub),
    ],
    ids=["test-split", "train-split-size", "label-counts", "partition"],
)
def test_an_unreachable_hub_says_which_key_to_set(load):
    # The tests run with HF_HUB_OFFLINE (conftest): the hub cannot be reached.
    hub = data_settings("uoft-cs/cifar10")
    with pytest.raises(ConnectionError) as ex:
        load(hub)
    message = str(ex.value)
    assert "'dataset' = 'uoft-cs/cifar10'" in message
    assert "local copy" in message and "--run-config" in message
    assert ex.value.__suppress_context__  # no second traceback from `datasets`


def test_a_hub_dataset_is_known_by_the_revision_in_the_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert pipeline.dataset_fingerprint("uoft-cs/cifar10") is None  # not downloaded
    ref = tmp_path / "datasets--uoft-cs--cifar10" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("0b2714987fa478483af9968de7c934580d0bb9a2\n")
    assert pipeline.dataset_fingerprint("uoft-cs/cifar10") == {
        "hub": "uoft-cs/cifar10",
        "revision": "0b2714987fa478483af9968de7c934580d0bb9a2",
    }


def _shards(cifar_dir, cache_dir) -> object:
    """Shard partitions (few classes each) with their own data cache."""
    return data_settings(
        cifar_dir,
        partitioner="shards",
        **{"shards-per-partition": 2, "data-cache-dir": str(cache_dir)},
    )


def test_label_counts_are_counted_in_each_partition(cifar_dir, tmp_path):
    data = _shards(cifar_dir, tmp_path)
    expected = label_counts(data, NUM_PARTITIONS)
    assert (expected[:, -1] == 0).any()  # a partition without the last class
    counts = pipeline.label_counts(data, NUM_PARTITIONS)
    assert counts.shape == (NUM_PARTITIONS, 10)
    assert counts.tolist() == expected.tolist()


def test_label_counts_come_from_the_data_cache_once_it_holds_every_partition(
    cifar_dir, tmp_path, monkeypatch
):
    data = _shards(cifar_dir, tmp_path)
    expected = label_counts(data, NUM_PARTITIONS).tolist()
    for pid in range(NUM_PARTITIONS - 1):
        load_data(pid, NUM_PARTITIONS, data)  # the clients fill the data cache
    assert pipeline.label_counts(data, NUM_PARTITIONS).tolist() == expected
    load_data(NUM_PARTITIONS - 1, NUM_PARTITIONS, data)
    monkeypatch.setattr(
        pipeline, "_federated_dataset", lambda *_: pytest.fail("partitions read")
    )
    assert pipeline.label_counts(data, NUM_PARTITIONS).tolist() == expected
