"""`flwr run` as a user runs it, on the Simulation Engine, for tests.

Flower 1.42's `flwr run .` starts a managed local SuperLink that outlives it;
`local_superlink` gives it ports and a Flower home of the test's own, and stops
it again by PID (it is a descendant of the test's process, which adopts it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import _live_descendants

from flower_tutorial.deployment import local as deployment

FLWR = deployment._bin("flwr")


def flwr_run_argv(overrides: str, num_supernodes: int) -> list[str]:
    """`flwr run .` with run-config `overrides` and one CPU per simulated client."""
    return [
        FLWR,
        "run",
        ".",
        "--stream",
        "--run-config",
        overrides,
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
    ]


@contextlib.contextmanager
def local_superlink(home: Path) -> Iterator[dict[str, str]]:
    """The environment of a `flwr run` whose local SuperLink is the test's own.

    Free ports and a Flower home in `home`; the app runs in this environment,
    offline (no per-run `uv sync`). The SuperLink is stopped by PID afterwards.
    """
    port, control = deployment.free_port(), deployment.free_port()
    env = os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    try:
        yield env
    finally:
        _stop_superlink(port)


def _stop_superlink(port: int) -> None:
    """SIGTERM the SuperLink serving on `port`, and wait up to 30 s for it."""
    for pid, command in _live_descendants(os.getpid()).items():
        if "flower-superlink" in command and f"--port {port}" in command:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while deployment._proc_info(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
