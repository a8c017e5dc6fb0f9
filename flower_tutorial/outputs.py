"""flower_tutorial: the files a run reads and writes: its folder, JSON and models.

Everything is written through a temporary file and renamed into place, so an
interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flower_tutorial.task import Net


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


def write_json(obj: Any, path: Path) -> None:
    """Write JSON through a temporary file, so `path` is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_model(net: nn.Module, path: Path) -> None:
    """Save a model's state_dict (`torch.load` + `load_state_dict` read it back)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)


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
