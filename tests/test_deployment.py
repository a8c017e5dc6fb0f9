"""The app under the Deployment Engine: real SuperLink and SuperNode processes.

The deployment test starts a local deployment on free loopback ports, with TLS
and SuperNode authentication, runs the app with `flwr run` on tiny synthetic data
under SecAgg+, kills a SuperNode mid-round, and stops every process by PID, also
when the test fails. It is marked `deployment` (`pytest -m deployment`) and runs
in CI with the rest. The others check, without starting Flower, what an insecure
start runs, what stop signals, which files and names are refused, certificates
and the lock.
"""

import contextlib
import datetime
import ipaddress
import json
import os
import runpy
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    APP_DIR,
    _set_child_subreaper,
    assert_nothing_left,
    history_of,
    make_split,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.flower_config import write_superlink_connection
from flwr.cli.typing import SuperLinkConnection

from flower_tutorial.deployment import local as deployment
from flower_tutorial.deployment import security

FLWR = deployment._bin("flwr")
NOBODY = 65534  # another user's uid


@pytest.fixture(autouse=True)
def flwr_home(tmp_path, monkeypatch) -> Path:
    """A Flower Configuration of the test's own: never the user's."""
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


def _connections(flwr_home: Path) -> dict:
    """The connections of the Flower Configuration in `flwr_home`."""
    return tomllib.loads((flwr_home / "config.toml").read_text())["superlink"]


@pytest.fixture
def deploy(tmp_path, monkeypatch) -> Iterator[Callable[..., deployment.Deployment]]:
    """Start local deployments (Flower Configuration in tmp); stop them by PID."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    _set_child_subreaper()  # so that orphaned ClientApp processes are found too
    started: list[deployment.Deployment] = []

    def start(
        num_supernodes: int, directory: Path | None = None, **kwargs
    ) -> deployment.Deployment:
        where = directory or tmp_path / f"deployment-{len(started)}"
        started.append(deployment.start(where, num_supernodes, **kwargs))
        return started[-1]

    yield start
    for running in started:
        deployment.stop(running.directory)
    assert_nothing_left()


@pytest.mark.deployment
def test_a_secured_deployment_with_secure_aggregation_survives_a_killed_supernode(
    deploy, cifar_dir, tmp_path, monkeypatch, flwr_home
):
    """Three registered SuperNodes over TLS, one on its own data folder, one killed.

    TLS files of an earlier start that expire soon are refused, then renewed; a
    fourth SuperNode, whose key was never registered, is refused and exits. The
    third is killed in round 1: SecAgg+ finishes that round with the two left (its
    reconstruction threshold), and the run goes on to its last round, evaluating
    on the nodes left; then `stop` removes the connection that `start` added, and
    no other.
    """
    where = tmp_path / "secure"
    _expiring_tls(monkeypatch, where / "certs", 10)
    site = tmp_path / "site-1"
    site.mkdir()
    make_split(60, 5).to_parquet(str(site / "train-00000-of-00001.parquet"))
    data_paths = {1: str(site)}
    with pytest.raises(ValueError, match=r"expires on .* start --secure --renew"):
        deploy(3, directory=where, secure=True, data_paths=data_paths)
    dep = deploy(3, directory=where, secure=True, renew=True, data_paths=data_paths)
    ca_pem = security.tls_files(dep.certs).ca_cert.read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    in_300_days = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=300)
    assert ca.not_valid_after_utc > in_300_days
    assert ca.extensions.get_extension_for_class(x509.NameConstraints).critical
    stranger_key = security.make_supernode_key(tmp_path / "stranger", "stranger")
    config = deployment.node_config(0, 3, None)
    argv = deployment.supernode_argv(dep, config, deployment.free_port(), stranger_key)
    stranger = dep.spawn("stranger", argv)
    out = tmp_path / "outputs"
    run_config = {
        "dataset": str(cifar_dir),
        "num-server-rounds": 2,
        "min-fit-clients": 2,
        "min-evaluate-clients": 2,
        "min-available-clients": 2,
        "fraction-evaluate": 1.0,
        "batch-size": 16,
        "node-wait-timeout": 60.0,
        "output-dir": str(out),
        "secure-aggregation": True,
        "secagg-num-shares": 3,
        "secagg-reconstruction-threshold": 2,
        # Long enough for a SecAgg+ stage on a loaded machine (a ClientApp
        # process per message); the lost node costs one such wait.
        "round-timeout": 90.0,
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
        deadline = time.monotonic() + 400
        sampled = "configure_fit: strategy sampled 3 clients"  # each said its partition
        while sampled not in log_file.read_text() and run.poll() is None:
            assert time.monotonic() < deadline, "round 1 did not start in 400 s"
            time.sleep(0.5)
        # A crash, not a shutdown, while SecAgg+ sets round 1 up.
        time.sleep(2)
        os.killpg(dep.processes["supernode-2"].pid, signal.SIGKILL)
        run.wait(timeout=600)
    finally:
        run.kill()
        run.wait()
    log = log_file.read_text()
    history = history_of(out)
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2], log[-3000:]
    assert "Secure aggregation" in log
    # Where the kill lands decides: SecAgg+ leaves the lost node out, or, if it
    # left after sharing its keys and too few shares came back, halts the round.
    # Either way the round is recorded and the run goes on.
    if rounds[1]["fit_clients"]:
        assert rounds[1]["fit_clients"] == 2, rounds[1]
        assert rounds[1]["fit_failures"], "the lost node is not recorded"
    else:
        assert rounds[1]["fit_voided"].startswith("secure aggregation halted")
    # Node 0 trained on partition 0 of 3 (80 images, 64 after the 80/20 split),
    # node 1 on its own folder's 60 images (48); node 2 is gone.
    assert rounds[2]["fit_examples"] == {"0": 64, "1": 48}
    for entry in rounds[1:]:  # the nodes left evaluate, every round
        assert entry["evaluate_clients"] == 2, entry
        assert 0 < entry["distributed_loss"] < 10
        assert 0 <= entry["distributed_accuracy"] <= 1
    accuracy = [r["centralized_accuracy"] for r in rounds]
    assert len(set(accuracy)) > 1  # the model changed: aggregates were taken
    deadline = time.monotonic() + 60
    while stranger.running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not stranger.running(), "the unregistered SuperNode was not refused"
    # Its SuperExec, left waiting for it, logs its retries after that.
    assert "Failed to activate SuperNode" in dep.log_tail("stranger", 100_000)
    assert dep.connection in _connections(flwr_home)
    _, _, removed = deployment.stop(dep.directory)
    assert removed
    assert set(_connections(flwr_home)) == {"default", "local", "supergrid"}


# --- Certificates and keys -------------------------------------------------------


def _tls_handshake(files: security.TlsFiles, cert: Path, key: Path, host: str) -> None:
    """Connect to a TLS server with `cert` as `host`, trusting the CA (OpenSSL)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(files.ca_cert))
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError):  # the client may refuse us
                server.wrap_socket(conn, server_side=True).close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname()) as raw,
                client.wrap_socket(raw, server_hostname=host),
            ):
                pass
        finally:
            thread.join(10)


