"""Start and stop a local deployment: a SuperLink and SuperNodes on this machine.

Starts one SuperLink and N SuperNodes as separate processes on loopback (Linux:
processes are found through /proc when stopping), each
SuperNode with its own ``partition-id`` (or its own data folder), adds a
connection for them to the Flower Configuration, and stops every process again
by PID::

    python -m flower_tutorial.deployment start --supernodes 3 --dir deployment
    flwr run . local-deployment --stream
    python -m flower_tutorial.deployment stop --dir deployment

With ``--secure``, the SuperLink serves TLS with a certificate from a CA made
here, and admits only SuperNodes whose public keys were registered. Runs use the
installed environment: runtime dependency installation is turned off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from click import ClickException
from flwr.cli.flower_config import write_superlink_connection
from flwr.cli.typing import SuperLinkConnection

from flower_tutorial.deployment import security

STATE_FILE = "deployment.json"
LOOPBACK = "127.0.0.1"
# Seconds a process gets to exit on SIGTERM before it is killed.
STOP_GRACE = 10.0


@dataclass
class Deployment:
    """A running local deployment: where it lives and the PIDs of its processes."""

    directory: Path
    connection: str
    superlink_port: int
    secure: bool
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        """The folder of the TLS files (with `secure`)."""
        return self.directory / "certs"

    @property
    def address(self) -> str:
        """The SuperLink's address, for SuperNodes and `flwr`."""
        return f"{LOOPBACK}:{self.superlink_port}"

    def save(self) -> None:
        """Record the deployment (after every process started: stop needs all PIDs)."""
        state = asdict(self) | {"directory": str(self.directory)}
        tmp = self.directory / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.directory / STATE_FILE)

    @classmethod
    def load(cls, directory: Path) -> Deployment:
        """Read the deployment that `start` recorded in `directory`."""
        path = directory / STATE_FILE
        if not path.is_file():
            raise ValueError(
                f"--dir {str(directory)!r} holds no {STATE_FILE}: expected the "
                "folder of a deployment started with "
                "`python -m flower_tutorial.deployment start`."
            )
        state = json.loads(path.read_text())
        return cls(**(state | {"directory": Path(state["directory"])}))

    def spawn(
        self, name: str, argv: Sequence[str], defaults: dict[str, str] | None = None
    ) -> int:
        """Start `argv` in its own session, logging to <name>.log; record its PID.

        `defaults` are environment variables the caller's environment may override.
        """
        # The installed environment is the app's: no per-run `uv sync` (offline).
        env = {"FLWR_TELEMETRY_ENABLED": "0", **(defaults or {})} | dict(os.environ)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        # Flower starts its SuperExec, ServerApp and ClientApp processes by name:
        # from this environment, also when it is not activated.
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        with open(self.directory / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                # Its own process group, apart from the caller's (Ctrl-C in the
                # terminal that ran `start` does not reach it).
                start_new_session=True,
            )
        self.pids[name] = proc.pid
        self.save()
        return proc.pid

    def log_tail(self, name: str, lines: int = 20) -> str:
        """Return the last lines of a process's log, for error messages."""
        path = self.directory / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, names: Sequence[str] | None = None) -> list[int]:
        """Stop processes (all by default) and everything they started, by PID.

        SIGTERM to each recorded process, its process group and its descendants
        (Flower starts its SuperExec in a session of its own), SIGKILL to those
        left after STOP_GRACE seconds. Returns the PIDs that had to be killed.
        """
        chosen = [n for n in self.pids if names is None or n in names]
        procs = _flower_trees({self.pids[n] for n in chosen})
        for pid in procs:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(map(_running, procs)):
            time.sleep(0.2)
        killed = [pid for pid in procs if _running(pid)]
        for pid in killed:
            _signal(pid, signal.SIGKILL)
        for name in chosen:
            del self.pids[name]
        self.save()
        return killed


def _signal(pid: int, sig: int) -> None:
    """Send `sig` to `pid`, which may have exited meanwhile."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _process_table() -> dict[int, tuple[int, int, str, bytes]]:
    """Return {pid: (parent pid, process group, state, command line)} from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgid = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # the process ended while we looked
        table[int(stat.parent.name)] = (int(ppid), int(pgid), state, cmdline)
    return table


def _flower_trees(roots: set[int]) -> set[int]:
    """Return the live processes of the groups led by `roots`, and their descendants.

    A group counts only while it still holds a Flower process: its leader may
    have exited (a refused SuperNode) while a child lives on, and a recorded
    PID may have been reused by another program since.
    """
    table = _process_table()
    groups = {
        root
        for root in roots
        if any(
            pgid == root and (b"flower-" in cmd or b"flwr-" in cmd)
            for _, pgid, _, cmd in table.values()
        )
    }
    found = {pid for pid, (_, pgid, _, _) in table.items() if pgid in groups}
    stack = list(found)
    while stack:
        parent = stack.pop()
        children = {pid for pid, (ppid, _, _, _) in table.items() if ppid == parent}
        stack.extend(children - found)
        found |= children
    return {pid for pid in found if table[pid][2] != "Z"}


