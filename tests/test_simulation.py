"""Runs that end early: too few SuperNodes, clients that all fail, Ctrl-C.

The first two ask what the app does, and run their ClientApps in process
(tests/inprocess.py); Ctrl-C is about Ray's processes, and runs on Ray.
"""

from conftest import in_process


def _simulate(
    run_python, num_supernodes: int, run_config: dict, output_dir
) -> tuple[int, str]:
    run_config = run_config | {"output-dir": str(output_dir)}
    code = f"""{in_process()}
from flower_tutorial.simulation import run_tutorial_simulation
run_tutorial_simulation(num_supernodes={num_supernodes}, run_config={run_config!r})
"""
    return run_python(code, timeout=240)


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
    # Before the fix, the process outlived Ray, waiting up to round-timeout (1 h):
    # run_python fails the test if it has not exited within its timeout.
    exit_code, output = run_python(code, timeout=150, interrupt_when=fit_started.exists)
    assert exit_code != 0
    assert "Ctrl-C: stopping the run" in output
    assert "KeyboardInterrupt: The simulation was stopped by Ctrl-C." in output
    assert "[round 2/2]" not in output
    # The fixture checks that no process of the run (Ray's included) is left.
