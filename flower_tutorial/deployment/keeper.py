"""Keep a deployment's process and all it starts findable, whatever dies first.

    python -m flower_tutorial.deployment.keeper FD PROGRAM [ARGS...]

Runs PROGRAM as its child, writes the child's PID to the file descriptor FD, and
stays until every process below it has exited. It is a child subreaper (Linux's
PR_SET_CHILD_SUBREAPER): a process whose parent dies is adopted by it, not by
init. So when a SuperLink is killed, the SuperExec and the ServerApp it started
stay the keeper's descendants, and `deployment stop` finds and ends them by PID.
PROGRAM runs in a session of its own; the keeper outlives a SIGTERM.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def become_subreaper() -> None:
    """Make orphaned descendants this process's children (Linux 3.4 and later)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


def keep(pid_fd: int, argv: list[str]) -> int:
    """Run `argv`, report its PID on `pid_fd`, reap until no child is left.

    Returns the exit status of `argv`'s process, as a shell would.
    """
    become_subreaper()
    # Its own session, as the deployment starts every process: a signal to its
    # group (a node's machine lost) leaves the keeper, holding what remains.
    child = subprocess.Popen(argv, start_new_session=True)
    with os.fdopen(pid_fd, "w") as report:
        report.write(f"{child.pid}\n")

    def stay(signum: int, frame: FrameType | None) -> None:
        """Outlive a SIGTERM: `stop` sends one to every process, this one's too.

        Passed on, it would reach PROGRAM twice, and a second SIGTERM makes a
        SuperNode exit without deactivating itself: its SuperLink would then
        refuse the node when it comes back. The keeper ends when all below it
        have ended.
        """

    signal.signal(signal.SIGTERM, stay)
    status = 0
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            return status
        except InterruptedError:  # a signal came; PEP 475 retries, but be sure
            continue
        if pid == child.pid:
            status = os.waitstatus_to_exitcode(wait_status)
            child.returncode = status  # reaped here, not by Popen


def main() -> None:
    """Command line: FD PROGRAM [ARGS...]."""
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m flower_tutorial.deployment.keeper FD PROGRAM ...")
    status = keep(int(sys.argv[1]), sys.argv[2:])
    # A signal's death as the shell reports it; else the exit code.
    sys.exit(128 - status if status < 0 else status)


if __name__ == "__main__":
    main()
