"""flower_tutorial: decoded splits kept on disk, memory-mapped by every later process.

Decoding CIFAR-10's images costs about 1 s per 5,000; a memory-mapped .npy of
the same pixels opens in a millisecond. Each entry is a folder named by a hash of
what made its bytes (the dataset's files, partitioner, partition, seed, ...),
holding one .npy per tensor and a manifest with their checksums. Entries are
built under a lock, in a temporary folder renamed into place, so processes that
need the same entry at once (Ray workers, ClientApp processes of SuperNodes on
one machine) decode it once and never see half of it; an entry that fails its
checksums is rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log

# One split as decoded tensors: uint8 images (N, 3, H, W) and int64 labels (N,).
Tensors = tuple[torch.Tensor, torch.Tensor]
Splits = dict[str, Tensors]


@dataclass(frozen=True)
class Decoded:
    """Decoded splits by name ("train", "test"), and the names of their classes."""

    splits: Splits
    class_names: list[str]

    def on(self, device: str) -> Decoded:
        """Return the same with every tensor on `device` (no copy if there already)."""
        splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}
        return Decoded(splits, self.class_names)


# Part of every key: a change of how entries are made or laid out misses them all.
FORMAT = 1
_TENSORS = ("images", "labels")


def default_cache_dir() -> Path:
    """Return the user's cache folder for the app (XDG: ~/.cache/flower-tutorial)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flower-tutorial"


class DecodedCache:
    """Decoded splits on disk, keyed by what made them; or nothing, when off."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def peek(self, key: Mapping[str, Any] | None) -> Decoded | None:
        """Return what `key` names if the cache holds it whole, else None."""
        if self.root is None or key is None:
            return None
        return _load(self.root / _digest(key))

    def get(
        self, key: Mapping[str, Any] | None, build: Callable[[], Decoded]
    ) -> Decoded:
        """Return the splits that `key` names: from disk, or built and stored.

        `build` decodes them; it runs only on a miss, with the cache off, or for
        no `key` (data whose origin is unknown). A cache folder that cannot be
        written is warned about, and left alone.
        """
        if self.root is None or key is None:
            return build()
        entry = self.root / _digest(key)
        found = _load(entry)
        if found is not None:
            return found
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(_locked(entry))
            except OSError as ex:
                self._warn(ex)
                return build()
            found = _load(entry)  # another process may have built it meanwhile
            if found is not None:
                return found
            decoded = build()
            try:
                _store(entry, key, decoded)
            except OSError as ex:
                self._warn(ex)
            return decoded

    def _warn(self, ex: OSError) -> None:
        if self.root not in _WARNED:  # once per folder, not once per partition
            _WARNED.add(self.root)
            log(
                WARNING,
                "Cannot write the data cache in %s (%s): the run goes on without it.",
                self.root,
                ex,
            )


# Cache folders already warned about in this process.
_WARNED: set[Path] = set()


def _digest(key: Mapping[str, Any]) -> str:
    text = json.dumps({"format": FORMAT, **key}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    """Hold the entry's lock: one process builds it while the others wait."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _store(entry: Path, key: Mapping[str, Any], decoded: Decoded) -> None:
    """Write the splits' .npy files and manifest, then rename them into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        manifest: dict[str, Any] = {
            "key": dict(key),
            "class_names": decoded.class_names,
            "splits": {},
        }
        for split, tensors in decoded.splits.items():
            files = {}
            for name, tensor in zip(_TENSORS, tensors, strict=True):
                path = tmp / f"{split}.{name}.npy"
                np.save(path, tensor.cpu().numpy())
                files[name] = {"file": path.name, "crc32": _crc32(path)}
            manifest["splits"][split] = files
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(entry)  # a corrupt entry, found by _load
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(entry: Path) -> Decoded | None:
    """Return an entry's splits, memory-mapped; None if missing or not whole.

    Every file is checked against the manifest's checksum first: a truncated or
    damaged entry (a full disk, a crash while copying the cache) is never used.
    """
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        splits = {}
        for split, files in manifest["splits"].items():
            tensors = []
            for name in _TENSORS:
                path = entry / files[name]["file"]
                if _crc32(path) != files[name]["crc32"]:
                    raise ValueError(f"{path.name} fails its checksum")
                # Copy-on-write: writable tensors, the file itself never changes.
                tensors.append(torch.from_numpy(np.load(path, mmap_mode="c")))
            splits[split] = (tensors[0], tensors[1])
        class_names = [str(name) for name in manifest["class_names"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as ex:
        log(WARNING, "Data cache entry %s is damaged (%s): rebuilding it.", entry, ex)
        return None
    return Decoded(splits, class_names)
