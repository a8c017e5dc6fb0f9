"""Whole federations through the tutorial's run_simulation entry (Ray, 2 cores)."""

import json
import time

RESULT_PREFIX = "RUN_DIR="


def _simulate(
    run_python, num_supernodes: int, run_config: dict, output_dir
) -> tuple[int, str]:
    run_config = run_config | {"output-dir": str(output_dir)}
    code = f"""
from flower_tutorial.simulation import run_tutorial_simulation
run_dir = run_tutorial_simulation(num_supernodes={num_supernodes},
                                  run_config={run_config!r})
print({RESULT_PREFIX!r} + str(run_dir))
"""
    return run_python(code, timeout=240)


def test_a_small_federation_trains_and_reports_accuracy(
    run_python, cifar_dir, tmp_path
):
    run_config = {
        "dataset": str(cifar_dir),
        "num-server-rounds": 2,
        "min-fit-clients": 3,
        "min-evaluate-clients": 2,
        "min-available-clients": 3,
        "batch-size": 16,
    }
    code, output = _simulate(run_python, 3, run_config, tmp_path)
    assert code == 0, output[-4000:]
    line = next(x for x in output.splitlines() if x.startswith(RESULT_PREFIX))
    (run_dir,) = tmp_path.iterdir()
    assert line == RESULT_PREFIX + str(run_dir)  # the folder the run wrote
    rounds = json.loads((run_dir / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for entry in rounds[1:]:
        assert entry["distributed_loss"] > 0 and entry["train_loss"] > 0
        assert 0.0 <= entry["distributed_accuracy"] <= 1.0
    assert output.count("aggregate_fit: received 3 results and 0 failures") == 2
    assert output.count("aggregate_evaluate: received 2 results and 0 failures") == 2


def test_too_few_supernodes_end_the_run_instead_of_waiting(
    run_python, cifar_dir, tmp_path
):
    # The tutorial's minimums (10 clients) on a federation of 2 SuperNodes: Flower
    # alone would wait a day; here the run ends after node-wait-timeout.
    run_config = {"dataset": str(cifar_dir), "node-wait-timeout": 3.0}
    code, output = _simulate(run_python, 2, run_config, tmp_path)
    assert code != 0
    assert "The strategy needs 10 SuperNodes but only 2 connected" in output
    assert '--federation-config "num-supernodes=10"' in output


def test_a_setting_that_breaks_every_client_ends_the_run(run_python, tmp_path):
    # Checked on the clients (the server cannot see their data): asked which
    # partition they hold, every client fails, and the run ends with its message.
    missing = str(tmp_path / "no-such-cifar10")
    run_config = {
        "dataset": missing,
        "centralized-evaluation": False,  # else the server itself refuses the path
        "min-fit-clients": 2,
        "min-evaluate-clients": 2,
        "min-available-clients": 2,
    }
    code, output = _simulate(run_python, 2, run_config, tmp_path)
    assert code != 0
    assert "All 2 SuperNodes failed when asked which partition they hold" in output
    assert "no-such-cifar10" in output


def test_ctrl_c_stops_the_simulation_and_leaves_nothing_running(
    run_python, cifar_dir, tmp_path
):
    fit_started = tmp_path / "fit-started"
    run_config = {
        "dataset": str(cifar_dir),
        "num-server-rounds": 2,
        "min-fit-clients": 2,
        "min-evaluate-clients": 1,
        "min-available-clients": 2,
        "output-dir": str(tmp_path / "out"),
    }
    code = f"""
import time
from pathlib import Path
from flower_tutorial.client_app import client_fn as app_client_fn
from flower_tutorial.simulation import run_tutorial_simulation

def slow_client_fn(context):
    numpy_client = app_client_fn(context).numpy_client
    sound_fit = numpy_client.fit

    def fit(parameters, config):
        Path({str(fit_started)!r}).touch()
        time.sleep(10)  # a long local epoch, during which Ctrl-C comes
        return sound_fit(parameters, config)

    numpy_client.fit = fit
    return numpy_client.to_client()

run_tutorial_simulation(num_supernodes=2, run_config={run_config!r},
                        client_fn=slow_client_fn)
"""
    start = time.monotonic()
    # Before the fix, the process outlived Ray, waiting up to round-timeout (1 h).
    exit_code, output = run_python(code, timeout=150, interrupt_when=fit_started.exists)
    assert exit_code != 0
    assert "Ctrl-C: stopping the run" in output
    assert "KeyboardInterrupt: The simulation was stopped by Ctrl-C." in output
    assert "[round 2/2]" not in output
    assert time.monotonic() - start < 150
    # The fixture checks that no process of the run (Ray's included) is left.
