"""Start and stop a local deployment: a SuperLink and SuperNodes on this machine.

Starts one SuperLink and N SuperNodes as separate processes on loopback (Linux:
processes are found through /proc and signalled through pidfds), each SuperNode
with its own ``partition-id`` (or its own data folder), adds a connection for
them to the Flower Configuration, and stops every process again by PID,
removing that connection::

    python -m flower_tutorial.deployment start --supernodes 3 --dir deployment
    flwr run . local-deployment --stream
    python -m flower_tutorial.deployment stop --dir deployment

With ``--secure``, the SuperLink serves TLS with a certificate from a CA made
here, and admits only SuperNodes whose public keys were registered. Runs use the
installed environment: runtime dependency installation is turned off. Neither
authenticates the users who start runs: see docs/deployment.md, "Who can do
what in a deployment".
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from click import ClickException
from flwr.cli.constant import (
    CHAT_SUPERGRID_CONNECTION_NAME,
    DEFAULT_FLOWER_CONFIG_TOML,
    FLOWER_CONFIG_FILE,
    SuperLinkConnectionTomlKey,
)
from flwr.cli.flower_config import write_flower_config, write_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.supercore.utils import get_flwr_home

from flower_tutorial.deployment import security

STATE_FILE = "deployment.json"
# What runs each process, and adopts what it leaves behind (keeper.py).
KEEPER = "flower_tutorial.deployment.keeper"
LOCK_FILE = "deployment.lock"
# The SuperLink's state (registered SuperNodes, runs): in a file, it survives a
# restart of the SuperLink (docs/reliability.md, "SuperLink restart").
DATABASE_FILE = "superlink.db"
LOOPBACK = "127.0.0.1"
# Where a SuperLink reached by a name other than loopback listens: every address.
ALL_ADDRESSES = "0.0.0.0"
# A SuperNode's SuperExec asks it for new ClientApp tasks every second by
# default: up to a second lost per message, twice a round (five times under
# SecAgg+). Each ask costs CPU: an idle SuperNode with its SuperExec took 0.09
# core-seconds a second asking every 0.1 s, 0.035 every 0.5 s, 0.029 every 1 s.
FAST_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5"}
# Seconds a process gets to exit on SIGTERM before it is killed.
STOP_GRACE = 10.0
# Passes of stopping: each stops what the previous one's processes started.
STOP_PASSES = 3
# Ports a process is started on, at most: `free_port` finds a port free, but
# another program may take it before the process listens on it.
PORT_TRIES = 3
# What a process that found its port taken logs: uvicorn's (Flower's HTTP APIs)
# "[Errno 98] ... address already in use", Flower's gRPC servers' "Port in server
# address ... is already in use".
ADDRESS_IN_USE = re.compile(r"address already in use|is already in use", re.I)
# A bound, not a measured limit: every SuperNode is a process on this one machine
# that starts a PyTorch ClientApp process per message (10 SuperNodes on 2 cores
# took 285 s for one round). 64 leaves room for big machines and stops a typo
# (1000) from starting a thousand processes.
MAX_SUPERNODES = 64
# The programs of Flower's that a deployment's processes run, by executable name:
# a process group whose leader has exited is stopped only while it runs these.
FLOWER_PROGRAMS = frozenset(
    {
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-serverapp",
        "flwr-clientapp",
        "flwr-simulation",
    }
)
# A connection is a table [superlink.NAME] in Flower's config.toml: a dot would
# nest tables, and these names are Flower's own (its default connection's key,
# the connections it creates itself, and the one `flwr chat` uses).
CONNECTION_NAME = re.compile(r"[A-Za-z0-9_-]+")
RESERVED_CONNECTIONS = frozenset(
    {
        SuperLinkConnectionTomlKey.DEFAULT,
        CHAT_SUPERGRID_CONNECTION_NAME,
        *tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)[
            SuperLinkConnectionTomlKey.SUPERLINK
        ],
    }
)


class _ProcInfo(NamedTuple):
    """What /proc/PID tells of a process."""

    ppid: int
    pgid: int
    uid: int
    start_time: int  # clock ticks after boot (field 22 of /proc/PID/stat)
    state: str
    argv: list[str]


def _proc_info(pid: int) -> _ProcInfo | None:
    """Return /proc's view of `pid`, or None if no such process exists (now)."""
    try:
        # The command name (field 2) may hold spaces and ')': fields after the last.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        uid = os.stat(f"/proc/{pid}").st_uid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    argv = [os.fsdecode(arg) for arg in cmdline.split(b"\0")[:-1]]
    return _ProcInfo(
        int(fields[1]), int(fields[2]), uid, int(fields[19]), fields[0], argv
    )


