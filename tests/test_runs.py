"""What a run leaves behind, reproducibility and resuming (small simulations).

Most runs go through Flower's Simulation Runtime with in-process ClientApps
(tests/inprocess.py); run "b" repeats run "a" on Ray in another process, so one
comparison shows that runs are reproducible across processes and that the
in-process runs are the runs `run_tutorial_simulation` makes on Ray.
"""

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import data_settings, in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flower_tutorial import task
from flower_tutorial.recording import TENSORBOARD_TAGS
from flower_tutorial.task import Net, load_test_data

ROUNDS = 2


RUN_DIR = "RUN_DIR "  # a line the child prints: RUN_DIR <name>=<folder returned>
ENGINE = "ENGINE "  # ...and ENGINE <name>=<in process | ray>


def _simulations(root: Path, cifar_dir: Path, runs: dict[str, tuple[int, dict]]) -> str:
    """Code that runs named simulations one after the other in one process.

    A run whose name starts with "workflow" runs the app's components (server_fn's
    strategy, client manager and config) under Flower's DefaultWorkflow, the loop
    that SecAgg+ needs, instead of the legacy Server that `ServerApp(server_fn)`
    drives. Runs named in RAY_RUNS run on Ray, the others in process.
    """
    return f"""{in_process()}
from inprocess import InProcessBackend, use_in_process_backend, use_ray_backend
from dataclasses import replace
from pathlib import Path
from flwr.client import ClientApp
from flwr.server import LegacyContext, ServerApp
from flwr.server.workflow import DefaultWorkflow
from flwr.simulation import run_simulation
from flower_tutorial.client_app import client_fn
from flower_tutorial.config import app_run_config
from flower_tutorial.server_app import server_fn
from flower_tutorial.simulation import run_tutorial_simulation


def run_under_default_workflow(num_supernodes, run_config):
    fused = app_run_config(run_config)
    app = ServerApp()

    @app.main()
    def main(grid, context):
        parts = server_fn(replace(context, run_config=fused))
        DefaultWorkflow()(grid, LegacyContext(
            context,
            config=parts.config,
            strategy=parts.strategy,
            client_manager=parts.client_manager,
        ))

    run_simulation(
        server_app=app,
        client_app=ClientApp(lambda c: client_fn(replace(c, run_config=fused))),
        num_supernodes=num_supernodes,
        backend_config={{"client_resources": {{"num_cpus": 1, "num_gpus": 0.0}}}},
    )


base = {{
    "dataset": {str(cifar_dir)!r},
    "num-server-rounds": {ROUNDS},
    "min-fit-clients": 3,
    "min-evaluate-clients": 2,
    "min-available-clients": 3,
    "batch-size": 16,
}}
root = Path({str(root)!r})
for name, (num_supernodes, overrides) in {runs!r}.items():
    config = base | {{"output-dir": str(root / name)}} | overrides
    if "initial-checkpoint" in config:
        (saved,) = (root / config["initial-checkpoint"]).iterdir()
        config["initial-checkpoint"] = str(saved / "final_model.pt")
    use_ray_backend() if name in {RAY_RUNS!r} else use_in_process_backend()
    builds = InProcessBackend.builds
    if name.startswith("workflow"):
        run_under_default_workflow(num_supernodes, config)
    else:
        run_dir = run_tutorial_simulation(num_supernodes=num_supernodes,
                                          run_config=config)
        print({RUN_DIR!r} + name + "=" + str(run_dir), flush=True)
    engine = "in process" if InProcessBackend.builds > builds else "ray"
    print({ENGINE!r} + name + "=" + engine, flush=True)
"""


# Four nodes of which each round samples two: reproducible only if sampling is.
SUBSET = {
    "fraction-fit": 0.5,
    "min-fit-clients": 2,
    "min-available-clients": 4,
    "seed": 3,
}


RAY_RUNS = {"b"}


