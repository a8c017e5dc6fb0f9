"""A deployment across hosts, not loopback: network namespaces, and faults.

The SuperLink and each SuperNode run in a Linux network namespace of their own,
on a bridge, each with its own address; every namespace maps the names
superlink.test, node-0.test and node-1.test to those addresses (`ip netns exec`
bind-mounts /etc/netns/<namespace>/hosts over /etc/hosts). The SuperNodes reach
the SuperLink by its name, over TLS whose certificate names superlink.test (and
127.0.0.1, for the SuperLink's own SuperExec) but not its bridge address, with
SuperNode authentication. `flwr` runs in the SuperLink's namespace, as its
operator would on that host.

One lean run then meets the faults: a SuperNode's link is cut during a round and
restored, and the SuperLink is killed and restarted mid-run, after which the run
is resumed from its run folder. The test makes and removes its namespaces, links
and hosts files itself, also when it fails; it is skipped where it cannot (not
root, no `ip`, no network namespaces). Marked `deployment`, as the other runs
against real SuperLink and SuperNode processes.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    APP_DIR,
    _set_child_subreaper,
    assert_nothing_left,
    history_of,
    run_dir_of,
)
from netns import Hosts, address, ip, namespaces

from flower_tutorial.deployment import local as deployment
from flower_tutorial.deployment import security

FLWR = deployment._bin("flwr")
SUPERLINK_HOST = "superlink.test"
SUPERLINK_PORT = 9092  # the SuperLink's namespace is its own: any port is free
SUPERNODE_PORT = 9094  # likewise, each SuperNode's
NUM_NODES = 2
# Room for the cut node's return: it reconnects after its retry backoff, which
# may span several of the short rounds that one node trains alone.
NUM_ROUNDS = 7
CUT = 1  # the SuperNode whose link is cut: it holds partition 1
# What each wait may take at most. A round with both nodes took 30-90 s on 2
# cores that a benchmark shared: a ClientApp process per message, importing
# PyTorch.
WAIT = 240.0
# Room for the slowest round seen with both nodes (a node's reply took over 60 s
# once). It costs nothing in the round without the cut node: the SuperLink
# answers for a node that missed its heartbeats for 60 s (HEARTBEAT_PATIENCE x
# 30 s) before this runs out.
ROUND_TIMEOUT = 120.0
# What a SuperNode logs (Flower's retry) when it fails to reach the SuperLink, and
# when it reaches it again after failing.
FAILED_ATTEMPT = "Connection attempt failed"
RECONNECTED = "Connection successful after"


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """The SuperLink's and SuperNodes' namespaces; removed again, also on failure."""
    with namespaces(NUM_NODES, SUPERLINK_HOST) as made:
        yield made


def _flwr(hosts: Hosts, *args: str, timeout: float = 60) -> str:
    """Run `flwr` on the SuperLink's host; return its output."""
    done = subprocess.run(
        hosts.exec(hosts.hub, [FLWR, *args]),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.stdout + done.stderr


def _flwr_json(hosts: Hosts, *args: str) -> dict:
    """Run `flwr ... --format json` on the SuperLink's host; return its reply."""
    output = _flwr(hosts, *args, "--format", "json")
    try:
        return json.loads(output[output.index("{") :])
    except ValueError:
        raise AssertionError(f"flwr {' '.join(args)}: {output}") from None


def _wait(what: str, ready: Callable[[], object], timeout: float = WAIT) -> object:
    """Return `ready()` once it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.5)
    return value


def _start_superlink(hosts: Hosts, dep: deployment.Deployment, name: str) -> None:
    """Start the SuperLink (on the deployment's database) and wait until it serves."""
    record = dep.spawn(name, hosts.exec(hosts.hub, deployment.superlink_argv(dep)))

    def serving() -> bool:
        assert record.running(), f"{name} exited:\n{dep.log_tail(name)}"
        return "Uvicorn running on" in dep.log_tail(name, 200)

    _wait(f"{name} to serve", serving, 60)


def _online(hosts: Hosts, dep: deployment.Deployment) -> dict[str, str]:
    """Return {node ID: status} of the SuperNodes the SuperLink knows."""
    reply = _flwr_json(hosts, "supernode", "list", dep.connection)
    return {node["node-id"]: node["status"] for node in reply.get("nodes", [])}


def _start_supernode(
    hosts: Hosts, dep: deployment.Deployment, i: int, name: str
) -> None:
    """Start SuperNode `i` on its host, with its registered key; log to <name>.log."""
    config = deployment.node_config(i, NUM_NODES, None)
    key = dep.keys / f"supernode-{i}"
    argv = deployment.supernode_argv(dep, config, SUPERNODE_PORT, key)
    threads = {"OMP_NUM_THREADS": "1"} | deployment.FAST_POLL
    dep.spawn(name, hosts.exec(hosts.node(i), argv), threads)


@pytest.fixture
def federation(
    hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[deployment.Deployment]:
    """A SuperLink and two registered SuperNodes, each in its namespace, over TLS.

    Every process is stopped by PID afterwards, before the namespaces go.
    """
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    _set_child_subreaper()  # orphans (a killed SuperLink's) are ours to find
    directory = security.owned_dir(tmp_path / "deployment", private=False)
    dep = deployment.Deployment(
        directory, "hosts", SUPERLINK_PORT, secure=True, host=SUPERLINK_HOST
    )
    try:
        # Not the bridge address: SuperNodes must verify the SuperLink by name.
        security.make_tls_files(dep.certs, [SUPERLINK_HOST, "127.0.0.1"])
        _start_superlink(hosts, dep, "superlink")
        dep.add_connection()
        for i in range(NUM_NODES):
            key = security.make_supernode_key(dep.keys, f"supernode-{i}")
            public_key = str(security.public_key_path(key))
            reply = _flwr_json(
                hosts, "supernode", "register", public_key, dep.connection
            )
            assert reply.get("success"), reply
            _start_supernode(hosts, dep, i, f"supernode-{i}")
        yield dep
    finally:
        dep.stop()
        # Helpers of a killed SuperLink's ServerApp may take a while to exit.
        assert_nothing_left()


def _tls_by_name(hosts: Hosts, dep: deployment.Deployment) -> list[str]:
    """From a SuperNode's host, shake hands with the SuperLink by name and address.

    Returns one line per name: verified, or refused with OpenSSL's reason.
    """
    code = (
        "import socket, ssl, sys\n"
        "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
        "for name in sys.argv[2:]:\n"
        f"    raw = socket.create_connection(({address(None)!r}, {SUPERLINK_PORT}))\n"
        "    try:\n"
        "        ctx.wrap_socket(raw, server_hostname=name).close()\n"
        "        print(name, 'verified')\n"
        "    except ssl.SSLCertVerificationError as ex:\n"
        "        print(name, 'refused:', ex.verify_message)\n"
    )
    ca = str(security.tls_files(dep.certs).ca_cert)
    argv = [sys.executable, "-c", code, ca, SUPERLINK_HOST, address(None)]
    done = subprocess.run(
        hosts.exec(hosts.node(0), argv), capture_output=True, text=True, timeout=60
    )
    return (done.stdout + done.stderr).splitlines()


def _rounds(output_dir: Path) -> list[dict]:
    """The training rounds the run in `output_dir` completed (none before 1)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        history = history_of(output_dir)
        return [r for r in history["rounds"] if r["round"] and "seconds" in r]
    return []


def _wait_rounds(
    out: Path, run: subprocess.Popen, log: Path, which: Callable[[dict], bool]
) -> list[int]:
    """Wait until the run has completed rounds that `which` picks; return them.

    Fails at once if the run ended (`flwr run --stream` returns when it does).
    """

    def picked() -> list[int]:
        if run.poll() is not None:
            raise AssertionError(f"the run ended:\n{log.read_text()[-3000:]}")
        return [r["round"] for r in _rounds(out) if which(r)]

    return _wait(f"rounds in {out}", picked)


def _start_run(
    hosts: Hosts, dep: deployment.Deployment, config: dict, log: Path
) -> subprocess.Popen:
    """Start `flwr run --stream` on the SuperLink's host, its output in `log`."""
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    argv = [FLWR, "run", str(APP_DIR), dep.connection, "--stream"]
    with open(log, "w") as out:
        return subprocess.Popen(
            hosts.exec(hosts.hub, [*argv, "--run-config", overrides]),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for a process the test started; kill it (by PID) if it does not end."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@contextlib.contextmanager
def _reaping(spared: set[int]) -> Iterator[None]:
    """Reap exited children, as init would, except the PIDs in `spared`.

    The test adopts orphans (subreaper); unreaped, an exited SuperLink stays a
    zombie, and Flower's processes that watch their parent's PID (SuperExec, the
    ServerApp) would never see it gone, as they do on a real host.
    """
    done = threading.Event()

    def reap() -> None:
        while not done.wait(1.0):
            for pid, info in deployment._process_table().items():
                mine = info.ppid == os.getpid() and pid not in spared
                if info.state == "Z" and mine:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)

    thread = threading.Thread(target=reap, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _times_logged(dep: deployment.Deployment, text: str) -> list[int]:
    """How often each SuperNode has logged `text`, by its number."""
    logs = (dep.log_tail(f"supernode-{i}", 100_000) for i in range(NUM_NODES))
    return [log.count(text) for log in logs]


def _each_logged_again(
    dep: deployment.Deployment, text: str, before: list[int]
) -> bool:
    """Whether every SuperNode has logged `text` more often than in `before`."""
    now = _times_logged(dep, text)
    return all(n > b for n, b in zip(now, before, strict=True))


def _tree(record: deployment.ProcessRecord) -> dict[tuple[int, int], list[str]]:
    """{(PID, start time): argv} of a process's keeper and all below it, now."""
    table = deployment._process_table()
    below, stack = {}, [record.keeper.pid]
    while stack:
        pid = stack.pop()
        below[(pid, table[pid].start_time)] = table[pid].argv
        stack += [child for child, info in table.items() if info.ppid == pid]
    return below


def _run_ids(hosts: Hosts, dep: deployment.Deployment) -> dict[str, str]:
    """Return {run ID: status} of the runs the SuperLink knows."""
    reply = _flwr_json(hosts, "ls", dep.connection)
    return {run["run-id"]: run["status"] for run in reply.get("runs", [])}


@pytest.mark.deployment
def test_a_run_across_hosts_survives_a_cut_link_and_a_superlink_restart(
    hosts, federation, cifar_dir, tmp_path
):
    """Round 1 with both nodes; node 1's link cut: round 2 goes on without it.

    Restored, the node takes part again; then the SuperLink is killed in the next
    round and restarted on its database, and the run is resumed from its folder.
    """
    dep = federation
    tls = _tls_by_name(hosts, dep)
    assert tls[0] == f"{SUPERLINK_HOST} verified", tls
    assert tls[1].startswith(f"{address(None)} refused: "), tls
    _wait(
        "both SuperNodes online",
        lambda: list(_online(hosts, dep).values()) == ["online"] * NUM_NODES,
        120,
    )
    out = tmp_path / "outputs"
    config = {
        "dataset": str(cifar_dir),
        "num-server-rounds": NUM_ROUNDS,
        "min-fit-clients": 1,
        "min-evaluate-clients": 1,
        "min-available-clients": 1,
        "fraction-evaluate": 0.0,  # fit only: a lost node costs one wait a round
        "batch-size": 16,
        "node-wait-timeout": 60.0,
        "round-timeout": ROUND_TIMEOUT,
        "output-dir": str(out),
    }
    seen: dict[str, object] = {}  # the timeline, for the report and failures
    started = time.monotonic()

    def note(event: str, value: object = None) -> None:
        seen[event] = [round(time.monotonic() - started, 1), value]

    spared: set[int] = set()
    with _reaping(spared):
        run = _start_run(hosts, dep, config, tmp_path / "run-1.log")
        spared.add(run.pid)
        try:
            # Cut once node 1 has said which partition it holds and trained.
            log = tmp_path / "run-1.log"
            _wait_rounds(out, run, log, lambda r: r["round"] == 1)
            ip("-n", hosts.hub, "link", "set", hosts.link(CUT), "down")
            note("link cut after round", 1)
            _wait_rounds(out, run, log, lambda r: r["round"] == 2)
            ip("-n", hosts.hub, "link", "set", hosts.link(CUT), "up")
            note("link restored after round", 2)
            (back, *_) = _wait_rounds(
                out,
                run,
                log,
                lambda r: r["round"] > 2 and str(CUT) in r["fit_examples"],
            )
            note("node back in round", back)
            assert back < NUM_ROUNDS, "no round left to kill the SuperLink in"
            reconnected = _times_logged(dep, RECONNECTED)
            failed = _times_logged(dep, FAILED_ATTEMPT)
            # What the SuperLink runs, its ServerApp included, by PID.
            tree = _tree(dep.processes["superlink"])
            assert any("flwr-serverapp" in " ".join(argv) for argv in tree.values())
            # Mid-run: round back + 1 has started.
            os.kill(dep.processes["superlink"].pid, signal.SIGKILL)
            note("SuperLink killed in round", back + 1)
            # Down until both SuperNodes have missed it (they ask every 3 s when
            # idle): a SuperLink back within a second is never missed, and its
            # SuperNodes would have nothing to reconnect from.
            _wait(
                "both SuperNodes to miss the SuperLink",
                lambda: _each_logged_again(dep, FAILED_ATTEMPT, failed),
                60,
            )
            note("SuperNodes missed the SuperLink")
            note("flwr run --stream exit code", _stop(run, 60))
            # Its ServerApp exits once it notices (it watches its SuperExec, which
            # watches the SuperLink), unless its threads are still retrying pulls
            # from the SuperLink: then it lingers, and would join the restarted
            # SuperLink and write beside the resumed run. `stop` ends it: the
            # SuperLink's keeper holds all it started.
            lingering = [key for key in tree if deployment._running(*key)]
            note("processes of the killed SuperLink left, its keeper's", lingering)
            dep.stop(["superlink"])
            left = {key: tree[key] for key in tree if deployment._running(*key)}
            assert not left, f"stop left processes of the SuperLink: {left}"
            _start_superlink(hosts, dep, "superlink-restarted")
            note("SuperLink restarted")
            runs = _run_ids(hosts, dep)
            note("runs after the restart", runs)
            note("nodes after the restart", _online(hosts, dep))
            _wait(
                "both SuperNodes reconnected",
                lambda: _each_logged_again(dep, RECONNECTED, reconnected),
                120,
            )
            note("SuperNodes reconnected")
            (old_run,) = runs
            # Its ServerApp died with the SuperLink; the SuperLink notices.
            _wait(
                "the interrupted run marked failed",
                lambda: _run_ids(hosts, dep)[old_run] == "finished:failed",
                120,
            )
            note("interrupted run marked finished:failed")
            # Flower 1.42 keys objects by their content: the resumed round repeats
            # the interrupted round's replies byte for byte, and a SuperNode that
            # still holds those fails to take them ("was not pre-registered").
            # Restarted, the SuperNodes start empty.
            dep.stop([f"supernode-{i}" for i in range(NUM_NODES)])
            for i in range(NUM_NODES):
                _start_supernode(hosts, dep, i, f"supernode-{i}-restarted")
            _wait(
                "the restarted SuperNodes connected",
                lambda: all(
                    "SuperNode ID:" in dep.log_tail(f"supernode-{i}-restarted", 200)
                    for i in range(NUM_NODES)
                ),
                120,
            )
            note("SuperNodes restarted")
        finally:
            _stop(run, 0.1)
        completed = [r["round"] for r in _rounds(out)]
        run_dir = run_dir_of(out)
        # One round more than the last complete one: the round the SuperLink died
        # in, trained again, with both nodes.
        last = completed[-1] + 1
        resume = config | {"resume-from": str(run_dir), "num-server-rounds": last}
        run = _start_run(hosts, dep, resume, tmp_path / "run-2.log")
        spared.add(run.pid)
        try:
            _stop(run, WAIT)
        finally:
            _stop(run, 0.1)
        note("resumed run ended")
    history = json.loads((run_dir / "history.json").read_text())
    print(json.dumps(seen, indent=1, default=str))
    (tmp_path / "seen.json").write_text(json.dumps(seen, indent=1, default=str))
    rounds = history["rounds"]
    log = (tmp_path / "run-2.log").read_text()
    assert [r["round"] for r in rounds] == list(range(last + 1)), log[-3000:]
    assert all("seconds" in r and r["fit_clients"] for r in rounds[1:]), rounds
    assert rounds[1]["fit_clients"] == NUM_NODES
    assert rounds[-1]["fit_clients"] == NUM_NODES, "not both nodes after the restart"
    assert list(rounds[2]["fit_examples"]) == ["0"], rounds[2]
    assert rounds[2]["fit_failures"], "the cut node's failure is not recorded"
    # The node stays silent until round-timeout, or the SuperLink answers for it
    # once it missed its heartbeats for 60 s: whichever comes first.
    (reason,) = rounds[2]["fit_failures"]
    assert "no reply within round-timeout" in reason or "Node Unavailable" in reason
    # Resumed after the last complete round, the one before the SuperLink died.
    assert completed[-1] == back
    assert history["resumed"][0]["after_round"] == back
    assert (run_dir / "final_model.pt").exists()