def _boot_id() -> str:
    """Return the ID of this boot (PIDs and start times of another mean nothing)."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _running(pid: int, start_time: int) -> bool:
    """Whether the process started at `start_time` still runs as `pid`.

    A zombie does not run; it is reaped here if it is our child.
    """
    info = _proc_info(pid)
    if info is None or info.start_time != start_time:
        return False
    if info.state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _same_command(cmdline: Sequence[str], argv: Sequence[str]) -> bool:
    """Whether a process runs exactly `argv`.

    A script started by its shebang line shows its interpreter first.
    """
    return list(cmdline) == list(argv) or list(cmdline[1:]) == list(argv)


def _runs_flower(cmdline: Sequence[str]) -> bool:
    """Whether a process runs one of FLOWER_PROGRAMS (or its interpreter does)."""
    return any(Path(arg).name in FLOWER_PROGRAMS for arg in cmdline[:2])


@dataclass(frozen=True)
class ProcessRecord:
    """A process `start` launched: enough to tell it from a later one with its PID.

    `keeper` is the process that runs it and adopts what it leaves behind
    (keeper.py): stopping it stops all it started, also after it died.
    """

    pid: int
    start_time: int
    argv: tuple[str, ...]
    keeper: ProcessRecord | None = None

    @classmethod
    def from_dict(cls, saved: dict) -> ProcessRecord:
        """Read a record that `asdict` wrote."""
        keeper = saved.get("keeper")
        return cls(
            saved["pid"],
            saved["start_time"],
            tuple(saved["argv"]),
            None if keeper is None else cls.from_dict(keeper),
        )

    def running(self) -> bool:
        """Whether this process (not merely its PID) still runs."""
        return _running(self.pid, self.start_time)


@dataclass
class _Pinned:
    """A process to stop, held by a pidfd: a signal reaches it and no other.

    Without a pidfd (Linux before 5.3) it is signalled by PID after checking its
    start time again, which leaves a short window for a reused PID.
    """

    pid: int
    start_time: int
    pidfd: int | None
    group: int

    def running(self) -> bool:
        """Whether it has not exited yet."""
        return _running(self.pid, self.start_time)

    def send(self, sig: int) -> None:
        """Send `sig`; the process may have exited meanwhile."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            elif self.running():
                os.kill(self.pid, sig)

    def close(self) -> None:
        """Release the pidfd."""
        if self.pidfd is not None:
            os.close(self.pidfd)


def _pin(pid: int, info: _ProcInfo) -> _Pinned | None:
    """Return the process `pid` if it is still the one `info` describes."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except OSError as ex:
        if ex.errno != errno.ENOSYS:
            return None  # gone, or now the ID of a thread, not of a process
        pidfd = None
    # Checked after opening: the pidfd holds whatever process had the PID then,
    # and a later process cannot have the start time of an earlier one.
    if _running(pid, info.start_time):
        return _Pinned(pid, info.start_time, pidfd, info.pgid)
    if pidfd is not None:
        os.close(pidfd)
    return None


def _process_table() -> dict[int, _ProcInfo]:
    """Return every process /proc lists now."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        info = _proc_info(int(entry.name))
        if info is not None:  # else it ended while we looked
            table[int(entry.name)] = info
    return table


def _pin_trees(records: Sequence[ProcessRecord], boot_id: str) -> list[_Pinned]:
    """Pin the recorded processes that still run, their groups and descendants.

    A recorded process counts only with its PID, start time and command line
    (from this boot). A group whose leader has exited (a refused SuperNode)
    counts with members of this user that run Flower's programs and started
    after it; each process is `start_new_session`, so its group is its own.
    Descendants (Flower starts its SuperExec in a session of its own) count as
    found: a live process's children are its own.
    """
    if boot_id != _boot_id():
        return []  # recorded before a reboot: any of those PIDs is another's now
    table = _process_table()
    uid = os.getuid()
    chosen: set[int] = set()
    for record in records:
        leader = table.get(record.pid)
        leader_runs = (
            leader is not None
            and leader.start_time == record.start_time
            and leader.uid == uid
            and _same_command(leader.argv, record.argv)
        )
        # While its leader runs, a group's ID cannot be reused: all of it is ours.
        chosen |= {
            pid
            for pid, info in table.items()
            if info.pgid == record.pid
            and info.uid == uid
            and (
                leader_runs
                or (info.start_time >= record.start_time and _runs_flower(info.argv))
            )
        }
    children: dict[int, list[int]] = defaultdict(list)
    for pid, info in table.items():
        children[info.ppid].append(pid)
    stack = list(chosen)
    while stack:
        for child in children[stack.pop()]:
            if child not in chosen:
                chosen.add(child)
                stack.append(child)
    pinned = (_pin(pid, table[pid]) for pid in chosen)
    return [process for process in pinned if process is not None]


