"""Flower's Simulation Runtime with each ClientApp run in a thread of this process.

A Ray simulation starts a cluster and an actor process per CPU: seconds of start-up
per run, on every run of a test. What a test asks of the app across rounds (its
history, checks, seeding, timeouts) needs none of it. `use_in_process_backend()`
makes every later `run_simulation` (and so `run_tutorial_simulation`) hand each
message to a ClientApp called in a worker thread here instead of in a Ray actor:
the same LinkState, message queues, TTLs, contexts and error replies as with Ray
(Flower's `vce_api`), only no Ray. Tests import this module in the child process
they run a simulation in; runs on Ray stay where Ray is the point (Ctrl-C, and
runs compared bit for bit with in-process ones).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import torch
from flwr.client import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common import Context, Message
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig, raybackend


class InProcessBackend(Backend):
    """Run each message's ClientApp in the calling worker thread.

    One worker by default: the app seeds Python's, NumPy's and torch's global
    generators per fit, so two ClientApps training at once in one process would
    draw from each other's stream (Ray's actors are separate processes). Tests that
    need a ClientApp to hang while others reply ask for more workers.
    """

    workers = 1
    builds = 0  # simulations run on this backend in this process

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self._app_fn: Callable[[], ClientApp] | None = None
        self._busy = threading.Semaphore(self.workers)

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Keep the ClientApp loader; nothing else needs starting."""
        self._app_fn = app_fn
        InProcessBackend.builds += 1

    @property
    def num_workers(self) -> int:
        """Threads that take messages from the runtime's queue."""
        return self.workers

    def is_worker_idle(self) -> bool:
        """Whether a worker thread is free."""
        if not self._busy.acquire(blocking=False):
            return False
        self._busy.release()
        return True

    def process_message(
        self, message: Message, context: Context
    ) -> tuple[Message, Context]:
        """Call the ClientApp as Ray's actor does (its errors as ClientAppException)."""
        assert self._app_fn is not None, "build() first"
        # One torch thread while the ClientApp runs, as in a Ray actor with one
        # CPU (Ray sets OMP_NUM_THREADS to it); the ServerApp's evaluation, which
        # runs in this process too, keeps the process's threads, as with Ray.
        threads = torch.get_num_threads()
        # Copies, as Ray's pickling makes: what the ClientApp and its mods change
        # in them must not reach the LinkState's or the runtime's objects.
        message, context = copy.deepcopy((message, context))
        with self._busy:
            torch.set_num_threads(1)
            try:
                return self._app_fn()(message=message, context=context), context
            except Exception as ex:
                raise ClientAppException(str(ex)) from ex
            finally:
                torch.set_num_threads(threads)

    def terminate(self) -> None:
        """Nothing runs outside the worker threads, which the runtime joins."""


_RAY_BACKEND = raybackend.RayBackend


def use_in_process_backend(workers: int = 1) -> None:
    """Make this process's next simulations run ClientApps in `workers` threads."""
    InProcessBackend.workers = workers
    # Flower's runtime builds its backend from this module's name on each run.
    raybackend.RayBackend = InProcessBackend  # type: ignore[misc]


def use_ray_backend() -> None:
    """Make this process's next simulations run on Ray again, as Flower does."""
    raybackend.RayBackend = _RAY_BACKEND  # type: ignore[misc]
