"""Resuming a run: after a SIGKILL mid-round, or to extend a finished run.

Every run here uses FedAdam (server-side moments) on a sample of the clients, so a
resumed run matches an uninterrupted one only if the checkpoint restores the
strategy's state and the sampler's, not only the model.
"""

import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import default_run_config, in_process, make_context, run_dir_of

from flower_tutorial import checkpoint
from flower_tutorial.config import PrivacySettings
from flower_tutorial.differential_privacy import LocalRelease, PrivacyLedger
from flower_tutorial.outputs import WRITER_LOCK, RunFolderLock
from flower_tutorial.server_app import server_fn
from flower_tutorial.task import Net, get_parameters

ROUNDS = 3
RUN = {
    "num-server-rounds": ROUNDS,
    "strategy": "fedadam",
    "server-learning-rate": 0.01,
    "fraction-fit": 0.67,
    "min-fit-clients": 2,
    "min-evaluate-clients": 2,
    "min-available-clients": 3,
    "batch-size": 16,
    "seed": 5,
}


def _code(cifar_dir: Path, runs: dict[str, dict], hold_round: int = 0) -> str:
    """Code that simulates the named runs (3 nodes, in process) one after another.

    With `hold_round`, every client waits a minute before it trains in that round,
    so that a kill meant for that round lands in it.
    """
    return f"""{in_process()}
import time
from flower_tutorial.client_app import client_fn as app_client_fn
from flower_tutorial.simulation import run_tutorial_simulation

def held_client_fn(context):
    numpy_client = app_client_fn(context).numpy_client
    sound_fit = numpy_client.fit

    def fit(parameters, config):
        if int(config["server-round"]) == {hold_round}:
            time.sleep(60)
        return sound_fit(parameters, config)

    numpy_client.fit = fit
    return numpy_client.to_client()

base = {RUN | {"dataset": str(cifar_dir)}!r}
for overrides in {list(runs.values())!r}:
    run_tutorial_simulation(num_supernodes=3, run_config=base | overrides,
                            client_fn=held_client_fn)
"""


def _has_checkpoint(output_dir: Path) -> bool:
    """Whether the run in `output_dir` has completed a round (written atomically)."""
    return any(output_dir.glob(f"*/{checkpoint.CHECKPOINT}"))


def _metrics(run_dir: Path) -> list[dict]:
    """Every recorded number of every round, but the wall times."""
    rounds = json.loads((run_dir / "history.json").read_text())["rounds"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]


@pytest.fixture(scope="module")
def runs(run_python_module, cifar_dir, tmp_path_factory) -> dict[str, Path]:
    """Run folders: uninterrupted, killed in round 2 then resumed, extended 2 -> 3."""
    root = tmp_path_factory.mktemp("resume")
    out = {name: root / name for name in ("whole", "killed", "short")}
    first = {"whole": {}, "short": {"num-server-rounds": 2}}
    code, output = run_python_module(
        _code(
            cifar_dir, {n: c | {"output-dir": str(out[n])} for n, c in first.items()}
        ),
        400,
    )
    assert code == 0, output[-4000:]
    # Killed, with all its processes, once round 1 is on record: during round 2.
    code, output = run_python_module(
        _code(cifar_dir, {"killed": {"output-dir": str(out["killed"])}}, 2),
        300,
        interrupt_when=lambda: _has_checkpoint(out["killed"]),
        interrupt_with=signal.SIGKILL,
    )
    assert code == -signal.SIGKILL, output[-4000:]
    assert not (run_dir_of(out["killed"]) / "final_model.pt").exists()
    resumed = {
        name: {"output-dir": str(out[name]), "resume-from": str(run_dir_of(out[name]))}
        for name in ("killed", "short")
    }
    code, output = run_python_module(_code(cifar_dir, resumed), 400)
    assert code == 0, output[-4000:]
    return {name: run_dir_of(folder) for name, folder in out.items()}


@pytest.mark.parametrize("name", ["killed", "short"])
def test_a_resumed_run_ends_as_an_uninterrupted_one(runs, name):
    whole, resumed = runs["whole"], runs[name]
    assert (resumed / "final_model.pt").read_bytes() == (
        whole / "final_model.pt"
    ).read_bytes()
    assert _metrics(resumed) == _metrics(whole)
    history = json.loads((resumed / "history.json").read_text())
    (resumed_after,) = [entry["after_round"] for entry in history["resumed"]]
    # The kill comes once round 1 is saved; round 2 may have ended meanwhile.
    assert resumed_after in ((2,) if name == "short" else (1, 2))


