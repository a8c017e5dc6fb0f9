"""flower_tutorial: stopping a run on Ctrl-C without leaving threads waiting.

`run_tutorial_simulation` turns the first Ctrl-C into a stop of the client
manager (`stop_on_ctrl_c`); every wait of the run then ends: for SuperNodes, and,
through `StoppableGrid`, for replies.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from logging import WARNING
from types import FrameType
from typing import Any

from flwr.common import Message
from flwr.common.logger import log
from flwr.server import Grid

# How often a wait for replies asks for them: every tenth of the time waited so
# far, and between 0.25 s and 2 s apart.
POLL_FRACTION = 0.1
FIRST_POLL_SECONDS = 0.25
LAST_POLL_SECONDS = 2.0


class RunStoppedError(RuntimeError):
    """The run was stopped (Ctrl-C, or the simulation ended) while it waited."""


class StoppableGrid:
    """A Grid whose wait for replies ends as soon as the replies or a stop come.

    Flower's client proxies wait for each reply without a timeout (the message's
    TTL, `round-timeout`, ends it). Once a run is stopped (Ctrl-C in
    `run_tutorial_simulation`) nothing replies any more, and those waits would
    keep the ServerApp's threads, and so the process, alive until then.
    """

    def __init__(
        self, grid: Grid, stopped: threading.Event, timeout: float | None = None
    ) -> None:
        self._grid = grid
        self._stopped = stopped
        self._timeout = timeout  # for callers that give none (DefaultWorkflow)
        # Flower's grid polls every 0.1 s in memory, but every 3 s over HTTP
        # (`flwr run`, deployments): every wait for replies would then end up to
        # 3 s after the last reply came. Over HTTP each pull is a request the
        # SuperLink serves, one per client waited on, so a long wait (ClientApp
        # processes starting, a lost node) asks less and less often: a reply is
        # seen at most a tenth of the wait late. Never slower than Flower's pace.
        pace = float(getattr(grid, "pull_interval", 3.0))
        self._first_interval = min(pace, FIRST_POLL_SECONDS)
        self._last_interval = min(pace, LAST_POLL_SECONDS)

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped Grid's."""
        return getattr(self._grid, name)

    def poll_interval(self, waited: float) -> float:
        """Return how long to wait before the next pull, `waited` seconds in."""
        interval = max(waited * POLL_FRACTION, self._first_interval)
        return min(interval, self._last_interval)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push `messages`, then pull replies until all came, time ran out or stop."""
        pending = set(self._grid.push_messages(messages))
        timeout = self._timeout if timeout is None else timeout
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        replies: list[Message] = []
        while True:
            for reply in list(self._grid.pull_messages(list(pending))):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
            now = time.monotonic()
            if not pending or (deadline is not None and now >= deadline):
                return replies
            interval = self.poll_interval(now - started)
            if deadline is not None:  # a last pull at the deadline, not after it
                interval = min(interval, deadline - now)
            if self._stopped.wait(interval):
                raise RunStoppedError("The run was stopped while waiting for replies.")


@contextmanager
def stop_on_ctrl_c(stop: Callable[[], None]) -> Iterator[None]:
    """Make the first Ctrl-C call `stop`; a second one interrupts at once.

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
