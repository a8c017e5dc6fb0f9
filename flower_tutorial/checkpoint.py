"""flower_tutorial: what a run needs to go on after a crash, saved after every round.

A checkpoint holds the global model, the last round completed, the history so far
and every state that the next rounds depend on: the server-side optimizer's
moments, the adaptive clipping norm, the privacy accountant and the server's noise
secret, the sampler's and the server's random generators. It holds a secret, so
only its owner may read it (mode 0600). Resuming from it (`resume-from`) gives the same
model, to the byte, as a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.server.strategy import Strategy

from flower_tutorial.outputs import save_tensors, write_atomically
from flower_tutorial.task import Net, get_parameters

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
    state = _to_tensors(vars(checkpoint))
    # Private: it holds the noise secret.
    write_atomically(
        run_dir / CHECKPOINT, lambda tmp: save_tensors(state, tmp), private=True
    )


def load(run_dir: Path) -> Checkpoint:
    """Read a run folder's checkpoint, or explain why it cannot be used.

    Every field is checked for its type (and the model for its shapes) before
    anything of it is used: a damaged or tampered file is refused, naming what is
    wrong, before the resumed run starts.
    """
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
    except Exception as ex:  # any damage means the same to the user
        raise ValueError(
            f"{key}: its {CHECKPOINT} cannot be read ({type(ex).__name__}: {ex})."
        ) from ex
    why = _unsound(state)
    if why:
        raise ValueError(f"{key}: its {CHECKPOINT} cannot be resumed: {why}.")
    return Checkpoint(**state)


def _unsound(state: Any) -> str | None:
    """Return what is wrong with a checkpoint's fields, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint"
    fields = {f.name for f in dataclasses.fields(Checkpoint)}
    unknown = sorted(str(k) for k in set(state) - fields)
    if unknown:
        return (
            f"it holds {', '.join(repr(k) for k in unknown)}, which no checkpoint has"
        )
    missing = sorted(f for f in fields - set(state) if f != "noise_secret")
    if missing:
        return f"it lacks {', '.join(repr(k) for k in missing)}"
    server_round = state["server_round"]
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        return f"'server_round' = {server_round!r}, expected an integer >= 1"
    if server_round < 1:
        return f"'server_round' = {server_round}, expected an integer >= 1"
    return (
        _unsound_model(state["model"])
        or _unsound_history(state["history"], server_round)
        or _unsound_types(state)
        or _unsound_generators(state)
    )


def _unsound_model(model: Any) -> str | None:
    """Return why `model` is not the arrays of the tutorial's Net, or None."""
    expected = get_parameters(Net())
    if not isinstance(model, list) or len(model) != len(expected):
        return f"'model' is not the {len(expected)} arrays of the tutorial's Net"
    for i, (array, want) in enumerate(zip(model, expected, strict=True)):
        if not isinstance(array, np.ndarray) or array.shape != want.shape:
            shape = getattr(array, "shape", type(array).__name__)
            return f"'model' array {i} is {shape}, expected shape {want.shape}"
        if array.dtype != want.dtype:
            return f"'model' array {i} has dtype {array.dtype}, expected {want.dtype}"
    return None


# history.json's keys that resuming reads, and the types each must have.
HISTORY_KEYS: dict[str, tuple[type, ...]] = {
    "run_config": (dict,),
    "rounds": (list,),
    "num_partitions": (int, type(None)),
    "nodes_left_out": (list,),
    "best_round": (int, type(None)),
}


def _unsound_history(history: Any, server_round: int) -> str | None:
    """Return why `history` cannot be the record of rounds 0..server_round, or None."""
    if not isinstance(history, dict):
        return f"'history' is a {type(history).__name__}, expected a dict"
    for key, types in HISTORY_KEYS.items():
        if key not in history:
            return f"'history' has no {key!r}"
        value = history[key]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"'history' {key!r} = {_short(value)}, of the wrong type"
    if not isinstance(history.get("resumed", []), list):  # none before a resumption
        return "'history' 'resumed' is not a list"
    numbers = [
        r.get("round") if isinstance(r, dict) else None for r in history["rounds"]
    ]
    if any(isinstance(n, bool) or not isinstance(n, int) for n in numbers):
        return "'history' 'rounds' holds an entry without an integer 'round'"
    if numbers != sorted(set(numbers)) or (numbers and numbers[-1] != server_round):
        return f"'history' 'rounds' are {numbers}, expected rounds up to {server_round}"
    if history["best_round"] is not None and history["best_round"] not in numbers:
        return f"'history' 'best_round' = {history['best_round']} is no round of it"
    return None


