"""The on-disk data cache: hits, misses by every part of the key, races, damage."""

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    APP_DIR,
    CIFAR10_CLASSES,
    data_settings,
    logged_warnings,
    make_split,
    write_hub_layout,
)

from flower_tutorial import cache as cache_module
from flower_tutorial import data as pipeline
from flower_tutorial.cache import Decoded, DecodedCache, default_cache_dir
from flower_tutorial.task import load_data, load_local_data, load_test_data

NUM_PARTITIONS = 4


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Count the decodes (each split decoded is one), starting from a cold process."""
    pipeline.decoded_partition.cache_clear()
    pipeline.decoded_folder.cache_clear()
    pipeline.decoded_test_split.cache_clear()
    calls: list[int] = []
    real = pipeline.decode
    monkeypatch.setattr(
        pipeline, "decode", lambda split: calls.append(1) or real(split)
    )
    return calls


def _fresh_process() -> None:
    """Forget what this process decoded, as a new ClientApp process would."""
    pipeline.decoded_partition.cache_clear()
    pipeline.decoded_folder.cache_clear()
    pipeline.decoded_test_split.cache_clear()


def _tensors(loaders) -> list[torch.Tensor]:
    return [t for loader in loaders for t in loader.dataset.tensors]


def test_a_hit_returns_exactly_what_decoding_returns(cifar_dir, tmp_path, decodes):
    cached = data_settings(cifar_dir, **{"data-cache-dir": str(tmp_path)})
    first = _tensors(load_data(1, NUM_PARTITIONS, cached))
    assert len(decodes) == 2  # a miss: train and validation split decoded
    _fresh_process()
    again = _tensors(load_data(1, NUM_PARTITIONS, cached))
    assert len(decodes) == 2  # a hit: nothing decoded
    _fresh_process()
    uncached = data_settings(cifar_dir, **{"data-cache": False})
    reference = _tensors(load_data(1, NUM_PARTITIONS, uncached))
    for a, b, c in zip(first, again, reference, strict=True):
        assert a.dtype == b.dtype == c.dtype
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize(
    ("change", "misses"),
    [
        ({}, False),
        ({"seed": 7}, True),
        ({"partitioner": "dirichlet"}, True),
        ({"dirichlet-alpha": 0.9}, False),  # not a parameter of the IID partitioner
        ({"shards-per-partition": 3}, False),  # nor is this
        ({"batch-size": 8}, False),  # batching does not change the bytes
    ],
    ids=["same", "seed", "partitioner", "unused-alpha", "unused-shards", "batch-size"],
)
def test_the_key_covers_what_changes_the_bytes(
    cifar_dir, tmp_path, decodes, change, misses
):
    settings = {"data-cache-dir": str(tmp_path)}
    load_data(0, NUM_PARTITIONS, data_settings(cifar_dir, **settings))
    _fresh_process()
    load_data(0, NUM_PARTITIONS, data_settings(cifar_dir, **settings | change))
    assert len(decodes) == (4 if misses else 2)


def test_partition_number_and_count_and_partitioner_parameters_miss(
    cifar_dir, tmp_path, decodes
):
    cached = data_settings(cifar_dir, **{"data-cache-dir": str(tmp_path)})
    load_data(0, NUM_PARTITIONS, cached)
    for pid, count in ((1, NUM_PARTITIONS), (0, NUM_PARTITIONS + 1)):
        _fresh_process()
        load_data(pid, count, cached)
    dirichlet = {"partitioner": "dirichlet", "dirichlet-alpha": 0.5}
    for alpha in (0.5, 2.0):
        _fresh_process()
        load_data(
            0,
            2,
            data_settings(
                cifar_dir,
                **{
                    **dirichlet,
                    "dirichlet-alpha": alpha,
                    "data-cache-dir": str(tmp_path),
                },
            ),
        )
    assert len(decodes) == 2 * 5  # every one of them a miss
    entries = [
        p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")
    ]
    assert len(entries) == 5


def test_shard_partitions_of_another_shards_per_partition_miss(
    cifar_dir, tmp_path, decodes
):
    def load(shards: int) -> list[torch.Tensor]:
        _fresh_process()
        shard_partitions = {
            "partitioner": "shards",
            "shards-per-partition": shards,
            "data-cache-dir": str(tmp_path),
        }
        data = data_settings(cifar_dir, **shard_partitions)
        return _tensors(load_data(0, 2, data))

    two = load(2)
    three = load(3)
    assert len(decodes) == 2 * 2  # both decoded: a hit would hand back `two`
    assert not torch.equal(three[1], two[1])  # other shards: other labels
    load(2)
    assert len(decodes) == 2 * 2  # and each is found again


@pytest.mark.parametrize(
    ("overrides", "partitioner"),
    [
        ({"partitioner": "iid"}, {"name": "iid"}),
        (
            {"partitioner": "dirichlet", "dirichlet-alpha": 0.5},
            {"name": "dirichlet", "alpha": 0.5},
        ),
        (
            {"partitioner": "shards", "shards-per-partition": 2},
            {"name": "shards", "shards_per_partition": 2},
        ),
    ],
    ids=["iid", "dirichlet", "shards"],
)
def test_a_partitions_manifest_says_what_made_it(
    cifar_dir, tmp_path, overrides, partitioner
):
    # What a person finds in the cache folder to tell its entries apart; it also
    # makes the entry's name, so another spelling would miss every user's cache.
    data = data_settings(
        cifar_dir, seed=5, **overrides, **{"data-cache-dir": str(tmp_path)}
    )
    _fresh_process()
    load_data(1, NUM_PARTITIONS, data)
    manifest = json.loads((_entry(tmp_path) / "manifest.json").read_text())
    assert manifest["key"] == {
        "what": "partition",
        "dataset": pipeline.dataset_fingerprint(str(cifar_dir)),
        "partitioner": partitioner,
        "num_partitions": NUM_PARTITIONS,
        "partition_id": 1,
        "seed": 5,
    }


def test_changed_dataset_files_miss(tmp_path, decodes):
    root = write_hub_layout(
        tmp_path / "cifar", {"train": make_split(40, 0), "test": make_split(20, 1)}
    )
    cached = data_settings(root, **{"data-cache-dir": str(tmp_path / "cache")})
    load_test_data(cached)
    _fresh_process()
    load_test_data(cached)
    assert len(decodes) == 1
    make_split(20, 2).to_parquet(
        str(root / "plain_text" / "test-00000-of-00001.parquet")
    )
    _fresh_process()
    changed = load_test_data(cached)
    assert len(decodes) == 2
    assert len(changed.dataset) == 20


def test_a_nodes_own_folder_is_cached_too(tmp_path, cifar_dir, decodes):
    site = tmp_path / "site"
    site.mkdir()
    make_split(30, 3).to_parquet(str(site / "train-00000-of-00001.parquet"))
    cached = data_settings(cifar_dir, **{"data-cache-dir": str(tmp_path / "cache")})
    first = _tensors(load_local_data(str(site), cached))
    _fresh_process()
    again = _tensors(load_local_data(str(site), cached))
    assert len(decodes) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def _entry(cache_dir: Path) -> Path:
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    return entry


def _flip_byte(path: Path, at: int) -> None:
    """Damage `path`: invert the bits of its byte at `at` (negative: from the end)."""
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_damaged_entry_is_rebuilt_never_used(
    cifar_dir, tmp_path, decodes, damage, caplog
):
    cached = data_settings(cifar_dir, **{"data-cache-dir": str(tmp_path)})
    good = _tensors(load_data(2, NUM_PARTITIONS, cached))
    entry = _entry(tmp_path)
    images = entry / "train.images.npy"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "flip":
        _flip_byte(images, -1)
    else:
        (entry / "manifest.json").write_text("{not json")
    _fresh_process()
    rebuilt = _tensors(load_data(2, NUM_PARTITIONS, cached))
    assert len(decodes) == 4  # decoded again
    assert "is damaged" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(good, rebuilt, strict=True))
    _fresh_process()
    load_data(2, NUM_PARTITIONS, cached)
    assert len(decodes) == 4  # and the rebuilt entry is whole


def test_with_the_cache_off_nothing_is_written(cifar_dir, tmp_path, decodes):
    off = data_settings(
        cifar_dir, **{"data-cache": False, "data-cache-dir": str(tmp_path)}
    )
    load_data(0, NUM_PARTITIONS, off)
    _fresh_process()
    load_data(0, NUM_PARTITIONS, off)
    assert len(decodes) == 4
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_folder_warns_and_the_run_goes_on(
    cifar_dir, tmp_path, decodes, caplog
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cached = data_settings(cifar_dir, **{"data-cache-dir": str(blocker / "cache")})
    trainloader, _ = load_data(0, NUM_PARTITIONS, cached)
    assert len(trainloader.dataset) > 0
    assert "Cannot write the data cache" in caplog.text
    assert "the run goes on without it" in caplog.text


def _small() -> Decoded:
    return Decoded({"s": (torch.arange(6, dtype=torch.uint8), torch.arange(3))}, ["a"])


def test_peek_returns_an_entry_only_when_the_cache_holds_it(tmp_path):
    cache, key = DecodedCache(tmp_path), {"what": "peek"}
    assert cache.peek(key) is None  # not stored yet
    cache.get(key, _small)
    found = cache.peek(key)
    assert found is not None and found.class_names == ["a"]
    for got, want in zip(found.splits["s"], _small().splits["s"], strict=True):
        assert torch.equal(got, want)
    assert cache.peek({"what": "another"}) is None
    assert cache.peek(None) is None  # data of unknown origin is never cached
    assert DecodedCache(None).peek(key) is None  # the cache is off


def test_an_unwritable_cache_folder_is_warned_about_once_with_the_reason(
    tmp_path, caplog
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    expected = []
    for root in (blocker / "cache", blocker / "other"):
        with pytest.raises(OSError) as err:  # what the cache meets
            root.mkdir(parents=True, exist_ok=True)
        expected.append(
            f"Cannot write the data cache in {root} ({err.value}): the run goes on "
            "without it."
        )
    for root, what in ((blocker / "cache", "a"), (blocker / "cache", "b")):
        assert DecodedCache(root).get({"what": what}, _small).class_names == ["a"]
    DecodedCache(blocker / "other").get({"what": "a"}, _small)
    warned = [m for m in logged_warnings(caplog) if m.startswith("Cannot write")]
    assert warned == expected  # once per folder, not once per entry


@pytest.mark.parametrize(
    ("xdg_cache_home", "expected"),
    [("xdg", "xdg"), (None, "home/.cache"), ("", "home/.cache")],
    ids=["set", "unset", "empty"],
)
def test_the_default_cache_folder_is_flower_tutorial_in_the_users_cache_folder(
    cifar_dir, tmp_path, monkeypatch, xdg_cache_home, expected
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if xdg_cache_home is None:
        monkeypatch.delenv("XDG_CACHE_HOME")
    else:
        # The XDG spec: an empty XDG_CACHE_HOME counts as unset.
        base = xdg_cache_home and str(tmp_path / xdg_cache_home)
        monkeypatch.setenv("XDG_CACHE_HOME", base)
    assert default_cache_dir() == tmp_path / expected / "flower-tutorial"
    default = pipeline.data_cache(data_settings(cifar_dir))  # data-cache-dir = ""
    assert default.root == tmp_path / expected / "flower-tutorial"


def test_an_entry_is_written_in_a_hidden_temporary_folder_beside_it_then_renamed(
    tmp_path, monkeypatch
):
    renames: list[tuple[Path, Path]] = []
    real_rename = os.rename

    def rename(src, dst) -> None:
        renames.append((Path(src), Path(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    DecodedCache(tmp_path).get({"what": "renamed"}, _small)
    ((tmp, entry),) = renames
    # Beside it: a rename within one file system, seen whole or not at all.
    assert tmp.parent == entry.parent == tmp_path
    # Hidden and named after its entry: the leftover of a killed process is never
    # taken for an entry, and tells which entry it was.
    assert tmp.name.startswith(f".{entry.name}-")
    assert entry == _entry(tmp_path) and not tmp.exists()


def test_the_manifest_records_the_key_the_class_names_and_each_files_checksum(
    tmp_path,
):
    key = {"what": "manifest", "seed": 3}
    DecodedCache(tmp_path).get(key, _small)
    entry = _entry(tmp_path)
    text = (entry / "manifest.json").read_text()
    manifest = json.loads(text)
    # The entry's name is a hash: its manifest is where a person reads what made it.
    assert manifest["key"] == key
    assert manifest["class_names"] == ["a"]
    files = {name: f"s.{name}.npy" for name in ("images", "labels")}
    assert manifest["splits"] == {
        "s": {
            name: {"file": file, "crc32": zlib.crc32((entry / file).read_bytes())}
            for name, file in files.items()
        }
    }
    assert text == json.dumps(manifest, indent=1)  # one item a line, to be read
    assert sorted(p.name for p in entry.iterdir()) == [
        "manifest.json",
        *sorted(files.values()),
    ]


def test_a_split_that_is_not_images_and_labels_is_refused_and_nothing_is_left(
    tmp_path,
):
    cache, key = DecodedCache(tmp_path), {"what": "images only"}
    images_only = Decoded({"s": (torch.arange(6, dtype=torch.uint8),)}, ["a"])
    with pytest.raises(ValueError, match="shorter"):
        cache.get(key, lambda: images_only)
    # Its images were written before the labels were missed: they go with the
    # temporary folder, and no entry is left that could never be loaded whole.
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    assert cache.peek(key) is None


def test_a_cache_folder_deleted_during_a_write_is_warned_about_with_the_writes_error(
    tmp_path, monkeypatch, caplog
):
    root = tmp_path / "cache"
    real_save = np.save

    def save_after_clearing(path, array) -> None:
        shutil.rmtree(root, ignore_errors=True)  # rm -rf, as docs/performance.md says
        real_save(path, array)

    monkeypatch.setattr(np, "save", save_after_clearing)
    assert DecodedCache(root).get({"what": "cleared"}, _small).class_names == ["a"]
    (warned,) = [m for m in logged_warnings(caplog) if m.startswith("Cannot write")]
    # The file that could not be written, not the temporary folder that then
    # could not be removed either.
    assert "s.images.npy" in warned
    assert not root.exists()


def test_the_class_names_come_along_to_the_device_from_a_miss_and_a_hit(
    cifar_dir, tmp_path, decodes
):
    # They label the plots and the history: moving the tensors to the run's
    # device must not lose them, whether the splits were decoded or found.
    cached = data_settings(cifar_dir, **{"data-cache-dir": str(tmp_path)})
    for _ in ("miss", "hit"):
        _fresh_process()
        decoded = pipeline.decoded_test_split(cached, "cpu")
        assert decoded.class_names == CIFAR10_CLASSES
    assert len(decodes) == 1  # the second was found in the cache


def test_a_key_names_one_entry_whatever_the_order_of_its_items(tmp_path):
    # A key is a mapping: the same items built in another order (by another
    # version of the code) must find the entry, not decode a second copy of it.
    cache = DecodedCache(tmp_path)
    partitioner = {"name": "dirichlet", "alpha": 0.5}
    cache.get({"what": "order", "seed": 3, "partitioner": partitioner}, _small)
    reordered = {"partitioner": {"alpha": 0.5, "name": "dirichlet"}, "seed": 3}
    assert cache.peek(reordered | {"what": "order"}) is not None


def test_an_entrys_name_is_the_hash_of_its_key_as_earlier_versions_wrote_it(
    tmp_path,
):
    # Entries outlive the app's version: another name for the same key would miss
    # every user's cache and strand the old entries on disk. FORMAT, hashed with
    # the key, is what a deliberate change of the entries' layout changes.
    DecodedCache(tmp_path).get({"what": "name", "seed": 3}, _small)
    canonical = b'{"format": 1, "seed": 3, "what": "name"}'
    assert _entry(tmp_path).name == hashlib.sha256(canonical).hexdigest()[:32]


def test_damage_early_in_a_file_longer_than_one_read_is_found(tmp_path, caplog):
    # Files are checksummed in 4 MiB reads: the checksum must cover them all,
    # not only the last, or a damaged start of the images would be used.
    images = torch.arange(5 << 20).remainder(251).to(torch.uint8)
    big = Decoded({"s": (images, torch.arange(3))}, ["a"])
    cache, key = DecodedCache(tmp_path), {"what": "big"}
    cache.get(key, lambda: big)
    assert cache.peek(key) is not None  # whole, it is found
    _flip_byte(_entry(tmp_path) / "s.images.npy", 1000)
    assert cache.peek(key) is None
    assert "is damaged" in caplog.text


def test_checking_an_entry_does_not_read_its_files_whole_into_memory(tmp_path):
    # Every process that opens an entry checks its checksums first; CIFAR-10's
    # train images are 150 MB, which each process must not hold at once for that:
    # the data itself is memory-mapped.
    size = 64 << 20
    large = Decoded({"s": (torch.zeros(size, dtype=torch.uint8), torch.arange(3))}, [])
    cache, key = DecodedCache(tmp_path), {"what": "large"}
    cache.get(key, lambda: large)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        found = cache.peek(key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found is not None and found.splits["s"][0].numel() == size
    assert peak - before < size // 2


def test_a_hit_takes_no_lock_so_a_cache_folder_that_is_only_readable_serves_it(
    tmp_path, monkeypatch, caplog
):
    # Only a miss is built under the entry's lock: a whole entry is read without
    # creating or waiting for it, so a shared cache that this user (or a read-only
    # mount) cannot write to still serves its entries, without any warning.
    cache, key = DecodedCache(tmp_path), {"what": "read-only"}
    cache.get(key, _small)

    def no_lock_file(entry: Path):
        raise PermissionError(13, "Permission denied", str(entry.with_suffix(".lock")))

    monkeypatch.setattr(cache_module, "_locked", no_lock_file)
    builds: list[int] = []
    found = cache.get(key, lambda: builds.append(1) or _small())
    assert builds == []
    assert found.class_names == ["a"]
    assert torch.equal(found.splits["s"][0], _small().splits["s"][0])
    assert logged_warnings(caplog) == []


def test_a_process_that_waited_for_the_lock_uses_the_entry_built_meanwhile(
    tmp_path, monkeypatch, caplog
):
    # Another process held the lock and stored the entry while this one waited:
    # this one must load that entry, not decode the same data a second time.
    cache, key = DecodedCache(tmp_path), {"what": "waited"}
    theirs = Decoded(
        {"s": (torch.full((6,), 7, dtype=torch.uint8), torch.arange(3))}, ["b"]
    )
    real_locked = cache_module._locked

    def locked_after_the_other_built_it(entry: Path):
        cache_module._store(entry, key, theirs)  # what the other process did
        return real_locked(entry)

    monkeypatch.setattr(cache_module, "_locked", locked_after_the_other_built_it)
    builds: list[int] = []
    found = cache.get(key, lambda: builds.append(1) or _small())
    assert builds == []
    assert found.class_names == ["b"]
    assert torch.equal(found.splits["s"][0], theirs.splits["s"][0])
    assert logged_warnings(caplog) == []


def test_a_damaged_entry_is_warned_about_naming_the_entry_and_the_damaged_file(
    tmp_path, caplog
):
    # The warning is what tells a person which folder of the cache is broken and
    # why (here: a file that no longer matches its checksum).
    cache, key = DecodedCache(tmp_path), {"what": "damaged"}
    cache.get(key, _small)
    entry = _entry(tmp_path)
    _flip_byte(entry / "s.labels.npy", -1)
    assert cache.peek(key) is None
    assert logged_warnings(caplog) == [
        f"Data cache entry {entry} is damaged (s.labels.npy fails its checksum): "
        "rebuilding it."
    ]


def _build_slowly(marker_dir: str, key: dict, root: str, out) -> None:
    def build():
        # Leave a mark per build, and take long enough for the other to arrive.
        (Path(marker_dir) / str(os.getpid())).touch()
        time.sleep(1.0)
        images = torch.arange(12, dtype=torch.uint8)
        return Decoded({"s": (images, torch.arange(3))}, ["a", "b"])

    decoded = DecodedCache(Path(root)).get(key, build)
    out.put(decoded.splits["s"][0].tolist() + decoded.class_names)


def test_two_processes_building_one_entry_build_it_once(tmp_path):
    markers = tmp_path / "builds"
    markers.mkdir()
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    key = {"what": "race"}
    procs = [
        context.Process(
            target=_build_slowly, args=(str(markers), key, str(tmp_path / "c"), out)
        )
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert len(list(markers.iterdir())) == 1  # one built it; the other waited
    assert results[0] == results[1] == [*range(12), "a", "b"]


def test_a_client_on_a_warm_cache_imports_no_datasets_and_no_plots(cifar_dir, tmp_path):
    cached = data_settings(cifar_dir, **{"data-cache-dir": str(tmp_path)})
    load_data(1, NUM_PARTITIONS, cached)  # warm the cache
    run_config = json.dumps(
        {"dataset": str(cifar_dir), "data-cache-dir": str(tmp_path), "batch-size": 16}
    )
    code = f"""
import json, sys
from flwr.common import Context, RecordDict
from flower_tutorial.client_app import client_fn
from flower_tutorial.config import app_run_config
from flower_tutorial.task import Net, get_parameters
context = Context(run_id=1, node_id=1, state=RecordDict(),
                  node_config={{"partition-id": 1, "num-partitions": {NUM_PARTITIONS}}},
                  run_config=app_run_config(json.loads({run_config!r})))
client = client_fn(context).numpy_client
client.fit(get_parameters(Net()), {{"server-round": 1}})
client.evaluate(get_parameters(Net()), {{}})
heavy = ("datasets", "flwr_datasets", "matplotlib", "pandas")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=APP_DIR,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