@pytest.fixture(scope="module")
def logs_and_runs(
    run_python_module, cifar_dir, tmp_path_factory
) -> tuple[list[str], dict[str, Path]]:
    """The logs of the two child processes, and run folders by name (see below).

    b and g repeat a and f in a second process, so determinism is checked across
    processes, not only within one; b on Ray, a in process.
    """
    root = tmp_path_factory.mktemp("runs")
    first = {
        "a": (3, {"seed": 1}),
        "c": (3, {"seed": 2}),
        "d": (3, {"seed": 2, "num-server-rounds": 1, "initial-checkpoint": "a"}),
        "e": (
            2,
            {
                "num-server-rounds": 1,
                "centralized-evaluation": False,
                "fraction-evaluate": 0.0,
                "min-fit-clients": 2,
                "min-available-clients": 2,
            },
        ),
        "f": (4, SUBSET),
        # A server-side optimizer under the app's checks and recording.
        "fedadam": (
            3,
            {"seed": 1, "strategy": "fedadam", "server-learning-rate": 0.01},
        ),
    }
    first["workflow"] = (3, {"seed": 1})
    second = {"b": (3, {"seed": 1}), "g": (4, SUBSET)}
    logs = []
    for batch in (first, second):
        code, output = run_python_module(_simulations(root, cifar_dir, batch), 500)
        assert code == 0, output[-4000:]
        assert f"[round {ROUNDS}/{ROUNDS}]" in output  # the per-round progress line
        logs.append(output)
    found = {name: next((root / name).iterdir()) for name in [*first, *second]}
    # run_tutorial_simulation returns the folder the run wrote.
    returned = {
        name: Path(folder)
        for name, folder in (
            line.removeprefix(RUN_DIR).split("=", 1)
            for line in "".join(logs).splitlines()
            if line.startswith(RUN_DIR)
        )
    }
    assert returned == {k: v for k, v in found.items() if k != "workflow"}
    return logs, found


@pytest.fixture(scope="module")
def runs(logs_and_runs) -> dict[str, Path]:
    """Run folders of the small simulations, by name."""
    return logs_and_runs[1]


def test_a_small_federation_on_ray_trains_and_reports(logs_and_runs):
    logs, runs = logs_and_runs
    ray_log = logs[1].split(f"{RUN_DIR}b=")[0]  # run b: 3 SuperNodes on Ray
    engines = dict(
        line.removeprefix(ENGINE).split("=", 1)
        for line in "".join(logs).splitlines()
        if line.startswith(ENGINE)
    )
    assert engines == {
        name: "ray" if name in RAY_RUNS else "in process" for name in runs
    }
    assert ray_log.count("aggregate_fit: received 3 results and 0 failures") == 2
    assert ray_log.count("aggregate_evaluate: received 2 results and 0 failures") == 2
    assert [r["round"] for r in _history(runs["b"])["rounds"]] == [0, 1, 2]


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
    rounds = history["rounds"]
    # The first round of the highest centralized accuracy, round 0 included.
    accuracy = [r["centralized_accuracy"] for r in rounds]
    assert history["best_round"] == accuracy.index(max(accuracy))
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert set(rounds[0]) == {
        "round",
        "seconds",
        "centralized_loss",
        "centralized_accuracy",
    }
    for entry in rounds[1:]:
        assert entry["fit_clients"] == 3 and entry["fit_failures"] == []
        assert entry["evaluate_clients"] == 2 and entry["evaluate_failures"] == []
        assert entry["seconds"] > 0
        for key in ("train_loss", "distributed_loss", "centralized_loss"):
            assert entry[key] > 0
        for key in ("distributed_accuracy", "centralized_accuracy"):
            assert 0.0 <= entry[key] <= 1.0
    assert not list(runs["a"].glob("*.tmp"))


