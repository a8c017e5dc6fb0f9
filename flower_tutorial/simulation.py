"""flower_tutorial: the tutorial's `run_simulation` entry, for notebooks and scripts.

`flwr run .` is the way to run the app; this module keeps the tutorial's Python
entry working: it fuses the run config of ``pyproject.toml`` with overrides (which
`run_simulation` alone does not read) and returns Flower's History of the run
(the run's output folder holds the same and more, see recording.py).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from logging import WARNING
from types import FrameType
from typing import Any

from flwr.client import Client, ClientApp
from flwr.common import Context
from flwr.common.logger import log
from flwr.server import History, ServerApp, ServerAppComponents
from flwr.simulation import run_simulation

from flower_tutorial.client_app import client_fn
from flower_tutorial.config import app_run_config
from flower_tutorial.recording import RecordingServer
from flower_tutorial.server_app import server_fn
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
) -> History:
    """Simulate the federation in this process and return its History.

    `run_config` overrides keys of ``[tool.flwr.app.config]`` (an unknown key is an
    error); `backend_config` is passed to `run_simulation` (default: see
    `default_backend_config`). Each SuperNode gets ``partition-id`` and
    ``num-partitions = num_supernodes`` in its node config. `client_fn` replaces
    the app's, e.g. to try the server against misbehaving clients.
    """
    fused = app_run_config(run_config)
    servers: list[RecordingServer] = []
    interrupted = threading.Event()

    def stop_servers() -> None:
        for server in servers:
            server.client_manager().stop()

    def on_ctrl_c() -> None:
        interrupted.set()
        stop_servers()

    def _server_fn(context: Context) -> ServerAppComponents:
        components = server_fn(replace(context, run_config=fused))
        servers.append(components.server)
        if interrupted.is_set():  # Ctrl-C came before the server existed
            stop_servers()
        return components

    def _client_fn(context: Context) -> Client:
        # A copy: Flower rejects a ClientApp that changes its context's run_config.
        return client_fn(replace(context, run_config=fused))

    try:
        with _stop_on_ctrl_c(on_ctrl_c):
            run_simulation(
                server_app=ServerApp(server_fn=_server_fn),
                client_app=ClientApp(client_fn=_client_fn),
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
        stop_servers()
    if not servers or servers[0].history is None:
        if interrupted.is_set():
            raise KeyboardInterrupt("The simulation was stopped by Ctrl-C.")
        raise RuntimeError("The simulation ended without completing its rounds.")
    return servers[0].history


@contextmanager
def _stop_on_ctrl_c(stop: Callable[[], None]) -> Iterator[None]:
    """Make the first Ctrl-C stop the run cleanly; a second one interrupts at once.

    A plain KeyboardInterrupt would leave Flower's simulation threads waiting on
    Ray after Ray is shut down, and the process could not exit. Stopping the
    ServerApp instead lets Flower wind the simulation down as after its last
    round: the clients' current tasks end, Ray is shut down, nothing is left.
    """
    previous = signal.getsignal(signal.SIGINT)
    if (
        threading.current_thread() is not threading.main_thread()
        or previous is signal.SIG_IGN
    ):
        yield  # only the main thread handles signals; an ignored SIGINT stays so
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, previous)
        log(WARNING, "Ctrl-C: stopping the run (press Ctrl-C again to interrupt).")
        stop()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
