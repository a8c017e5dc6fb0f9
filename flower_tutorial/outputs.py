"""flower_tutorial: the files a run reads and writes: its folder, JSON and models.

Everything is written through a temporary file and renamed into place, so an
interrupted run never leaves a half-written file behind. A run folder has one
writer at a time (`RunFolderLock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import secrets
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flower_tutorial.task import Net

WRITER_LOCK = ".writer.lock"


def make_run_dir(output_dir: str, run_id: int | str) -> Path:
    """Create this run's own output folder under `output_dir`, or explain why not."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir).expanduser().resolve() / f"{stamp}-{run_id}"
    run_dir = base
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        # Two runs may start in the same second with the same id (run_simulation).
        for attempt in itertools.count(2):
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                run_dir = base.with_name(f"{base.name}-{attempt}")
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # leave nothing behind
        raise ValueError(
            f"run config key 'output-dir' = {output_dir!r} is not allowed: "
            f"cannot create a writable folder {str(run_dir)!r} there ({err})."
        ) from err
    return run_dir


def write_atomically(
    path: Path, write: Callable[[Path], object], private: bool = False
) -> None:
    """Have `write` fill a temporary file, then rename it to `path`.

    The temporary file has a name of its own: two writers never write into one
    another's. With `private`, it is created readable by its owner only, so no
    moment of its life shows others what it holds. An interrupted write removes
    it and leaves `path` as it was.
    """
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    mode = 0o600 if private else 0o666  # the umask applies
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json(obj: Any, path: Path) -> None:
    """Write JSON through a temporary file, so `path` is never half-written."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def save_model(net: nn.Module, path: Path) -> None:
    """Save a model's state_dict (`torch.load` + `load_state_dict` read it back)."""
    write_atomically(path, lambda tmp: save_tensors(net.state_dict(), tmp))


def save_tensors(obj: Any, path: Path) -> None:
    """`torch.save` `obj` to `path`, the same bytes whatever the file's name.

    Given a path, torch names the archive inside after the file: a temporary
    file's name of its own would change the bytes of every save.
    """
    with open(path, "wb") as f:
        torch.save(obj, f)


class RunFolderLock:
    """The one writer of a run folder: the process that holds it, while it lives.

    An exclusive flock on a file in the folder, which the OS lets go when the
    process ends, however it ends. A second writer (a ServerApp that a killed
    SuperLink left running, beside a resumed run) is refused, naming the holder.
    """

    def __init__(self, run_dir: Path, holder: str) -> None:
        self.path = run_dir / WRITER_LOCK
        self._file = open(self.path, "a+")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            held_by = self._file.read(1000).strip() or "another process"
            self._file.close()
            raise ValueError(
                f"run folder {str(run_dir)!r} is being written by {held_by}: one "
                "writer at a time. Stop that one first (a deployment's `stop` "
                "ends every process it started)."
            ) from None
        self._file.truncate(0)
        self._file.write(holder)
        self._file.flush()

    def release(self) -> None:
        """Let the folder go (at the end of the run; the OS does at exit)."""
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def load_checkpoint(path: str) -> Net:
    """Return a Net holding a saved state_dict, or explain why it cannot.

    Only tensors are read (`weights_only`): a checkpoint cannot run code.
    """
    net = Net()
    try:
        state_dict = torch.load(
            Path(path).expanduser(), map_location="cpu", weights_only=True
        )
        net.load_state_dict(state_dict)
    except Exception as err:  # any failure means the same to the user
        raise ValueError(
            f"run config key 'initial-checkpoint' = {path!r} could not be loaded as "
            f"a state_dict of the tutorial's Net: {type(err).__name__}: {err}"
        ) from err
    return net
