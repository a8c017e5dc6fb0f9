"""Hosts for tests across machines: Linux network namespaces on one bridge.

A first namespace holds the bridge (the SuperLink's host, or a Ray head's); each
further one is linked to it by a veth pair, with its own address. Every namespace
maps the hosts' names to those addresses (`ip netns exec` bind-mounts
/etc/netns/<namespace>/hosts over /etc/hosts). `namespaces(...)` makes them and
removes them again, their links and hosts files too, also when a test fails; it
skips the test where it cannot (not root, no `ip`, no network namespaces).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUBNET = "10.213.7"  # inside the test's namespaces only: no route leads there
ETC_NETNS = Path("/etc/netns")


@dataclass
class Hosts:
    """The namespaces a test made, named from `prefix`, and their hosts files.

    `hub_name` is what the first host, which holds the bridge, is called; the others are
    node-0.test, node-1.test, ...
    """

    prefix: str
    num_nodes: int
    hub_name: str
    namespaces: list[str] = field(default_factory=list)
    made_etc_netns: bool = False

    @property
    def hub(self) -> str:
        """The first host's namespace: it holds the bridge."""
        return f"{self.prefix}-sl"

    def node(self, i: int) -> str:
        """Node `i`'s namespace."""
        return f"{self.prefix}-n{i}"

    @staticmethod
    def link(i: int) -> str:
        """The bridge's end of node `i`'s link, in the first host's namespace."""
        return f"vn{i}"

    @staticmethod
    def exec(namespace: str, argv: list[str]) -> list[str]:
        """Return `argv` run in `namespace` (with its hosts file as /etc/hosts)."""
        return ["ip", "netns", "exec", namespace, *argv]


def ip(*args: str) -> None:
    """Run `ip` with `args`; fail on an error."""
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def why_no_namespaces() -> str | None:
    """Return why this machine cannot make the hosts, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "network namespaces and /etc/netns/ need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"flt-probe-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def address(i: int | None) -> str:
    """The first host's address (None) or node `i`'s."""
    return f"{SUBNET}.1" if i is None else f"{SUBNET}.{10 + i}"


def _hosts_file(hosts: Hosts) -> str:
    """The names of the hosts, as every namespace sees them."""
    lines = ["127.0.0.1 localhost", f"{address(None)} {hosts.hub_name}"]
    lines += [f"{address(i)} node-{i}.test" for i in range(hosts.num_nodes)]
    return "\n".join(lines) + "\n"


def _add_namespace(hosts: Hosts, name: str) -> None:
    """Add namespace `name` with loopback up and the hosts' names."""
    if not ETC_NETNS.exists():
        ETC_NETNS.mkdir(mode=0o755)
        hosts.made_etc_netns = True
    ip("netns", "add", name)
    hosts.namespaces.append(name)
    (ETC_NETNS / name).mkdir(mode=0o755)
    (ETC_NETNS / name / "hosts").write_text(_hosts_file(hosts))
    ip("-n", name, "link", "set", "lo", "up")


def _build(hosts: Hosts) -> None:
    """Make the first host's namespace with a bridge, and a linked one per node."""
    hub = hosts.hub
    _add_namespace(hosts, hub)
    ip("-n", hub, "link", "add", "br0", "type", "bridge")
    ip("-n", hub, "addr", "add", f"{address(None)}/24", "dev", "br0")
    ip("-n", hub, "link", "set", "br0", "up")
    for i in range(hosts.num_nodes):
        node = hosts.node(i)
        _add_namespace(hosts, node)
        # A veth pair: one end on the bridge, the other the node's eth0.
        link = hosts.link(i)
        ip(
            *("-n", hub, "link", "add", link, "type", "veth"),
            *("peer", "name", "eth0", "netns", node),
        )
        ip("-n", hub, "link", "set", link, "master", "br0", "up")
        ip("-n", node, "addr", "add", f"{address(i)}/24", "dev", "eth0")
        ip("-n", node, "link", "set", "eth0", "up")


def _remove(hosts: Hosts) -> None:
    """Delete the namespaces (their links go with them) and their hosts files."""
    for name in reversed(hosts.namespaces):
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
    if hosts.made_etc_netns:
        with contextlib.suppress(OSError):  # not empty: someone else's now
            ETC_NETNS.rmdir()


def _listed(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line for line in listed.stdout.splitlines() if line.startswith(prefix)]


@contextlib.contextmanager
def namespaces(num_nodes: int, hub_name: str) -> Iterator[Hosts]:
    """The first host's and `num_nodes` nodes' namespaces; removed again after."""
    why = why_no_namespaces()
    if why is not None:
        pytest.skip(why)
    made = Hosts(f"flt{uuid.uuid4().hex[:6]}", num_nodes, hub_name)
    try:
        _build(made)
        yield made
    finally:
        _remove(made)
    assert not _listed(made.prefix), "namespaces left behind"
    assert not any((ETC_NETNS / name).exists() for name in made.namespaces)
