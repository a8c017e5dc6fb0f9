"""Faulty, lying and late clients are left out, and the run goes on."""

import json
from pathlib import Path

import numpy as np
import torch
from conftest import first_round_updates, history_of, in_process, run_dir_of

from flower_tutorial.task import Net, get_parameters

# Partition -> how its client misbehaves: in `fit` (1-4, 9-11), or in what it
# says about itself (5-8, trained honestly); partitions 0 and 12 are sound.
FAULTS = {
    11: "raises",
    1: "nan",
    2: "shape",
    3: "count",
    4: "zero",
    5: "partition-id as a string",
    6: "huge num-partitions",
    7: "nan accuracy",
    8: "get_properties raises",
    9: "a 10 MB status",
    10: "a 10 MB metric",
}
NODES = 13
NOT_SAMPLED = [5, 6, 8]  # they never said which partition they hold
SOUND_UPDATES = [0, 7, 12]  # 7 lies only when it evaluates
TEN_MB = 10_000_000

FAULTY_CLIENT_FN = f"""
import numpy as np
from flwr.common import Code, FitRes, Parameters, Status
from flower_tutorial.client_app import client_fn as app_client_fn

FAULTS = {FAULTS!r}

def faulty_client_fn(context):
    numpy_client = app_client_fn(context).numpy_client
    fault = FAULTS.get(int(context.node_config["partition-id"]))
    sound_fit = numpy_client.fit
    sound_evaluate = numpy_client.evaluate
    sound_properties = numpy_client.get_properties

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
        if fault == "a 10 MB metric":
            metrics["train_loss"] = "y" * {TEN_MB}
        return arrays, num_examples, metrics

    def evaluate(parameters, config):
        loss, num_examples, metrics = sound_evaluate(parameters, config)
        return loss, num_examples, {{**metrics, "accuracy": float("nan")}}

    def get_properties(config):
        properties = sound_properties(config)
        if fault == "partition-id as a string":
            properties["partition-id"] = "5"
        if fault == "huge num-partitions":
            properties["num-partitions"] = 10**9
        if fault == "get_properties raises":
            raise RuntimeError("no identity today")
        return properties

    numpy_client.fit = fit
    numpy_client.evaluate = evaluate if fault == "nan accuracy" else sound_evaluate
    numpy_client.get_properties = get_properties
    client = numpy_client.to_client()
    if fault == "a 10 MB status":  # a Client of its own, which sets its status
        status = Status(Code.FIT_NOT_IMPLEMENTED, "x" * {TEN_MB})
        client.fit = lambda ins: FitRes(status, Parameters([], ""), 0, {{}})
    return client
"""


def _run_config(cifar_dir: Path, out: Path) -> dict:
    return {
        "dataset": str(cifar_dir),
        "num-server-rounds": 1,
        "min-fit-clients": NODES - len(NOT_SAMPLED),
        "fraction-evaluate": 1.0,
        "min-evaluate-clients": 2,
        # Nodes that cannot say which partition they hold are not available.
        "min-available-clients": NODES - len(NOT_SAMPLED),
        "batch-size": 16,
        "output-dir": str(out),
    }


def _sound_updates(run_config: dict) -> list[tuple[list[np.ndarray], int]]:
    """The round-1 updates of the clients with sound updates, computed here."""
    return first_round_updates(run_config, SOUND_UPDATES, NODES)


def _mean(updates: list[tuple[list[np.ndarray], int]], weighted: bool) -> list:
    weights = [n if weighted else 1 for _, n in updates]
    return [
        sum(a[i] * w for (a, _), w in zip(updates, weights, strict=True)) / sum(weights)
        for i in range(len(updates[0][0]))
    ]


