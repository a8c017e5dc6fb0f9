"""flower_tutorial: the tutorial's `run_simulation` entry, for notebooks and scripts.

`flwr run .` is the way to run the app; this module keeps the tutorial's Python
entry working: it fuses the run config of ``pyproject.toml`` with overrides (which
`run_simulation` alone does not read), stops cleanly on Ctrl-C, and returns the
run's output folder (history.json, models, plots: see recording.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.client import Client, ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message
from flwr.server import Grid, ServerApp, ServerAppComponents
from flwr.simulation import run_simulation

from flower_tutorial.client_app import client_fn
from flower_tutorial.config import app_run_config
from flower_tutorial.privacy import privacy_mod
from flower_tutorial.server_app import run_rounds, server_fn
from flower_tutorial.stopping import stop_on_ctrl_c
from flower_tutorial.task import get_device


def default_backend_config() -> dict[str, Any]:
    """Return the tutorial's client resources: 1 CPU each, a whole GPU on CUDA."""
    num_gpus = 1.0 if get_device().type == "cuda" else 0.0
    return {"client_resources": {"num_cpus": 1, "num_gpus": num_gpus}}


def run_tutorial_simulation(
    num_supernodes: int = 10,
    run_config: Mapping[str, Any] | None = None,
    backend_config: Mapping[str, Any] | None = None,
    client_fn: Callable[[Context], Client] = client_fn,
) -> Path:
    """Simulate the federation in this process; return the run's output folder.

    `run_config` overrides keys of ``[tool.flwr.app.config]`` (an unknown key is an
    error); `backend_config` is passed to `run_simulation` (default: see
    `default_backend_config`). Each SuperNode gets ``partition-id`` and
    ``num-partitions = num_supernodes`` in its node config. `client_fn` replaces
    the app's, e.g. to try the server against misbehaving clients.
    """
    fused = app_run_config(run_config)
    built: list[ServerAppComponents] = []
    interrupted = threading.Event()

    def stop_run() -> None:
        for components in built:
            components.client_manager.stop()

    def on_ctrl_c() -> None:
        interrupted.set()
        stop_run()

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        context = replace(context, run_config=fused)
        components = server_fn(context)
        built.append(components)
        if interrupted.is_set():  # Ctrl-C came before the server existed
            stop_run()
        run_rounds(grid, context, components)

    def fuse(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        # First of the mods, so that privacy_mod and client_fn read the fused run
        # config. A copy: Flower rejects a ClientApp that changes its context's.
        return call_next(msg, replace(context, run_config=fused))

    try:
        with stop_on_ctrl_c(on_ctrl_c):
            run_simulation(
                server_app=server_app,
                client_app=ClientApp(client_fn=client_fn, mods=[fuse, privacy_mod]),
                num_supernodes=num_supernodes,
                backend_config=dict(backend_config or default_backend_config()),
            )
    except Exception as ex:
        if interrupted.is_set():
            raise KeyboardInterrupt("The simulation was stopped by Ctrl-C.") from ex
        raise
    finally:
        # Also after a crash of the simulation: the ServerApp's thread must not
        # wait for replies that never come (up to round-timeout).
        stop_run()
    if interrupted.is_set():
        raise KeyboardInterrupt("The simulation was stopped by Ctrl-C.")
    if not built or not built[0].strategy.recorder.finished:
        raise RuntimeError("The simulation ended without completing its rounds.")
    return built[0].strategy.recorder.run_dir
