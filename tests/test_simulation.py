"""Runs that end early (too few SuperNodes, clients that all fail, Ctrl-C), and,
without a simulation, that `run_tutorial_simulation` runs the app `flwr run` runs,
on the same run config.

The first two runs ask what the app does, and run their ClientApps in process
(tests/inprocess.py); Ctrl-C is about Ray's processes, and runs on Ray.
"""

import inspect
import time
import tomllib
import warnings
import zipfile
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import APP_DIR, in_process
from flwr.cli.build import build_fab_from_disk
from flwr.client import NumPyClient
from flwr.common import Context, GetPropertiesIns, Metadata, RecordDict
from flwr.common.config import (
    get_fused_config_from_dir,
    get_fused_config_from_fab,
    get_project_config,
    parse_config_args,
)
from flwr.common.constant import MessageTypeLegacy
from flwr.common.serde import user_config_from_proto, user_config_to_proto
from flwr.compat.common.recorddict_compat import getpropertiesins_to_recorddict
from flwr.serverapp import ServerApp
from flwr.supercore.run import Run

from flower_tutorial import client_app, server_app, simulation
from flower_tutorial.config import RunSettings
from flower_tutorial.privacy import privacy_mod


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


# --- The same app and run config as `flwr run` ----------------------------------

PRESETS = sorted((APP_DIR / "conf").glob("*.toml"))
# One override of each type, as `flwr run . --run-config "..."` takes them.
OVERRIDES = (
    "num-server-rounds=3 fraction-fit=0.5 learning-rate=0.01 "
    'dataset="/data/cifar10" partitioner="dirichlet" dirichlet-alpha=0.3 '
    "centralized-evaluation=false dp-max-epsilon=8.0 tau=1e-3 seed=7"
)


def _flwr_run_config(overrides: list[str], tmp_path) -> dict:
    """The run config that `flwr run . --run-config ...` gives the app.

    As Flower 1.42 makes it: `flwr run` parses the overrides and sends them, as
    protobuf, with the app's FAB; each SuperNode fuses them with the FAB's
    pyproject.toml, the ServerApp's runtime with that of the FAB installed.
    """
    with warnings.catch_warnings():  # pathspec's, about Flower's ignore patterns
        warnings.simplefilter("ignore", DeprecationWarning)
        fab = build_fab_from_disk(APP_DIR)
    wire = user_config_to_proto(parse_config_args(overrides))
    run = Run.create_empty(run_id=1)
    run.override_config = user_config_from_proto(wire)
    clients = dict(get_fused_config_from_fab(fab, run))
    zipfile.ZipFile(BytesIO(fab)).extractall(tmp_path / "fab")
    server = dict(get_fused_config_from_dir(tmp_path / "fab", run.override_config))
    assert clients == server
    return server


def _simulation_run_configs(monkeypatch, overrides: dict) -> dict[str, dict]:
    """The run configs that run_tutorial_simulation gives its ServerApp and client.

    Flower's run_simulation is replaced by one that calls the ServerApp and asks
    the ClientApp a node's properties, with the empty run config it gives them.
    """
    seen: dict[str, dict] = {}

    def server_fn(context: Context) -> SimpleNamespace:
        seen["server"] = dict(context.run_config)
        return SimpleNamespace(
            client_manager=SimpleNamespace(stop=lambda: None),
            strategy=SimpleNamespace(
                recorder=SimpleNamespace(finished=True, run_dir="run-dir")
            ),
        )

    class _Client(NumPyClient):
        def get_properties(self, config):
            return {}

    def client_fn(context: Context):
        seen["client"] = dict(context.run_config)
        return _Client().to_client()

    def run_simulation(server_app, client_app, num_supernodes, backend_config):
        assert num_supernodes == 2
        context = Context(1, 1, {}, RecordDict(), {})  # as Flower gives them
        server_app(None, context)  # the grid goes to run_rounds only
        metadata = Metadata(
            run_id=1,
            message_id="1",
            src_node_id=0,
            dst_node_id=1,
            reply_to_message_id="",
            group_id="",
            created_at=time.time(),
            ttl=60.0,
            message_type=MessageTypeLegacy.GET_PROPERTIES,
        )
        content = getpropertiesins_to_recorddict(GetPropertiesIns({}))
        client_app(simulation.Message(content, metadata=metadata), context)

    monkeypatch.setattr(simulation, "run_simulation", run_simulation)
    monkeypatch.setattr(simulation, "server_fn", server_fn)
    monkeypatch.setattr(simulation, "run_rounds", lambda grid, context, parts: None)
    simulation.run_tutorial_simulation(2, overrides, client_fn=client_fn)
    return seen


def test_run_tutorial_simulation_runs_the_app_that_flwr_run_runs():
    components = get_project_config(APP_DIR)["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "flower_tutorial.server_app:app",
        "clientapp": "flower_tutorial.client_app:app",
    }
    # The ServerApp's main builds with server_fn and runs run_rounds; the ClientApp
    # is client_fn behind privacy_mod. The simulation uses the same pieces.
    assert isinstance(server_app.app, ServerApp)
    assert simulation.server_fn is server_app.server_fn
    assert simulation.run_rounds is server_app.run_rounds
    assert simulation.privacy_mod is privacy_mod
    assert client_app.app._mods == [privacy_mod]
    parameters = inspect.signature(simulation.run_tutorial_simulation).parameters
    assert parameters["client_fn"].default is client_app.client_fn


@pytest.mark.parametrize(
    "overrides",
    [[], [OVERRIDES], *([str(p)] for p in PRESETS)],
    ids=["defaults", "overrides", *(p.name for p in PRESETS)],
)
def test_flwr_run_and_run_tutorial_simulation_fuse_the_same_run_config(
    tmp_path, monkeypatch, overrides
):
    flwr_run = _flwr_run_config(overrides, tmp_path)
    if overrides and overrides[0].endswith(".toml"):
        as_python = tomllib.loads(Path(overrides[0]).read_text())
    else:
        as_python = parse_config_args(overrides)  # the same values, in Python
    seen = _simulation_run_configs(monkeypatch, as_python)
    assert seen["server"] == flwr_run
    assert seen["client"] == flwr_run
    # Every type as flwr run gives it, and the same settings from it.
    assert {k: type(v) for k, v in seen["server"].items()} == {
        k: type(v) for k, v in flwr_run.items()
    }
    assert RunSettings.from_run_config(seen["server"]) == RunSettings.from_run_config(
        flwr_run
    )


def test_an_unknown_key_is_refused_by_both(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Key 'num-rounds' is not present"):
        _flwr_run_config(["num-rounds=3"], tmp_path)
    with pytest.raises(ValueError, match="Key 'num-rounds' is not present"):
        _simulation_run_configs(monkeypatch, {"num-rounds": 3})
