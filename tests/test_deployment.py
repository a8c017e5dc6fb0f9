"""The app under the Deployment Engine: a real SuperLink and SuperNode processes.

Each test starts a local deployment on free loopback ports (insecure, or TLS with
SuperNode authentication), runs the app with `flwr run` on tiny synthetic data
and stops every process by PID, also when the test fails. Those are marked
`deployment` (`pytest -m deployment`); they run in CI with the rest.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    APP_DIR,
    _kill_descendants,
    _set_child_subreaper,
    make_split,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flower_tutorial.deployment import local as deployment
from flower_tutorial.deployment import security

FLWR = deployment._bin("flwr")


@pytest.fixture
def deploy(tmp_path, monkeypatch) -> Iterator[Callable[..., deployment.Deployment]]:
    """Start local deployments (Flower Configuration in tmp); stop them by PID."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    _set_child_subreaper()  # so that orphaned ClientApp processes are found too
    started: list[deployment.Deployment] = []

    def start(num_supernodes: int, **kwargs) -> deployment.Deployment:
        where = tmp_path / f"deployment-{len(started)}"
        started.append(deployment.start(where, num_supernodes, **kwargs))
        return started[-1]

    yield start
    for running in started:
        running.stop()
    time.sleep(1)
    left = _kill_descendants()
    assert not left, f"processes left running by the test (now killed): {left}"