def _running(pid: int) -> bool:
    """Whether `pid` runs: not gone, not a zombie (reaped here if our child)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_port(deployment: Deployment, name: str, port: int, timeout: float) -> None:
    """Wait until `port` accepts connections; fail early if process `name` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(deployment.pids[name]):
            raise RuntimeError(
                f"{name} exited while starting; its log ends with:\n"
                f"{deployment.log_tail(name)}"
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection((LOOPBACK, port), timeout=1),
        ):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout:g} s.")


def _bin(name: str) -> str:
    """Return the path of command `name` in the environment this runs in."""
    return str(Path(sys.executable).with_name(name))


def superlink_argv(deployment: Deployment) -> list[str]:
    """Return the SuperLink's command line: insecure, or TLS and node auth."""
    argv = [
        _bin("flower-superlink"),
        "--port",
        str(deployment.superlink_port),
        "--disable-runtime-dependency-installation",
    ]
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


def add_connection(deployment: Deployment) -> None:
    """Add (or replace) the deployment's connection in the Flower Configuration."""
    if deployment.secure:
        ca = str(security.tls_files(deployment.certs).ca_cert)
        connection = SuperLinkConnection(
            name=deployment.connection, address=deployment.address, root_certificates=ca
        )
    else:
        connection = SuperLinkConnection(
            name=deployment.connection, address=deployment.address, insecure=True
        )
    write_superlink_connection(connection)


def register_supernode(deployment: Deployment, private_key: Path) -> int:
    """Register a SuperNode's public key with the SuperLink; return its node ID."""
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


def start(
    directory: Path,
    num_supernodes: int,
    *,
    secure: bool = False,
    data_paths: dict[int, str] | None = None,
    connection: str = "local-deployment",
    timeout: float = 60.0,
) -> Deployment:
    """Start a SuperLink and `num_supernodes` SuperNodes; add the connection.

    SuperNode i gets ``partition-id=i num-partitions=num_supernodes`` and, if
    `data_paths` has an entry for i, ``data-path``. If anything fails to start,
    whatever was started is stopped before the error is raised.
    """
    if num_supernodes < 1:
        raise ValueError(
            f"--supernodes = {num_supernodes} is not allowed: expected >= 1."
        )
    data_paths = data_paths or {}
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
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / STATE_FILE).exists() and Deployment.load(directory).pids:
        raise ValueError(
            f"--dir {str(directory)!r} holds a deployment that is still running: "
            "stop it first (`python -m flower_tutorial.deployment stop`)."
        )
    deployment = Deployment(directory.resolve(), connection, free_port(), secure)
    try:
        # A restart in the same folder keeps the CA (and keys) users already trust.
        if secure and not security.tls_files(deployment.certs).ca_cert.exists():
            security.make_tls_files(deployment.certs)
        deployment.spawn("superlink", superlink_argv(deployment))
        wait_for_port(deployment, "superlink", deployment.superlink_port, timeout)
        add_connection(deployment)
        ports: dict[str, int] = {}
        # The SuperNodes share this machine's cores, as Ray's clients do in
        # simulation: PyTorch's default of one thread per core in every ClientApp
        # process oversubscribes them (measured: rounds 2.3x slower with 3 nodes).
        threads = str(max(1, (os.cpu_count() or 1) // num_supernodes))
        for i in range(num_supernodes):
            key = None
            if secure:
                key = deployment.directory / "keys" / f"supernode-{i}"
                if not key.exists():
                    security.make_supernode_key(key.parent, key.name)
                register_supernode(deployment, key)
            config = node_config(i, num_supernodes, data_paths.get(i))
            ports[f"supernode-{i}"] = port = free_port()
            argv = supernode_argv(deployment, config, port, key)
            deployment.spawn(f"supernode-{i}", argv, {"OMP_NUM_THREADS": threads})
        # A SuperNode that cannot start (port taken, key refused) fails here, not
        # later as a run waiting for nodes that never come.
        for name, port in ports.items():
            wait_for_port(deployment, name, port, timeout)
    except BaseException:
        deployment.stop()
        raise
    return deployment


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
    start_cmd.add_argument("--supernodes", type=int, default=10)
    start_cmd.add_argument("--secure", action="store_true", help="TLS + node auth")
    start_cmd.add_argument(
        "--data-path",
        type=_data_path_arg,
        action="append",
        default=[],
        help="NODE=FOLDER: SuperNode NODE trains on its own folder (repeatable)",
    )
    start_cmd.add_argument("--connection", default="local-deployment")
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
            deployment = Deployment.load(args.dir)
            killed = deployment.stop()
            note = f" ({len(killed)} had to be killed)" if killed else ""
            print(f"Stopped the deployment in {deployment.directory}{note}.")
    except ValueError as ex:
        parser.exit(2, f"error: {ex}\n")
    except (RuntimeError, ClickException) as ex:  # a process failed to start
        parser.exit(1, f"error: {ex}\n")


if __name__ == "__main__":
    main()
