"""A simulation on a Ray cluster across two hosts, as docs/scaling.md runs it.

The Ray head runs in one network namespace and a worker in another (tests/netns.py:
a bridge, an address each), each with one CPU and data caches of its own. `flwr
run .` on the head's host, with RAY_ADDRESS, simulates ten SuperNodes for two
rounds; Ray's own state then says on which host each client actor ran. The run
must end as the same run on one host does: the same history and model bytes.
Every Ray process runs under the deployment tooling's keeper and is stopped by
PID. Skipped where namespaces cannot be made (not root, no `ip`). Marked
`deployment`: it runs, as those do, on one worker in turn.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import APP_DIR, assert_nothing_left, run_dir_of
from flwr_cli import flwr_run_argv, local_superlink
from netns import Hosts, address, namespaces

from flower_tutorial.deployment import local as deployment

RAY = deployment._bin("ray")
RAY_PORT = 6379
NODES, ROUNDS = 10, 2
pytestmark = pytest.mark.deployment


def _host_env(home: Path, ray_tmp: Path) -> list[str]:
    """`env` for a Ray node of its own: its temporary files and data caches.

    Ray's own files go to `ray_tmp`, a short path: its sockets' paths must fit
    in 107 bytes.
    """
    return [
        "env",
        f"RAY_TMPDIR={ray_tmp}",
        f"XDG_CACHE_HOME={home / 'cache'}",
        f"HF_HOME={home / 'hf'}",
    ]


# A Ray driver that reads the cluster's state from its GCS: the live nodes, and
# every client actor with the address of the node it ran on (dead ones too).
# `ray list` would ask the dashboard, which Flower's `ray` (not `ray[default]`)
# does not serve.
CLUSTER_STATE = """
import json, sys
import ray
from ray._private import state

ray.init(address=sys.argv[1], logging_level="ERROR")
nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
actors = [
    a["Address"]["IPAddress"]
    for a in state.actors().values()
    if a["ActorClassName"] == "ClientAppActor"
]
print(json.dumps({"nodes": sorted(nodes), "actors": sorted(actors)}))
"""


def _cluster_state(hosts: Hosts) -> dict[str, list[str]]:
    """{"nodes": live nodes' IPs, "actors": each client actor's node IP}."""
    head = f"{address(None)}:{RAY_PORT}"
    done = subprocess.run(
        hosts.exec(hosts.hub, [sys.executable, "-c", CLUSTER_STATE, head]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        return {"nodes": [], "actors": []}
    return json.loads(done.stdout.splitlines()[-1])


def _wait_for_nodes(hosts: Hosts, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_cluster_state(hosts)["nodes"]) < count:
        assert time.monotonic() < deadline, f"{count} Ray nodes: not within {timeout} s"
        time.sleep(1)


def _start_cluster(
    hosts: Hosts, cluster: deployment.Deployment, homes: Path, ray_tmp: Path
) -> None:
    """A Ray head on the hub's host and a worker on node 0's, one CPU each."""
    each = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    head = [
        "start",
        "--head",
        "--port",
        str(RAY_PORT),
        "--node-ip-address",
        address(None),
        "--dashboard-host",
        address(None),
    ]
    cluster.spawn(
        "ray-head",
        hosts.exec(
            hosts.hub, [*_host_env(homes / "head", ray_tmp / "h"), RAY, *head, *each]
        ),
    )
    _wait_for_nodes(hosts, 1)
    worker = ["start", "--address", f"{address(None)}:{RAY_PORT}"]
    worker += ["--node-ip-address", address(0)]
    cluster.spawn(
        "ray-worker",
        hosts.exec(
            hosts.node(0),
            [*_host_env(homes / "worker", ray_tmp / "w"), RAY, *worker, *each],
        ),
    )
    _wait_for_nodes(hosts, 2)


def _flwr_run(hosts: Hosts, overrides: str, home: Path, ray_address: str | None):
    """`flwr run .` on the hub's host (on the cluster with `ray_address`)."""
    with local_superlink(home) as env:
        if ray_address is not None:
            env["RAY_ADDRESS"] = ray_address
        done = subprocess.run(
            hosts.exec(hosts.hub, flwr_run_argv(overrides, NODES)),
            env=env,
            cwd=APP_DIR,
            capture_output=True,
            text=True,
            timeout=420,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _run(out: Path) -> tuple[dict, bytes]:
    """A run's history, its times and output folder left out, and its model's bytes."""
    run_dir = run_dir_of(out)
    history = json.loads((run_dir / "history.json").read_text())
    history.pop("seconds")
    history["run_config"].pop("output-dir")
    for entry in history["rounds"]:
        entry.pop("seconds")
    return history, (run_dir / "final_model.pt").read_bytes()


def test_a_simulation_on_a_ray_cluster_across_hosts(cifar_dir, tmp_path):
    overrides = f"dataset='{cifar_dir}' num-server-rounds={ROUNDS} batch-size=16"
    homes = tmp_path / "hosts"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    with namespaces(1, "head.test") as hosts:
        cluster = deployment.Deployment(tmp_path / "cluster", "ray", RAY_PORT, False)
        cluster.directory.mkdir()
        try:
            _start_cluster(hosts, cluster, homes, ray_tmp)
            hosts_ips = sorted([address(None), address(0)])
            assert _cluster_state(hosts)["nodes"] == hosts_ips
            ray_address = f"{address(None)}:{RAY_PORT}"
            on_cluster = tmp_path / "on-cluster"
            _flwr_run(
                hosts,
                f"{overrides} output-dir='{on_cluster}'",
                tmp_path / "flwr-cluster",
                ray_address,
            )
            placed = _cluster_state(hosts)["actors"]
        finally:
            cluster.stop()
            shutil.rmtree(ray_tmp, ignore_errors=True)
        print("client actors ran on", placed)
        assert set(placed) == {address(None), address(0)}, placed
        # Each host decoded the data into its own cache.
        for host in ("head", "worker"):
            cached = list((homes / host / "cache" / "flower-tutorial").rglob("*"))
            assert any(p.is_file() for p in cached), f"{host}'s cache is empty"
        # The same run, on one host (the Ray instance Flower starts itself).
        on_one = tmp_path / "on-one-host"
        _flwr_run(
            hosts, f"{overrides} output-dir='{on_one}'", tmp_path / "flwr-1", None
        )
    assert _run(on_cluster) == _run(on_one)
    assert_nothing_left()