def _saved_run(tmp_path: Path, run_config: dict | None = None, **fields) -> Path:
    """A run folder with a sound checkpoint after round 1 of `run_config`.

    `fields` replace the checkpoint's own.
    """
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = default_run_config() | (run_config or {})
    history = {
        "run_config": config,
        "rounds": [{"round": 1}],
        "num_partitions": 10,
        "nodes_left_out": [],
        "best_round": None,
    }
    numpy_rng, python_rng = checkpoint.random_states()
    saved = {
        "server_round": 1,
        "model": get_parameters(Net()),
        "history": history,
        "strategy": {},
        "privacy": None,
        "sampler": random.Random(0).getstate(),
        "numpy_rng": numpy_rng,
        "python_rng": python_rng,
    }
    checkpoint.save(checkpoint.Checkpoint(**saved | fields), run_dir)
    return run_dir


def test_resuming_a_folder_that_is_no_run_is_refused(tmp_path):
    config = default_run_config() | {"resume-from": str(tmp_path)}
    with pytest.raises(ValueError, match="resume-from.*holds no checkpoint.pt"):
        server_fn(make_context(config))


def test_resuming_with_another_config_names_the_keys_that_differ(tmp_path):
    run_dir = _saved_run(tmp_path)
    config = default_run_config() | {
        "resume-from": str(run_dir),
        "learning-rate": 0.5,
        "num-server-rounds": 9,  # allowed: extends the run
        "output-dir": str(tmp_path / "elsewhere"),  # allowed
    }
    with pytest.raises(
        ValueError, match=r"learning-rate = 0\.001 -> 0\.5\. Only"
    ) as ex:
        checkpoint.check_resumable(checkpoint.load(run_dir), config)
    assert "num-server-rounds" not in str(ex.value).split("Only")[0]
    config["learning-rate"] = default_run_config()["learning-rate"]
    checkpoint.check_resumable(checkpoint.load(run_dir), config)
    with pytest.raises(ValueError, match="num-server-rounds' = 1 leaves nothing"):
        checkpoint.check_resumable(
            checkpoint.load(run_dir), config | {"num-server-rounds": 1}
        )


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_checkpoint_is_refused(tmp_path, damage):
    path = _saved_run(tmp_path) / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"x" * 99)
    with pytest.raises(ValueError, match="checkpoint.pt cannot be read"):
        checkpoint.load(path.parent)


def test_a_checkpoint_cannot_run_code(tmp_path):
    path = _saved_run(tmp_path) / "checkpoint.pt"
    torch.save({"evil": print}, path)  # a pickled callable, not data
    with pytest.raises(ValueError, match="cannot be read"):
        checkpoint.load(path.parent)


def _tampered(run_dir: Path, **changes) -> None:
    """Rewrite the checkpoint in `run_dir` with fields changed or (None) removed."""
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = checkpoint._to_tensors(value)  # as the app stores arrays
    torch.save(state, run_dir / "checkpoint.pt")


FEDADAM = {"strategy": "fedadam", "server-learning-rate": 0.01}