def test_tls_files_name_the_hosts_and_chain_to_the_ca(tmp_path):
    hosts = ["superlink.example.org", "127.0.0.1"]
    files = security.make_tls_files(tmp_path / "certs", hosts, tmp_path / "ca")
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1"
    ]
    # The CA may sign for exactly these names, and says so critically.
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [
        x509.DNSName("superlink.example.org"),
        x509.IPAddress(ipaddress.ip_network("127.0.0.1/32")),
    ]
    with pytest.raises(ValueError, match="exist already"):  # never a silent new CA
        security.make_tls_files(tmp_path / "certs", hosts, tmp_path / "ca2")


def test_openssl_accepts_the_server_and_refuses_other_names_from_the_ca(tmp_path):
    files = security.make_tls_files(tmp_path / "certs", ca_dir=tmp_path / "ca")
    for host in security.LOOPBACK_NAMES:
        _tls_handshake(files, files.server_cert, files.server_key, host)
    # Whoever took the CA key signs for another name: clients refuse it.
    ca = security.ca_files(tmp_path / "ca")
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key, cert = security._issue_server_cert(
        ca_key, ca_cert, ["evil.example"], security._now()
    )
    (tmp_path / "evil.pem").write_bytes(security._pem_cert(cert))
    (tmp_path / "evil.key").write_bytes(security._pem_key(key))
    with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree"):
        _tls_handshake(
            files, tmp_path / "evil.pem", tmp_path / "evil.key", "evil.example"
        )


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_keys_are_private_and_the_ca_key_is_kept_apart(tmp_path):
    files = security.make_tls_files(tmp_path / "site" / "certs", ca_dir=tmp_path / "ca")
    ca = security.ca_files(tmp_path / "ca")
    assert {p.name for p in files.server_key.parent.iterdir()} == {
        "ca.crt",
        "server.pem",
        "server.key",
    }
    assert _mode(files.server_key) == _mode(ca.key) == 0o600
    assert _mode(files.server_cert) == _mode(files.ca_cert) == 0o644
    # Every folder it made, the missing parent too, is its owner's only.
    for folder in (tmp_path / "site", tmp_path / "site" / "certs", tmp_path / "ca"):
        assert _mode(folder) == 0o700, folder
    # Without a CA folder (deployment start --secure), the CA key is not kept.
    security.make_tls_files(tmp_path / "local" / "certs")
    assert sorted(p.name for p in (tmp_path / "local").rglob("*.key")) == ["server.key"]
    private = security.make_supernode_key(tmp_path / "keys", "org.3")
    assert _mode(private) == 0o600 and _mode(tmp_path / "keys") == 0o700
    with pytest.raises(ValueError, match="the SuperLink's folder"):
        security.make_tls_files(tmp_path / "same", ca_dir=tmp_path / "same")


def test_supernode_keys_are_p384_in_openssh_format(tmp_path):
    private = security.make_supernode_key(tmp_path / "keys", "org.3")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key.curve, ec.SECP384R1)
    public = security.public_key_path(private).read_text()
    assert public.startswith("ecdsa-sha2-nistp384 ") and public.endswith(" org.3\n")
    with pytest.raises(ValueError, match=r"--name '../org' is not allowed"):
        security.make_supernode_key(tmp_path / "keys", "../org")


def _expiring_tls(monkeypatch, certs: Path, days: float, **kwargs) -> security.TlsFiles:
    """Make TLS files valid for `days` days from 5 minutes ago (0.001: expired)."""
    with monkeypatch.context() as patch:
        patch.setattr(security, "VALID_DAYS", days)
        return security.make_tls_files(certs, **kwargs)


