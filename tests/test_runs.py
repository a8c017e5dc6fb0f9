"""What a run leaves behind, reproducibility and resuming (four small simulations)."""

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import data_settings

from flower_tutorial import task
from flower_tutorial.task import Net, load_test_data

ROUNDS = 2


@pytest.fixture(scope="module")
def runs(run_python_module, cifar_dir, tmp_path_factory) -> dict[str, Path]:
    """Run folders of: a, b (seed 1), c (seed 2), d (c's seed, resumed from a)."""
    root = tmp_path_factory.mktemp("runs")
    code = f"""
from pathlib import Path
from flower_tutorial.simulation import run_tutorial_simulation

base = {{
    "dataset": {str(cifar_dir)!r},
    "num-server-rounds": {ROUNDS},
    "min-fit-clients": 3,
    "min-evaluate-clients": 2,
    "min-available-clients": 3,
    "batch-size": 16,
}}

def run(name, overrides):
    config = base | {{"output-dir": str(Path({str(root)!r}) / name)}} | overrides
    run_tutorial_simulation(num_supernodes=3, run_config=config)
    (run_dir,) = (Path({str(root)!r}) / name).iterdir()
    return run_dir

a = run("a", {{"seed": 1}})
run("b", {{"seed": 1}})
run("c", {{"seed": 2}})
run("d", {{"seed": 2, "num-server-rounds": 1,
           "initial-checkpoint": str(a / "final_model.pt")}})
"""
    code_, output = run_python_module(code, timeout=400)
    assert code_ == 0, output[-4000:]
    assert f"[round {ROUNDS}/{ROUNDS}]" in output  # the per-round progress line
    return {name: next((root / name).iterdir()) for name in "abcd"}


def _history(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    """Every recorded number but the wall times."""
    rounds = _history(run_dir)["rounds"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]


def test_history_holds_every_round_and_the_config(runs):
    history = _history(runs["a"])
    assert history["run_config"]["seed"] == 1
    assert history["run_config"]["num-server-rounds"] == ROUNDS
    assert history["num_partitions"] == 3
    assert history["best_round"] in range(1, ROUNDS + 1)
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert set(rounds[0]) == {
        "round",
        "seconds",
        "centralized_loss",
        "centralized_accuracy",
    }
    for entry in rounds[1:]:
        assert entry["fit_clients"] == 3 and entry["fit_failures"] == 0
        assert entry["evaluate_clients"] == 2 and entry["evaluate_failures"] == 0
        assert entry["seconds"] > 0
        for key in ("train_loss", "distributed_loss", "centralized_loss"):
            assert entry[key] > 0
        for key in ("distributed_accuracy", "centralized_accuracy"):
            assert 0.0 <= entry[key] <= 1.0
    assert not list(runs["a"].glob("*.tmp"))


def test_final_model_is_the_last_rounds_global_model(runs, cifar_dir):
    net = Net()
    net.load_state_dict(torch.load(runs["a"] / "final_model.pt"))
    loss, accuracy = task.test(
        net, load_test_data(data_settings(cifar_dir)), torch.device("cpu")
    )
    last = _history(runs["a"])["rounds"][-1]
    assert loss == pytest.approx(last["centralized_loss"], rel=1e-6)
    assert accuracy == last["centralized_accuracy"]
    Net().load_state_dict(torch.load(runs["a"] / "best_model.pt"))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("accuracy.png", (640, 400)),
        ("loss.png", (640, 400)),
        ("batch.png", (1200, 600)),
        ("label_distribution.png", (640, 400)),
    ],
)
def test_plots_are_pngs_of_the_expected_size(runs, name, size):
    assert _png_size(runs["a"] / name) == size


def test_same_seed_same_history_other_seed_other_history(runs):
    assert _metrics(runs["a"]) == _metrics(runs["b"])
    assert _metrics(runs["a"]) != _metrics(runs["c"])


def test_resuming_starts_from_the_checkpoint(runs):
    saved = _history(runs["a"])["rounds"][-1]
    resumed = _history(runs["d"])["rounds"][0]
    assert resumed["centralized_loss"] == pytest.approx(
        saved["centralized_loss"], rel=1e-6
    )
    assert resumed["centralized_accuracy"] == saved["centralized_accuracy"]
    # ...while a fresh start with the same seed does not.
    fresh = _history(runs["c"])["rounds"][0]
    assert fresh["centralized_loss"] != pytest.approx(saved["centralized_loss"])
