"""Resuming a run: after a SIGKILL mid-round, or to extend a finished run.

Every run here uses FedAdam (server-side moments) on a sample of the clients, so a
resumed run matches an uninterrupted one only if the checkpoint restores the
strategy's state and the sampler's, not only the model.
"""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import default_run_config, in_process, make_context, run_dir_of

from flower_tutorial import checkpoint
from flower_tutorial.server_app import server_fn

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


def _saved_run(tmp_path: Path) -> Path:
    """A run folder with a checkpoint after round 1 of the default run config."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = default_run_config()
    history = {"run_config": config, "rounds": [{"round": 1}]}
    checkpoint.save(
        checkpoint.Checkpoint(
            server_round=1,
            model=[np.zeros(2, np.float32)],
            history=history,
            strategy={},
            privacy=None,
            sampler=None,
            numpy_rng=None,
            python_rng=None,
        ),
        run_dir,
    )
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