@pytest.mark.parametrize(
    ("name", "round_of"),
    [("final_model.pt", lambda h: -1), ("best_model.pt", lambda h: h["best_round"])],
)
def test_saved_models_are_those_the_history_names(runs, cifar_dir, name, round_of):
    net = Net()
    net.load_state_dict(torch.load(runs["a"] / name))
    loss, accuracy = task.test(
        net, load_test_data(data_settings(cifar_dir)), torch.device("cpu")
    )
    history = _history(runs["a"])
    entry = history["rounds"][round_of(history)]
    assert loss == pytest.approx(entry["centralized_loss"], rel=1e-6)
    assert accuracy == entry["centralized_accuracy"]


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


def test_default_workflow_records_the_same_run(runs):
    # Flower's DefaultWorkflow drives the same components: the same history and
    # the same model bytes as the legacy Server's run "a".
    assert _metrics(runs["workflow"]) == _metrics(runs["a"])
    assert _history(runs["workflow"])["best_round"] == _history(runs["a"])["best_round"]
    for name in ("final_model.pt", "best_model.pt"):
        assert (runs["workflow"] / name).read_bytes() == (runs["a"] / name).read_bytes()

    def outputs(run_dir: Path) -> set[str]:
        # TensorBoard names its file by time and process.
        return {
            "events" if p.name.startswith("events.") else p.name
            for p in run_dir.iterdir()
        }

    assert outputs(runs["workflow"]) == outputs(runs["a"])


def test_tensorboard_events_hold_the_history(runs):
    events = EventAccumulator(str(runs["a"]))
    events.Reload()
    history = _history(runs["a"])
    written = set(events.Tags()["scalars"])
    for key, tag in TENSORBOARD_TAGS.items():
        expected = {r["round"]: r[key] for r in history["rounds"] if key in r}
        if not expected:  # epsilon, in a run without differential privacy
            assert tag not in written
            continue
        scalars = {e.step: e.value for e in events.Scalars(tag)}
        assert scalars == pytest.approx(expected, rel=1e-6), tag
    for key, name in (
        ("fit_train_loss", "training loss"),
        ("fit_examples", "examples"),
    ):
        expected: dict[str, dict[int, float]] = {}
        for entry in history["rounds"][1:]:
            for organization, value in entry[key].items():
                expected.setdefault(organization, {})[entry["round"]] = value
        for organization, by_round in expected.items():
            events_of = events.Scalars(f"organization {organization}/{name}")
            scalars = {e.step: e.value for e in events_of}
            assert scalars == pytest.approx(by_round, rel=1e-6), (organization, name)


def test_fedadam_runs_under_the_apps_checks(runs):
    history = _history(runs["fedadam"])
    assert history["run_config"]["strategy"] == "fedadam"
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert all(r["fit_failures"] == [] and r["fit_clients"] == 3 for r in rounds[1:])
    # The same clients and seed as run "a": only the server's step differs.
    assert rounds[0] == {**_metrics(runs["a"])[0], "seconds": rounds[0]["seconds"]}
    assert (
        rounds[1]["fit_train_loss"]
        == _history(runs["a"])["rounds"][1]["fit_train_loss"]
    )
    assert _metrics(runs["fedadam"])[1:] != _metrics(runs["a"])[1:]


def test_sampling_a_subset_of_clients_is_reproducible(runs):
    rounds = _metrics(runs["f"])[1:]
    assert [r["fit_clients"] for r in rounds] == [2] * ROUNDS
    assert _metrics(runs["f"]) == _metrics(runs["g"])


def test_a_run_without_evaluation_still_leaves_its_record(runs):
    history = _history(runs["e"])
    assert [r["round"] for r in history["rounds"]] == [1]
    assert history["rounds"][0]["train_loss"] > 0
    assert "centralized_loss" not in history["rounds"][0]
    assert history["best_round"] is None
    names = {p.name for p in runs["e"].iterdir()}
    assert {"history.json", "final_model.pt", "loss.png"} <= names
    assert not names & {"best_model.pt", "accuracy.png"}


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