@pytest.mark.parametrize(("days", "when"), [(10, "expires"), (0.001, "expired")])
def test_start_refuses_expiring_tls_files_and_says_how_to_renew(
    tmp_path, monkeypatch, days, when
):
    where = tmp_path / "dep"
    _expiring_tls(monkeypatch, where / "certs", days)
    message = rf"ca.crt {when} on .*: renew it with .*start --secure --renew --dir"
    with pytest.raises(ValueError, match=message):
        deployment.start(where, 1, secure=True)
    assert sorted(p.name for p in where.iterdir()) == ["certs"]  # nothing started


def test_start_refuses_a_ca_key_in_the_superlinks_folder(tmp_path):
    where = tmp_path / "dep"
    security.make_tls_files(where / "certs")
    security.write_new(where / "certs" / "ca.key", b"an earlier version's CA key")
    with pytest.raises(ValueError, match=r"ca.key: the CA's private key lies"):
        deployment.start(where, 1, secure=True)


def test_renew_replaces_the_server_certificate_from_the_same_ca(
    tmp_path, monkeypatch, capsys
):
    certs, ca_dir = tmp_path / "certs", tmp_path / "ca"
    security.main(["tls", "--dir", str(certs), "--ca-dir", str(ca_dir)])
    assert f"CA key: {ca_dir / 'ca.key'} - keep it off" in capsys.readouterr().out
    files = security.tls_files(certs)
    with monkeypatch.context() as patch:  # a server certificate near its end
        patch.setattr(security, "VALID_DAYS", 10)
        security.renew_server_cert(certs, ca_dir)
    with pytest.raises(ValueError, match="server.pem expires on"):
        security.check_not_expiring([files.server_cert], "renew")
    security.main(["renew", "--dir", str(certs), "--ca-dir", str(ca_dir)])
    assert "Renewed" in capsys.readouterr().out
    security.check_not_expiring([files.ca_cert, files.server_cert], "renew")
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert security._certificate_names(server) == ["localhost", "127.0.0.1"]
    assert _mode(files.server_key) == 0o600
    assert not list(certs.glob("*.new"))
    with pytest.raises(ValueError, match=r"--host 'evil.example' is not allowed"):
        security.renew_server_cert(certs, ca_dir, ["evil.example"])


def test_renew_refuses_an_expiring_ca(tmp_path, monkeypatch):
    _expiring_tls(monkeypatch, tmp_path / "certs", 10, ca_dir=tmp_path / "ca")
    with pytest.raises(ValueError, match=r"ca.crt expires on .*make a new CA"):
        security.renew_server_cert(tmp_path / "certs", tmp_path / "ca")


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_renew_keeps_the_ca_so_supernodes_and_users_keep_trusting_it(tmp_path):
    certs, ca_dir = tmp_path / "certs", tmp_path / "ca"
    files = security.make_tls_files(certs, ca_dir=ca_dir)
    before, ca_before = _contents(certs), _contents(ca_dir)
    security.renew_server_cert(certs, ca_dir)
    after = _contents(certs)
    assert after["ca.crt"] == before["ca.crt"]  # what SuperNodes and flwr trust
    assert _contents(ca_dir) == ca_before  # the CA's certificate and key
    assert after["server.pem"] != before["server.pem"]
    assert after["server.key"] != before["server.key"]
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(after["server.pem"]).verify_directly_issued_by(ca)


def test_a_secure_restart_keeps_the_ca_and_the_supernodes_keys(tmp_path):
    where = security.owned_dir(tmp_path / "dep", private=False)
    dep = deployment.Deployment(where, "test", 9092, secure=True)
    deployment._prepare_tls(dep, renew=False)  # the first start
    key = deployment._supernode_key(dep, "supernode-0")
    tls, keys = _contents(dep.certs), _contents(dep.keys)
    assert set(tls) == {"ca.crt", "server.pem", "server.key"}
    assert set(keys) == {"supernode-0", "supernode-0.pub"}
    # start after stop, in the same folder: every file is reused as it is.
    deployment._check_reused_tls(where)
    deployment._prepare_tls(dep, renew=False)
    assert deployment._supernode_key(dep, "supernode-0") == key
    assert _contents(dep.certs) == tls and _contents(dep.keys) == keys
    argv = deployment.supernode_argv(dep, "partition-id=0 num-partitions=1", 9094, key)
    assert argv[argv.index("--root-certificates") + 1] == str(dep.certs / "ca.crt")
    # start --renew: a new CA and server certificate; the keys (registered) stay.
    deployment._prepare_tls(dep, renew=True)
    renewed = _contents(dep.certs)
    assert renewed["ca.crt"] != tls["ca.crt"]
    assert renewed["server.pem"] != tls["server.pem"]
    assert _contents(dep.keys) == keys
    ca = x509.load_pem_x509_certificate(renewed["ca.crt"])
    x509.load_pem_x509_certificate(renewed["server.pem"]).verify_directly_issued_by(ca)
    assert not (dep.certs / "ca.key").exists()  # the new CA's key is not kept


@pytest.mark.parametrize("host", ["*.example.org", "a b", "", "x" * 254])
def test_tls_refuses_hosts_a_certificate_cannot_carry(tmp_path, host):
    with pytest.raises(ValueError, match="is not allowed"):
        security.make_tls_files(tmp_path / "certs", [host])
    assert not (tmp_path / "certs").exists()


# --- Files and folders -----------------------------------------------------------


