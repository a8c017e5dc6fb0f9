"""Faulty clients are left out; robust aggregation resists poisoned updates."""

import json
from pathlib import Path

import numpy as np
import torch
from conftest import default_run_config

from flower_tutorial.client_app import FlowerClient
from flower_tutorial.config import NodeSettings, RunSettings
from flower_tutorial.task import Net, get_parameters, load_data, set_seed

# Partition -> how its client misbehaves in `fit`; partitions 5 and 6 are sound.
FAULTS = {0: "raises", 1: "nan", 2: "shape", 3: "count", 4: "zero"}
NODES = 7

FAULTY_CLIENT_FN = f"""
import numpy as np
from flower_tutorial.client_app import client_fn as app_client_fn

FAULTS = {FAULTS!r}

def faulty_client_fn(context):
    numpy_client = app_client_fn(context).numpy_client
    fault = FAULTS.get(int(context.node_config["partition-id"]))
    sound_fit = numpy_client.fit

    def fit(parameters, config):
        arrays, num_examples, metrics = sound_fit(parameters, config)
        if fault == "raises":
            raise RuntimeError("simulated crash")
        if fault == "nan":
            arrays[0] = np.full_like(arrays[0], np.nan)
        if fault == "shape":
            arrays[0] = arrays[0][:1]
        if fault == "count":
            arrays = arrays[:-1]
        if fault == "zero":
            num_examples = 0
        return arrays, num_examples, metrics

    if fault:
        numpy_client.fit = fit
    return numpy_client.to_client()
"""


def _run_config(cifar_dir: Path, out: Path) -> dict:
    return {
        "dataset": str(cifar_dir),
        "num-server-rounds": 1,
        "min-fit-clients": NODES,
        "min-evaluate-clients": 2,
        "min-available-clients": NODES,
        "batch-size": 16,
        "output-dir": str(out),
    }


def _sound_average(run_config: dict) -> list[np.ndarray]:
    """FedAvg of the sound clients' round-1 updates, computed here."""
    settings = RunSettings.from_run_config(default_run_config() | run_config)
    set_seed(settings.seed)
    initial = get_parameters(Net())  # the server's initial model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker with one CPU
    try:
        updates = []
        for pid in range(len(FAULTS), NODES):
            node = NodeSettings(partition_id=pid, num_partitions=NODES)
            train, val = load_data(pid, NODES, settings.data)
            client = FlowerClient(Net(), train, val, settings, node)
            arrays, n, _ = client.fit(initial, {"server-round": 1})
            updates.append((arrays, n))
    finally:
        torch.set_num_threads(threads)
    total = sum(n for _, n in updates)
    return [sum(a[i] * n for a, n in updates) / total for i in range(len(initial))]


def test_faulty_clients_are_left_out_and_the_round_goes_on(
    run_python, cifar_dir, tmp_path
):
    run_config = _run_config(cifar_dir, tmp_path)
    code = f"""{FAULTY_CLIENT_FN}
from flower_tutorial.simulation import run_tutorial_simulation
run_tutorial_simulation(num_supernodes={NODES}, run_config={run_config!r},
                        client_fn=faulty_client_fn)
"""
    exit_code, output = run_python(code, timeout=240)
    assert exit_code == 0, output[-4000:]
    (run_dir,) = tmp_path.iterdir()
    round_1 = json.loads((run_dir / "history.json").read_text())["rounds"][1]
    assert round_1["fit_clients"] == NODES - len(FAULTS)
    reasons = " | ".join(round_1["fit_failures"])
    assert len(round_1["fit_failures"]) == len(FAULTS)
    for expected in (
        "simulated crash",
        "partition 1: array 0 holds NaN",
        "partition 2: array 0 has shape (1, 3, 5, 5), expected (6, 3, 5, 5)",
        "partition 3: 9 arrays, expected 10",
        "partition 4: num_examples = 0",
    ):
        assert expected in reasons
    assert "a client was left out" in output  # and the log says so
    net = Net()
    net.load_state_dict(torch.load(run_dir / "final_model.pt"))
    expected = _sound_average(run_config)
    for got, want in zip(get_parameters(net), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# Long enough for round 1 (which also starts the clients) even on a loaded machine.
ROUND_TIMEOUT = 40.0
SLOW_CLIENT_FN = f"""
import time
from flower_tutorial.client_app import client_fn as app_client_fn

def slow_client_fn(context):
    # In round 2, partition 1 replies 15 s after the round-timeout.
    numpy_client = app_client_fn(context).numpy_client
    partition_id = int(context.node_config["partition-id"])
    sound_fit = numpy_client.fit

    def fit(parameters, config):
        if int(config["server-round"]) == 2 and partition_id == 1:
            time.sleep({ROUND_TIMEOUT + 15})
        return sound_fit(parameters, config)

    numpy_client.fit = fit
    return numpy_client.to_client()
"""


def test_a_late_result_is_left_out_and_the_round_goes_on(
    run_python, cifar_dir, tmp_path
):
    run_config = _run_config(cifar_dir, tmp_path) | {
        "num-server-rounds": 2,
        "min-fit-clients": 1,
        "min-evaluate-clients": 1,
        "min-available-clients": 2,
        "round-timeout": ROUND_TIMEOUT,
    }
    code = f"""{SLOW_CLIENT_FN}
from flower_tutorial.simulation import run_tutorial_simulation
run_tutorial_simulation(num_supernodes=2, run_config={run_config!r},
                        client_fn=slow_client_fn)
"""
    exit_code, output = run_python(code, timeout=240)
    assert exit_code == 0, output[-4000:]
    (run_dir,) = tmp_path.iterdir()
    rounds = json.loads((run_dir / "history.json").read_text())["rounds"]
    assert rounds[1]["fit_clients"] == 2
    assert rounds[2]["fit_clients"] == 1
    (reason,) = rounds[2]["fit_failures"]
    assert reason.startswith("no reply within round-timeout"), reason
    assert rounds[2]["seconds"] < ROUND_TIMEOUT + 15  # it did not wait for it
