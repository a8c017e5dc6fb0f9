"""Ctrl-C: the first stops the run cleanly, the second interrupts at once.

The handlers are called as functions: no signal is sent to the test process, and
every test leaves SIGINT's handler as it found it.
"""

import signal
import threading
import time

import pytest

from flower_tutorial import stopping
from flower_tutorial.stopping import RunStoppedError, StoppableGrid, stop_on_ctrl_c


def test_the_first_ctrl_c_stops_the_run_and_hands_the_next_to_the_caller(
    caller_sigint, caplog
):
    caller = signal.getsignal(signal.SIGINT)
    handler_during_stop = []

    def stop() -> None:
        handler_during_stop.append(signal.getsignal(signal.SIGINT))

    with stop_on_ctrl_c(stop):
        ours = signal.getsignal(signal.SIGINT)
        assert ours is not caller
        ours(signal.SIGINT, None)  # the first Ctrl-C
        # stop ran once, and already a Ctrl-C during it would reach the caller's.
        assert handler_during_stop == [caller]
        assert caller_sigint == []
        assert "Ctrl-C: stopping the run (press Ctrl-C again to interrupt)." in (
            caplog.text
        )
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the second
        assert caller_sigint == [signal.SIGINT]
        assert len(handler_during_stop) == 1
    assert signal.getsignal(signal.SIGINT) is caller


def test_with_pythons_handler_the_second_ctrl_c_raises_keyboard_interrupt_at_once():
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    stops = []
    try:
        with stop_on_ctrl_c(lambda: stops.append("stop")):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            with pytest.raises(KeyboardInterrupt):
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert stops == ["stop"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, original)


def test_the_callers_handler_is_back_after_the_run_without_a_ctrl_c(caller_sigint):
    caller = signal.getsignal(signal.SIGINT)
    with (
        pytest.raises(RuntimeError, match="the run failed"),
        stop_on_ctrl_c(lambda: None),
    ):
        assert signal.getsignal(signal.SIGINT) is not caller
        raise RuntimeError("the run failed")
    assert signal.getsignal(signal.SIGINT) is caller


def test_an_ignored_ctrl_c_stays_ignored():
    original = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_ctrl_c(lambda: None):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, original)


def test_outside_the_main_thread_no_handler_is_installed(caller_sigint):
    caller = signal.getsignal(signal.SIGINT)
    seen = []

    def run() -> None:
        with stop_on_ctrl_c(lambda: None):
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen == [caller]


class _SilentGrid:
    """A grid that takes messages and never replies."""

    pull_interval = 3.0  # Flower's over HTTP

    def push_messages(self, messages) -> list[str]:
        return [f"message-{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids) -> list:
        return []


def test_a_stop_ends_the_wait_for_replies_at_once():
    stopped = threading.Event()
    grid = StoppableGrid(_SilentGrid(), stopped, timeout=30.0)
    threading.Timer(0.2, stopped.set).start()
    start = time.monotonic()
    with pytest.raises(RunStoppedError, match="stopped while waiting for replies"):
        grid.send_and_receive(["a message"])
    # At once, not after a poll (Flower's: 3 s) nor at the 30 s timeout.
    assert time.monotonic() - start < 2.0


class _MemoryGrid(_SilentGrid):
    pull_interval = 0.1  # Flower's in memory (simulation)


@pytest.mark.parametrize(
    ("grid", "waited", "interval"),
    [
        # Over HTTP: a tenth of the time waited, from 0.25 s up to 2 s.
        (_SilentGrid(), 0.0, 0.25),
        (_SilentGrid(), 2.5, 0.25),
        (_SilentGrid(), 7.0, 0.7),
        (_SilentGrid(), 20.0, 2.0),
        (_SilentGrid(), 600.0, 2.0),
        # In memory, where a pull costs next to nothing: Flower's 0.1 s throughout.
        (_MemoryGrid(), 0.0, 0.1),
        (_MemoryGrid(), 60.0, 0.1),
    ],
)
def test_a_long_wait_asks_less_often_and_never_slower_than_flowers_grid(
    grid, waited, interval
):
    stoppable = StoppableGrid(grid, threading.Event())
    assert stoppable.poll_interval(waited) == pytest.approx(interval)


class _Clock:
    """Time that passes only while the wait for replies waits (a stop never comes)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return False


def test_a_wait_for_replies_backs_off_and_ends_at_its_deadline(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(stopping, "time", clock)
    grid = StoppableGrid(_SilentGrid(), clock, timeout=30.0)
    assert grid.send_and_receive(["a message"]) == []
    assert clock.now == 30.0  # its last pull at the deadline, not up to 2 s after
    waits = clock.waits
    assert waits[:10] == [0.25] * 10  # the first 2.5 s
    assert waits[10:13] == pytest.approx([0.25, 0.275, 0.3025])  # a tenth of it
    assert max(waits) == 2.0
    assert len(waits) == 37  # at a fixed 0.25 s: 120