@pytest.mark.parametrize(
    "link",
    [
        "deployment.json",
        "deployment.lock",
        "superlink.log",
        "certs/server.key",
        "certs/ca.crt",
        "keys/supernode-0",
    ],
)
def test_start_refuses_a_symlink_in_place_of_its_files(tmp_path, link):
    where = tmp_path / "dep"
    (where / link).parent.mkdir(mode=0o700, parents=True)
    target = tmp_path / "elsewhere"
    target.write_text("not the deployment's")
    (where / link).symlink_to(target)
    with pytest.raises(ValueError, match=rf"{link} is a symbolic link: refused"):
        deployment.start(where, 1, secure=True)
    assert target.read_text() == "not the deployment's"
    assert [p.name for p in where.iterdir()] == [link.split("/")[0]]  # nothing new


def test_state_and_logs_are_never_written_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("not the deployment's")
    where = tmp_path / "dep"
    where.mkdir(mode=0o700)
    dep = deployment.Deployment(where, "test", 0, secure=False)
    (where / "deployment.json").symlink_to(target)
    dep.save()  # replaces the link, does not follow it
    assert not (where / "deployment.json").is_symlink()
    (where / "probe.log").symlink_to(target)
    with pytest.raises(ValueError, match=r"probe.log is a symbolic link"):
        dep.spawn("probe", ["true"])
    assert target.read_text() == "not the deployment's"
    assert dep.processes == {}


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_a_folder_of_another_user_is_refused(tmp_path):
    where = tmp_path / "dep"
    where.mkdir(mode=0o700)
    os.chown(where, NOBODY, NOBODY)
    message = rf"{where} belongs to uid {NOBODY}: refused; expected your own"
    with pytest.raises(ValueError, match=message):
        deployment.start(where, 1)
    with pytest.raises(ValueError, match=message):
        security.make_supernode_key(where, "org-1")
    assert list(where.iterdir()) == []


@pytest.mark.parametrize(
    ("folder", "mode", "make"),
    [
        ("dep", 0o775, lambda p: deployment.start(p, 1)),
        ("keys", 0o755, lambda p: security.make_supernode_key(p, "org-1")),
        ("certs", 0o750, lambda p: security.make_tls_files(p)),
    ],
)
def test_a_folder_others_can_change_or_read_keys_in_is_refused(
    tmp_path, folder, mode, make
):
    path = tmp_path / folder
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(ValueError, match=rf"{path} has mode 0{mode:o}: refused"):
        make(path)
    assert list(path.iterdir()) == []


# --- Connection names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("default", "Flower's configuration uses it itself"),
        ("local", "Flower's configuration uses it itself"),
        ("supergrid", "Flower's configuration uses it itself"),
        ("a.b", "expected letters, digits, '-' and '_'"),
        ("", "expected letters, digits, '-' and '_'"),
    ],
)
def test_start_refuses_a_reserved_or_malformed_connection_name(tmp_path, name, message):
    with pytest.raises(ValueError, match=rf"--connection '{name}' is not allowed: "):
        deployment.start(tmp_path / "dep", 1, connection=name)
    with pytest.raises(ValueError, match=message):
        deployment.check_connection(name, None)
    assert not (tmp_path / "dep").exists()


def test_start_refuses_a_connection_the_user_has_but_its_own(tmp_path, flwr_home):
    mine = SuperLinkConnection(name="mine", address="10.0.0.1:9093", insecure=True)
    write_superlink_connection(mine)
    with pytest.raises(ValueError, match=r"has a connection of that name already"):
        deployment.start(tmp_path / "dep", 1, connection="mine")
    assert not (tmp_path / "dep").exists()
    assert _connections(flwr_home)["mine"]["address"] == "10.0.0.1:9093"
    # The same folder's stopped deployment may take its own connection back.
    own = deployment.Deployment(tmp_path, "own", 9092, secure=False)
    own.add_connection()
    deployment.check_connection("own", own)
    with pytest.raises(ValueError, match=r"--connection 'own' is not allowed"):
        deployment.check_connection("own", None)


def test_stop_removes_the_connection_start_added_and_no_other(tmp_path, flwr_home):
    dep = deployment.Deployment(tmp_path, "mine", 9092, secure=False)
    dep.save()
    dep.add_connection()
    other = SuperLinkConnection(name="other", address="10.0.0.1:9093", insecure=True)
    write_superlink_connection(other)
    assert deployment.stop(tmp_path)[1:] == ([], True)
    assert set(_connections(flwr_home)) == {"default", "local", "supergrid", "other"}
    # A connection of that name the user pointed elsewhere since is theirs.
    write_superlink_connection(
        SuperLinkConnection(name="mine", address="10.0.0.1:9092", insecure=True)
    )
    assert deployment.stop(tmp_path)[1:] == ([], False)
    assert "mine" in _connections(flwr_home)


# --- Stopping by PID, start time and boot ------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """An unrelated process leading its own group, as ours do; ended by PID."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("mismatch", ["command line", "start time", "boot"])
def test_stop_spares_a_process_that_took_a_recorded_pid(tmp_path, sleeper, mismatch):
    start_time = deployment._proc_info(sleeper.pid).start_time
    argv = ("sleep", "60")
    record, boot_id = {
        "command line": (
            deployment.ProcessRecord(sleeper.pid, start_time, ("flower-superlink",)),
            deployment._boot_id(),
        ),
        "start time": (
            deployment.ProcessRecord(sleeper.pid, start_time - 1, argv),
            deployment._boot_id(),
        ),
        "boot": (
            deployment.ProcessRecord(sleeper.pid, start_time, argv),
            "another-boot",
        ),
    }[mismatch]
    dep = deployment.Deployment(tmp_path, "test", 9092, secure=False, boot_id=boot_id)
    dep.processes["superlink"] = record
    dep.save()
    _, killed, _ = deployment.stop(tmp_path)
    time.sleep(0.5)
    assert sleeper.poll() is None, "stop signalled a process not the deployment's"
    assert killed == []
    assert deployment.Deployment.load(tmp_path).processes == {}