def _unsound_types(state: dict[str, Any]) -> str | None:
    """Return why the strategy, accountant or noise state has the wrong type."""
    strategy = state["strategy"]
    if not isinstance(strategy, dict) or not all(isinstance(k, str) for k in strategy):
        return "'strategy' is not a dict of named states"
    if state["privacy"] is not None and not isinstance(state["privacy"], dict):
        return "'privacy' is not an accountant's state"
    secret = state.get("noise_secret")
    if secret is not None and not (isinstance(secret, bytes) and len(secret) == 32):
        return "'noise_secret' is not 32 bytes"
    return None


def _unsound_generators(state: dict[str, Any]) -> str | None:
    """Return which saved random state a generator refuses, or None.

    Each is tried on a generator of its own: the run's are not touched yet.
    """
    for key, generator in (
        ("sampler", random.Random()),
        ("python_rng", random.Random()),
        ("numpy_rng", np.random.RandomState()),
    ):
        try:
            if isinstance(generator, random.Random):
                generator.setstate(state[key])
            else:
                generator.set_state(state[key])
        except Exception as ex:  # whatever is wrong with it, it cannot be used
            return f"{key!r} is no generator's state ({type(ex).__name__})"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}..."


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


def check_restorable(
    saved: Checkpoint,
    run_dir: Path,
    strategy: Strategy,
    accountant: bool,
    noise_secret: bool,
) -> None:
    """Refuse a checkpoint whose state does not fit this run's strategy and privacy.

    Only what `strategy_state` collects from this stack of strategies may be
    restored, each value of its type and shape; the accountant's and the noise
    secret's presence must match the run's privacy settings. Called before any
    of it is restored.
    """
    why = _unsound_strategy_state(strategy, saved.strategy, saved.model)
    if why is None and (saved.privacy is not None) != accountant:
        having = "holds" if saved.privacy is not None else "lacks"
        why = f"it {having} an accountant's state, and this run's dp says otherwise"
    if why is None and (saved.noise_secret is not None) != noise_secret:
        having = "holds" if saved.noise_secret is not None else "lacks"
        why = f"it {having} a noise secret, and this run's dp says otherwise"
    if why:
        raise ValueError(
            f"run config key 'resume-from' = {str(run_dir)!r}: its {CHECKPOINT} "
            f"cannot be resumed: {why}."
        )


def _unsound_strategy_state(
    strategy: Strategy, state: dict[str, Any], model: list[np.ndarray]
) -> str | None:
    """Return why `state` cannot be this stack's state, or None."""
    layers = _layers(strategy)
    allowed = {
        f"{depth}.{name}"
        for depth, layer in enumerate(layers)
        for name in STRATEGY_STATE
        if hasattr(layer, name)
    }
    for key, value in state.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            return (
                f"strategy state {key!r} is not this run's strategy's (known: {known})"
            )
        name = key.split(".", 1)[1]
        if name == "clipping_norm":
            number = isinstance(value, float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                return (
                    f"strategy state {key!r} = {_short(value)}, expected a number > 0"
                )
            continue
        arrays = isinstance(value, list) and all(
            isinstance(a, np.ndarray) for a in value
        )
        shapes = [a.shape for a in value] if arrays else None
        if shapes != [a.shape for a in model]:
            return (
                f"strategy state {key!r} is not one float array per model array, "
                "in the model's shapes"
            )
        if any(a.dtype.kind != "f" for a in value):
            return f"strategy state {key!r} is not one float array per model array"
    return None


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back what `strategy_state` collected (checked by `check_restorable`)."""
    layers = _layers(strategy)
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