def test_faulty_and_lying_clients_are_left_out_and_the_run_goes_on(
    run_python, cifar_dir, tmp_path
):
    run_config = _run_config(cifar_dir, tmp_path)
    code = f"""{in_process()}{FAULTY_CLIENT_FN}
from flower_tutorial.simulation import run_tutorial_simulation
run_tutorial_simulation(num_supernodes={NODES}, run_config={run_config!r},
                        client_fn=faulty_client_fn)
"""
    exit_code, output = run_python(code, timeout=240)
    assert exit_code == 0, output[-4000:]
    run_dir = run_dir_of(tmp_path)
    history = json.loads((run_dir / "history.json").read_text())
    # Three never said which partition they hold, and were never asked to train.
    left_out = " | ".join(history["nodes_left_out"])
    assert len(history["nodes_left_out"]) == len(NOT_SAMPLED)
    for expected in (
        "partition-id = '5', expected an integer",
        f"num-partitions = 1000000000, but the other SuperNodes say {NODES}",
        "get_properties failed",
    ):
        assert expected in left_out
    assert history["num_partitions"] == NODES
    round_1 = history["rounds"][1]
    assert sorted(int(k) for k in round_1["fit_examples"]) == SOUND_UPDATES
    reasons = " | ".join(round_1["fit_failures"])
    # Every node was sampled: each that could not say who it is costs its place.
    assert round_1["fit_failures"][:3] == history["nodes_left_out"]
    assert len(round_1["fit_failures"]) == len(NOT_SAMPLED) + 7
    for expected in (
        "simulated crash",
        "partition 1: array 0 holds NaN",
        "partition 2: array 0 has shape (1, 3, 5, 5), expected (6, 3, 5, 5)",
        "partition 3: 9 arrays, expected 10",
        "partition 4: num_examples = 0",
        "x" * 1000 + f"... ({TEN_MB:,} characters)",
        f"partition 10: metric 'train_loss' = '{'y' * 100}'... ({TEN_MB:,} "
        "characters), expected a finite number >= 0",
    ):
        assert expected in reasons
    assert round_1["evaluate_failures"] == history["nodes_left_out"] + [
        "partition 7: metric 'accuracy' = nan, expected a number in [0, 1]"
    ]
    assert round_1["evaluate_clients"] == NODES - len(NOT_SAMPLED) - 1
    # A client's text has no length limit; the log and history.json have one.
    assert len((run_dir / "history.json").read_text()) < 50_000
    assert max(len(line) for line in output.splitlines()) < 2_000
    assert 0 <= round_1["distributed_accuracy"] <= 1
    assert "a client was left out" in output  # and the log says so
    # The model is the example-weighted average of the sound updates, which differ
    # in size, so that an unweighted mean would not pass.
    net = Net()
    net.load_state_dict(torch.load(run_dir / "final_model.pt"))
    got = get_parameters(net)
    updates = _sound_updates(run_config)
    assert [n for _, n in updates] == [
        round_1["fit_examples"][str(pid)] for pid in SOUND_UPDATES
    ]
    assert len({n for _, n in updates}) > 1
    for array, want in zip(got, _mean(updates, weighted=True), strict=True):
        np.testing.assert_allclose(array, want, rtol=1e-5, atol=1e-7)
    assert not all(
        np.allclose(array, want, rtol=1e-5, atol=1e-7)
        for array, want in zip(got, _mean(updates, weighted=False), strict=True)
    )


# Round 1 of two clients training on a few dozen images decoded beforehand, in
# this process: about a second, five on a machine busy with two other test runs,
# so this leaves room for a loaded machine.
ROUND_TIMEOUT = 30.0
SLOW_CLIENT_FN = f"""
import time
from flower_tutorial.client_app import client_fn as app_client_fn

def slow_client_fn(context):
    # In round 2, partition 1 replies 5 s after the round-timeout.
    numpy_client = app_client_fn(context).numpy_client
    partition_id = int(context.node_config["partition-id"])
    sound_fit = numpy_client.fit

    def fit(parameters, config):
        if int(config["server-round"]) == 2 and partition_id == 1:
            time.sleep({ROUND_TIMEOUT + 5})
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
    # In-process ClientApps in two threads: one hangs while the other replies.
    code = f"""{in_process(workers=2)}{SLOW_CLIENT_FN}
from flower_tutorial.config import app_run_config, DataSettings
from flower_tutorial.simulation import run_tutorial_simulation
from flower_tutorial.task import load_data

data = DataSettings.from_run_config(app_run_config({run_config!r}))
for partition_id in range(2):  # decoded once here, kept in memory for the run
    load_data(partition_id, 2, data)
run_tutorial_simulation(num_supernodes=2, run_config={run_config!r},
                        client_fn=slow_client_fn)
"""
    exit_code, output = run_python(code, timeout=240)
    assert exit_code == 0, output[-4000:]
    rounds = history_of(tmp_path)["rounds"]
    assert rounds[1]["fit_clients"] == 2
    assert rounds[2]["fit_clients"] == 1
    (reason,) = rounds[2]["fit_failures"]
    assert reason.startswith("no reply within round-timeout"), reason
    assert rounds[2]["seconds"] < ROUND_TIMEOUT + 5  # it did not wait for it