@pytest.mark.parametrize(
    ("run_config", "fields", "tampering", "named"),
    [
        # Switching the central noise off: no such state is restored.
        (
            {"dp": "central-fixed"},
            {"privacy": {}, "noise_secret": bytes(32)},
            {"strategy": {"0.noise_multiplier": 0.0}},
            "strategy state '0.noise_multiplier' is not this run's strategy's "
            "(known: 0.clipping_norm)",
        ),
        (
            FEDADAM,
            {},
            {"strategy": {"0.m_t": [np.zeros(3)]}},
            "strategy state '0.m_t' is not one float array per model array, in "
            "the model's shapes",
        ),
        (
            {"dp": "central-adaptive", "dp-noise-multiplier": 0.5},
            {"privacy": {}, "noise_secret": bytes(32)},
            {"strategy": {"0.clipping_norm": "1.0"}},
            "strategy state '0.clipping_norm' = '1.0', expected a number > 0",
        ),
        ({}, {}, {"server_round": "1"}, "'server_round' = '1', expected an integer"),
        ({}, {}, {"sneaky": 1}, "it holds 'sneaky', which no checkpoint has"),
        ({}, {}, {"numpy_rng": None}, "it lacks 'numpy_rng'"),
        ({}, {}, {"sampler": (3, (1, 2), None)}, "'sampler' is no generator's state"),
        ({}, {}, {"noise_secret": bytes(32)}, "it holds a noise secret"),
        ({}, {}, {"model": [np.zeros(2, np.float32)]}, "'model' is not the 10 arrays"),
    ],
    ids=[
        "unknown-key",
        "wrong-shape",
        "wrong-type",
        "round-as-text",
        "unknown-field",
        "missing-field",
        "bad-generator",
        "secret-without-dp",
        "other-model",
    ],
)
def test_a_tampered_checkpoint_is_refused_before_round_1(
    tmp_path, cifar_dir, run_config, fields, tampering, named
):
    run_config = run_config | {
        "dataset": str(cifar_dir),
        "output-dir": str(tmp_path / "out"),
    }
    run_dir = _saved_run(tmp_path, run_config, **fields)
    _tampered(run_dir, **tampering)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    config = default_run_config() | run_config | {"resume-from": str(run_dir)}
    if "privacy" in fields:  # a real accountant's state, for the dp of the run
        privacy = PrivacySettings.from_run_config(config)
        state = PrivacyLedger(privacy, release=LocalRelease(privacy)).state_dict()
        _tampered(run_dir, privacy=state)
        before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(ValueError) as refused:
        server_fn(make_context(config))
    message = str(refused.value)
    assert message.startswith(f"run config key 'resume-from' = {str(run_dir)!r}: ")
    assert named in message
    # Nothing of the run folder changed (but for who last claimed it), and no
    # other was made.
    after = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    claimed = after.pop(WRITER_LOCK, b"the ServerApp of run 1 (process ")
    assert claimed.startswith(b"the ServerApp of run 1 (process ")
    assert after == before
    assert not Path(config["output-dir"]).exists()


@pytest.mark.parametrize(
    ("history", "named"),
    [
        ({"rounds": None}, "'history' has no 'rounds'"),
        ({"best_round": 5}, "'history' 'best_round' = 5 is no round of it"),
        ({"rounds": [{"round": "1"}]}, "without an integer 'round'"),
        ({"rounds": [{"round": 2}]}, "'history' 'rounds' are [2], expected rounds up"),
        ({"nodes_left_out": "all"}, "'history' 'nodes_left_out' = 'all', of the"),
    ],
)
def test_a_checkpoint_with_a_broken_history_is_refused(tmp_path, history, named):
    run_dir = _saved_run(tmp_path)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for key, value in history.items():
        if value is None:
            del state["history"][key]
        else:
            state["history"][key] = value
    torch.save(state, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError) as refused:
        checkpoint.load(run_dir)
    assert named in str(refused.value)


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(
    tmp_path, cifar_dir
):
    # A ServerApp left running by a killed SuperLink holds its run folder; a
    # resumed run on it must not write beside it.
    run_config = {"dataset": str(cifar_dir), "output-dir": str(tmp_path / "out")}
    run_dir = _saved_run(tmp_path, run_config)
    config = (
        default_run_config()
        | run_config
        | {
            "resume-from": str(run_dir),
            "num-server-rounds": 2,
        }
    )
    stray = "the ServerApp of run 7 (process 4242 on host-a, since 2026-12-01 10:00:00)"
    holder = RunFolderLock(run_dir.resolve(), stray)
    try:
        with pytest.raises(ValueError) as refused:
            server_fn(make_context(config))
        assert str(refused.value) == (
            f"run folder {str(run_dir.resolve())!r} is being written by {stray}: "
            "one writer at a time. Stop that one first (a deployment's `stop` ends "
            "every process it started)."
        )
    finally:
        holder.release()
    # Once it is gone, the run resumes, and holds the folder in turn.
    components = server_fn(make_context(config))
    with pytest.raises(ValueError, match="is being written by the ServerApp of run 1"):
        server_fn(make_context(config))
    components.strategy.recorder.stop_early(
        1, components.strategy.initialize_parameters(None), "test"
    )
    server_fn(make_context(config))  # released when the run ended