def _flwr_run(dep: deployment.Deployment, run_config: dict, timeout: float) -> str:
    """`flwr run` the app on the deployment; return its streamed log."""
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    done = subprocess.run(
        [FLWR, "run", str(APP_DIR), dep.connection, "--stream"]
        + ["--run-config", overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.stdout + done.stderr


def _history(output_dir: Path) -> dict:
    (run_dir,) = output_dir.iterdir()
    return json.loads((run_dir / "history.json").read_text())


def _run_config(cifar_dir: Path, output_dir: Path, nodes: int, rounds: int) -> dict:
    return {
        "dataset": str(cifar_dir),
        "num-server-rounds": rounds,
        "min-fit-clients": nodes,
        "min-evaluate-clients": nodes,
        "min-available-clients": nodes,
        "fraction-evaluate": 1.0,
        "batch-size": 16,
        "node-wait-timeout": 60.0,
        "output-dir": str(output_dir),
    }


def _assert_trained(history: dict, rounds: int, clients: int) -> None:
    assert [r["round"] for r in history["rounds"]] == list(range(rounds + 1))
    for entry in history["rounds"][1:]:
        assert entry["fit_clients"] == clients, entry
        assert entry["evaluate_clients"] == clients, entry
        assert 0 < entry["distributed_loss"] < 10
        assert 0 <= entry["distributed_accuracy"] <= 1


@pytest.mark.deployment
def test_insecure_deployment_on_a_partition_and_a_local_folder(
    deploy, cifar_dir, tmp_path
):
    site = tmp_path / "site-1"
    site.mkdir()
    make_split(60, 5).to_parquet(str(site / "train-00000-of-00001.parquet"))
    dep = deploy(2, data_paths={1: str(site)})
    out = tmp_path / "outputs"
    log = _flwr_run(dep, _run_config(cifar_dir, out, nodes=2, rounds=2), 300)
    history = _history(out)
    _assert_trained(history, rounds=2, clients=2)
    assert "[round 2/2]" in log
    # Node 0 trained on partition 0 of 2 (120 images, 96 after the 80/20 split),
    # node 1 on its own folder's 60 images (48).
    assert history["rounds"][1]["fit_examples"] == {"0": 96, "1": 48}


@pytest.mark.deployment
def test_secured_deployment_admits_registered_supernodes_only(
    deploy, cifar_dir, tmp_path
):
    dep = deploy(2, secure=True)
    # A third SuperNode whose key was never registered is refused and exits.
    stranger_key = security.make_supernode_key(tmp_path / "stranger", "stranger")
    config = deployment.node_config(0, 2, None)
    argv = deployment.supernode_argv(dep, config, deployment.free_port(), stranger_key)
    pid = dep.spawn("stranger", argv)
    out = tmp_path / "outputs"
    _flwr_run(dep, _run_config(cifar_dir, out, nodes=2, rounds=2), 300)
    _assert_trained(_history(out), rounds=2, clients=2)
    deadline = time.monotonic() + 60
    while deployment._running(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not deployment._running(pid), "the unregistered SuperNode was not refused"
    assert "Failed to activate SuperNode" in dep.log_tail("stranger", 40)


@pytest.mark.deployment
def test_a_supernode_killed_during_the_run(deploy, cifar_dir, tmp_path):
    dep = deploy(3)
    out = tmp_path / "outputs"
    run_config = _run_config(cifar_dir, out, nodes=3, rounds=3) | {
        "min-fit-clients": 2,
        "min-evaluate-clients": 2,
        "min-available-clients": 2,
    }
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    log_file = tmp_path / "flwr-run.log"
    with open(log_file, "w") as log_out:
        run = subprocess.Popen(
            [FLWR, "run", str(APP_DIR), dep.connection, "--stream"]
            + ["--run-config", overrides],
            stdout=log_out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while "[round 1/3]" not in log_file.read_text() and run.poll() is None:
            assert time.monotonic() < deadline, "round 1 did not end in 300 s"
            time.sleep(0.5)
        # A crash, not a shutdown: the SuperLink is not told the node left.
        os.killpg(dep.pids["supernode-2"], signal.SIGKILL)
        # Bounded: the SuperLink declares a silent node gone after its heartbeats
        # stop (about a minute), and its messages then fail.
        run.wait(timeout=400)
    finally:
        run.kill()
        run.wait()
    log = log_file.read_text()
    rounds = _history(out)["rounds"]
    assert len(rounds) == 4, log[-3000:]  # the run went on to its last round
    later = rounds[2:]
    # The lost node's results are missing or recorded as failures, never averaged.
    assert all(r["fit_clients"] == 2 for r in later), later
    assert rounds[3]["centralized_accuracy"] is not None


def test_tls_files_name_the_hosts_and_chain_to_the_ca(tmp_path):
    files = security.make_tls_files(tmp_path, ["superlink.example.org", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1"
    ]
    assert files.server_key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="exist already"):  # never a silent new CA
        security.make_tls_files(tmp_path)


def test_supernode_keys_are_p384_in_openssh_format(tmp_path):
    private = security.make_supernode_key(tmp_path, "org.3")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key.curve, ec.SECP384R1)
    public = security.public_key_path(private).read_text()
    assert public.startswith("ecdsa-sha2-nistp384 ") and public.endswith(" org.3\n")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_supernodes": 0}, r"--supernodes = 0 is not allowed: expected >= 1"),
        (
            {"num_supernodes": 2, "data_paths": {2: "."}},
            r"--data-path 2=\.\.\. is not allowed: .*\[0, 2\)",
        ),
        (
            {"num_supernodes": 2, "data_paths": {1: "/no/such/site"}},
            r"--data-path 1='/no/such/site': no such folder",
        ),
    ],
)
def test_start_refuses_bad_input_before_starting_anything(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        deployment.start(tmp_path / "dep", **kwargs)
    assert not (tmp_path / "dep").exists()


def test_stop_needs_a_started_deployment(tmp_path):
    with pytest.raises(ValueError, match=r"holds no deployment.json"):
        deployment.Deployment.load(tmp_path)


def test_node_config_quotes_the_data_path(tmp_path):
    site = tmp_path / "site one"
    assert deployment.node_config(3, 10, None) == "partition-id=3 num-partitions=10"
    assert deployment.node_config(3, 10, str(site)) == (
        f"partition-id=3 num-partitions=10 data-path='{site}'"
    )


@pytest.mark.parametrize(("user_value", "expected"), [(None, "1"), ("3", "3")])
def test_spawn_defaults_give_way_to_the_callers_environment(
    tmp_path, monkeypatch, user_value, expected
):
    if user_value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user_value)
    dep = deployment.Deployment(tmp_path, "test", 0, secure=False)
    code = "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['PATH'])"
    pid = dep.spawn("probe", [sys.executable, "-c", code], {"OMP_NUM_THREADS": "1"})
    os.waitpid(pid, 0)
    threads, path = (tmp_path / "probe.log").read_text().split(maxsplit=1)
    assert threads == expected
    # Flower's own commands are found in this environment first.
    assert path.startswith(str(Path(sys.executable).parent))
    assert json.loads((tmp_path / "deployment.json").read_text())["pids"] == {
        "probe": pid
    }