def _terminate(procs: Sequence[_Pinned]) -> list[int]:
    """SIGTERM `procs`, SIGKILL those left after STOP_GRACE; return the killed."""
    try:
        for proc in procs:
            proc.send(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(p.running() for p in procs):
            time.sleep(0.2)
        killed = [p for p in procs if p.running()]
        for proc in killed:
            proc.send(signal.SIGKILL)
    finally:
        for proc in procs:
            proc.close()
    return [p.pid for p in killed]


def _groups(procs: Sequence[_Pinned]) -> list[ProcessRecord]:
    """Return the process groups of `procs`, as records of exited leaders.

    `_pin_trees` then takes members that run Flower's programs and started no
    earlier than the group's earliest pinned member started.
    """
    first: dict[int, int] = {}
    for proc in procs:
        first[proc.group] = min(first.get(proc.group, proc.start_time), proc.start_time)
    return [ProcessRecord(group, start, ()) for group, start in first.items()]


@dataclass
class Deployment:
    """A running local deployment: where it lives and which processes it runs."""

    directory: Path
    connection: str
    superlink_port: int
    secure: bool
    boot_id: str = field(default_factory=_boot_id)
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    # The name or address SuperNodes and `flwr` reach the SuperLink by.
    host: str = LOOPBACK

    @property
    def certs(self) -> Path:
        """The folder of the SuperLink's TLS files (with `secure`)."""
        return self.directory / "certs"

    @property
    def keys(self) -> Path:
        """The folder of the SuperNodes' private keys (with `secure`)."""
        return self.directory / "keys"

    @property
    def database(self) -> Path:
        """The SuperLink's database file: its state, kept across restarts."""
        return self.directory / DATABASE_FILE

    @property
    def address(self) -> str:
        """The SuperLink's address, for SuperNodes and `flwr`."""
        return f"{self.host}:{self.superlink_port}"

    def save(self) -> None:
        """Record the deployment (after every process started: stop needs all)."""
        state = asdict(self) | {"directory": str(self.directory)}
        security.write_replacing(
            self.directory / STATE_FILE, json.dumps(state, indent=2).encode()
        )

    @classmethod
    def load(cls, directory: Path) -> Deployment:
        """Read the deployment that `start` recorded in `directory`.

        It lives where it was read (the folder that was checked and is locked),
        whatever folder the record names.
        """
        path = directory / STATE_FILE
        try:
            security.check_owned(directory, private=False)
            state = json.loads(security.read_owned(path, private=False))
            processes = {
                name: ProcessRecord.from_dict(p)
                for name, p in state.pop("processes").items()
            }
            state |= {"directory": directory.resolve(), "processes": processes}
            return cls(**state)
        except FileNotFoundError:
            raise ValueError(
                f"--dir {str(directory)!r} holds no {STATE_FILE}: expected the "
                "folder of a deployment started with "
                "`python -m flower_tutorial.deployment start`."
            ) from None
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as ex:
            raise ValueError(
                f"{path} is not a deployment record of this version ({ex!r}): "
                "stop its processes by hand, then remove the file."
            ) from None

    def spawn(
        self, name: str, argv: Sequence[str], defaults: dict[str, str] | None = None
    ) -> ProcessRecord:
        """Start `argv` under a keeper, logging to <name>.log; record both.

        The keeper (keeper.py) runs in a session of its own, apart from the
        caller's (Ctrl-C in the terminal that ran `start` does not reach it), and
        adopts whatever `argv`'s process leaves behind when it dies: a SuperLink's
        ServerApp, a SuperNode's SuperExec. `defaults` are environment variables
        the caller's environment may override.
        """
        # The installed environment is the app's: no per-run `uv sync` (offline).
        env = {"FLWR_TELEMETRY_ENABLED": "0", **(defaults or {})} | dict(os.environ)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        # Flower starts its SuperExec, ServerApp and ClientApp processes by name:
        # from this environment, also when it is not activated.
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        log_fd = security.open_nofollow(
            self.directory / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        )
        report, reported = os.pipe()
        keeper_argv = [sys.executable, "-m", KEEPER, str(reported), *argv]
        try:
            with os.fdopen(log_fd, "wb") as log:
                proc = subprocess.Popen(
                    keeper_argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                    pass_fds=(reported,),
                )
            os.close(reported)
            with os.fdopen(report) as pid_line:
                line = pid_line.readline()
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(reported)
            raise
        keeper_info = _proc_info(proc.pid)
        assert keeper_info is not None  # our child, not reaped: /proc has it
        keeper = ProcessRecord(proc.pid, keeper_info.start_time, tuple(keeper_argv))
        if not line.strip().isdigit():  # it could not start argv
            proc.wait()
            raise OSError(
                f"could not start {argv[0]!r} ({name}.log: {self.log_tail(name, 3)})"
            )
        pid = int(line)
        info = _proc_info(pid)
        # Gone already (a start that failed at once): its log says why.
        start_time = info.start_time if info else keeper_info.start_time
        record = ProcessRecord(pid, start_time, tuple(argv), keeper)
        self.processes[name] = record
        self.save()
        return record

    def log_tail(self, name: str, lines: int = 20) -> str:
        """Return the last lines of a process's log, for error messages."""
        with contextlib.suppress(FileNotFoundError):
            text = security.read_owned(self.directory / f"{name}.log", private=False)
            return "\n".join(text.decode(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, names: Sequence[str] | None = None) -> list[int]:
        """Stop processes (all by default) and everything they started, by PID.

        SIGTERM to each recorded process that still is the one started, its
        process group and its descendants (`_pin_trees`), SIGKILL to those left
        after STOP_GRACE seconds. Returns the PIDs that had to be killed.
        """
        chosen = [n for n in self.processes if names is None or n in names]
        records = [self.processes[n] for n in chosen]
        # A keeper holds what its process left behind; it waits for all of it to
        # end, so it is not counted among the processes that had to be killed.
        keepers = [r.keeper for r in records if r.keeper is not None]
        records += keepers
        killed: list[int] = []
        # A process that one being stopped starts meanwhile (a SuperExec starts a
        # ClientApp per message) is in no tree pinned before, but in a group seen.
        for _ in range(STOP_PASSES):
            procs = _pin_trees(records, self.boot_id)
            if not procs:
                break
            killed += _terminate(procs)
            records += _groups(procs)
        for name in chosen:
            del self.processes[name]
        self.save()
        keeper_pids = {k.pid for k in keepers}
        return [pid for pid in killed if pid not in keeper_pids]

    def add_connection(self) -> None:
        """Add (or replace) the deployment's connection in the Flower Configuration."""
        if self.secure:
            ca = str(security.tls_files(self.certs).ca_cert)
            connection = SuperLinkConnection(
                name=self.connection, address=self.address, root_certificates=ca
            )
        else:
            connection = SuperLinkConnection(
                name=self.connection, address=self.address, insecure=True
            )
        write_superlink_connection(connection)

    def owns_connection(self, config: dict) -> bool:
        """Whether the Flower Configuration `config` has this one's connection.

        That is, one of its name that leads to its SuperLink: a connection of
        that name that the user pointed elsewhere is theirs.
        """
        connections = config.get(SuperLinkConnectionTomlKey.SUPERLINK, {})
        entry = connections.get(self.connection)
        address = SuperLinkConnectionTomlKey.ADDRESS
        return isinstance(entry, dict) and entry.get(address) == self.address

    def remove_connection(self) -> bool:
        """Remove the connection `add_connection` made; return whether it did."""
        config, _ = _flower_config()
        if not self.owns_connection(config):
            return False
        del config[SuperLinkConnectionTomlKey.SUPERLINK][self.connection]
        write_flower_config(config)
        return True


def _flower_config() -> tuple[dict, Path]:
    """Return the user's Flower Configuration and its path.

    Read as it is: Flower's own reader would create the file if it is missing.
    """
    path = get_flwr_home() / FLOWER_CONFIG_FILE
    if not path.exists():
        return {}, path
    try:
        return tomllib.loads(path.read_text()), path
    except tomllib.TOMLDecodeError as ex:
        raise ValueError(f"{path} is not valid TOML ({ex}): fix it first.") from None


def check_connection(name: str, previous: Deployment | None) -> None:
    """Refuse a connection name that is invalid, Flower's own or someone else's.

    A name in the user's Flower Configuration is allowed only as the connection
    the `previous` deployment of the same folder added, to its SuperLink.
    """
    if not CONNECTION_NAME.fullmatch(name):
        raise ValueError(
            f"--connection {name!r} is not allowed: expected letters, digits, "
            "'-' and '_' (it names a table in Flower's config.toml)."
        )
    if name in RESERVED_CONNECTIONS:
        raise ValueError(
            f"--connection {name!r} is not allowed: Flower's configuration uses "
            f"it itself (reserved: {', '.join(sorted(RESERVED_CONNECTIONS))})."
        )
    config, path = _flower_config()
    taken = name in config.get(SuperLinkConnectionTomlKey.SUPERLINK, {})
    own = (
        previous is not None
        and previous.connection == name
        and previous.owns_connection(config)
    )
    if taken and not own:
        raise ValueError(
            f"--connection {name!r} is not allowed: {path} has a connection of "
            "that name already, which this deployment would overwrite; choose "
            "another name."
        )


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on now.

    Nothing holds it for the caller: another program may take it before the
    process it is meant for listens on it (`wait_for_port`, `_wait_serving`).
    """
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class PortTakenError(RuntimeError):
    """A process exited because another program took the port it was to listen on."""


def _listening_sockets(port: int) -> set[str]:
    """Return the TCP sockets listening on `port` (any address), as /proc names them.

    Those of this network namespace, as `socket:[INODE]`, the link target of a
    file descriptor in /proc/PID/fd.
    """
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                # State 0A is LISTEN; the local address ends with the port in hex.
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    sockets.add(f"socket:[{inode}]")
    return sockets


def _listens(pid: int, port: int) -> bool:
    """Whether the process `pid` itself holds a socket listening on `port`."""
    sockets = _listening_sockets(port)
    if not sockets:
        return False
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # it exited
        return False
    for fd in descriptors:
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                return True
    return False


def wait_for_port(deployment: Deployment, name: str, port: int, timeout: float) -> None:
    """Wait until process `name` itself listens on `port`; fail early if it died.

    A port that accepts connections is not enough: another program may have
    taken it since `free_port` found it free. If `name` exited because of that
    (its log says the address is in use), PortTakenError.
    """
    record = deployment.processes[name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listens(record.pid, port):
            return
        if not record.running():
            tail = deployment.log_tail(name)
            error = PortTakenError if ADDRESS_IN_USE.search(tail) else RuntimeError
            raise error(f"{name} exited while starting; its log ends with:\n{tail}")
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout:g} s.")


def _start_on_free_port(launch: Callable[[int], object]) -> int:
    """Start a process with `launch(port)` on a free port; return the port."""
    port = free_port()
    launch(port)
    return port


def _wait_serving(
    deployment: Deployment,
    name: str,
    port: int,
    launch: Callable[[int], object],
    timeout: float,
) -> int:
    """Wait until process `name` listens on `port`; return the port it listens on.

    If another program took the port before it could listen (PortTakenError), it
    is started again with `launch` on another free port: PORT_TRIES ports in all.
    """
    for tries in range(1, PORT_TRIES + 1):
        try:
            wait_for_port(deployment, name, port, timeout)
            break
        except PortTakenError as ex:
            if tries == PORT_TRIES:
                raise PortTakenError(
                    f"{name}: another program took each of the {PORT_TRIES} ports "
                    f"it was started on before it listened; the last: {ex}"
                ) from ex
            port = _start_on_free_port(launch)
    return port


def threads_per_supernode(cores: int, supernodes: int) -> int:
    """Return the PyTorch threads of each SuperNode's ClientApp processes.

    The SuperNodes share the machine's `cores`, as Ray's clients do in simulation:
    PyTorch's default of one thread per core in every ClientApp process
    oversubscribes them (measured: rounds 2.3x slower with 3 nodes). At least 1.
    """
    if cores < 1 or supernodes < 1:
        raise ValueError(
            f"cores = {cores}, supernodes = {supernodes} is not allowed: expected "
            "both >= 1."
        )
    return max(1, cores // supernodes)


def _bin(name: str) -> str:
    """Return the path of command `name` in the environment this runs in."""
    return str(Path(sys.executable).with_name(name))


def superlink_argv(deployment: Deployment) -> list[str]:
    """Return the SuperLink's command line: insecure, or TLS and node auth.

    Its state lives in the deployment's database file, so that a restarted
    SuperLink knows the registered SuperNodes and the runs.
    """
    argv = [
        _bin("flower-superlink"),
        "--port",
        str(deployment.superlink_port),
        "--database",
        str(deployment.database),
        "--disable-runtime-dependency-installation",
    ]
    if deployment.host != LOOPBACK:
        # Flower listens on loopback only by default.
        argv += ["--host", ALL_ADDRESSES]
    if not deployment.secure:
        return [*argv, "--insecure"]
    files = security.tls_files(deployment.certs)
    return [
        *argv,
        "--ssl-ca-certfile",
        str(files.ca_cert),
        "--ssl-certfile",
        str(files.server_cert),
        "--ssl-keyfile",
        str(files.server_key),
        "--enable-supernode-auth",
    ]


def supernode_argv(
    deployment: Deployment, node_config: str, port: int, key: Path | None = None
) -> list[str]:
    """Return a SuperNode's command line; with TLS it trusts the deployment's CA.

    `port` is the SuperNode's own API (for its ClientApp processes), one per node.
    """
    argv = [
        _bin("flower-supernode"),
        "--superlink",
        deployment.address,
        "--port",
        str(port),
        "--node-config",
        node_config,
    ]
    if not deployment.secure:
        return [*argv, "--insecure"]
    files = security.tls_files(deployment.certs)
    argv += ["--root-certificates", str(files.ca_cert)]
    if key is not None:
        argv += ["--auth-supernode-private-key", str(key)]
    return argv


class AlreadyRegisteredError(RuntimeError):
    """The SuperLink has the public key registered already (its database kept it)."""


def register_supernode(deployment: Deployment, private_key: Path) -> int:
    """Register a SuperNode's public key with the SuperLink; return its node ID.

    AlreadyRegisteredError if it was registered before: Flower refuses a key twice.
    """
    public_key = security.public_key_path(private_key)
    argv = [_bin("flwr"), "supernode", "register", str(public_key)]
    done = subprocess.run(
        [*argv, deployment.connection, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {}
    if "Public key already in use" in str(reply.get("error-message")):
        raise AlreadyRegisteredError(f"{public_key} is registered already.")
    if not reply.get("success"):
        raise RuntimeError(
            f"`flwr supernode register {public_key}` failed: "
            f"{done.stdout.strip()} {done.stderr.strip()}"
        )
    return int(reply["node-id"])


def node_config(partition_id: int, num_partitions: int, data_path: str | None) -> str:
    """Return the --node-config string of SuperNode `partition_id`."""
    config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if data_path is not None:
        # A TOML literal string: no escapes, so Windows-style backslashes survive.
        config += f" data-path='{Path(data_path).resolve()}'"
    return config


def _check_start_args(
    num_supernodes: int, data_paths: dict[int, str], *, secure: bool, renew: bool
) -> None:
    """Refuse bad arguments of `start`, naming the value and what is allowed."""
    if not 1 <= num_supernodes <= MAX_SUPERNODES:
        raise ValueError(
            f"--supernodes = {num_supernodes} is not allowed: expected 1 to "
            f"{MAX_SUPERNODES}. Every SuperNode runs on this machine and starts a "
            "PyTorch process per message; for more organizations on one "
            "machine, use the simulation (`flwr run .`)."
        )
    if renew and not secure:
        raise ValueError(
            "--renew is not allowed without --secure: it renews TLS files."
        )
    for node, path in data_paths.items():
        if not 0 <= node < num_supernodes:
            raise ValueError(
                f"--data-path {node}=... is not allowed: expected a SuperNode number "
                f"in [0, {num_supernodes})."
            )
        if not Path(path).is_dir():
            raise ValueError(f"--data-path {node}={path!r}: no such folder.")
        if "'" in str(Path(path).resolve()):
            raise ValueError(
                f"--data-path {node}={path!r} is not allowed: Flower's node config "
                "cannot carry a path with a single quote (')."
            )


def _recorded(directory: Path) -> Deployment | None:
    """Return the deployment recorded in `directory` (checked), unless running.

    Refuses one whose processes were not stopped: starting another would lose
    their PIDs.
    """
    if not os.path.lexists(directory):
        return None
    security.check_owned(directory, private=False)
    if not os.path.lexists(directory / STATE_FILE):
        return None
    previous = Deployment.load(directory)
    if previous.processes:
        raise ValueError(
            f"--dir {str(directory)!r} holds a deployment that is still running: "
            "stop it first (`python -m flower_tutorial.deployment stop`)."
        )
    return previous


def _check_reused_files(
    directory: Path, num_supernodes: int, *, secure: bool, renew: bool
) -> None:
    """Refuse files of an earlier deployment here that are not safe to reuse.

    Each must be this user's and not a link, key material private to them; the
    TLS files of a secure restart must be fit for use (`_check_reused_tls`).
    """
    nodes = [f"supernode-{i}" for i in range(num_supernodes)]
    tls = security.tls_files(directory / "certs")
    keys = [directory / "keys" / node for node in nodes]
    private = [directory / "certs", directory / "keys", tls.server_key, *keys]
    public = [
        directory / STATE_FILE,
        directory / LOCK_FILE,
        directory / DATABASE_FILE,
        tls.ca_cert,
        tls.server_cert,
        *(security.public_key_path(key) for key in keys),
        *(directory / f"{name}.log" for name in ["superlink", *nodes]),
    ]
    for paths, is_private in ((private, True), (public, False)):
        for path in paths:
            if os.path.lexists(path):
                security.check_owned(path, private=is_private)
    if secure and not renew:
        _check_reused_tls(directory)


def _check_reused_tls(directory: Path) -> None:
    """Refuse the TLS files of an earlier start unless complete and not expiring.

    A CA key in the SuperLink's folder (an earlier version left it there) is
    refused too: whoever reads it can sign for the CA.
    """
    certs = directory / "certs"
    legacy_ca_key = certs / "ca.key"
    if os.path.lexists(legacy_ca_key):
        raise ValueError(
            f"{legacy_ca_key}: the CA's private key lies in the SuperLink's folder "
            "(left by an earlier version of this tool). Start with --secure --renew "
            "for a new CA whose key is not kept, or delete the file."
        )
    files = vars(security.tls_files(certs)).values()
    present = [p for p in files if os.path.lexists(p)]
    if present and len(present) < len(files):
        raise ValueError(
            f"{certs} holds only {', '.join(p.name for p in present)} of "
            f"{', '.join(p.name for p in files)}: start with --secure --renew."
        )
    if present:
        tls = security.tls_files(certs)
        security.check_not_expiring(
            [tls.ca_cert, tls.server_cert],
            "renew it with `python -m flower_tutorial.deployment start --secure "
            f"--renew --dir {directory}` (a new CA; the SuperNodes' keys stay).",
        )


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the deployment folder's lock: one `start` or `stop` at a time there."""
    lock = security.open_nofollow(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"--dir {str(directory)!r} is in use by another start or stop (it "
                f"holds the lock on {LOCK_FILE}): wait until that one ends."
            ) from None
        yield
    finally:
        os.close(lock)  # releases the lock


def _prepare_tls(deployment: Deployment, *, renew: bool) -> None:
    """Make the TLS files on a first start, or new ones to renew them.

    The CA's key is not kept: it signs the SuperLink's certificate once, and
    renewing makes a new CA (the connection and SuperNodes get its ca.crt).
    """
    if renew:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(deployment.certs / "ca.key")  # an earlier version's
    if renew or not os.path.lexists(security.tls_files(deployment.certs).ca_cert):
        security.make_tls_files(deployment.certs, replace=renew)


def _supernode_key(deployment: Deployment, name: str) -> Path:
    """Return SuperNode `name`'s private key; made on its first start."""
    key = deployment.keys / name
    if not os.path.lexists(key):
        security.make_supernode_key(deployment.keys, name)
    return key


def _tear_down(deployment: Deployment) -> tuple[list[int], bool]:
    """Stop every process of `deployment` and remove its connection.

    Returns the PIDs that had to be killed, and whether the connection was removed.
    """
    killed = deployment.stop()
    return killed, deployment.remove_connection()


def start(
    directory: Path,
    num_supernodes: int,
    *,
    secure: bool = False,
    renew: bool = False,
    data_paths: dict[int, str] | None = None,
    connection: str = "local-deployment",
    timeout: float = 60.0,
) -> Deployment:
    """Start a SuperLink and `num_supernodes` SuperNodes; add the connection.

    SuperNode i gets ``partition-id=i num-partitions=num_supernodes`` and, if
    `data_paths` has an entry for i, ``data-path``. With `secure` and `renew`,
    new TLS files replace those of an earlier start. Everything is checked
    before anything is made. A process whose port another program took first is
    started again on another (`_wait_serving`); if anything fails to start,
    whatever was started is stopped and the connection removed before the error
    is raised.
    """
    data_paths = data_paths or {}
    _check_start_args(num_supernodes, data_paths, secure=secure, renew=renew)
    check_connection(connection, _recorded(directory))
    _check_reused_files(directory, num_supernodes, secure=secure, renew=renew)
    security.owned_dir(directory, private=False)
    with _locked(directory):
        _recorded(directory)  # another start may have run since the check above
        deployment = Deployment(directory.resolve(), connection, 0, secure)
        try:
            if secure:
                _prepare_tls(deployment, renew=renew)
            launch = functools.partial(_spawn_superlink, deployment)
            port = _start_on_free_port(launch)
            _wait_serving(deployment, "superlink", port, launch, timeout)
            deployment.add_connection()
            ports: dict[str, int] = {}
            launches: dict[str, Callable[[int], object]] = {}
            threads = threads_per_supernode(os.cpu_count() or 1, num_supernodes)
            env = {"OMP_NUM_THREADS": str(threads)} | FAST_POLL
            for i in range(num_supernodes):
                name = f"supernode-{i}"
                key = None
                if secure:
                    key = _supernode_key(deployment, name)
                    # A restart: the SuperLink's database kept the registration.
                    with contextlib.suppress(AlreadyRegisteredError):
                        register_supernode(deployment, key)
                config = node_config(i, num_supernodes, data_paths.get(i))
                launches[name] = functools.partial(
                    _spawn_supernode, deployment, name, config, key, env
                )
                ports[name] = _start_on_free_port(launches[name])
            # A SuperNode that cannot start (key refused) fails here, not later as
            # a run waiting for nodes that never come; one whose port was taken
            # starts again on another.
            for name, port in ports.items():
                _wait_serving(deployment, name, port, launches[name], timeout)
        except BaseException:
            _tear_down(deployment)
            raise
    return deployment


def _spawn_superlink(deployment: Deployment, port: int) -> ProcessRecord:
    """Start the deployment's SuperLink on `port` (which SuperNodes then reach)."""
    deployment.superlink_port = port
    return deployment.spawn("superlink", superlink_argv(deployment))


def _spawn_supernode(
    deployment: Deployment,
    name: str,
    config: str,
    key: Path | None,
    env: dict[str, str],
    port: int,
) -> ProcessRecord:
    """Start SuperNode `name` with its node config, its API on `port`."""
    argv = supernode_argv(deployment, config, port, key)
    return deployment.spawn(name, argv, env)


def stop(directory: Path) -> tuple[Deployment, list[int], bool]:
    """Stop the deployment recorded in `directory` and remove its connection.

    Returns it, the PIDs that had to be killed, and whether its connection was
    removed (not if the user changed it since).
    """
    Deployment.load(directory)  # a deployment's folder, before a lock file is made
    with _locked(directory):
        deployment = Deployment.load(directory)
        killed, removed = _tear_down(deployment)
    return deployment, killed, removed


def _data_path_arg(text: str) -> tuple[int, str]:
    number, sep, path = text.partition("=")
    if not sep or not number.isdigit() or not path:
        raise argparse.ArgumentTypeError(
            f"--data-path {text!r} is not allowed: expected NODE=FOLDER, "
            "e.g. 2=/data/site-2."
        )
    return int(number), path


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: start or stop a local deployment."""
    parser = argparse.ArgumentParser(
        prog="python -m flower_tutorial.deployment", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start_cmd = commands.add_parser("start", help="start a SuperLink and SuperNodes")
    start_cmd.add_argument(
        "--supernodes", type=int, default=10, help=f"1 to {MAX_SUPERNODES}"
    )
    start_cmd.add_argument("--secure", action="store_true", help="TLS + node auth")
    start_cmd.add_argument(
        "--renew",
        action="store_true",
        help="with --secure: a new CA and SuperLink certificate (they expire)",
    )
    start_cmd.add_argument(
        "--data-path",
        type=_data_path_arg,
        action="append",
        default=[],
        help="NODE=FOLDER: SuperNode NODE trains on its own folder (repeatable)",
    )
    start_cmd.add_argument(
        "--connection",
        default="local-deployment",
        help="the name `flwr` reaches it by; not one the Flower Configuration has",
    )
    stop_cmd = commands.add_parser("stop", help="stop every process of a deployment")
    for cmd in (start_cmd, stop_cmd):
        cmd.add_argument("--dir", type=Path, default=Path("deployment"))
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            deployment = start(
                args.dir,
                args.supernodes,
                secure=args.secure,
                renew=args.renew,
                data_paths=dict(args.data_path),
                connection=args.connection,
            )
            print(
                f"SuperLink at {deployment.address} and {args.supernodes} SuperNodes "
                f"started (logs and PIDs in {deployment.directory}).\n"
                f"Run the app:  flwr run . {deployment.connection} --stream\n"
                f"Stop it all:  python -m flower_tutorial.deployment stop "
                f"--dir {args.dir}"
            )
        else:
            deployment, killed, removed = stop(args.dir)
            note = f" ({len(killed)} had to be killed)" if killed else ""
            connection = (
                f"removed connection {deployment.connection!r}"
                if removed
                else f"no connection {deployment.connection!r} to its SuperLink "
                "was left to remove"
            )
            print(
                f"Stopped the deployment in {deployment.directory}{note}; {connection}."
            )
    except ValueError as ex:
        parser.exit(2, f"error: {ex}\n")
    except (RuntimeError, ClickException, OSError) as ex:  # a process failed to start
        parser.exit(1, f"error: {ex}\n")


if __name__ == "__main__":
    main()
