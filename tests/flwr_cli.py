"""`flwr run` as a user runs it, on the Simulation Engine, for tests.

Flower 1.42's `flwr run .` starts a managed local SuperLink that outlives it;
`local_superlink` gives it ports and a Flower home of the test's own, and stops
it again by PID: the test's process adopts it as a subreaper, so it stays a
descendant after `flwr run` exits and can be found.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import _live_descendants, _reap_adopted, _set_child_subreaper

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
    _set_child_subreaper()
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
    """SIGTERM the SuperLink serving on `port` and what it started (its SuperExec),
    wait up to 30 s for them, SIGKILL what is left, and reap them."""
    for pid, command in _live_descendants(os.getpid()).items():
        if "flower-superlink" in command and f"--port {port}" in command:
            tree = {each: _started(each) for each in [pid, *_live_descendants(pid)]}
            for each in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(each, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _still_running(tree) and time.monotonic() < deadline:
                time.sleep(0.2)
            for each in _still_running(tree):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(each, signal.SIGKILL)
    _reap_adopted()


def _started(pid: int) -> int:
    """The start time of `pid`, so that a reused PID is never taken for it."""
    info = deployment._proc_info(pid)
    return info.start_time if info else -1


def _still_running(tree: dict[int, int]) -> list[int]:
    """The PIDs of `tree` ({pid: start time}) that still run."""
    return [pid for pid, start in tree.items() if deployment._running(pid, start)]