def test_stop_ends_recorded_processes_and_their_descendants(tmp_path):
    # A child in a session of its own, as Flower starts its SuperExec.
    code = (
        "import subprocess; "
        "p = subprocess.Popen(['sleep', '60'], start_new_session=True); "
        "print(p.pid, flush=True); p.wait()"
    )
    dep = deployment.Deployment(tmp_path, "test", 9092, secure=False)
    parent = dep.spawn("parent", [sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while not (tmp_path / "parent.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    child_pid = int((tmp_path / "parent.log").read_text())
    child = deployment.ProcessRecord(
        child_pid, deployment._proc_info(child_pid).start_time, ("sleep", "60")
    )
    try:
        assert dep.stop() == []  # both ended on SIGTERM
        assert not parent.running() and not child.running()
        assert dep.processes == {}
    finally:
        for proc in (parent, child):
            if proc.running():
                os.kill(proc.pid, signal.SIGKILL)


# A process that ignores SIGTERM, and says so once it does.
IGNORES_SIGTERM = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ignoring SIGTERM', flush=True); time.sleep(60)",
]


def _wait_for_log(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{path}: no {text!r} within {timeout} s"
        time.sleep(0.05)


def test_stop_kills_a_process_that_ignores_sigterm_after_the_grace(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(deployment, "STOP_GRACE", 0.5)
    dep = deployment.Deployment(tmp_path, "test", 9092, secure=False)
    stubborn = dep.spawn("stubborn", IGNORES_SIGTERM)
    try:
        _wait_for_log(tmp_path / "stubborn.log", "ignoring SIGTERM")
        start = time.monotonic()
        deployment.main(["stop", "--dir", str(tmp_path)])
        assert 0.5 <= time.monotonic() - start < 5.0  # the grace, then SIGKILL
        assert not stubborn.running()
        assert deployment.Deployment.load(tmp_path).processes == {}
        out = capsys.readouterr().out
        assert f"Stopped the deployment in {tmp_path} (1 had to be killed)" in out
    finally:
        if stubborn.running():
            os.kill(stubborn.pid, signal.SIGKILL)


# A process that starts another in a session of its own, as a SuperLink starts
# its SuperExec, and dies: what it started must not escape `stop`.
LEAVES_AN_ORPHAN = [
    sys.executable,
    "-c",
    "import subprocess, sys\n"
    "orphan = subprocess.Popen([sys.executable, '-c', 'import time; "
    "time.sleep(60)'], start_new_session=True)\n"
    "print('orphan', orphan.pid, flush=True)",
]


def test_stop_ends_what_a_dead_process_left_behind(tmp_path):
    # As when a SuperLink is SIGKILLed: its ServerApp lives on, no longer its
    # child, in no group of the deployment's. Its keeper adopted it.
    dep = deployment.Deployment(tmp_path, "test", 9092, secure=False)
    parent = dep.spawn("superlink", LEAVES_AN_ORPHAN)
    _wait_for_log(tmp_path / "superlink.log", "orphan")
    orphan = int((tmp_path / "superlink.log").read_text().split()[1])
    try:
        _wait(lambda: not parent.running())
        info = deployment._proc_info(orphan)
        assert info is not None and info.ppid == parent.keeper.pid  # adopted
        assert info.pgid == orphan  # in a group of its own
        deployment.stop(tmp_path)
        assert deployment._proc_info(orphan) is None or not deployment._running(
            orphan, info.start_time
        )
        _wait(lambda: not parent.keeper.running())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.05)


def test_stop_reports_the_pids_it_had_to_kill(tmp_path, monkeypatch):
    monkeypatch.setattr(deployment, "STOP_GRACE", 0.5)
    dep = deployment.Deployment(tmp_path, "test", 9092, secure=False)
    polite = dep.spawn("polite", ["sleep", "60"])
    stubborn = dep.spawn("stubborn", IGNORES_SIGTERM)
    try:
        _wait_for_log(tmp_path / "stubborn.log", "ignoring SIGTERM")
        _, killed, _ = deployment.stop(tmp_path)
        assert killed == [stubborn.pid]  # the one that ended on SIGTERM is not
        assert not polite.running() and not stubborn.running()
    finally:
        for proc in (polite, stubborn):
            if proc.running():
                os.kill(proc.pid, signal.SIGKILL)


# --- Ports and threads ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "supernodes", "threads"),
    [
        (2, 1, 2),
        (2, 2, 1),
        (2, 3, 1),  # never 0: each gets a thread
        (16, 3, 5),
        (16, 10, 1),
        (64, 10, 6),
        (128, 64, 2),
        (1, 64, 1),
    ],
)
def test_threads_per_supernode_share_the_cores(cores, supernodes, threads):
    assert deployment.threads_per_supernode(cores, supernodes) == threads


@pytest.mark.parametrize(("cores", "supernodes"), [(0, 1), (4, 0), (-2, 3)])
def test_threads_per_supernode_refuse_counts_below_one(cores, supernodes):
    message = rf"cores = {cores}, supernodes = {supernodes} is not allowed: expected"
    with pytest.raises(ValueError, match=message):
        deployment.threads_per_supernode(cores, supernodes)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A socket of this test's listening on a loopback port: the port is taken."""
    with socket.socket() as sock:
        sock.bind((deployment.LOOPBACK, 0))
        sock.listen()
        yield sock


def test_wait_for_port_wants_the_process_itself_listening(tmp_path, listener):
    dep = deployment.Deployment(tmp_path, "test", 0, secure=False)
    taken = listener.getsockname()[1]  # accepts connections: not the process's
    free = deployment.free_port()
    listens = (
        "import socket, sys, time; time.sleep(0.5); s = socket.socket(); "
        "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(60)"
    )
    server = dep.spawn("server", [sys.executable, "-c", listens, str(free)])
    try:
        message = rf"server did not listen on port {taken} within 1 s"
        with pytest.raises(RuntimeError, match=message):
            deployment.wait_for_port(dep, "server", taken, timeout=1.0)
        deployment.wait_for_port(dep, "server", free, timeout=10.0)
    finally:
        os.kill(server.pid, signal.SIGKILL)
        os.waitpid(server.keeper.pid, 0)  # which ends once its process has


def test_a_process_that_finds_its_port_taken_is_told_apart(tmp_path, listener):
    port = listener.getsockname()[1]
    dep = deployment.Deployment(tmp_path, "test", 0, secure=False)
    binds = f"import socket; socket.socket().bind(('127.0.0.1', {port}))"
    dep.spawn("taken", [sys.executable, "-c", binds])
    with pytest.raises(deployment.PortTakenError, match=r"(?s)taken exited.*in use"):
        deployment.wait_for_port(dep, "taken", port, timeout=10.0)
    # Any other early exit is a plain error.
    dep.spawn("crash", [sys.executable, "-c", "raise SystemExit('no key')"])
    with pytest.raises(RuntimeError, match=r"(?s)crash exited.*no key") as err:
        deployment.wait_for_port(dep, "crash", port, timeout=10.0)
    assert not isinstance(err.value, deployment.PortTakenError)


class _FakeStart:
    """`start` without processes: spawns are recorded, ports counted from 20001.

    `taken[name]` says how many of that process's waits find its port taken.
    """

    def __init__(self, monkeypatch, taken: dict[str, int]) -> None:
        self.taken = dict(taken)
        self.spawned: list[tuple[str, list[str], dict | None]] = []
        self.waited: list[tuple[str, int]] = []
        self.stopped = 0
        self.ports = iter(range(20001, 20100))
        monkeypatch.setattr(deployment, "free_port", lambda: next(self.ports))
        monkeypatch.setattr(deployment, "wait_for_port", self.wait_for_port)
        # Functions, not bound methods: the Deployment is their first argument.
        monkeypatch.setattr(
            deployment.Deployment, "spawn", lambda *args: self.spawn(*args)
        )
        monkeypatch.setattr(deployment.Deployment, "stop", lambda *a: self.stop(*a))
        monkeypatch.setattr(deployment.Deployment, "add_connection", lambda dep: None)

    def spawn(self, dep, name, argv, defaults=None) -> deployment.ProcessRecord:
        self.spawned.append((name, list(argv), defaults))
        dep.processes[name] = deployment.ProcessRecord(0, 0, tuple(argv))
        return dep.processes[name]

    def wait_for_port(self, dep, name, port, timeout) -> None:
        self.waited.append((name, port))
        if self.taken.get(name, 0) > 0:
            self.taken[name] -= 1
            raise deployment.PortTakenError(f"{name} exited: address already in use")

    def stop(self, dep, names=None) -> list[int]:
        self.stopped += 1
        return []


def _port_of(argv: list[str]) -> int:
    return int(argv[argv.index("--port") + 1])


def test_start_starts_a_process_whose_port_was_taken_again_on_another(
    tmp_path, monkeypatch
):
    fake = _FakeStart(monkeypatch, {"superlink": 1, "supernode-1": 1})
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    dep = deployment.start(tmp_path / "dep", 3)
    assert [(name, _port_of(argv)) for name, argv, _ in fake.spawned] == [
        ("superlink", 20001),
        ("superlink", 20002),  # 20001 was taken
        ("supernode-0", 20003),
        ("supernode-1", 20004),
        ("supernode-2", 20005),
        ("supernode-1", 20006),  # 20004 was taken
    ]
    assert fake.waited == [
        ("superlink", 20001),
        ("superlink", 20002),
        ("supernode-0", 20003),
        ("supernode-1", 20004),
        ("supernode-1", 20006),
        ("supernode-2", 20005),
    ]
    # Everything reaches the SuperLink where it listens in the end.
    assert dep.superlink_port == 20002 and dep.address == "127.0.0.1:20002"
    for _, argv, env in fake.spawned[2:]:
        assert argv[argv.index("--superlink") + 1] == "127.0.0.1:20002"
        assert env["OMP_NUM_THREADS"] == "5"  # 16 cores, 3 SuperNodes
    assert fake.stopped == 0


def test_an_insecure_start_runs_everything_insecure(tmp_path, monkeypatch, flwr_home):
    # The one deployment run end to end is secured; this is all that differs.
    add_connection = deployment.Deployment.add_connection
    fake = _FakeStart(monkeypatch, {})
    dep = deployment.start(tmp_path / "dep", 2)
    assert [name for name, _, _ in fake.spawned] == [
        "superlink",
        "supernode-0",
        "supernode-1",
    ]
    secured_only = {  # what the secured command lines add (superlink_argv, ...)
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--root-certificates",
        "--auth-supernode-private-key",
    }
    for _, argv, _ in fake.spawned:
        assert argv[-1] == "--insecure", argv
        assert not secured_only & set(argv), argv
    assert not dep.certs.exists() and not dep.keys.exists()
    add_connection(dep)  # the connection as `start` adds it
    assert _connections(flwr_home)[dep.connection] == {
        "address": dep.address,
        "insecure": True,
    }


def test_start_gives_up_after_port_tries_and_stops_what_it_started(
    tmp_path, monkeypatch
):
    fake = _FakeStart(monkeypatch, {"supernode-0": deployment.PORT_TRIES})
    message = (
        r"supernode-0: another program took each of the 3 ports it was started on "
        r"before it listened; the last: supernode-0 exited: address already in use"
    )
    with pytest.raises(deployment.PortTakenError, match=message):
        deployment.start(tmp_path / "dep", 1)
    assert [name for name, _, _ in fake.spawned] == ["superlink"] + 3 * ["supernode-0"]
    assert fake.stopped == 1  # the tear-down, by PID


# --- Command lines ---------------------------------------------------------------


def _exit(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a command line's `main(argv)` until it exits: (code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.mark.parametrize(
    ("main", "argv", "expected"),
    [
        (deployment.main, [], ["start", "stop"]),
        (
            deployment.main,
            ["start"],
            ["--supernodes", "--secure", "--renew", "--data-path", "--connection"],
        ),
        (deployment.main, ["stop"], ["--dir"]),
        (security.main, [], ["tls", "renew", "supernode-key"]),
        (security.main, ["tls"], ["--dir", "--ca-dir", "--host"]),
        (security.main, ["renew"], ["--dir", "--ca-dir", "--host"]),
        (security.main, ["supernode-key"], ["--dir", "--name"]),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else "",
)
def test_every_command_has_help(capsys, main, argv, expected):
    code, out, _ = _exit(main, [*argv, "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: python -m flower_tutorial.deployment")
    for option in expected:
        assert option in out, option


@pytest.mark.parametrize(
    ("module", "first_line"),
    [
        ("flower_tutorial.deployment", "usage: python -m flower_tutorial.deployment "),
        (
            "flower_tutorial.deployment.security",
            "usage: python -m flower_tutorial.deployment.security ",
        ),
    ],
)
def test_python_dash_m_runs_each_command_line(monkeypatch, capsys, module, first_line):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with warnings.catch_warnings():  # runpy: security is imported already
        warnings.simplefilter("ignore", RuntimeWarning)
        code, out, _ = _exit(
            lambda _: runpy.run_module(module, run_name="__main__"), [], capsys
        )
    assert code == 0 and out.startswith(first_line)


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        (deployment.main, [], "the following arguments are required: command"),
        (deployment.main, ["begin"], "invalid choice: 'begin'"),
        (
            deployment.main,
            ["start", "--supernodes", "many"],
            "argument --supernodes: invalid int value: 'many'",
        ),
        (deployment.main, ["start", "--bogus"], "unrecognized arguments: --bogus"),
        (
            deployment.main,
            ["start", "--data-path", "site-3"],
            "--data-path 'site-3' is not allowed: expected NODE=FOLDER, e.g. "
            "2=/data/site-2.",
        ),
        (
            deployment.main,
            ["start", "--supernodes", "0", "--dir", "DIR"],
            "error: --supernodes = 0 is not allowed: expected 1 to 64.",
        ),
        (
            deployment.main,
            ["start", "--renew", "--dir", "DIR"],
            "error: --renew is not allowed without --secure: it renews TLS files.",
        ),
        (deployment.main, ["stop", "--dir", "DIR"], "holds no deployment.json"),
        (security.main, [], "the following arguments are required: command"),
        (
            security.main,
            ["tls", "--dir", "DIR"],
            "the following arguments are required: --ca-dir",
        ),
        (
            security.main,
            ["tls", "--dir", "DIR", "--ca-dir", "DIR"],
            "error: --ca-dir 'DIR' is the SuperLink's folder: expected another one",
        ),
        (
            security.main,
            ["tls", "--dir", "DIR/certs", "--ca-dir", "DIR/ca", "--host", "*.org"],
            "error: --host '*.org' is not allowed: expected an IP address or a DNS",
        ),
        (
            security.main,
            ["supernode-key", "--dir", "DIR", "--name", "../org"],
            "error: --name '../org' is not allowed: expected letters, digits",
        ),
    ],
)
def test_bad_options_end_with_a_clear_error_and_exit_code_2(
    tmp_path, monkeypatch, capsys, main, argv, message
):
    def spawn(*args, **kwargs):
        raise AssertionError("a bad option went through: start spawned a process")

    monkeypatch.setattr(deployment.Deployment, "spawn", spawn)
    where = str(tmp_path / "dep")
    code, out, err = _exit(main, [a.replace("DIR", where) for a in argv], capsys)
    assert code == 2
    assert message.replace("DIR", where) in err
    assert out == ""
    assert not (tmp_path / "dep").exists()  # nothing made


def test_start_and_stop_options_reach_the_functions(tmp_path, monkeypatch, capsys):
    calls = []
    dep = deployment.Deployment(tmp_path, "site", 9092, secure=True)

    def start(*args, **kwargs):
        calls.append(("start", args, kwargs))
        return dep

    def stop(*args, **kwargs):
        calls.append(("stop", args, kwargs))
        return dep, [12, 13], True

    monkeypatch.setattr(deployment, "start", start)
    monkeypatch.setattr(deployment, "stop", stop)
    site_2, site_3 = str(tmp_path / "site-2"), str(tmp_path / "site-3")
    deployment.main(
        ["start", "--supernodes", "4", "--secure", "--renew", "--dir", "here"]
        + ["--data-path", f"2={site_2}", "--data-path", f"3={site_3}"]
        + ["--connection", "site"]
    )
    deployment.main(["start"])
    deployment.main(["stop", "--dir", "here"])
    assert calls == [
        (
            "start",
            (Path("here"), 4),
            {
                "secure": True,
                "renew": True,
                "data_paths": {2: site_2, 3: site_3},
                "connection": "site",
            },
        ),
        (
            "start",
            (Path("deployment"), 10),
            {
                "secure": False,
                "renew": False,
                "data_paths": {},
                "connection": "local-deployment",
            },
        ),
        ("stop", (Path("here"),), {}),
    ]
    out = capsys.readouterr().out
    assert "SuperLink at 127.0.0.1:9092 and 4 SuperNodes started" in out
    assert "flwr run . site --stream" in out
    assert (
        f"Stopped the deployment in {tmp_path} (2 had to be killed); removed "
        "connection 'site'." in out
    )


def test_security_options_reach_the_functions(tmp_path, monkeypatch, capsys):
    calls = []
    files = security.tls_files(tmp_path / "certs")

    def record(name, result):
        def function(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result

        return function

    monkeypatch.setattr(security, "make_tls_files", record("tls", files))
    monkeypatch.setattr(security, "renew_server_cert", record("renew", files))
    monkeypatch.setattr(
        security, "make_supernode_key", record("key", tmp_path / "keys" / "org-3")
    )
    security.main(["tls", "--dir", "c", "--ca-dir", "a", "--host", "sl.example"])
    security.main(["tls", "--dir", "c", "--ca-dir", "a", "--host", "localhost"])
    security.main(["renew", "--dir", "c", "--ca-dir", "a"])
    security.main(["renew", "--dir", "c", "--ca-dir", "a", "--host", "10.0.0.1"])
    security.main(["supernode-key", "--dir", "k", "--name", "org-3"])
    certs, ca = Path("c"), Path("a")
    assert calls == [
        # tls always adds the loopback names, once each.
        ("tls", (certs, ["sl.example", "127.0.0.1", "localhost"], ca), {}),
        ("tls", (certs, ["localhost", "127.0.0.1"], ca), {}),
        ("renew", (certs, ca, None), {}),  # None: the current names
        ("renew", (certs, ca, ["10.0.0.1"]), {}),
        ("key", (Path("k"), "org-3"), {}),
    ]
    out = capsys.readouterr().out
    assert "Certificate names: sl.example, 127.0.0.1, localhost" in out
    assert f"Private key: {tmp_path / 'keys' / 'org-3'}" in out


# --- Input, state and the lock -------------------------------------------------


def test_a_second_start_or_stop_in_the_folder_is_refused_while_one_runs(tmp_path):
    where = tmp_path / "dep"
    where.mkdir(mode=0o700)
    deployment.Deployment(where, "test", 9092, secure=False).save()
    with deployment._locked(where):  # the first start, still starting
        for action in (
            lambda: deployment.start(where, 1),
            lambda: deployment.stop(where),
        ):
            with pytest.raises(
                RuntimeError, match=r"is in use by another start or stop"
            ):
                action()
    assert not (where / "superlink.log").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_supernodes": 0}, r"--supernodes = 0 is not allowed: expected 1 to 64"),
        ({"num_supernodes": 65}, r"--supernodes = 65 is not allowed: expected 1 to 64"),
        (
            {"num_supernodes": 2, "data_paths": {2: "."}},
            r"--data-path 2=\.\.\. is not allowed: .*\[0, 2\)",
        ),
        (
            {"num_supernodes": 2, "data_paths": {1: "/no/such/site"}},
            r"--data-path 1='/no/such/site': no such folder",
        ),
        ({"num_supernodes": 1, "renew": True}, r"--renew is not allowed without"),
    ],
)
def test_start_refuses_bad_input_before_starting_anything(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        deployment.start(tmp_path / "dep", **kwargs)
    assert not (tmp_path / "dep").exists()


def test_stop_needs_a_started_deployment(tmp_path):
    with pytest.raises(ValueError, match=r"holds no deployment.json"):
        deployment.Deployment.load(tmp_path)
    (tmp_path / "deployment.json").write_text('{"pids": {"superlink": 1}}')
    with pytest.raises(ValueError, match=r"not a deployment record of this version"):
        deployment.stop(tmp_path)


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
    argv = [sys.executable, "-c", code]
    record = dep.spawn("probe", argv, {"OMP_NUM_THREADS": "1"})
    os.waitpid(record.keeper.pid, 0)  # which ends once its process has
    threads, path = (tmp_path / "probe.log").read_text().split(maxsplit=1)
    assert threads == expected
    # Flower's own commands are found in this environment first.
    assert path.startswith(str(Path(sys.executable).parent))
    state = json.loads((tmp_path / "deployment.json").read_text())
    keeper = record.keeper
    assert state["processes"] == {
        "probe": {
            "pid": record.pid,
            "start_time": record.start_time,
            "argv": argv,
            "keeper": {
                "pid": keeper.pid,
                "start_time": keeper.start_time,
                "argv": [
                    sys.executable,
                    "-m",
                    deployment.KEEPER,
                    keeper.argv[3],
                    *argv,
                ],
                "keeper": None,
            },
        }
    }
    assert deployment.Deployment.load(tmp_path).processes["probe"] == record
    assert state["boot_id"] == deployment._boot_id()
