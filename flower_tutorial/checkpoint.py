"""flower_tutorial: what a run needs to go on after a crash, saved after every round.

A checkpoint holds the global model, the last round completed, the history so far
and every state that the next rounds depend on: the server-side optimizer's
moments, the adaptive clipping norm, the privacy accountant and the server's noise
secret, the sampler's and the server's random generators. It holds a secret, so
only its owner may read it (mode 0600). Resuming from it (`resume-from`) gives the same
model, to the byte, as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.server.strategy import Strategy

CHECKPOINT = "checkpoint.pt"
# What Flower's strategies and DP wrappers change as rounds go by: FedAdam's,
# FedYogi's and FedAdagrad's moments and their own copy of the model (in float64,
# more precise than the float32 model sent out), FedAvgM's momentum, adaptive
# clipping's norm. FedAvgM's model is the checkpoint's, which it is built from.
STRATEGY_STATE = ("m_t", "v_t", "current_weights", "momentum_vector", "clipping_norm")


@dataclass
class Checkpoint:
    """A run after its round `server_round` (see the module's docstring)."""

    server_round: int
    model: list[np.ndarray]  # the global model's arrays
    history: dict[str, Any]  # what history.json holds, the record so far
    strategy: dict[str, Any]  # STRATEGY_STATE found in the strategy's layers
    privacy: dict[str, Any] | None  # Flower's RDP accountant's state
    sampler: Any  # the client manager's random.Random state
    numpy_rng: Any  # np.random's state: DP noise, SecAgg+'s rounding
    python_rng: Any  # random's state: SecAgg+'s shuffling
    noise_secret: bytes | None = None  # central DP's noise (ServerNoise)


def save(checkpoint: Checkpoint, run_dir: Path) -> None:
    """Write the checkpoint atomically: a crash leaves the previous one whole."""
    path = run_dir / CHECKPOINT
    tmp = path.with_name(path.name + ".tmp")
    # Created private: no moment of the file's life lets others read the secret.
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with open(tmp, "xb", opener=_private) as f:
        torch.save(_to_tensors(vars(checkpoint)), f)
    os.replace(tmp, path)


def _private(path: str, flags: int) -> int:
    """Open `path` as only its owner may read it (for `open`'s `opener`)."""
    return os.open(path, flags, 0o600)


def load(run_dir: Path) -> Checkpoint:
    """Read a run folder's checkpoint, or explain why it cannot be used."""
    path = run_dir / CHECKPOINT
    key = f"run config key 'resume-from' = {str(run_dir)!r}"
    if not path.is_file():
        raise ValueError(
            f"{key} is not allowed: it holds no {CHECKPOINT}. Expected the folder "
            "of an earlier run (<output-dir>/<date>-<time>-<run id>), which writes "
            "one after every round."
        )
    try:
        # Only tensors and plain containers: a checkpoint cannot run code.
        state = _from_tensors(torch.load(path, map_location="cpu", weights_only=True))
        return Checkpoint(**state)
    except Exception as ex:  # any damage means the same to the user
        raise ValueError(
            f"{key}: its {CHECKPOINT} cannot be read ({type(ex).__name__}: {ex})."
        ) from ex


# Run-config keys that may differ between a run and its resumption: where and how
# long to wait, where the cache lives, how far to go (a larger num-server-rounds
# extends a finished run), the privacy budget. Any other change would make the
# resumed rounds another run's.
RESUMABLE_CHANGES = {
    "resume-from",
    "output-dir",
    "num-server-rounds",
    "node-wait-timeout",
    "round-timeout",
    "data-cache",
    "data-cache-dir",
    "dp-max-epsilon",
}


def check_resumable(saved: Checkpoint, run_config: dict[str, Any]) -> None:
    """Refuse to resume `saved` with a run config that would change its run."""
    before = saved.history["run_config"]
    changed = sorted(
        key
        for key in set(before) | set(run_config)
        if key not in RESUMABLE_CHANGES and before.get(key) != run_config.get(key)
    )
    if changed:
        shown = ", ".join(
            f"{key} = {before.get(key)!r} -> {run_config.get(key)!r}" for key in changed
        )
        raise ValueError(
            f"run config key 'resume-from' = {run_config['resume-from']!r} is not "
            f"allowed with this run config: it differs from the saved run's in "
            f"{shown}. Only {', '.join(sorted(RESUMABLE_CHANGES - {'resume-from'}))} "
            "may change."
        )
    rounds = run_config["num-server-rounds"]
    if rounds <= saved.server_round:
        raise ValueError(
            f"run config key 'num-server-rounds' = {rounds} leaves nothing to resume: "
            f"the run completed round {saved.server_round}. To extend it, set a "
            f"larger num-server-rounds."
        )


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Collect STRATEGY_STATE from `strategy` and the strategies it wraps."""
    state: dict[str, Any] = {}
    for depth, layer in enumerate(_layers(strategy)):
        for name in STRATEGY_STATE:
            if getattr(layer, name, None) is not None:
                state[f"{depth}.{name}"] = getattr(layer, name)
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back what `strategy_state` collected from the same stack of strategies."""
    layers = list(_layers(strategy))
    for key, value in state.items():
        depth, name = key.split(".", 1)
        setattr(layers[int(depth)], name, value)


def _layers(strategy: Strategy) -> list[Strategy]:
    """Return the strategy and those it wraps (a wrapper holds one as `.strategy`)."""
    layers = [strategy]
    while isinstance(getattr(layers[-1], "strategy", None), Strategy):
        layers.append(layers[-1].strategy)
    return layers


def random_states() -> tuple[Any, Any]:
    """Return the states of NumPy's and Python's global random generators."""
    return np.random.get_state(), random.getstate()


def restore_random_states(numpy_rng: Any, python_rng: Any) -> None:
    """Put back the global generators' states that `random_states` returned."""
    np.random.set_state(numpy_rng)
    random.setstate(python_rng)


# torch.load(weights_only=True) reads tensors and plain containers (tuples
# included) but no NumPy arrays: those travel as tagged tensors.
def _to_tensors(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(value.copy())}
    if isinstance(value, list | tuple):
        return type(value)(_to_tensors(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    return value


def _from_tensors(value: Any) -> Any:
    if isinstance(value, dict) and value.keys() == {"__ndarray__"}:
        return value["__ndarray__"].numpy()
    if isinstance(value, list | tuple):
        return type(value)(_from_tensors(v) for v in value)
    if isinstance(value, dict):
        return {k: _from_tensors(v) for k, v in value.items()}
    return value
